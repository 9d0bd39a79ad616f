"""The store handle and the one way a write reaches PostgreSQL.

Every write command runs through `run`, so a slot is never booked twice: one
READ COMMITTED transaction whose first statements take the doctors'
transaction-level advisory locks (in id order, so crossed commands cannot
deadlock); the idempotency key replayed if seen before; expired holds cleared;
then the command re-checks everything under the locks and writes; finally each
touched doctor's version is bumped once and its change record appended, all in
that transaction. The exclusion constraint on appointments stands behind it all.
After the commit the changes go to the store's commit hook (the outbox).

Every use of the database is bounded on this side too (`Store.connection`): a
connection is waited for at most `acquire_timeout_s`, and one unit of work (a
statement, or a whole transaction) may take at most `timeout_s`, each call
included. PostgreSQL's own `statement_timeout` cannot help when PostgreSQL itself
is frozen or the network has gone quiet; these bounds turn that into
`unavailable` in a known time, and the connection, whose state is then unknown,
is terminated rather than handed to the next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any, cast

import asyncpg
import msgspec
import orjson

from protocol.messages import SERVER_MESSAGES, Message
from store import sql, steps
from store.changes import Change
from store.constants import LOCK_NS_DOCTOR, LOCK_NS_PATIENT
from store.errors import (
    IdempotencyConflict,
    NotFound,
    SlotTaken,
    StoreError,
    Unavailable,
    transient,
    translated,
)
from store.startup import wait_until_up, where_postgres
from store.tx import Actor, LockTarget, Outcome, Reply, Taking, Tx

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
            try:
                conn = await self.pool.acquire(timeout=self.acquire_timeout_s)
            except TimeoutError:
                raise Unavailable("no database connection was free in time") from None
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
) -> AsyncIterator[Store]:
    """A pool whose every connection fails fast on a stuck lock or a runaway statement,
    and whose every use is bounded on this side too (`timeout_ms`, `acquire_timeout_ms`;
    None: unbounded). `timeout_ms` also bounds each call, the connecting and the close."""
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
                    "application_name": "slotcast",
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


# ---- the command runner ------------------------------------------------------------------------


async def run(
    store: Store,
    *,
    actor: Actor,
    now: datetime,
    work: Callable[[Tx], Awaitable[Reply]],
    doctors: Iterable[int] = (),
    of_slot: int | None = None,
    of_appointment: int | None = None,
    request: Message | None = None,
    key: str | None = None,
    patient_lock: str | None = None,
    taking: Taking | None = None,
) -> Outcome[Reply]:
    """Run `work` under the locks of `doctors`, or of the doctor of `of_slot` or of
    `of_appointment`, found in the transaction's first statement (`not_found` if none).
    With `of_slot` (a booking or a hold: `taking` says what it inserts), the slot is read
    FOR UPDATE, and the appointment inserted if it passes, by the first read under the
    locks."""
    fingerprint: dict[str, Any] = {}
    if request is not None:
        fingerprint = msgspec.to_builtins(request)
        fingerprint.pop("idempotency_key", None)
    command = request.TYPE if request is not None else "system"
    target = LockTarget(sorted(set(doctors)), of_slot, of_appointment, patient_lock, taking)
    try:
        outcome, error = await _attempt(store, target, actor, now, work, command, fingerprint, key)
    except _KeyRace:
        # The same subject's key was stored by a concurrent command on another doctor.
        async with store.connection() as conn:
            replay = await _replay(conn, actor, key, command, fingerprint)
        if replay is None:  # pragma: no cover - the conflicting insert committed
            raise IdempotencyConflict("key in use by an unfinished request") from None
        return Outcome(cast(Reply, replay), [])
    if outcome.changes:
        store.on_commit(outcome.changes)
    if error is not None:
        raise error
    return outcome


async def _lock(conn: asyncpg.Connection, target: LockTarget) -> list[int]:
    """Take the locks, doctors first in id order, then the patient's: the first statement."""
    if target.slot_id is None and target.appointment_id is None:
        for doctor_id in target.doctor_ids:
            await conn.execute(sql.DOCTOR_LOCK, LOCK_NS_DOCTOR, doctor_id)
        if target.patient is not None:
            await conn.execute(sql.PATIENT_LOCK, LOCK_NS_PATIENT, target.patient)
        return target.doctor_ids
    if target.slot_id is not None:
        if target.patient is not None:
            row = await conn.fetchrow(
                sql.SLOT_DOCTOR_PATIENT_LOCK,
                LOCK_NS_DOCTOR,
                target.slot_id,
                LOCK_NS_PATIENT,
                target.patient,
            )
        else:
            row = await conn.fetchrow(sql.SLOT_DOCTOR_LOCK, LOCK_NS_DOCTOR, target.slot_id)
        if row is None:
            raise NotFound(f"no slot {target.slot_id}")
    else:
        assert target.patient is None  # no command locks a patient by appointment
        row = await conn.fetchrow(
            sql.APPOINTMENT_DOCTOR_LOCK, LOCK_NS_DOCTOR, target.appointment_id
        )
        if row is None:
            raise NotFound(f"no appointment {target.appointment_id}")
    return [row["doctor_id"]]


async def _attempt(
    store: Store,
    target: LockTarget,
    actor: Actor,
    now: datetime,
    work: Callable[[Tx], Awaitable[Reply]],
    command: str,
    fingerprint: dict[str, Any],
    key: str | None,
) -> tuple[Outcome[Reply], StoreError | None]:
    async with store.connection() as conn, conn.transaction():
        doctor_ids = await _lock(conn, target)
        # One round trip for the versions, the expired-hold check, the idempotency
        # record and the slot or appointment named: its snapshot follows the locks.
        if target.slot_id is not None:
            first = await _slot_prelude(conn, target, now, actor, key)
        elif target.appointment_id is not None:
            first = await conn.fetchrow(
                sql.APPOINTMENT_PRELUDE, now, str(actor), key, target.appointment_id
            )
            if first is None:  # pragma: no cover - appointments are never deleted
                raise NotFound(f"no appointment {target.appointment_id}")
        else:
            first = await conn.fetchrow(sql.COMMAND_PRELUDE, doctor_ids, now, str(actor), key)
        if first["key_command"] is not None:
            # The stored reply is of the type this very command returned the first time.
            replayed = _replayed(first, command, fingerprint)
            return Outcome(cast(Reply, replayed), []), None
        versions = dict(zip(first["doctor_ids"] or [], first["versions"] or [], strict=True))
        tx = Tx(conn, now, actor)
        if first["expired_holds"]:
            for doctor_id in doctor_ids:
                await steps.expire_holds(tx, doctor_id)
        elif target.slot_id is not None:
            tx.prefetched_slot = first  # nothing written since it was read
            if first["taken_id"] is not None:
                assert target.taking is not None
                tx.taken = (target.taking, first)
        elif target.appointment_id is not None:
            tx.prefetched_appointment = first  # nothing written since it was read
        before = tx.checkpoint()
        error: StoreError | None = None
        reply: Reply | None = None
        if before:
            # Expired holds to keep even if the command is refused: a savepoint
            # lets a refusal undo only the command's own work.
            try:
                async with conn.transaction():
                    reply = await work(tx)
            except StoreError as exc:
                tx.restore(before)
                error = exc
        else:
            # Nothing to keep: a refusal rolls the whole transaction back, and
            # the two round trips of a savepoint are saved on every command.
            reply = await work(tx)
        if tx.taken is not None:  # pragma: no cover - the command must claim it
            raise StoreError("an inserted appointment was not the command's")
        tx.prefetched_slot = tx.prefetched_appointment = None
        changes = await _record(conn, tx, versions, actor, key, command, fingerprint, reply)
        # A refused command still commits the holds it found expired; its `reply` is
        # None then, but `run` raises `error` instead of returning it.
        return Outcome(cast(Reply, reply), changes), error


async def _slot_prelude(
    conn: asyncpg.Connection,
    target: LockTarget,
    now: datetime,
    actor: Actor,
    key: str | None,
) -> asyncpg.Record:
    taking = target.taking
    assert taking is not None, "a command locating its doctor by slot inserts on it"
    limits = taking.limits
    try:
        row: asyncpg.Record | None = await conn.fetchrow(
            sql.SLOT_PRELUDE,
            now,
            str(actor),
            key,
            target.slot_id,
            taking.patient_id,
            taking.status.value,
            taking.hold_expires_at,
            taking.slot_status.value,
            taking.max_holds,
            limits.per_doctor if limits is not None else None,
            limits.total if limits is not None else None,
            limits.cooldown if limits is not None and limits.cooldown > timedelta(0) else None,
        )
    except (asyncpg.ExclusionViolationError, asyncpg.UniqueViolationError) as exc:
        # As in `steps.insert_appointment`: the constraint behind every check fired, and
        # the whole transaction rolls back as this propagates.
        raise SlotTaken("the slot overlaps an active appointment") from exc
    if row is None:  # pragma: no cover - slots are never deleted
        raise NotFound(f"no slot {target.slot_id}")
    return row


async def _record(
    conn: asyncpg.Connection,
    tx: Tx,
    versions: dict[int, int],
    actor: Actor,
    key: str | None,
    command: str,
    fingerprint: dict[str, Any],
    reply: Message | None,
) -> list[Change]:
    """Versions, change records and the idempotency record: one statement (`sql.RECORD`)."""
    built = tx.changes(versions)
    remember = reply is not None and key is not None
    if not built and not remember:
        return []
    response = (
        {"type": reply.TYPE, "body": msgspec.to_builtins(reply)} if reply is not None else None
    )
    row = await conn.fetchrow(
        sql.RECORD,
        [c.doctor_id for _, c in built],
        [c.version for _, c in built],
        [kind for kind, _ in built],
        [c.public for _, c in built],
        [c.private.to_builtins() for _, c in built],
        str(actor),
        key if remember else None,
        command if remember else None,
        fingerprint if remember else None,
        response if remember else None,
    )
    if row["recorded"] != len(built):  # pragma: no cover - only a bug can get here
        raise StoreError("a doctor's version moved under its lock")
    if remember and not row["remembered"]:
        raise _KeyRace  # a concurrent command on another doctor stored it first
    return [c for _, c in built]


def _replayed(row: Mapping[str, Any], command: str, fingerprint: dict[str, Any]) -> Message:
    """The reply stored under the key, if the key was used for this same request."""
    if row["key_command"] != command or row["key_request"] != fingerprint:
        raise IdempotencyConflict("this idempotency key was used for a different request")
    response = row["key_response"]
    reply: Message = msgspec.convert(response["body"], SERVER_MESSAGES[response["type"]])
    return reply


async def _replay(
    conn: asyncpg.Connection,
    actor: Actor,
    key: str | None,
    command: str,
    fingerprint: dict[str, Any],
) -> Message | None:
    # Keys belong to the role and subject together: doctor "1" is not patient "1".
    row = await conn.fetchrow(sql.IDEMPOTENCY_GET, str(actor), key)
    if row is None:
        return None
    return _replayed(
        {
            "key_command": row["command"],
            "key_request": row["request"],
            "key_response": row["response"],
        },
        command,
        fingerprint,
    )


class _KeyRace(Exception):
    """Two transactions on different doctors inserted the same idempotency key."""


# ---- before the locks ------------------------------------------------------------------------


async def doctor_of_slot(store: Store, slot_id: int) -> int:
    # A slot never changes doctor, so this is safe before the lock.
    doctor_id: int | None = await store.fetchval(sql.SLOT_DOCTOR, slot_id)
    if doctor_id is None:
        raise NotFound(f"no slot {slot_id}")
    return doctor_id


async def doctor_of_appointment(store: Store, appointment_id: int) -> int:
    # Nor does an appointment.
    doctor_id: int | None = await store.fetchval(sql.APPOINTMENT_DOCTOR, appointment_id)
    if doctor_id is None:
        raise NotFound(f"no appointment {appointment_id}")
    return doctor_id


# ---- beside the runner -------------------------------------------------------------------------


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
