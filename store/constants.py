"""Names shared between processes: advisory-lock namespaces and broker channels.

Changing any of these is a protocol change between instances of different
versions, so they live in one place.
"""

from typing import Final

# pg_advisory_xact_lock(namespace, key): the two-int4 form, so keys never collide by hashing.
LOCK_NS_MIGRATIONS: Final = 0x5C01
LOCK_NS_DOCTOR: Final = 0x5C02
LOCK_NS_SEED: Final = 0x5C03
LOCK_NS_PATIENT: Final = 0x5C04
LOCK_NS_PRUNE: Final = 0x5C05  # one instance prunes at a time (store.lifecycle)

CHANNEL_PREFIX: Final = "slotcast:v1"


def doctor_channel(doctor_id: int) -> str:
    """Every committed change of one doctor (public and private halves) and its presence.

    Only instances read it; they hand each client only the half it may see.
    """
    return f"{CHANNEL_PREFIX}:doctor:{doctor_id}"


def patient_channel(patient_id: str) -> str:
    """Changes to one patient's own appointments."""
    return f"{CHANNEL_PREFIX}:patient:{patient_id}"


# Rate-limit counters in the broker's Redis (store.counters): every instance counts in the
# same keys, so a budget holds however a client's requests are spread over instances.
LIMIT_KEY_PREFIX: Final = f"{CHANNEL_PREFIX}:limit"
