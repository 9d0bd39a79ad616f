"""The WebSocket protocol over real sockets: input hygiene, identity, watches and delta order.

Every test talks to the in-process server through a real loopback WebSocket, so the
codec negotiation, aiohttp's frame limits and the per-connection outbox are all
exercised as a browser or the Python client would meet them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any, Literal, cast

import aiohttp
import msgpack
import orjson
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from client import ClientError, SlotcastClient
from protocol.codec import JSON
from protocol.errors import ErrorCode
from protocol.messages import Error, Message, Pong, Welcome
from protocol.vocabulary import Role, SlotStatus
from server import auth
from server.app import create_app
from server.keys import CONNECTIONS
from server.settings import Settings
from store.pool import Store
from testkit.fixtures import SeededDoctor, seed_doctor, token, ws_url
from testkit.raw import RawWebSocket
from testkit.wire import WAIT_S, assert_no_delta_before_pong, deltas_before_pong, eventually

AppClient = TestClient[web.Request, web.Application]
RequestId = str | int | None
CodecName = Literal["json", "msgpack"]
CODEC_NAMES: list[CodecName] = ["json", "msgpack"]


class RecordingClient(SlotcastClient):
    """The stock client drops the request id of unsolicited frames; error echoes need it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.frames: asyncio.Queue[tuple[RequestId, Message]] = asyncio.Queue()
        super().__init__(*args, **kwargs)

    def _dispatch(self, rid: RequestId, message: Message) -> None:
        if not isinstance(message, Welcome):
            self.frames.put_nowait((rid, message))
        super()._dispatch(rid, message)

    async def next_frame(self, timeout: float = 5.0) -> tuple[RequestId, Message]:
        return await asyncio.wait_for(self.frames.get(), timeout)


@contextlib.asynccontextmanager
async def recording(url: str, codec: CodecName) -> AsyncIterator[RecordingClient]:
    async with RecordingClient.connect(url, codec=codec) as client:
        assert isinstance(client, RecordingClient)
        yield client


READY = {
    "status": "ready",
    "database": "up",
    "broker": "up",
    "rooms": 0,
    "watchers": 0,
    "dashboards": 0,
    "patient_rooms": 0,
}


async def next_error(client: SlotcastClient, timeout: float = 5.0) -> Error:
    event = await client.next_event(timeout)
    assert isinstance(event, Error), f"expected an error event, got {event!r}"
    return event


def encode(codec: CodecName, wire: Any) -> bytes:
    """Encode arbitrary (possibly invalid) wire data the way a client of `codec` would."""
    return orjson.dumps(wire) if codec == "json" else msgpack.packb(wire, use_bin_type=True)


def watch_frame(codec: CodecName, rid: RequestId, **body: Any) -> bytes:
    return encode(codec, {"type": "watch", "id": rid, "body": body})


# ---- bad input: an error reply with a stable code, and the connection lives on --------------

MAX_FRAME = Settings().max_frame_bytes
PADDED_PING = {"type": "ping", "id": "big", "body": {"pad": "x" * (MAX_FRAME + 10)}}

BAD_FRAMES: list[tuple[str, CodecName, bytes | str, ErrorCode, RequestId]] = [
    # (case, codec, frame, code, id the error reply must carry)
    ("malformed json", "json", '{"type": "ping", "id": "a"', ErrorCode.BAD_MESSAGE, None),
    ("json array", "json", '[{"type": "ping"}]', ErrorCode.BAD_MESSAGE, None),
    ("json scalar", "json", "42", ErrorCode.BAD_MESSAGE, None),
    (
        "json unknown type",
        "json",
        encode("json", {"type": "teleport", "id": "u-1", "body": {}}),
        ErrorCode.UNKNOWN_TYPE,
        "u-1",
    ),
    (
        "json unknown type, numeric id",
        "json",
        encode("json", {"type": "teleport", "id": 987654, "body": {}}),
        ErrorCode.UNKNOWN_TYPE,
        987654,
    ),
    (
        "json wrong field type",
        "json",
        watch_frame("json", "w-1", doctor_id="seven", start="2030-01-01", end="2030-01-08"),
        ErrorCode.INVALID,
        "w-1",
    ),
    (
        "json unreadable id",
        "json",
        encode("json", {"type": "ping", "id": True, "body": {}}),
        ErrorCode.BAD_MESSAGE,
        None,
    ),
    ("json too large", "json", encode("json", PADDED_PING), ErrorCode.TOO_LARGE, None),
    ("msgpack array", "msgpack", encode("msgpack", [1, 2, 3]), ErrorCode.BAD_MESSAGE, None),
    (
        "msgpack unknown type",
        "msgpack",
        encode("msgpack", {"type": "teleport", "id": "u-2", "body": {}}),
        ErrorCode.UNKNOWN_TYPE,
        "u-2",
    ),
    (
        "msgpack wrong field type",
        "msgpack",
        watch_frame("msgpack", "w-2", doctor_id=[1], start="2030-01-01", end="2030-01-08"),
        ErrorCode.INVALID,
        "w-2",
    ),
    ("msgpack too large", "msgpack", encode("msgpack", PADDED_PING), ErrorCode.TOO_LARGE, None),
    ("msgpack garbage", "msgpack", b"\xc1\xff\x00\x13garbage", ErrorCode.BAD_MESSAGE, None),
    (
        "msgpack truncated",
        "msgpack",
        encode("msgpack", {"type": "ping"})[:-2],
        ErrorCode.BAD_MESSAGE,
        None,
    ),
    ("text on msgpack", "msgpack", '{"type": "ping", "id": "t"}', ErrorCode.BAD_MESSAGE, None),
]


@pytest.mark.parametrize(
    ("codec", "frame", "code", "rid"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_FRAMES],
)
async def test_bad_frame_gets_error_and_connection_survives(
    client: AppClient, codec: CodecName, frame: bytes | str, code: ErrorCode, rid: RequestId
) -> None:
    """One bad frame must cost the client a reply, never its connection."""
    async with recording(ws_url(client), codec) as ws:
        await ws.send_raw(frame)
        reply_id, reply = await ws.next_frame()
        assert isinstance(reply, Error), reply
        assert reply.code == code
        assert reply_id == rid
        # The error is unsolicited from the client's point of view, so it is an event.
        assert await next_error(ws) == reply
        await ws.ping()
        _, pong = await ws.next_frame()
        assert isinstance(pong, Pong)


@pytest.mark.parametrize("codec", CODEC_NAMES)
async def test_frame_at_the_limit_is_accepted_and_one_byte_more_is_not(
    client: AppClient, codec: CodecName
) -> None:
    """The limit is inclusive: pin the boundary so an off-by-one in either layer shows."""

    def padded(size: int) -> bytes:
        frame = encode(codec, {"type": "ping", "id": "edge", "body": {"pad": ""}})
        pad = size - len(frame)
        frame = encode(codec, {"type": "ping", "id": "edge", "body": {"pad": "x" * pad}})
        # msgpack's string header grows with the length; trim back to the exact size.
        overshoot = len(frame) - size
        frame = encode(
            codec, {"type": "ping", "id": "edge", "body": {"pad": "x" * (pad - overshoot)}}
        )
        assert len(frame) == size
        return frame

    async with recording(ws_url(client), codec) as ws:
        await ws.send_raw(padded(MAX_FRAME))
        rid, reply = await ws.next_frame()
        assert (rid, reply) == ("edge", Pong())
        await ws.send_raw(padded(MAX_FRAME + 1))
        rid, reply = await ws.next_frame()
        assert isinstance(reply, Error)
        assert (rid, reply.code) == (None, ErrorCode.TOO_LARGE)


async def test_many_bad_frames_in_a_row_leave_the_connection_usable(
    client: AppClient, doctor: SeededDoctor
) -> None:
    """Errors must not accumulate state: after a burst of junk, real work still succeeds."""
    async with SlotcastClient.connect(ws_url(client)) as ws:
        for frame in ("{", "[]", "null", '{"type": 1}', '{"type": "nope"}'):
            await ws.send_raw(frame)
        codes = [(await next_error(ws)).code for _ in range(5)]
        assert codes == ["bad_message"] * 4 + ["unknown_type"]
        snapshot = await ws.watch(doctor.id, doctor.start, doctor.end)
        assert snapshot.slots == doctor.slots


# ---- frames beyond aiohttp's hard limit -----------------------------------------------------


async def test_huge_frame_closes_only_that_connection(
    client: AppClient, doctor: SeededDoctor
) -> None:
    """Past 4x the frame limit the server must not buffer: it closes (1009), and only that one."""
    url = ws_url(client)
    async with (
        SlotcastClient.connect(url, codec="msgpack") as bystander,
        SlotcastClient.connect(url, token=token(sub="p-huge")) as patient,
        client.ws_connect("/ws", protocols=[JSON.subprotocol]) as raw,
    ):
        snapshot = await bystander.watch(doctor.id, doctor.start, doctor.end)
        welcome = await raw.receive(timeout=5)
        assert welcome.type is WSMsgType.TEXT
        await raw.send_str('{"type":"ping","id":1,"body":{"pad":"' + "x" * (MAX_FRAME * 4) + '"}}')
        closing = await raw.receive(timeout=5)
        assert closing.type is WSMsgType.CLOSE, closing
        assert closing.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
        assert raw.close_code == 1009

        await bystander.ping()
        await patient.book(doctor.slots[0].id)
        delta = await bystander.next_delta(timeout=5)
        assert delta.version == snapshot.version + 1
        assert [s.id for s in delta.slots] == [doctor.slots[0].id]


# ---- identity --------------------------------------------------------------------------------


async def test_anonymous_can_watch_but_not_book(client: AppClient, doctor: SeededDoctor) -> None:
    """Public availability is public; booking needs a patient."""
    async with SlotcastClient.connect(ws_url(client)) as ws:
        welcome = await ws.welcome()
        assert (welcome.subject, welcome.role) == (None, None)
        snapshot = await ws.watch(doctor.id, doctor.start, doctor.end)
        assert snapshot.slots
        with pytest.raises(ClientError) as caught:
            await ws.book(snapshot.slots[0].id)
        assert caught.value.code == ErrorCode.UNAUTHENTICATED


async def test_welcome_names_the_header_identity(client: AppClient) -> None:
    """The client learns who the server thinks it is before sending anything."""
    async with SlotcastClient.connect(ws_url(client), token=token(Role.DOCTOR, "doc-9")) as ws:
        welcome = await ws.welcome()
        assert welcome.subject == "doc-9"
        assert welcome.role == Role.DOCTOR
        assert welcome.instance == "test-instance"
        assert welcome.protocol == "slotcast.v1"


async def test_expired_header_token_connects_as_anonymous_and_says_why(
    client: AppClient, doctor: SeededDoctor
) -> None:
    """Refusing the upgrade would hide the reason from browsers; an error frame does not."""
    expired = token(sub="p-old", ttl=timedelta(minutes=-1))
    async with SlotcastClient.connect(ws_url(client), token=expired) as ws:
        welcome = await ws.welcome()
        assert (welcome.subject, welcome.role) == (None, None)
        assert (await next_error(ws)).code == ErrorCode.TOKEN_EXPIRED
        with pytest.raises(ClientError) as caught:
            await ws.book(doctor.slots[0].id)
        assert caught.value.code == ErrorCode.UNAUTHENTICATED


async def test_header_token_signed_with_another_secret_is_token_invalid(
    client: AppClient,
) -> None:
    forged = auth.issue("some-other-secret-of-sufficient-length", subject="x", role=Role.ADMIN)
    async with SlotcastClient.connect(ws_url(client), token=forged) as ws:
        welcome = await ws.welcome()
        assert welcome.role is None
        assert (await next_error(ws)).code == ErrorCode.TOKEN_INVALID


@pytest.mark.parametrize(
    ("make", "code"),
    [
        pytest.param(
            lambda: token(sub="p-old", ttl=timedelta(seconds=-5)),
            ErrorCode.TOKEN_EXPIRED,
            id="expired",
        ),
        pytest.param(
            lambda: auth.issue(
                "another-secret-entirely-0123456789", subject="p", role=Role.PATIENT
            ),
            ErrorCode.TOKEN_INVALID,
            id="other-secret",
        ),
        pytest.param(lambda: "not.a.jwt", ErrorCode.TOKEN_INVALID, id="garbage"),
    ],
)
async def test_bad_token_in_auth_message_is_refused(
    client: AppClient, doctor: SeededDoctor, make: Callable[[], str], code: ErrorCode
) -> None:
    """A refused `auth` must not leave the connection with any identity."""
    async with SlotcastClient.connect(ws_url(client)) as ws:
        with pytest.raises(ClientError) as caught:
            await ws.auth(make())
        assert caught.value.code == code
        with pytest.raises(ClientError) as booking:
            await ws.book(doctor.slots[0].id)
        assert booking.value.code == ErrorCode.UNAUTHENTICATED


@pytest.mark.parametrize("codec", CODEC_NAMES)
async def test_token_in_auth_message_then_books(
    client: AppClient, doctor: SeededDoctor, codec: CodecName
) -> None:
    """Browsers cannot set WebSocket headers, so the `auth` message must be a full substitute."""
    async with SlotcastClient.connect(
        ws_url(client),
        token=token(sub="p-msg"),
        token_in_header=False,
        codec=codec,
    ) as ws:
        assert (await ws.welcome()).subject is None  # nothing in the header
        appointment = await ws.book(doctor.slots[0].id)
        assert appointment.patient_id == "p-msg"
        assert appointment.slot_id == doctor.slots[0].id


async def test_auth_message_reply_carries_identity(client: AppClient) -> None:
    async with SlotcastClient.connect(ws_url(client)) as ws:
        who = await ws.auth(token(Role.ADMIN, "admin-1", ttl=timedelta(hours=1)))
        assert (who.subject, who.role) == ("admin-1", Role.ADMIN)
        assert who.expires_at is not None


@pytest.mark.parametrize("role", [Role.DOCTOR, Role.ADMIN])
async def test_non_patients_cannot_book(
    client: AppClient, doctor: SeededDoctor, role: Role
) -> None:
    async with SlotcastClient.connect(ws_url(client), token=token(role, "staff-1")) as ws:
        with pytest.raises(ClientError) as caught:
            await ws.book(doctor.slots[0].id)
        assert caught.value.code == ErrorCode.FORBIDDEN


# ---- watch validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start_offset", "end_offset"),
    [
        pytest.param(0, 0, id="empty range"),
        pytest.param(3, 1, id="end before start"),
        pytest.param(0, 63, id="63 days"),
    ],
)
async def test_bad_watch_range_is_invalid(
    client: AppClient, doctor: SeededDoctor, start_offset: int, end_offset: int
) -> None:
    """A room must never be left behind by a refused watch, or it would leak subscriptions."""
    async with SlotcastClient.connect(ws_url(client)) as ws:
        with pytest.raises(ClientError) as caught:
            await ws.watch(
                doctor.id,
                doctor.start + timedelta(days=start_offset),
                doctor.start + timedelta(days=end_offset),
            )
        assert caught.value.code == ErrorCode.INVALID
        resp = await client.get("/readyz")
        assert (await resp.json())["rooms"] == 0


async def test_watch_of_62_days_is_allowed(client: AppClient, doctor: SeededDoctor) -> None:
    """The limit is inclusive; the 63-day case above only means something next to this one."""
    async with SlotcastClient.connect(ws_url(client)) as ws:
        snapshot = await ws.watch(doctor.id, doctor.start, doctor.start + timedelta(days=62))
        assert snapshot.slots


async def test_unknown_doctor_is_not_found_and_connection_can_still_watch(
    client: AppClient, doctor: SeededDoctor
) -> None:
    async with SlotcastClient.connect(ws_url(client)) as ws:
        with pytest.raises(ClientError) as caught:
            await ws.watch(doctor.id + 1000, doctor.start, doctor.end)
        assert caught.value.code == ErrorCode.NOT_FOUND
        snapshot = await ws.watch(doctor.id, doctor.start, doctor.end)
        assert snapshot.doctor_id == doctor.id
        assert [s.id for s in snapshot.slots] == [s.id for s in doctor.slots]
        # The refused watch left no room (nor broker subscription) behind.
        resp = await client.get("/readyz")
        assert await resp.json() == {**READY, "rooms": 1, "watchers": 1}


async def test_watch_limit(settings: Settings, store: Store, aiohttp_client: AiohttpClient) -> None:
    """Watches cost server memory and broker subscriptions, so each connection gets a budget."""
    app_client = await aiohttp_client(create_app(settings.replace(max_watches=2)))
    doctors = [await seed_doctor(store, name=f"Dr. {n}") for n in "ABC"]
    a, b, c = doctors
    async with SlotcastClient.connect(ws_url(app_client)) as ws:
        await ws.watch(a.id, a.start, a.end)
        await ws.watch(b.id, b.start, b.end)
        with pytest.raises(ClientError) as caught:
            await ws.watch(c.id, c.start, c.end)
        assert caught.value.code == ErrorCode.LIMIT_EXCEEDED
        # Replacing a watch at the limit is not a new watch.
        again = await ws.watch(a.id, a.start, a.start + timedelta(days=1))
        assert again.doctor_id == a.id
        # Freeing a place makes room for the refused one.
        await ws.unwatch(b.id)
        assert (await ws.watch(c.id, c.start, c.end)).doctor_id == c.id


async def test_rewatch_replaces_the_old_watch(client: AppClient, doctor: SeededDoctor) -> None:
    """Two live watches of one doctor would send every delta twice."""
    async with (
        SlotcastClient.connect(ws_url(client)) as watcher,
        SlotcastClient.connect(ws_url(client), token=token(sub="p-rw")) as patient,
    ):
        await watcher.watch(doctor.id, doctor.start, doctor.end)
        second = await watcher.watch(doctor.id, doctor.start, doctor.start + timedelta(days=2))
        await patient.book(doctor.slots[0].id)
        delta = await watcher.next_delta()
        assert delta.version == second.version + 1
        await assert_no_delta_before_pong(watcher)


async def test_refused_rewatch_keeps_the_old_watch(client: AppClient, doctor: SeededDoctor) -> None:
    """A refused command must change nothing; the client still believes it is watching."""
    async with (
        SlotcastClient.connect(ws_url(client)) as watcher,
        SlotcastClient.connect(ws_url(client), token=token(sub="p-rf")) as patient,
    ):
        snapshot = await watcher.watch(doctor.id, doctor.start, doctor.end)
        with pytest.raises(ClientError) as caught:
            await watcher.watch(doctor.id, doctor.end, doctor.start)
        assert caught.value.code == ErrorCode.INVALID
        assert doctor.id in watcher.calendars  # the client kept its calendar...
        await patient.book(doctor.slots[0].id)
        deltas = await deltas_before_pong(watcher)  # ...so the server must keep feeding it
        assert [d.version for d in deltas] == [snapshot.version + 1]


async def test_unwatch_stops_deltas(client: AppClient, doctor: SeededDoctor) -> None:
    async with (
        SlotcastClient.connect(ws_url(client), codec="msgpack") as watcher,
        SlotcastClient.connect(ws_url(client), token=token(sub="p-uw")) as patient,
    ):
        snapshot = await watcher.watch(doctor.id, doctor.start, doctor.end)
        await patient.book(doctor.slots[0].id)
        delta = await watcher.next_delta()  # the watch was live: the absence below means something
        assert delta.version == snapshot.version + 1
        await watcher.unwatch(doctor.id)
        await patient.book(doctor.slots[1].id)
        await assert_no_delta_before_pong(watcher)
        resp = await client.get("/readyz")
        assert (await resp.json())["rooms"] == 0


async def test_unwatch_of_a_doctor_not_watched_is_harmless(client: AppClient) -> None:
    async with SlotcastClient.connect(ws_url(client)) as ws:
        await ws.unwatch(12345)
        await ws.ping()


# ---- ordering ----------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODEC_NAMES)
async def test_n_bookings_give_n_deltas_in_version_order(
    client: AppClient, doctor: SeededDoctor, codec: CodecName
) -> None:
    """Clients apply deltas as `previous + 1`; any gap, duplicate or reorder forces a resync."""
    n = 8
    async with SlotcastClient.connect(ws_url(client), codec=codec) as watcher:
        snapshot = await watcher.watch(doctor.id, doctor.start, doctor.end)
        booked = []
        for slot in doctor.slots[:n]:
            # A patient each: one may have only a few of a doctor's slots.
            async with SlotcastClient.connect(
                ws_url(client), token=token(sub=f"p-n{slot.id}")
            ) as patient:
                booked.append((await patient.book(slot.id)).slot_id)
        deltas = [await watcher.next_delta() for _ in range(n)]
        assert [d.version for d in deltas] == list(
            range(snapshot.version + 1, snapshot.version + n + 1)
        )
        assert [d.slots[0].id for d in deltas] == booked
        assert all(d.slots[0].status == SlotStatus.BUSY for d in deltas)
        await assert_no_delta_before_pong(watcher)
        calendar = watcher.calendars[doctor.id]
        assert calendar.version == snapshot.version + n
        assert calendar.resyncs == 0


async def test_concurrent_bookings_still_arrive_contiguously(
    client: AppClient, doctor: SeededDoctor
) -> None:
    """Publishes from concurrent commits may overtake each other; rooms must reorder them."""
    n = 10
    url = ws_url(client)
    async with SlotcastClient.connect(url) as watcher:
        snapshot = await watcher.watch(doctor.id, doctor.start, doctor.end)

        async def book(i: int) -> int:
            async with SlotcastClient.connect(url, token=token(sub=f"p-c{i}")) as p:
                return (await p.book(doctor.slots[i].id)).slot_id

        booked = await asyncio.gather(*(book(i) for i in range(n)))
        deltas = [await watcher.next_delta() for _ in range(n)]
        assert [d.version for d in deltas] == list(
            range(snapshot.version + 1, snapshot.version + n + 1)
        )
        assert sorted(d.slots[0].id for d in deltas) == sorted(booked)


async def test_a_client_that_answers_no_ping_is_dropped_and_one_that_answers_stays(
    settings: Settings, aiohttp_client: AiohttpClient
) -> None:
    """The heartbeat is one sweep over every connection (server.connection.heartbeat):
    a client silent for `heartbeat_s` is pinged, and dropped if no frame comes back
    within half that. A raw socket that never answers is gone after a few intervals;
    the library client, which answers every ping, is still served after as many."""
    app = create_app(settings.replace(heartbeat_s=0.4))
    client = cast(AppClient, await aiohttp_client(app))
    assert client.server.host is not None
    assert client.server.port is not None
    async with SlotcastClient.connect(ws_url(client)) as alive:
        raw = await RawWebSocket.connect(client.server.host, client.server.port)
        try:
            await eventually(lambda: len(app[CONNECTIONS]) == 1, "the silent client dropped")
            loop = asyncio.get_running_loop()
            received = b""
            async with asyncio.timeout(WAIT_S):
                while chunk := await loop.sock_recv(raw.sock, 4096):
                    received += chunk
            assert b"\x89\x00" in received  # the ping it did not answer, then the end
        finally:
            raw.close()
        await asyncio.sleep(4 * 0.4)  # several heartbeats: pinged, answered, never dropped
        await alive.ping()
        assert len(app[CONNECTIONS]) == 1
