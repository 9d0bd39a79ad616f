"""Edges of the protocol an independent client found vague or wrong, pinned as documented.

Each test is one promise of docs/protocol.md that a client written from the page alone
relies on: dates at the ends of the calendar, a `mark` to a status that is no mark, an
identity switch by `auth`. Everything goes over a real loopback WebSocket (or REST) to
the in-process server, so what is asserted is what any client sees on the wire.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from client import ClientError, SlotcastClient
from protocol.errors import ErrorCode
from protocol.messages import Error, Message
from protocol.vocabulary import Role
from testkit.fixtures import SeededDoctor, token, ws_url
from testkit.wire import error_code

AppClient = TestClient[Any, Any]

FIRST, LAST = "0001-01-01", "9999-12-31"  # what Python's and most languages' dates hold


async def reply_to(client: SlotcastClient, kind: str, body: dict[str, Any]) -> Message:
    """Send a raw frame (the Python client's own types would refuse some of these) and
    return the reply with its id."""
    await client.send_raw(client._codec.dumps({"type": kind, "id": "edge", "body": body}))
    while True:
        event = await client.next_event()
        if isinstance(event, Error) or type(event).TYPE != "presence":
            return event


# ---- dates at the ends of the calendar ------------------------------------------------------


def date_frames(doctor_id: int) -> list[tuple[str, dict[str, Any]]]:
    return [
        ("watch_dashboard", {"doctor_id": doctor_id, "date": LAST}),
        ("watch_dashboard", {"doctor_id": doctor_id, "date": FIRST}),
        ("watch", {"doctor_id": doctor_id, "start": "9999-12-30", "end": LAST}),
        ("watch", {"doctor_id": doctor_id, "start": FIRST, "end": "0001-01-05"}),
        ("list_appointments", {"doctor_id": doctor_id, "date": LAST}),
        ("list_appointments", {"doctor_id": doctor_id, "date": FIRST}),
        (
            "set_schedule",
            {"doctor_id": doctor_id, "weekly": [], "overrides": [{"date": LAST}]},
        ),
    ]


async def test_dates_at_the_ends_of_the_calendar_are_invalid_not_internal(
    client: AppClient, doctor: SeededDoctor, caplog: pytest.LogCaptureFixture
) -> None:
    """9999-12-31 is a date in every language, but the day after it is none: the server
    refuses the first and last days as `invalid`, never fails on them (`internal`)."""
    caplog.set_level(logging.INFO)
    admin = token(Role.ADMIN, "ops")
    async with SlotcastClient.connect(ws_url(client), token=admin) as c:
        for kind, body in date_frames(doctor.id):
            reply = await reply_to(c, kind, body)
            assert isinstance(reply, Error), (kind, body, reply)
            assert reply.code == ErrorCode.INVALID, (kind, body, reply)
            assert "from 0001-01-02 to 9999-12-30" in reply.message
        # The nearest dates that are inside are fine.
        await c.watch_dashboard(doctor.id, date_of("9999-12-30"))
        await c.list_appointments(doctor.id, date_of("0001-01-02"))
    headers = {"Authorization": f"Bearer {admin}"}
    for url in (
        f"/api/doctors/{doctor.id}/slots?start=9999-12-30&end={LAST}",
        f"/api/doctors/{doctor.id}/slots?start={FIRST}&end=0001-01-05",
        f"/api/doctors/{doctor.id}/appointments?date={LAST}",
    ):
        assert await error_code(await client.get(url, headers=headers), 422) == "invalid"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def date_of(text: str) -> Any:
    from datetime import date

    return date.fromisoformat(text)


# keep ClientError imported for the tests below
_ = ClientError
