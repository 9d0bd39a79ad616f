"""The store handle: the pool, and the bounds on every use of it.

Every use of the database is bounded on this side (`Store.connection`): a
connection is waited for at most `acquire_timeout_s`, and one unit of work (a
statement, or a whole transaction) may take at most `timeout_s`, each call
included. PostgreSQL's own `statement_timeout` cannot help when PostgreSQL itself
is frozen or the network has gone quiet; these bounds turn that into
`unavailable` in a known time, and the connection, whose state is then unknown,
is terminated rather than handed to the next request. The transaction every write
goes through is `store.runner.run`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import orjson

from store import sql
from store.changes import Change
from store.errors import Unavailable, transient, translated
from store.startup import wait_until_up, where_postgres
from store.timing import StageTimes

log = logging.getLogger(__name__)

OnCommit = Callable[[list[Change]], None]


def _ignore(changes: list[Change]) -> None:
    return None


class Store:
    """The handle every store function takes: the pool, its time bounds, and what must
    follow each commit.

    `on_commit` is told of every commit's changes, in commit order per doctor; it is
    given when the store is opened (the server passes its outbox) and runs on the
    committing task, so it must only queue.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        session_state: set[int] | None = None,
        *,
        on_commit: OnCommit | None = None,
        timeout_s: float | None = None,
        acquire_timeout_s: float | None = None,
    ) -> None:
        self.pool = pool
        # Backend pids of pooled connections that may hold session state (see open_store).
        self.session_state = session_state if session_state is not None else set()
        self.on_commit: OnCommit = on_commit or _ignore
        self.timeout_s = timeout_s
        self.acquire_timeout_s = acquire_timeout_s
        self.waiting = 0  # callers in `connection` waiting for the pool, for pool_stats
        # Where each write's time goes (the runner, the outbox and the rooms observe).
        self.timings = StageTimes()

    def pool_stats(self) -> tuple[int, int, int, int]:
        """(open, idle, max, waiting): the pool's load, for the server's metrics."""
        pool = self.pool
        return pool.get_size(), pool.get_idle_size(), pool.get_max_size(), self.waiting

    @contextlib.asynccontextmanager
    async def connection(self, *, bounded: bool = True) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection for one unit of work, with driver errors translated.

        Acquired within `acquire_timeout_s`; the block must end within `timeout_s`
        (unless `bounded` is False: work that spans several transactions on purpose,
        each call still bounded by the pool's `command_timeout`). At the deadline the
        connection is terminated, which fails whatever waits on it at once: cancelling
        the task instead would leave a transaction's ROLLBACK waiting on the very
        server that stopped answering. Any block that ends in a timeout, a cancellation
        or a transient error leaves the connection in an unknown state (a query may
        still run, an exchange be half done), so it is terminated rather than reused;
        the pool opens a fresh one when next needed.
        """
        with translated():
            self.waiting += 1
            try:
                conn = await self.pool.acquire(timeout=self.acquire_timeout_s)
            except TimeoutError:
                raise Unavailable("no database connection was free in time") from None
            finally:
                self.waiting -= 1
            expired = False

            def expire() -> None:
                nonlocal expired
                expired = True
                _drop(conn)

            watchdog = None
            if bounded and self.timeout_s is not None:
                watchdog = asyncio.get_running_loop().call_later(self.timeout_s, expire)
            try:
                yield conn
            except BaseException as exc:
                if expired:
                    raise Unavailable("the database did not answer in time") from exc
                if isinstance(exc, asyncio.CancelledError) or transient(exc):
                    _drop(conn)
                raise
            finally:
                if watchdog is not None:
                    watchdog.cancel()
                await self.pool.release(conn)

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        async with self.connection() as conn:
            rows: list[asyncpg.Record] = await conn.fetch(query, *args)
        return rows

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        async with self.connection() as conn:
            row: asyncpg.Record | None = await conn.fetchrow(query, *args)
        return row

    async def fetchval(self, query: str, *args: Any) -> Any:
        async with self.connection() as conn:
            return await conn.fetchval(query, *args)

    async def execute(self, query: str, *args: Any) -> str:
        async with self.connection() as conn:
            status: str = await conn.execute(query, *args)
        return status


def _drop(conn: asyncpg.Connection) -> None:
    """Terminate a pooled connection, unless the driver already did (and released it)."""
    with contextlib.suppress(asyncpg.InterfaceError):
        conn.terminate()


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "jsonb",
        encoder=lambda v: orjson.dumps(v).decode(),
        decoder=orjson.loads,
        schema="pg_catalog",
    )


@contextlib.asynccontextmanager
async def open_store(
    dsn: str,
    *,
    min_size: int = 2,
    max_size: int = 10,
    lock_timeout_ms: int = 1000,
    statement_timeout_ms: int = 2000,
    timeout_ms: int | None = 3000,
    acquire_timeout_ms: int | None = 1000,
    on_commit: OnCommit | None = None,
    application_name: str = "slotcast",
    durable_commits: bool = True,
) -> AsyncIterator[Store]:
    """A pool whose every connection fails fast on a stuck lock or a runaway statement,
    and whose every use is bounded on this side too (`timeout_ms`, `acquire_timeout_ms`;
    None: unbounded). `timeout_ms` also bounds each call, the connecting and the close.

    `durable_commits=False` (`synchronous_commit = off`) is for work whose last commits
    may be lost in a crash of PostgreSQL without harm, such as webhook delivery's
    bookkeeping (a lost cursor write resends, never skips): its commits then neither
    wait for nor ask for a WAL flush, so they add no flushes for bookings to queue
    behind."""
    timeout_s = _seconds(timeout_ms)
    session_state: set[int] = set()
    with translated():
        async with asyncio.timeout(timeout_s):
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                init=_init_connection,
                reset=_reset_only_if(session_state),
                # Every call's default bound, BEGIN and COMMIT included; and connecting.
                command_timeout=timeout_s,
                timeout=timeout_s or 60.0,
                server_settings={
                    "lock_timeout": str(lock_timeout_ms),
                    "statement_timeout": str(statement_timeout_ms),
                    "idle_in_transaction_session_timeout": str(statement_timeout_ms * 5),
                    "application_name": application_name,
                    **({} if durable_commits else {"synchronous_commit": "off"}),
                },
            )
    try:
        yield Store(
            pool,
            session_state,
            on_commit=on_commit,
            timeout_s=timeout_s,
            acquire_timeout_s=_seconds(acquire_timeout_ms),
        )
    finally:
        await _close(pool, timeout_s)


async def _close(pool: asyncpg.Pool, timeout_s: float | None) -> None:
    """Close gracefully if PostgreSQL lets us (every unit of work is bounded, so in-use
    connections come back within `timeout_s`); else drop the connections."""
    try:
        async with asyncio.timeout(None if timeout_s is None else timeout_s + 1.0):
            await pool.close()
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        log.warning("database pool did not close cleanly (%s); connections dropped", exc)
        pool.terminate()


def _seconds(ms: int | None) -> float | None:
    return None if ms is None else ms / 1000


async def wait_for_database(dsn: str, *, limit_s: float, connect_timeout_s: float) -> None:
    """Return once PostgreSQL at `dsn` takes a connection; `Unavailable` after `limit_s`
    (or at once when waiting cannot help, e.g. a wrong password or database name)."""

    async def attempt() -> None:
        async with asyncio.timeout(connect_timeout_s):
            conn = await asyncpg.connect(dsn, timeout=connect_timeout_s)
            await conn.close()

    await wait_until_up(where_postgres(dsn), attempt, transient=transient, limit_s=limit_s)


def _reset_only_if(session_state: set[int]) -> Callable[[asyncpg.Connection], Awaitable[None]]:
    """A pool reset that costs a round trip only where session state may be left behind.

    asyncpg's default reset sends `SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
    RESET ALL` on every release: one round trip per checkout, on every booking. Before this
    hook runs, asyncpg itself has dropped the connection's listeners and rolled back any
    transaction left open. The store leaves no other session state (no SET, LISTEN, WITH
    HOLD cursors or temporary tables: all its SQL is in `sql.py`) except the session
    advisory lock of `exclusive`, which marks its connection (by backend pid) before
    locking: a marked connection gets the full reset, whatever happened to its unlock.
    Anything new that leaves session state must mark its connection the same way.
    """

    async def reset(conn: asyncpg.Connection) -> None:
        pid = conn.get_server_pid()
        if pid in session_state:
            session_state.discard(pid)
            await conn.execute(conn.get_reset_query())

    return reset


# ---- beside the pool ----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def exclusive(store: Store, namespace: int, key: int = 0) -> AsyncIterator[None]:
    """Hold a session advisory lock across several transactions (e.g. seeding): each
    call is bounded, the whole is not."""
    async with store.connection(bounded=False) as conn:
        # Fully reset on release even if the unlock below never runs.
        store.session_state.add(conn.get_server_pid())
        await conn.execute(sql.SESSION_LOCK, namespace, key)
        try:
            yield
        finally:
            await conn.execute(sql.SESSION_UNLOCK, namespace, key)


async def ping(store: Store, *, timeout_s: float | None = None) -> None:
    """Raise `Unavailable` unless the database answers, within `timeout_s` (waiting for a
    pooled connection included) or the store's own bounds."""
    with translated():
        async with asyncio.timeout(timeout_s):
            async with store.connection() as conn:
                await conn.fetchval("SELECT 1")
