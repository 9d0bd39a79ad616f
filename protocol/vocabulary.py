"""The domain vocabulary, borrowed from FHIR's Schedule/Slot/Appointment resources.

Using FHIR's words keeps Slotcast legible to anyone who has integrated a clinic
system before, and the string values are what travels on the wire and in SQL.
"""

from enum import StrEnum


class SlotStatus(StrEnum):
    FREE = "free"
    BUSY = "busy"
    BUSY_TENTATIVE = "busy-tentative"
    BUSY_UNAVAILABLE = "busy-unavailable"


class AppointmentStatus(StrEnum):
    PENDING = "pending"
    BOOKED = "booked"
    ARRIVED = "arrived"
    FULFILLED = "fulfilled"
    CANCELLED = "cancelled"
    NOSHOW = "noshow"


class Role(StrEnum):
    PATIENT = "patient"
    DOCTOR = "doctor"
    ADMIN = "admin"


class KeyScope(StrEnum):
    """What an API key may do (docs/protocol.md, "API keys"); `admin` implies the rest."""

    READ = "read"  # schedules, appointments and dashboards of its doctors
    BOOK = "book"  # hold, book, cancel and reschedule on a patient's behalf
    SCHEDULES = "schedules"  # schedules, blocks and attendance of its doctors
    ADMIN = "admin"  # everything, the directory, webhooks and keys included
