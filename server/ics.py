"""Add to calendar: an appointment as an iCalendar file (RFC 5545) at
`GET /api/appointments/{id}.ics`.

A patient's calendar application keeps its own copy of the appointment, so the file says
only what stays true or is updated by downloading it again: the UID is the appointment's
own (the same file twice is one event, not two), times are UTC (the calendar shows them in
whatever zone its owner is in), and a cancelled appointment comes back as
`STATUS:CANCELLED` with a higher SEQUENCE, which calendars take as an update of the event
they have. The icalendar library writes the file: escaping, line folding and date forms
are where hand-written iCalendar goes wrong.

Only the appointment's patient, its doctor and admins (API keys with `read`) get it; to
anyone else an appointment they may not see does not exist (`not_found`), so ids cannot
be probed.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from aiohttp import web
from icalendar import Calendar, Event

from protocol.errors import ErrorCode, SlotcastError
from protocol.vocabulary import AppointmentStatus, KeyScope
from server.api import caller
from server.keys import CLOCK, SETTINGS, STORE
from server.service import actor_of, require_scope
from store import reads
from store.reads import AppointmentEntry

log = logging.getLogger(__name__)

PRODID = "-//Slotcast//Appointments//EN"
# Larger than the SEQUENCE of the booked event, so a calendar replaces it with this one.
_CANCELLED_SEQUENCE = 1
_STATUS = {
    AppointmentStatus.PENDING: "TENTATIVE",
    AppointmentStatus.CANCELLED: "CANCELLED",
}


def setup(app: web.Application) -> None:
    app.router.add_get(r"/api/appointments/{appointment_id:\d{1,16}}.ics", download)


def render(entry: AppointmentEntry, *, place: str, host: str, now: datetime) -> bytes:
    """The calendar file of one appointment. `place`: where to go ("" names none); `host`
    makes the UID unique beyond this server's ids (RFC 5545 asks for a domain)."""
    appointment = entry.appointment
    cancelled = appointment.status is AppointmentStatus.CANCELLED
    event = Event()
    event.add("uid", f"appointment-{appointment.id}@{host}")
    event.add("dtstamp", now.astimezone(UTC))
    event.add("dtstart", appointment.start.astimezone(UTC))
    event.add("dtend", appointment.end.astimezone(UTC))
    event.add("summary", f"Appointment with {entry.doctor_name}")
    event.add("status", _STATUS.get(appointment.status, "CONFIRMED"))
    event.add("sequence", _CANCELLED_SEQUENCE if cancelled else 0)
    if place:
        event.add("location", place)
    if cancelled and appointment.cancel_reason:
        event.add("description", f"Cancelled: {appointment.cancel_reason}")
    calendar = Calendar()
    calendar.add("prodid", PRODID)
    calendar.add("version", "2.0")
    calendar.add("calscale", "GREGORIAN")
    calendar.add_component(event)
    ical: bytes = calendar.to_ical()
    return ical


async def download(request: web.Request) -> web.Response:
    app = request.app
    appointment_id = int(request.match_info["appointment_id"])
    actor = require_scope(actor_of(await caller(request), app[CLOCK]()), KeyScope.READ)
    entry = await reads.appointment_entry(app[STORE], appointment_id)
    if not actor.may_manage(entry.appointment):
        raise SlotcastError(f"no appointment {appointment_id}", code=ErrorCode.NOT_FOUND)
    host = request.url.host or "slotcast"
    body = render(entry, place=app[SETTINGS].clinic_name, host=host, now=app[CLOCK]())
    return web.Response(
        body=body,
        headers={
            "Content-Type": "text/calendar; charset=utf-8",
            "Content-Disposition": f'attachment; filename="appointment-{appointment_id}.ics"',
            # A patient's appointment: no shared cache keeps it.
            "Cache-Control": "private, no-store",
        },
    )
