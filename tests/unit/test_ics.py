"""The calendar file of an appointment, read back with the same library a calendar would use."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from icalendar import Calendar

from protocol.messages import AppointmentView
from protocol.vocabulary import AppointmentStatus
from server.ics import render
from store.reads import AppointmentEntry

NOW = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
TOKYO = timezone(timedelta(hours=9))


def entry(status: AppointmentStatus, reason: str | None = None) -> AppointmentEntry:
    appointment = AppointmentView(
        id=501,
        slot_id=1234,
        doctor_id=7,
        patient_id="alice",
        # Given in Tokyo time: the file must still say the same instant in UTC.
        start=datetime(2026, 12, 2, 10, 0, tzinfo=TOKYO),
        end=datetime(2026, 12, 2, 10, 30, tzinfo=TOKYO),
        status=status,
        cancel_reason=reason,
    )
    return AppointmentEntry(appointment, "Dr. Kenji Sato, Jr.", "Asia/Tokyo")


def event_of(data: bytes) -> Calendar:
    calendar = Calendar.from_ical(data)
    assert calendar["VERSION"] == "2.0"
    assert calendar["PRODID"]
    (event,) = calendar.walk("VEVENT")
    return event


def test_a_booked_appointment_is_one_confirmed_event_in_utc() -> None:
    event = event_of(
        render(
            entry(AppointmentStatus.BOOKED),
            place="Rue de la Paix; 2",
            host="clinic.example",
            now=NOW,
        )
    )
    assert str(event["UID"]) == "appointment-501@clinic.example"
    assert event.decoded("DTSTART") == datetime(2026, 12, 2, 1, 0, tzinfo=UTC)
    assert event.decoded("DTEND") == datetime(2026, 12, 2, 1, 30, tzinfo=UTC)
    assert event["DTSTART"].to_ical() == b"20261202T010000Z"
    assert str(event["SUMMARY"]) == "Appointment with Dr. Kenji Sato, Jr."
    assert str(event["LOCATION"]) == "Rue de la Paix; 2"  # escaped on the way, intact back
    assert str(event["STATUS"]) == "CONFIRMED"
    assert event.decoded("DTSTAMP") == NOW


def test_the_uid_is_stable_and_a_cancellation_updates_the_same_event() -> None:
    booked = event_of(render(entry(AppointmentStatus.BOOKED), place="", host="h", now=NOW))
    later = NOW + timedelta(hours=3)
    cancelled = event_of(
        render(entry(AppointmentStatus.CANCELLED, "feeling better"), place="", host="h", now=later)
    )
    assert cancelled["UID"] == booked["UID"]
    assert str(cancelled["STATUS"]) == "CANCELLED"
    assert cancelled["SEQUENCE"] > booked["SEQUENCE"]
    assert str(cancelled["DESCRIPTION"]) == "Cancelled: feeling better"
    assert "LOCATION" not in booked  # no place known: none invented


def test_a_hold_is_tentative() -> None:
    event = event_of(render(entry(AppointmentStatus.PENDING), place="", host="h", now=NOW))
    assert str(event["STATUS"]) == "TENTATIVE"
