"""An async Python client for the Slotcast protocol (used by the tests and benchmarks).

    async with SlotcastClient.connect("ws://127.0.0.1:8080/ws", token=tok) as client:
        snapshot = await client.watch(doctor_id, date(2026, 12, 1), date(2026, 12, 8))
        appointment = await client.book(snapshot.slots[0].id, idempotency_key="k1")
        delta = await client.next_event()

The client keeps a live `Calendar` per watched doctor: deltas are applied in
version order, and a delta that skips a version (a missed message) triggers a
fresh snapshot, so the calendar always converges to the server's state.

It is its own package, beside `server/` rather than inside it, because it needs
only `protocol/` and aiohttp: a program that talks to Slotcast should not import
the server. Reading order: `connection` (one socket, replies matched by id,
reconnect), then `commands` (one method per command, rooms rejoined after a
reconnect), then `calendars` (how deltas are applied), then `demo`
(`slotcast watch` and `slotcast book`).
"""

from client.calendars import Calendar
from client.commands import SlotcastClient
from client.connection import ClientError, Connection

__all__ = ["Calendar", "ClientError", "Connection", "SlotcastClient"]
