"""The typed command API, and the live state it keeps across reconnects.

Each protocol command is one method returning the reply's useful part, so a
caller never handles envelopes. The rooms a caller joined (calendars,
dashboards, the patient's appointments) are remembered here because only the
command API knows how to join them again after `client.connection` reconnects.
"""

from __future__ import annotations

import logging
from datetime import date, datetime
from typing import Any

from client.calendars import Calendar
from client.connection import Connection
from protocol.messages import (
    Appointments,
    AppointmentUpdated,
    AppointmentView,
    Block,
    Book,
    Booked,
    Cancel,
    CreateDoctor,
    Dashboard,
    DayOverride,
    Delta,
    Doctors,
    DoctorUpdated,
    DoctorView,
    GetSchedule,
    Held,
    Hold,
    ListAppointments,
    Mark,
    Message,
    MyAppointments,
    NextAvailable,
    NextSlot,
    Ping,
    Pong,
    Release,
    Reschedule,
    Rescheduled,
    Resumed,
    Resync,
    RetireDoctor,
    Schedule,
    ScheduleUpdated,
    SearchDoctors,
    SetSchedule,
    SlotUpdated,
    SlotView,
    Snapshot,
    Unblock,
    Unwatch,
    UnwatchDashboard,
    Unwatched,
    UpdateDoctor,
    Watch,
    WatchAppointments,
    WatchDashboard,
    WeeklyBlock,
)
from protocol.vocabulary import AppointmentStatus

log = logging.getLogger(__name__)


class SlotcastClient(Connection):
    """Open one with `SlotcastClient.connect(...)`, an async context manager."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # as Connection's; use `connect`
        super().__init__(*args, **kwargs)
        self._resyncing: set[int] = set()
        self.calendars: dict[int, Calendar] = {}
        self.dashboards: dict[int, date] = {}
        self.following = False

    # ---- watching ---------------------------------------------------------------------------

    async def watch(self, doctor_id: int, start: date, end: date) -> Snapshot:
        snapshot = await self.request(Watch(doctor_id, start, end), Snapshot)
        self.calendars[doctor_id] = Calendar(
            doctor_id, start, end, snapshot.version, {s.id: s for s in snapshot.slots}
        )
        return snapshot

    async def unwatch(self, doctor_id: int) -> None:
        await self.request(Unwatch(doctor_id), Unwatched)
        self.calendars.pop(doctor_id, None)

    async def watch_dashboard(self, doctor_id: int, day: date) -> Dashboard:
        dashboard = await self.request(WatchDashboard(doctor_id, day), Dashboard)
        self.dashboards[doctor_id] = day
        return dashboard

    async def unwatch_dashboard(self, doctor_id: int) -> None:
        await self.request(UnwatchDashboard(doctor_id), Unwatched)
        self.dashboards.pop(doctor_id, None)

    async def watch_appointments(self) -> list[AppointmentView]:
        reply = await self.request(WatchAppointments(), Appointments)
        self.following = True
        return reply.appointments

    async def next_delta(self, timeout: float = 10.0) -> Delta:
        while True:
            event = await self.next_event(timeout)
            if isinstance(event, Delta):
                return event

    # ---- commands ---------------------------------------------------------------------------

    async def book(
        self,
        slot_id: int | None = None,
        idempotency_key: str | None = None,
        *,
        hold_id: int | None = None,
        patient_id: str | None = None,
        patient_name: str | None = None,
        visit_reason: str | None = None,
        patient_contact: str | None = None,
    ) -> AppointmentView:
        """Book a free slot, or confirm a hold with `hold_id=`; with `patient_id=`, on
        that patient's behalf (the doctor, an admin, an API key with the `book` scope)."""
        request = Book(
            slot_id,
            idempotency_key,
            hold_id,
            patient_id,
            patient_name,
            visit_reason,
            patient_contact,
        )
        return (await self.request(request, Booked)).appointment

    async def hold(
        self,
        slot_id: int,
        idempotency_key: str | None = None,
        *,
        patient_id: str | None = None,
        patient_name: str | None = None,
        visit_reason: str | None = None,
        patient_contact: str | None = None,
    ) -> AppointmentView:
        request = Hold(
            slot_id, idempotency_key, patient_id, patient_name, visit_reason, patient_contact
        )
        return (await self.request(request, Held)).appointment

    async def release(
        self, appointment_id: int, idempotency_key: str | None = None
    ) -> AppointmentView:
        reply = await self.request(Release(appointment_id, idempotency_key), AppointmentUpdated)
        return reply.appointment

    async def cancel(
        self,
        appointment_id: int,
        reason: str,
        idempotency_key: str | None = None,
        *,
        patient_id: str | None = None,
    ) -> AppointmentView:
        reply = await self.request(
            Cancel(appointment_id, reason, idempotency_key, patient_id), AppointmentUpdated
        )
        return reply.appointment

    async def reschedule(
        self, appointment_id: int, slot_id: int, idempotency_key: str | None = None
    ) -> Rescheduled:
        return await self.request(Reschedule(appointment_id, slot_id, idempotency_key), Rescheduled)

    async def block(self, slot_id: int, idempotency_key: str | None = None) -> SlotView:
        return (await self.request(Block(slot_id, idempotency_key), SlotUpdated)).slot

    async def unblock(self, slot_id: int, idempotency_key: str | None = None) -> SlotView:
        return (await self.request(Unblock(slot_id, idempotency_key), SlotUpdated)).slot

    async def mark(
        self, appointment_id: int, status: AppointmentStatus, idempotency_key: str | None = None
    ) -> AppointmentView:
        reply = await self.request(
            Mark(appointment_id, status, idempotency_key), AppointmentUpdated
        )
        return reply.appointment

    async def set_schedule(
        self,
        doctor_id: int,
        weekly: list[WeeklyBlock],
        overrides: list[DayOverride] | None = None,
        *,
        slot_minutes: int = 30,
        buffer_minutes: int = 0,
        min_notice_minutes: int = 0,
        horizon_days: int = 28,
        idempotency_key: str | None = None,
    ) -> ScheduleUpdated:
        request = SetSchedule(
            doctor_id,
            weekly,
            overrides or [],
            slot_minutes=slot_minutes,
            buffer_minutes=buffer_minutes,
            min_notice_minutes=min_notice_minutes,
            horizon_days=horizon_days,
            idempotency_key=idempotency_key,
        )
        return await self.request(request, ScheduleUpdated)

    # ---- reads ------------------------------------------------------------------------------

    async def get_schedule(self, doctor_id: int) -> Schedule:
        """The schedule as `set_schedule` takes it: change a field, send the rest back."""
        return await self.request(GetSchedule(doctor_id), Schedule)

    async def next_available(
        self, doctor_id: int, after: datetime | None = None
    ) -> SlotView | None:
        """The doctor's first slot a patient may hold now (at or after `after`), or None."""
        return (await self.request(NextAvailable(doctor_id, after), NextSlot)).slot

    async def list_appointments(self, doctor_id: int, day: date) -> list[AppointmentView]:
        reply = await self.request(ListAppointments(doctor_id, day), Appointments)
        return reply.appointments

    async def my_appointments(self) -> list[AppointmentView]:
        return (await self.request(MyAppointments(), Appointments)).appointments

    async def search_doctors(
        self,
        q: str | None = None,
        limit: int = 20,
        offset: int = 0,
        *,
        include_retired: bool = False,
    ) -> list[DoctorView]:
        msg = SearchDoctors(q, limit, offset, include_retired)
        return (await self.request(msg, Doctors)).doctors

    # ---- the doctor directory (admins) --------------------------------------------------------

    async def create_doctor(
        self,
        name: str,
        timezone: str,
        specialty: str = "",
        external_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> DoctorUpdated:
        msg = CreateDoctor(name, timezone, specialty, external_id, idempotency_key)
        return await self.request(msg, DoctorUpdated)

    async def update_doctor(
        self,
        doctor_id: int,
        *,
        name: str | None = None,
        specialty: str | None = None,
        timezone: str | None = None,
        external_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> DoctorUpdated:
        msg = UpdateDoctor(doctor_id, name, specialty, timezone, external_id, idempotency_key)
        return await self.request(msg, DoctorUpdated)

    async def retire_doctor(
        self, doctor_id: int, idempotency_key: str | None = None
    ) -> DoctorUpdated:
        return await self.request(RetireDoctor(doctor_id, idempotency_key), DoctorUpdated)

    async def ping(self) -> None:
        await self.request(Ping(), Pong)

    # ---- staying current --------------------------------------------------------------------

    async def _rejoin(self) -> None:
        """Every room joined before the drop, each once per socket (see `_restored`)."""
        for calendar in list(self.calendars.values()):
            if ("availability", calendar.doctor_id) not in self._restored:
                await self._resume(calendar)
                self._restored.add(("availability", calendar.doctor_id))
        for doctor_id, day in list(self.dashboards.items()):
            if ("dashboard", doctor_id) not in self._restored:
                await self.watch_dashboard(doctor_id, day)
                self._restored.add(("dashboard", doctor_id))
        if self.following and ("appointments", None) not in self._restored:
            await self.watch_appointments()
            self._restored.add(("appointments", None))

    async def _resume(self, calendar: Calendar) -> None:
        """Ask for what was missed since the calendar's version; accept a snapshot instead."""
        request = Watch(calendar.doctor_id, calendar.start, calendar.end, since=calendar.version)
        reply = await self.request_any(request, (Snapshot, Resumed))
        if isinstance(reply, Snapshot):
            calendar.version = reply.version
            calendar.slots = {s.id: s for s in reply.slots}
            calendar.resyncs += 1

    def _on_push(self, message: Message) -> None:
        if isinstance(message, Unwatched):
            # The server left a private room on its own (the token expired, or `auth`
            # switched identity): it is not ours to restore after a reconnect any more.
            if message.room == "dashboard" and message.doctor_id is not None:
                self.dashboards.pop(message.doctor_id, None)
            elif message.room == "appointments":
                self.following = False
        elif isinstance(message, Resync):
            if message.doctor_id in self.calendars:
                self._resync(self.calendars[message.doctor_id])
            elif message.room == "appointments" and self.following:
                rewatch = self._retrying(self._ws, self.watch_appointments, "appointments resync")
                self._spawn(rewatch)
        elif isinstance(message, Delta):
            calendar = self.calendars.get(message.doctor_id)
            if calendar is not None and not calendar.apply(message):
                log.info(
                    "gap on doctor %s: v%s after v%s",
                    message.doctor_id,
                    message.version,
                    calendar.version,
                )
                self._resync(calendar)

    def _resync(self, calendar: Calendar) -> None:
        """A fresh snapshot replaces the calendar; one at a time per doctor, retried with
        backoff while it fails on this socket (a reconnect resumes the calendar instead)."""
        if calendar.doctor_id in self._resyncing:
            return
        self._resyncing.add(calendar.doctor_id)

        async def snapshot() -> None:
            if self.calendars.get(calendar.doctor_id) is not calendar:
                return  # unwatched, or replaced by a newer watch meanwhile
            await self.watch(calendar.doctor_id, calendar.start, calendar.end)
            self.calendars[calendar.doctor_id].resyncs = calendar.resyncs + 1

        async def resync() -> None:
            try:
                await self._retrying(self._ws, snapshot, f"resync of doctor {calendar.doctor_id}")
            finally:
                self._resyncing.discard(calendar.doctor_id)

        self._spawn(resync())
