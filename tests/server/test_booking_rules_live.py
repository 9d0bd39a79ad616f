"""A doctor's booking rules (notice, horizon) reach open pages with the schedule save.

A snapshot's bookable window comes from the rules; without them on the delta, a page
would show newly opened slots as "not bookable yet" until it read a snapshot again.
"""

from __future__ import annotations

from datetime import time, timedelta

from aiohttp import web
from aiohttp.test_utils import TestClient

from client import SlotcastClient
from protocol.messages import ScheduleUpdated, SetSchedule, WeeklyBlock
from protocol.vocabulary import Role
from testkit.fixtures import SeededDoctor, token, ws_url

AppClient = TestClient[web.Request, web.Application]
LONG = timedelta(hours=2)
EVERY_DAY = [WeeklyBlock(d, time(8), time(18)) for d in range(1, 8)]


async def test_every_schedule_save_carries_the_doctors_rules_to_watchers(
    client: AppClient, doctor: SeededDoctor
) -> None:
    url = ws_url(client)
    async with (
        SlotcastClient.connect(url, token=token(Role.DOCTOR, str(doctor.id), ttl=LONG)) as doc,
        SlotcastClient.connect(url, token=token(Role.PATIENT, "pat", ttl=LONG)) as pat,
    ):
        await pat.watch(doctor.id, doctor.start, doctor.end)
        [listed] = await pat.search_doctors("Dr. Test")
        assert (listed.min_notice_minutes, listed.horizon_days) == (0, 9)  # the seed's rules

        # Further ahead, with an hour's notice: new slots open, and the rules ride along.
        longer = SetSchedule(doctor.id, EVERY_DAY, min_notice_minutes=60, horizon_days=14)
        saved = await doc.request(longer, ScheduleUpdated)
        assert saved.opened > 0
        delta = await pat.next_delta()
        assert delta.version == saved.version
        assert len(delta.slots) == saved.opened
        assert delta.doctor is not None
        assert delta.doctor.id == doctor.id
        assert (delta.doctor.min_notice_minutes, delta.doctor.horizon_days) == (60, 14)
        assert delta.doctor.external_id is None  # the public entry

        # A save that changes nothing still carries them (cheaper than telling saves apart).
        again = await doc.request(longer, ScheduleUpdated)
        assert again.opened == 0
        same = await pat.next_delta()
        assert (same.version, same.slots, same.removed) == (again.version, [], [])
        assert same.doctor == delta.doctor
