"""The first live slice, end to end over real WebSockets."""

from __future__ import annotations

from aiohttp.test_utils import TestClient

from client import SlotcastClient
from protocol.vocabulary import SlotStatus
from testkit.fixtures import SeededDoctor, token, ws_url


async def test_booking_reaches_watchers_in_both_codecs(
    client: TestClient, doctor: SeededDoctor
) -> None:
    url = ws_url(client)
    async with (
        SlotcastClient.connect(url, codec="json") as json_watcher,
        SlotcastClient.connect(url, codec="msgpack") as msgpack_watcher,
        SlotcastClient.connect(url, token=token(sub="p-1")) as patient,
    ):
        a = await json_watcher.watch(doctor.id, doctor.start, doctor.end)
        b = await msgpack_watcher.watch(doctor.id, doctor.start, doctor.end)
        slot = a.slots[0]
        appointment = await patient.book(slot.id)
        assert appointment.slot_id == slot.id
        for watcher, snap in ((json_watcher, a), (msgpack_watcher, b)):
            delta = await watcher.next_delta(timeout=5)
            assert delta.version == snap.version + 1
            assert [(s.id, s.status) for s in delta.slots] == [(slot.id, SlotStatus.BUSY)]
