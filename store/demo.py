"""Demo data: doctors in several time zones with weekly schedules, and demo patients.

Seeded only into an empty database, so restarting `make run` keeps whatever was
booked; the server opens their slots up to each doctor's horizon at every start.
"""

from __future__ import annotations

import logging
from datetime import time

from store.constants import LOCK_NS_SEED
from store.doctors import create_doctor, doctor_count
from store.pool import Store, exclusive
from store.schedule import Block

log = logging.getLogger(__name__)

_WEEKDAYS = (1, 2, 3, 4, 5)


def _office_hours(
    *days: int, am: tuple[int, int] = (9, 12), pm: tuple[int, int] = (13, 17)
) -> list[Block]:
    blocks = []
    for day in days:
        blocks.append(Block(day, time(am[0]), time(am[1])))
        blocks.append(Block(day, time(pm[0]), time(pm[1])))
    return blocks


DOCTORS: list[dict[str, object]] = [
    {
        "name": "Dr. Ada Moreau",
        "specialty": "General practice",
        "timezone": "Europe/Paris",
        "schedule": [*_office_hours(*_WEEKDAYS), Block(6, time(9), time(12))],
    },
    {
        "name": "Dr. Maya Patel",
        "specialty": "Pediatrics",
        "timezone": "America/New_York",
        "schedule": _office_hours(*_WEEKDAYS, am=(8, 12), pm=(13, 16)),
    },
    {
        "name": "Dr. Kenji Sato",
        "specialty": "Cardiology",
        "timezone": "Asia/Tokyo",
        "slot_minutes": 20,
        "schedule": _office_hours(1, 2, 4, 5),
    },
    {
        "name": "Dr. Lucas Silva",
        "specialty": "Dermatology",
        "timezone": "America/Sao_Paulo",
        "schedule": _office_hours(1, 3, 5, am=(10, 13), pm=(14, 18)),
    },
    {
        "name": "Dr. Amara Okafor",
        "specialty": "General practice",
        "timezone": "Africa/Lagos",
        "schedule": _office_hours(*_WEEKDAYS),
    },
    {
        "name": "Dr. Liam O'Connor",
        "specialty": "Orthopedics",
        "timezone": "Australia/Sydney",
        "slot_minutes": 45,
        "schedule": _office_hours(2, 3, 4),
    },
]


# Demo patients have no rows: a patient is whoever a token names. These are the
# subjects the demo sign-in offers, with names for the pages to show.
PATIENTS: list[dict[str, str]] = [
    {"subject": "alice", "name": "Alice Martin"},
    {"subject": "bob", "name": "Bob Nguyen"},
    {"subject": "chloe", "name": "Chloé Dubois"},
    {"subject": "dev", "name": "Dev Sharma"},
]


async def seed(store: Store) -> None:
    async with exclusive(store, LOCK_NS_SEED):  # instances starting together seed once
        if await doctor_count(store) == 0:
            for spec in DOCTORS:
                await create_doctor(store, **spec)  # type: ignore[arg-type]
            log.info("seeded %d demo doctors", len(DOCTORS))
