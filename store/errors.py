"""The store's exceptions: what `server/` catches instead of asyncpg or redis errors.

Each carries the protocol error code the client will see, so the mapping from
"what went wrong in the database" to "what the client can do about it" is made
once, here, at the boundary.

Two kinds of failure must never be confused. A *transient* one says that
PostgreSQL or Redis is away, restarting, frozen, or out of connections, or that
the way to it broke: the request was not wrong and the same request (with the
same idempotency key) may succeed in a moment, so it is `unavailable` (HTTP
503). Anything else the driver raises is a bug of ours, `internal`, and is
logged with its traceback. `transient` and `broker_transient` draw that line.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from datetime import timedelta

import asyncpg
from redis.exceptions import AuthenticationError as RedisAuthenticationError
from redis.exceptions import AuthorizationError as RedisAuthorizationError
from redis.exceptions import ClusterError as RedisClusterError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import TryAgainError as RedisTryAgainError

from protocol.errors import ErrorCode, SlotcastError

log = logging.getLogger(__name__)

# SQLSTATEs of a server that is going away, not there yet, or out of room, whatever the
# request: 08 connection exceptions, 53 insufficient resources (53300 too many
# connections), 57P01-57P05 admin and crash shutdown, "cannot connect now" (starting up
# or shutting down), database dropped, idle session timeout; 25P03 idle-in-transaction
# timeout (the server closed the session).
_TRANSIENT_SQLSTATE_PREFIXES = ("08", "53", "57P", "25P03")


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


class TooEarly(StoreError):
    """Attendance recorded before the appointment could have begun."""

    code = ErrorCode.TOO_EARLY


class Forbidden(StoreError):
    code = ErrorCode.FORBIDDEN


class Invalid(StoreError):
    code = ErrorCode.INVALID


class IdempotencyConflict(StoreError):
    code = ErrorCode.IDEMPOTENCY_CONFLICT


class DoctorRetired(StoreError):
    """The doctor no longer practises here: nothing of theirs is offered or scheduled."""

    code = ErrorCode.DOCTOR_RETIRED


class Busy(StoreError):
    """A lock or statement timed out: safe to retry with the same idempotency key."""

    code = ErrorCode.BUSY


class Unavailable(StoreError):
    """The database or the broker is away, restarting, frozen or full: retry shortly."""

    code = ErrorCode.UNAVAILABLE


def transient(exc: BaseException) -> bool:
    """Whether `exc` says PostgreSQL (or the way to it) is unavailable, not that a request
    or the code is wrong. A connection that raised one is in an unknown state."""
    if isinstance(exc, OSError):  # refused, reset, unreachable; TimeoutError is one too
        return True
    if isinstance(exc, asyncpg.DataError | asyncpg.ClientConfigurationError):
        return False  # an argument the driver cannot encode, a bad DSN: bugs, not outages
    if isinstance(exc, asyncpg.InterfaceError | asyncpg.InternalClientError):
        # "connection is closed", "another operation is in progress", "cannot switch to
        # state 12": the client side of a connection that broke under it.
        return True
    if isinstance(exc, asyncpg.PostgresError):
        return (exc.sqlstate or "").startswith(_TRANSIENT_SQLSTATE_PREFIXES)
    return False


def broker_transient(exc: BaseException) -> bool:
    """Whether `exc` says Redis is unavailable (rather than refusing our credentials)."""
    if isinstance(exc, RedisAuthenticationError | RedisAuthorizationError):
        return False
    # A Redis Cluster part-way through a fail-over (down, a slot without a master, a
    # node unreachable) says so in errors of its own: as transient as a restart.
    cluster = RedisClusterError | RedisClusterException | RedisTryAgainError
    return isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError | cluster)


class _Quiet:
    """At most one warning per `every_s` for a condition that may hit every request."""

    def __init__(self, every_s: float = 5.0) -> None:
        self._every_s = every_s
        self._last = -every_s

    def warn(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last >= self._every_s:
            self._last = now
            log.warning(message, *args)


_database_away = _Quiet()


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
    except asyncpg.IntegrityConstraintViolationError as exc:
        # The directory's own guards, behind the application's checks (a concurrent
        # import, a row the application did not check): bad input, said as such.
        refusal = _refusal(exc)
        if refusal is None:
            log.exception("unexpected constraint violation")
            raise StoreError("internal database error") from exc
        raise refusal from exc
    except (asyncpg.LockNotAvailableError, asyncpg.QueryCanceledError) as exc:
        raise Busy("the doctor's calendar is busy; retry shortly") from exc
    except asyncpg.SerializationError as exc:
        # Only a read replica says this to the store (its reads conflicting with the
        # replay of the primary's WAL): retryable, and `store.replicas` asks the primary.
        raise Busy("the read was cancelled by a replica's recovery; retry shortly") from exc
    except TimeoutError as exc:
        # One of the store's own bounds: the server may be frozen or unreachable.
        _database_away.warn("database did not answer in time (client-side bound)")
        raise Unavailable("the database did not answer in time; retry shortly") from exc
    except Exception as exc:
        if transient(exc):
            _database_away.warn("database unavailable: %s: %s", type(exc).__name__, exc)
            raise Unavailable("the database is unavailable; retry shortly") from exc
        if isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError):
            log.exception("unexpected database error")
            raise StoreError("internal database error") from exc
        raise


def _refusal(exc: asyncpg.IntegrityConstraintViolationError) -> StoreError | None:
    """The client's error behind a constraint of the doctor directory, if it is one."""
    constraint = getattr(exc, "constraint_name", None)
    if constraint == "doctors_timezone_iana":
        # The trigger's own words: "timezone: <name> is not an IANA time zone name".
        return Invalid(str(exc.args[0]) if exc.args else "timezone: not an IANA time zone")
    if constraint == "doctors_external_id":
        return Invalid("external_id: already used by another doctor")
    return None


@contextlib.contextmanager
def broker_translated() -> Iterator[None]:
    """Turn redis-py errors (and the broker's own time bounds) into `Unavailable`."""
    try:
        yield
    except SlotcastError:
        raise
    except TimeoutError as exc:
        raise Unavailable("the broker did not answer in time") from exc
    except (RedisError, RedisClusterException, OSError) as exc:
        raise Unavailable(f"the broker is unavailable: {exc}") from exc
