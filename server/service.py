"""Scheduling commands, shared by the WebSocket and REST front doors.

Authorization and input limits are decided here once; the store does the
transactional work; a committed change is then published to the broker so every
instance's rooms hear of it.
"""

from __future__ import annotations

import logging
from datetime import date

from protocol.errors import ErrorCode, SlotcastError
from protocol.messages import AppointmentView, DoctorView, Snapshot
from protocol.vocabulary import Role
from server.auth import Identity
from server.settings import Settings
from store.broker import Broker
from store.changes import Change
from store.constants import availability_channel
from store.database import Store
from store.errors import StoreError

log = logging.getLogger(__name__)


def forbidden(message: str) -> SlotcastError:
    return SlotcastError(message, code=ErrorCode.FORBIDDEN)


class Scheduling:
    def __init__(self, store: Store, broker: Broker, settings: Settings) -> None:
        self._store = store
        self._broker = broker
        self._settings = settings

    async def snapshot(self, doctor_id: int, start: date, end: date) -> Snapshot:
        days = (end - start).days
        if days < 1:
            raise SlotcastError("`end` must be after `start`", code=ErrorCode.INVALID)
        if days > self._settings.max_watch_days:
            raise SlotcastError(
                f"a range spans at most {self._settings.max_watch_days} days",
                code=ErrorCode.INVALID,
            )
        return await self._store.snapshot(doctor_id, start, end)

    async def doctors(self, query: str | None, limit: int, offset: int) -> list[DoctorView]:
        return await self._store.search_doctors(query, limit=limit, offset=offset)

    async def book(
        self, who: Identity, slot_id: int, idempotency_key: str | None
    ) -> AppointmentView:
        if not who.is_role(Role.PATIENT):
            raise forbidden("only patients book appointments")
        booking = await self._store.book(
            slot_id=slot_id, patient_id=who.subject, idempotency_key=idempotency_key
        )
        if booking.change is not None:
            await self.publish(booking.change)
        return booking.appointment

    async def publish(self, change: Change) -> None:
        """Best effort: a lost publish is a gap that watchers' rooms refill from the log."""
        try:
            await self._broker.publish(availability_channel(change.doctor_id), change.pack())
        except StoreError as exc:
            log.warning(
                "publish of doctor %s v%s failed: %s", change.doctor_id, change.version, exc
            )
