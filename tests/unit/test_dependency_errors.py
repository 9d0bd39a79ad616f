"""Where the store draws the line between an outage and a bug, and how it waits at start-up.

A PostgreSQL restart, a frozen server, a full connection table or a broken socket
must reach clients as `unavailable` (503, retry with the same key), never as
`internal` with an "unexpected database error" in the log; a real bug must stay
`internal`. These run without any service: each driver error is raised by hand,
as the driver raises it. tests/store/test_bounds.py produces the real ones.
"""

from __future__ import annotations

import asyncio
import logging
import time

import asyncpg
import pytest
from redis.exceptions import AuthenticationError as RedisAuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from protocol.errors import ErrorCode, SlotcastError
from store.errors import (
    Busy,
    StoreError,
    Unavailable,
    broker_transient,
    broker_translated,
    transient,
    translated,
)
from store.startup import wait_until_up, where_postgres, where_redis

OUTAGES = [
    asyncpg.CannotConnectNowError("the database system is shutting down"),
    asyncpg.CannotConnectNowError("the database system is starting up"),
    asyncpg.AdminShutdownError("terminating connection due to administrator command"),
    asyncpg.CrashShutdownError("terminating connection because of crash of another process"),
    asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    asyncpg.ConnectionFailureError("could not receive data from server"),
    asyncpg.TooManyConnectionsError("sorry, too many clients already"),
    asyncpg.IdleInTransactionSessionTimeoutError("terminating connection due to idle timeout"),
    # The client side of a connection that broke under it: this one used to bypass the
    # translation entirely and surface as "handler failed" / "relay failed".
    asyncpg.InternalClientError("cannot switch to state 12; another operation (2) is in progress"),
    asyncpg.InterfaceError("cannot perform operation: another operation is in progress"),
    asyncpg.InterfaceError("connection is closed"),
    ConnectionRefusedError(111, "Connection refused"),
    ConnectionResetError(104, "Connection reset by peer"),
    TimeoutError(),  # one of the store's own client-side bounds
]


def raised_through_translated(exc: BaseException) -> BaseException:
    try:
        with translated():
            raise exc
    except BaseException as out:
        return out
    raise AssertionError("translated() swallowed the error")


@pytest.mark.parametrize("exc", OUTAGES, ids=lambda e: type(e).__name__)
def test_every_outage_is_unavailable_and_not_logged_as_a_bug(
    exc: BaseException, caplog: pytest.LogCaptureFixture
) -> None:
    assert transient(exc)
    with caplog.at_level(logging.WARNING, logger="store.errors"):
        out = raised_through_translated(exc)
    assert isinstance(out, Unavailable)
    assert out.code is ErrorCode.UNAVAILABLE
    assert out.__cause__ is exc  # the driver's error stays attached, for debugging
    assert "unexpected database error" not in caplog.text
    assert not any(r.exc_info for r in caplog.records)  # no traceback for an outage


@pytest.mark.parametrize(
    "exc",
    [
        asyncpg.QueryCanceledError("canceling statement due to statement timeout"),
        asyncpg.LockNotAvailableError("canceling statement due to lock timeout"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_the_servers_own_timeouts_stay_busy(exc: BaseException) -> None:
    """The server answered, and said the doctor's lock or a statement took too long."""
    assert isinstance(raised_through_translated(exc), Busy)


@pytest.mark.parametrize(
    "exc",
    [
        asyncpg.UndefinedColumnError('column "nope" does not exist'),
        asyncpg.DataError("invalid input for query argument $1"),
        asyncpg.SyntaxOrAccessError("syntax error at or near"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_a_bug_stays_internal_and_is_logged(
    exc: BaseException, caplog: pytest.LogCaptureFixture
) -> None:
    assert not transient(exc)
    with caplog.at_level(logging.ERROR, logger="store.errors"):
        out = raised_through_translated(exc)
    assert type(out) is StoreError
    assert out.code is ErrorCode.INTERNAL
    assert "unexpected database error" in caplog.text


def test_errors_of_our_own_pass_through_untouched() -> None:
    refusal = SlotcastError("taken", code=ErrorCode.SLOT_TAKEN)
    assert raised_through_translated(refusal) is refusal
    bug = KeyError("a Python bug is not the database's")
    assert raised_through_translated(bug) is bug


@pytest.mark.parametrize(
    "exc",
    [
        RedisConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused."),
        RedisTimeoutError("Timeout reading from socket"),
        ConnectionResetError(104, "Connection reset by peer"),
        TimeoutError(),
    ],
    ids=lambda e: type(e).__name__,
)
def test_every_broker_outage_is_unavailable(exc: BaseException) -> None:
    assert broker_transient(exc)
    with pytest.raises(Unavailable), broker_translated():
        raise exc


def test_wrong_broker_credentials_are_not_an_outage_to_wait_out() -> None:
    assert not broker_transient(RedisAuthenticationError("invalid username-password pair"))


@pytest.mark.parametrize(
    ("dsn", "where"),
    [
        ("postgresql://app:hunter2@db.internal:6543/slotcast", "PostgreSQL at db.internal:6543"),
        ("postgres://app:hunter2@10.0.0.5/slotcast?sslmode=require", "PostgreSQL at 10.0.0.5:5432"),
        (
            "postgresql://postgres:hunter2@/postgres?host=/tmp/pg",
            "PostgreSQL at socket /tmp/pg/.s.PGSQL.5432",
        ),
        ("postgresql://app:hunter2@a:1,b:2/x", "PostgreSQL at a:1,b:2"),
    ],
)
def test_the_database_is_named_by_where_it_is_never_by_its_password(dsn: str, where: str) -> None:
    assert where_postgres(dsn) == where
    assert "hunter2" not in where_postgres(dsn)


@pytest.mark.parametrize(
    ("url", "where"),
    [
        ("redis://:hunter2@cache:6380/0", "Redis at cache:6380"),
        ("rediss://user:hunter2@cache/1", "Redis at cache:6379"),
        ("unix:///run/redis.sock", "Redis at socket /run/redis.sock"),
    ],
)
def test_the_broker_is_named_by_where_it_is_never_by_its_password(url: str, where: str) -> None:
    assert where_redis(url) == where


async def test_start_up_waits_for_a_dependency_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    attempts = 0

    async def attempt() -> None:
        nonlocal attempts
        attempts += 1
        if attempts < 4:
            raise ConnectionRefusedError(111, "Connection refused")

    with caplog.at_level(logging.INFO, logger="store.startup"):
        await wait_until_up("PostgreSQL at db:5432", attempt, transient=transient, limit_s=10)
    assert attempts == 4
    waiting = [r.getMessage() for r in caplog.records if "waiting" in r.getMessage()]
    assert waiting == [
        "waiting up to 10 s for PostgreSQL at db:5432 ([Errno 111] Connection refused)"
    ]
    assert caplog.records[-1].getMessage() == "PostgreSQL at db:5432 answers"


async def test_start_up_gives_up_after_its_limit_with_one_message() -> None:
    async def attempt() -> None:
        raise ConnectionRefusedError(111, "Connection refused")

    started = time.monotonic()
    with pytest.raises(Unavailable) as gave_up:
        await wait_until_up("Redis at cache:6379", attempt, transient=broker_transient, limit_s=0.5)
    assert 0.5 <= time.monotonic() - started < 1.5
    assert gave_up.value.message == (
        "Redis at cache:6379 did not answer within 0.5 s: [Errno 111] Connection refused"
    )


async def test_start_up_does_not_wait_out_what_waiting_cannot_cure() -> None:
    """A wrong password will not be right in 30 s: say so at once."""
    attempts = 0

    async def attempt() -> None:
        nonlocal attempts
        attempts += 1
        raise asyncpg.InvalidPasswordError('password authentication failed for user "app"')

    with pytest.raises(Unavailable, match="refused us: password authentication failed"):
        await wait_until_up("PostgreSQL at db:5432", attempt, transient=transient, limit_s=30)
    assert attempts == 1


async def test_a_signal_stops_the_wait() -> None:
    """`slotcast serve` cancels start-up on SIGTERM: the wait must not outlive it."""

    async def attempt() -> None:
        raise ConnectionRefusedError(111, "Connection refused")

    waiting = asyncio.create_task(
        wait_until_up("PostgreSQL at db:5432", attempt, transient=transient, limit_s=30)
    )
    await asyncio.sleep(0.3)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
