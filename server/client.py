"""An async Python client for the Slotcast protocol (used by the tests and benchmarks).

    async with SlotcastClient.connect("ws://127.0.0.1:8080/ws", token=tok) as client:
        snapshot = await client.watch(doctor_id, date(2026, 12, 1), date(2026, 12, 8))
        appointment = await client.book(snapshot.slots[0].id, idempotency_key="k1")
        delta = await client.next_event()

The client keeps a live `Calendar` per watched doctor: deltas are applied in
version order, and a delta that skips a version (a missed message) triggers a
fresh snapshot, so the calendar always converges to the server's state.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Literal, TypeVar

import aiohttp

from protocol.codec import JSON, MSGPACK, Codec
from protocol.errors import ErrorCode, SlotcastError
from protocol.messages import (
    SERVER_MESSAGES,
    Appointments,
    AppointmentUpdated,
    AppointmentView,
    Auth,
    Authenticated,
    Block,
    Book,
    Booked,
    Cancel,
    Dashboard,
    DayOverride,
    Delta,
    Doctors,
    DoctorView,
    Error,
    Held,
    Hold,
    ListAppointments,
    Mark,
    Message,
    MyAppointments,
    Ping,
    Pong,
    Reconnect,
    Release,
    Reschedule,
    Rescheduled,
    Resumed,
    Resync,
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
    Watch,
    WatchAppointments,
    WatchDashboard,
    WeeklyBlock,
    Welcome,
)
from protocol.vocabulary import AppointmentStatus

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)


class ClientError(SlotcastError):
    """An `error` reply from the server; `code` is its stable error code."""

    def __init__(self, code: str, message: str) -> None:
        try:
            known = ErrorCode(code)
        except ValueError:
            known = ErrorCode.INTERNAL
        super().__init__(message, code=known)
        self.wire_code = code


@dataclass(slots=True)
class Calendar:
    """The client's copy of one watched range, kept current by deltas."""

    doctor_id: int
    start: date
    end: date
    version: int
    slots: dict[int, SlotView] = field(default_factory=dict)
    resyncs: int = 0


class SlotcastClient:
    def __init__(
        self,
        http: aiohttp.ClientSession,
        url: str,
        codec: Codec,
        *,
        headers: dict[str, str],
        auth_token: str | None,
        reconnect: bool,
        max_backoff: float,
    ) -> None:
        self._http = http
        self._url = url
        self._codec = codec
        self._headers = headers
        self._auth_token = auth_token  # sent in an `auth` message after each (re)connect
        self._reconnect = reconnect
        self._max_backoff = max_backoff
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._welcome: asyncio.Future[Welcome] = asyncio.get_running_loop().create_future()
        self._retry_after: float | None = None
        self._closed = False
        self._reader: asyncio.Task[None] | None = None
        self._resyncing: set[int] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.events: asyncio.Queue[Message] = asyncio.Queue()
        self.calendars: dict[int, Calendar] = {}
        self.dashboards: dict[int, date] = {}
        self.following = False
        self.close_code: int | None = None
        self.instance: str | None = None
        self.reconnects = 0
        # Set while connected with every watch restored; cleared on each disconnect.
        self.ready = asyncio.Event()

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls,
        url: str,
        *,
        token: str | None = None,
        codec: Literal["json", "msgpack"] = "json",
        token_in_header: bool = True,
        session: aiohttp.ClientSession | None = None,
        reconnect: bool = False,
        max_backoff: float = 5.0,
    ) -> AsyncIterator[SlotcastClient]:
        """Connect; with `token_in_header=False` the token goes in a first `auth` message.

        With `reconnect=True` a dropped connection is re-established with capped,
        fully jittered exponential backoff (or after the delay a `reconnect` notice
        asked for), the token re-presented, and every watch resumed from its version.
        """
        chosen = MSGPACK if codec == "msgpack" else JSON
        headers = {"Authorization": f"Bearer {token}"} if token and token_in_header else {}
        own = session is None
        http = session or aiohttp.ClientSession()
        client = cls(
            http,
            url,
            chosen,
            headers=headers,
            auth_token=None if token_in_header else token,
            reconnect=reconnect,
            max_backoff=max_backoff,
        )
        try:
            await client._open()
            try:
                await client._restore()
                yield client
            finally:
                await client.close()
        finally:
            if own:
                await http.close()

    async def _open(self) -> None:
        self._ws = await self._http.ws_connect(
            self._url, protocols=[self._codec.subprotocol], headers=self._headers
        )
        self._welcome = asyncio.get_running_loop().create_future()
        if self._reader is None:
            self._reader = asyncio.create_task(self._read_forever(), name="slotcast-client-reader")

    async def _restore(self) -> None:
        """After (re)connecting: welcome, identity, then every watch, resumed where it was."""
        self.instance = (await self.welcome()).instance
        if self._auth_token:
            await self.auth(self._auth_token)
        for calendar in list(self.calendars.values()):
            await self._resume(calendar)
        for doctor_id, day in list(self.dashboards.items()):
            await self.watch_dashboard(doctor_id, day)
        if self.following:
            await self.watch_appointments()
        self.ready.set()

    # ---- commands -------------------------------------------------------------------------

    async def welcome(self, timeout: float = 10.0) -> Welcome:
        return await asyncio.wait_for(asyncio.shield(self._welcome), timeout)

    async def request(self, message: Message, expect: type[M], timeout: float = 10.0) -> M:
        """Send a command and wait for its reply; an `error` reply raises ClientError."""
        reply = await self.request_any(message, (expect,), timeout)
        assert isinstance(reply, expect)
        return reply

    async def request_any(
        self, message: Message, expect: tuple[type[Message], ...], timeout: float = 10.0
    ) -> Message:
        rid = next(self._ids)
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        try:
            await self.send_raw(self._codec.encode(message, rid))
            reply = await asyncio.wait_for(future, timeout)
        finally:
            self._pending.pop(rid, None)
        if isinstance(reply, Error):
            raise ClientError(reply.code, reply.message)
        if not isinstance(reply, expect):
            names = "/".join(t.TYPE for t in expect)
            raise ClientError("bad_message", f"expected {names}, got {reply.TYPE}")
        return reply

    async def send_raw(self, frame: bytes | str) -> None:
        """Send a frame as is (tests use this to send malformed input)."""
        if self._ws is None or self._ws.closed:
            raise ClientError("unavailable", "not connected")
        if isinstance(frame, str):
            await self._ws.send_str(frame)
        elif self._codec.binary:
            await self._ws.send_bytes(frame)
        else:
            await self._ws.send_str(frame.decode())

    async def auth(self, token: str) -> Authenticated:
        return await self.request(Auth(token), Authenticated)

    async def watch(self, doctor_id: int, start: date, end: date) -> Snapshot:
        snapshot = await self.request(Watch(doctor_id, start, end), Snapshot)
        self.calendars[doctor_id] = Calendar(
            doctor_id, start, end, snapshot.version, {s.id: s for s in snapshot.slots}
        )
        return snapshot

    async def _resume(self, calendar: Calendar) -> None:
        """Ask for what was missed since the calendar's version; accept a snapshot instead."""
        request = Watch(calendar.doctor_id, calendar.start, calendar.end, since=calendar.version)
        reply = await self.request_any(request, (Snapshot, Resumed))
        if isinstance(reply, Snapshot):
            calendar.version = reply.version
            calendar.slots = {s.id: s for s in reply.slots}
            calendar.resyncs += 1

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

    async def unwatch(self, doctor_id: int) -> None:
        await self.request(Unwatch(doctor_id), Unwatched)
        self.calendars.pop(doctor_id, None)

    async def book(
        self,
        slot_id: int | None = None,
        idempotency_key: str | None = None,
        *,
        hold_id: int | None = None,
    ) -> AppointmentView:
        """Book a free slot, or confirm a hold with `hold_id=`."""
        request = Book(slot_id, idempotency_key, hold_id)
        return (await self.request(request, Booked)).appointment

    async def hold(self, slot_id: int, idempotency_key: str | None = None) -> AppointmentView:
        return (await self.request(Hold(slot_id, idempotency_key), Held)).appointment

    async def release(
        self, appointment_id: int, idempotency_key: str | None = None
    ) -> AppointmentView:
        reply = await self.request(Release(appointment_id, idempotency_key), AppointmentUpdated)
        return reply.appointment

    async def cancel(
        self, appointment_id: int, reason: str, idempotency_key: str | None = None
    ) -> AppointmentView:
        reply = await self.request(
            Cancel(appointment_id, reason, idempotency_key), AppointmentUpdated
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

    async def list_appointments(self, doctor_id: int, day: date) -> list[AppointmentView]:
        reply = await self.request(ListAppointments(doctor_id, day), Appointments)
        return reply.appointments

    async def my_appointments(self) -> list[AppointmentView]:
        return (await self.request(MyAppointments(), Appointments)).appointments

    async def search_doctors(
        self, q: str | None = None, limit: int = 20, offset: int = 0
    ) -> list[DoctorView]:
        return (await self.request(SearchDoctors(q, limit, offset), Doctors)).doctors

    async def ping(self) -> None:
        await self.request(Ping(), Pong)

    async def next_event(self, timeout: float = 10.0) -> Message:
        return await asyncio.wait_for(self.events.get(), timeout)

    async def next_delta(self, timeout: float = 10.0) -> Delta:
        while True:
            event = await self.next_event(timeout)
            if isinstance(event, Delta):
                return event

    async def close(self) -> None:
        self._closed = True
        tasks = [t for t in (self._reader, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._ws is not None:
            await self._ws.close()

    # ---- receiving --------------------------------------------------------------------------

    async def _read_forever(self) -> None:
        while True:
            ws = self._ws
            assert ws is not None
            try:
                async for frame in ws:
                    if frame.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                        continue
                    envelope = self._codec.decode(frame.data, SERVER_MESSAGES, max_size=1 << 30)
                    self._dispatch(envelope.id, envelope.body)
            finally:
                self.ready.clear()
                self.close_code = ws.close_code
                error = ClientError("unavailable", f"connection closed ({ws.close_code})")
                for future in self._pending.values():
                    if not future.done():
                        future.set_exception(error)
                if not self._welcome.done():
                    self._welcome.set_exception(error)
                    self._welcome.exception()  # retrieved: nobody may be waiting
            if self._closed or not self._reconnect:
                return
            await self._reconnect_with_backoff()

    async def _reconnect_with_backoff(self) -> None:
        """Full jitter: a restart's clients spread out instead of stampeding together."""
        attempt = 0
        while not self._closed:
            if self._retry_after is not None:
                delay, self._retry_after = self._retry_after, None
            else:
                delay = random.uniform(0, min(self._max_backoff, 0.1 * 2**attempt))
            await asyncio.sleep(delay)
            attempt += 1
            try:
                await self._open()
            except (aiohttp.ClientError, OSError) as exc:
                log.info("reconnect attempt %d failed: %s", attempt, exc)
                continue
            self.reconnects += 1
            task = asyncio.create_task(self._restore_quietly())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return

    async def _restore_quietly(self) -> None:
        try:
            await self._restore()
        except ClientError as exc:  # the connection dropped again; the reader retries
            log.info("restore after reconnect failed: %s", exc)

    def _dispatch(self, rid: str | int | None, message: Message) -> None:
        if isinstance(message, Welcome) and not self._welcome.done():
            self._welcome.set_result(message)
            return
        if isinstance(message, Reconnect):
            self._retry_after = message.retry_after_ms / 1000
        elif isinstance(message, Resync):
            if message.doctor_id in self.calendars:
                self._resync(self.calendars[message.doctor_id])
            elif message.room == "appointments" and self.following:
                self._spawn(self.watch_appointments())
        future = self._pending.get(rid) if isinstance(rid, int) else None
        if future is not None and not future.done():
            future.set_result(message)
            return
        if isinstance(message, Delta):
            self._apply(message)
        self.events.put_nowait(message)

    def _apply(self, delta: Delta) -> None:
        calendar = self.calendars.get(delta.doctor_id)
        if calendar is None or delta.version <= calendar.version:
            return  # not watched, or already part of the snapshot
        # A merged delta (`since` set) applies on top of any version from `since` on.
        base = delta.since if delta.since is not None else delta.version - 1
        if calendar.version < base:
            log.info(
                "gap on doctor %s: v%s after v%s", delta.doctor_id, delta.version, calendar.version
            )
            self._resync(calendar)
            return
        calendar.version = delta.version
        for slot in delta.slots:
            if slot.id in calendar.slots or _within(slot, calendar):
                calendar.slots[slot.id] = slot
        for slot_id in delta.removed:
            calendar.slots.pop(slot_id, None)

    def _spawn(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _resync(self, calendar: Calendar) -> None:
        if calendar.doctor_id in self._resyncing:
            return
        self._resyncing.add(calendar.doctor_id)

        async def resync() -> None:
            try:
                await self.watch(calendar.doctor_id, calendar.start, calendar.end)
                self.calendars[calendar.doctor_id].resyncs = calendar.resyncs + 1
            finally:
                self._resyncing.discard(calendar.doctor_id)

        task = asyncio.create_task(resync())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _within(slot: SlotView, calendar: Calendar) -> bool:
    # The snapshot decided which slots the range holds; new slots are kept if they
    # fall on or between the first and last dates in UTC terms (a cheap superset).
    return calendar.start <= slot.start.date() <= calendar.end
