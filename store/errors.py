"""The store's exceptions: what `server/` catches instead of asyncpg or redis errors.

Each carries the protocol error code the client will see, so the mapping from
"what went wrong in the database" to "what the client can do about it" is made
once, here, at the boundary.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from datetime import timedelta

import asyncpg

from protocol.errors import ErrorCode, SlotcastError

log = logging.getLogger(__name__)


class StoreError(SlotcastError):
    code = ErrorCode.INTERNAL


class NotFound(StoreError):
    code = ErrorCode.NOT_FOUND


class SlotTaken(StoreError):
    code = ErrorCode.SLOT_TAKEN


class SlotUnavailable(StoreError):
    code = ErrorCode.SLOT_UNAVAILABLE


class TooLate(StoreError):
    code = ErrorCode.TOO_LATE


class OutsideHorizon(StoreError):
    code = ErrorCode.OUTSIDE_HORIZON


class HoldExpired(StoreError):
    code = ErrorCode.HOLD_EXPIRED


class NotHolder(StoreError):
    code = ErrorCode.NOT_HOLDER


class HoldLimit(StoreError):
    code = ErrorCode.HOLD_LIMIT


class AppointmentLimit(StoreError):
    """The patient already has as many active future appointments as `Limits` allows."""

    code = ErrorCode.APPOINTMENT_LIMIT


class Cooldown(StoreError):
    """The patient's own hold on this slot ended too recently; `retry_after` says when."""

    code = ErrorCode.COOLDOWN

    def __init__(self, message: str, *, retry_after: timedelta) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        # On the wire as on a rate limit: `retry_after_ms`, and `Retry-After` on REST.
        self.retry_after_ms = max(1, math.ceil(retry_after.total_seconds() * 1000))


class InvalidTransition(StoreError):
    code = ErrorCode.INVALID_TRANSITION


class Forbidden(StoreError):
    code = ErrorCode.FORBIDDEN


class Invalid(StoreError):
    code = ErrorCode.INVALID


class IdempotencyConflict(StoreError):
    code = ErrorCode.IDEMPOTENCY_CONFLICT


class Busy(StoreError):
    """A lock or statement timed out: safe to retry with the same idempotency key."""

    code = ErrorCode.BUSY


class Unavailable(StoreError):
    """The database could not be reached."""

    code = ErrorCode.UNAVAILABLE


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """Turn driver errors raised inside the block into StoreErrors."""
    try:
        yield
    except SlotcastError:
        raise
    except asyncpg.ExclusionViolationError as exc:
        # The last guard fired: something above it let an overlap through.
        log.error("exclusion constraint refused an overlapping appointment: %s", exc)
        raise SlotTaken("the slot overlaps an active appointment") from exc
    except (asyncpg.LockNotAvailableError, asyncpg.QueryCanceledError) as exc:
        raise Busy("the doctor's calendar is busy; retry shortly") from exc
    except (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError) as exc:
        raise Unavailable("the database is unreachable") from exc
    except asyncpg.PostgresError as exc:
        log.exception("unexpected database error")
        raise StoreError("internal database error") from exc
