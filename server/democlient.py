"""`slotcast watch` and `slotcast book`: the Python client driven from a terminal.

They exist so a newcomer can see the live slice with nothing but the CLI: two
terminals watching a demo doctor, a third booking, both watchers updating.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import date, timedelta

from protocol.messages import Delta
from protocol.vocabulary import SlotStatus
from server.client import ClientError, SlotcastClient


async def watch(url: str, doctor_id: int, days: int, codec: str) -> int:
    start = date.today()
    async with SlotcastClient.connect(url, codec="msgpack" if codec == "msgpack" else "json") as c:
        snapshot = await c.watch(doctor_id, start, start + timedelta(days=days))
        free = sum(1 for s in snapshot.slots if s.status is SlotStatus.FREE)
        print(
            f"doctor {doctor_id} ({snapshot.timezone}) v{snapshot.version}: "
            f"{free} free of {len(snapshot.slots)} slots; watching ({codec})...",
            flush=True,
        )
        with contextlib.suppress(asyncio.CancelledError, KeyboardInterrupt):
            while True:
                event = await c.events.get()
                if isinstance(event, Delta):
                    for slot in event.slots:
                        print(
                            f"v{event.version}: slot {slot.id} at "
                            f"{slot.start.isoformat()} is now {slot.status.value}",
                            flush=True,
                        )
    return 0


async def book_first_free(url: str, token: str, doctor_id: int) -> int:
    start = date.today() + timedelta(days=1)
    async with SlotcastClient.connect(url, token=token) as c:
        snapshot = await c.watch(doctor_id, start, start + timedelta(days=14))
        free = [s for s in snapshot.slots if s.status is SlotStatus.FREE]
        if not free:
            print("no free slot in the next two weeks")
            return 1
        try:
            appointment = await c.book(free[0].id)
        except ClientError as exc:
            print(f"refused: {exc.code.value}: {exc.message}")
            return 1
        print(
            f"booked appointment {appointment.id}: slot {appointment.slot_id} "
            f"at {appointment.start.isoformat()} for {appointment.patient_id}"
        )
    return 0
