"""Read replicas: reads that may be served by a streaming standby, never older than known.

Why: snapshots, dashboards, resumes and the doctor search are most of the database's
work and need no lock, so they can go to PostgreSQL read replicas, while commands
and everything under a lock stay on the primary (they never come here).

A replica is behind the primary by its replication lag, so a read from it is used
only if it is at least as new as what the caller already knows (the *fence*):

- a fenced read names a doctor and a minimum version (a watcher's room version when
  it joined, a resuming client's `since`); the read checks the doctor's version
  first and stops with `store.reads.Behind` below the fence. The replica is polled
  for up to `wait_s` (replay is usually a few milliseconds behind), then the
  primary answers, whatever its version: the primary is the truth;
- this instance remembers the highest version of each doctor it has committed,
  read, or (its closing rooms tell) sent as deltas (`KNOWN_DOCTORS` of them, least
  recently used dropped), and fences every read of that doctor with it too: a
  client of this instance never reads its own booking undone, nor a calendar older
  than one this instance already answered with;
- a replica that fails (down, frozen past the store's bounds, restarting) costs the
  read nothing but time: the primary answers, and the replica leaves the rotation
  at once. A replica is never the reason for `unavailable`.

A background check (`check_every_s`) compares each replica's replayed WAL position
with the primary's: a replica more than `max_lag_s` behind, or failing, or not a
standby at all, is out of rotation until a check finds it healthy again. Every
replica pool has the primary's client-side bounds (`store.pool.open_store`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

from store import sql
from store.changes import Change
from store.errors import Invalid, NotFound, StoreError, Unavailable
from store.pool import Store, open_store
from store.reads import Behind

log = logging.getLogger(__name__)

T = TypeVar("T")

# Doctors whose highest known version this instance remembers (about 100 bytes each).
KNOWN_DOCTORS: Final = 100_000
NOT_CHECKED: Final = "not checked yet"
POLL_S: Final = 0.005  # how often a replica behind the fence is asked again
MAX_POSITIONS: Final = 600  # primary positions kept per replica while it is behind
# Why a read meant for a replica went to the primary.
FALLBACK_REASONS: Final = ("behind", "missing", "failed", "none")


@dataclass(eq=False, slots=True)
class Replica:
    """One replica: its pool, and whether reads may go to it."""

    name: str  # host:port/database, never the password: a metric label
    store: Store
    in_rotation: bool = False  # until the first check finds it current
    lag_s: float = 0.0
    reason: str = NOT_CHECKED
    # (monotonic time, primary WAL position) at each check, oldest first: how far back
    # the oldest position this replica has not replayed was the primary's.
    positions: deque[tuple[float, int]] = field(default_factory=deque)


@dataclass(frozen=True, slots=True)
class ReplicaReading:
    """The replicas as the server's metrics show them."""

    lag_s: dict[str, float]
    in_rotation: dict[str, bool]
    reads: dict[str, int]  # by target: replica, primary
    fallbacks: dict[str, int]  # by reason (FALLBACK_REASONS)


class Replicas:
    """Where the unlocked reads go. Without replicas every read goes to the primary,
    exactly as before; with them, see the module's rules."""

    def __init__(
        self,
        urls: Sequence[str] = (),
        *,
        wait_s: float = 0.02,
        max_lag_s: float = 1.0,
        check_every_s: float = 1.0,
        known_doctors: int = KNOWN_DOCTORS,
        primary: Store | None = None,
    ) -> None:
        self.urls = list(urls)
        self.wait_s = wait_s
        self.max_lag_s = max_lag_s
        self.check_every_s = check_every_s
        self.primary = primary  # set by `serving`
        self.replicas: list[Replica] = []
        self._turn = itertools.count()
        self._known: OrderedDict[int, int] = OrderedDict()
        self._known_limit = known_doctors
        self.reads = {"replica": 0, "primary": 0}
        self.fallbacks = dict.fromkeys(FALLBACK_REASONS, 0)

    # ---- lifetime ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def serving(self, primary: Store, **pool: Any) -> AsyncIterator[Replicas]:
        """Open a pool per replica URL (connecting lazily: a replica that is down must
        not stop the instance from starting) and check them until the block ends.
        `pool`: `store.pool.open_store`'s bounds, the primary's."""
        self.primary = primary
        async with contextlib.AsyncExitStack() as stack:
            for url in self.urls:
                replica_store = await stack.enter_async_context(
                    open_store(url, **{**pool, "min_size": 0}, application_name="slotcast-replica")
                )
                self.replicas.append(Replica(where(url), replica_store))
            checker = None
            if self.replicas:
                log.info("read replicas: %s", ", ".join(r.name for r in self.replicas))
                checker = asyncio.create_task(self._check_forever(), name="replica-check")
            try:
                yield self
            finally:
                if checker is not None:
                    checker.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await checker
                self.replicas = []

    # ---- what the instance knows --------------------------------------------------------------

    def committed(self, changes: list[Change]) -> None:
        """This instance's commits (the store's commit hook): its reads fence on them."""
        for change in changes:
            self.note(change.doctor_id, change.version)

    def note(self, doctor_id: int, version: int) -> None:
        """This instance served (or its closing room had) `version` of the doctor."""
        if not self.replicas:
            return  # nothing to fence: every read is the primary's
        known = self._known.get(doctor_id)
        if known is None or version > known:
            self._known[doctor_id] = version
        self._known.move_to_end(doctor_id)
        while len(self._known) > self._known_limit:
            self._known.popitem(last=False)

    def known(self, doctor_id: int) -> int:
        """The highest version of the doctor this instance committed or served (0: none
        remembered)."""
        return self._known.get(doctor_id, 0)

    # ---- reads ------------------------------------------------------------------------------

    async def read(self, read: Callable[[Store], Awaitable[T]]) -> T:
        """A read with no version to fence on (the doctor search): any replica in
        rotation, hence at most `max_lag_s` behind the primary; else the primary."""
        replica = self._pick()
        if replica is not None:
            try:
                result = await read(replica.store)
            except (NotFound, Invalid):
                raise
            except Exception as exc:  # never the replica's fault to the client: the primary
                self._failed(replica, exc)
            else:
                self.reads["replica"] += 1
                return result
        return await self._primary(read)

    async def fenced(
        self,
        doctor_id: int,
        fence: int,
        read: Callable[[Store, int], Awaitable[T]],
        version_of: Callable[[T], int],
    ) -> T:
        """`read(store, min_version)` of one doctor, never older than `fence` nor than
        what this instance knows of the doctor; from a replica when one has it within
        `wait_s`, else from the primary (whatever its version)."""
        replica = self._pick()
        if replica is not None:
            fence = max(fence, self.known(doctor_id))
            deadline = time.monotonic() + self.wait_s
            while True:
                try:
                    result = await read(replica.store, fence)
                except Behind:
                    if time.monotonic() + POLL_S > deadline or not replica.in_rotation:
                        self.fallbacks["behind"] += 1
                        break
                    await asyncio.sleep(POLL_S)
                    continue
                except NotFound:
                    # A doctor the replica has not replayed yet, or none at all: the
                    # primary decides.
                    self.fallbacks["missing"] += 1
                    break
                except Invalid:
                    raise  # about the request (too many slots), at a version past the fence
                except Exception as exc:  # never the replica's fault to the client
                    self._failed(replica, exc)
                    break
                self.reads["replica"] += 1
                self.note(doctor_id, version_of(result))
                return result
        result = await self._primary(lambda store: read(store, 0))
        self.note(doctor_id, version_of(result))
        return result

    async def _primary(self, read: Callable[[Store], Awaitable[T]]) -> T:
        assert self.primary is not None, "read before the replicas were opened"
        self.reads["primary"] += 1
        return await read(self.primary)

    def _pick(self) -> Replica | None:
        """The next replica in rotation, round robin (None: none configured or in it)."""
        if not self.replicas:
            return None
        turn = next(self._turn)
        n = len(self.replicas)
        for i in range(n):
            replica = self.replicas[(turn + i) % n]
            if replica.in_rotation:
                return replica
        self.fallbacks["none"] += 1
        return None

    def _failed(self, replica: Replica, exc: Exception) -> None:
        """A replica read failed: the primary answers. A replica that is away (down,
        frozen past the bounds, restarting) or unusable (a DSN the driver refuses)
        waits out of rotation for a check to find it healthy again; one that cancelled
        a read (a conflict with recovery, its statement timeout) stays."""
        self.fallbacks["failed"] += 1
        if isinstance(exc, StoreError) and not isinstance(exc, Unavailable):
            log.info("replica %s read failed, the primary answered: %s", replica.name, exc)
        elif replica.in_rotation:
            replica.in_rotation = False
            replica.reason = f"read failed: {_why(exc)}"
            log.warning("replica %s out of rotation: %s", replica.name, replica.reason)

    # ---- health -----------------------------------------------------------------------------

    async def _check_forever(self) -> None:
        while True:
            try:
                await self.check()
            except Exception:
                log.exception("replica check failed")  # a bug: keep checking
            await asyncio.sleep(self.check_every_s)

    async def check(self) -> None:
        """Measure each replica's lag against the primary; put it in rotation or take it
        out. Each call is bounded by the pools' own bounds."""
        assert self.primary is not None
        now = time.monotonic()
        try:
            position = int(await self.primary.fetchval(sql.PRIMARY_WAL_POSITION))
        except StoreError as exc:
            # The primary away: the lag is judged against the last position it gave.
            log.debug("replica check: the primary did not answer: %s", exc)
        else:
            for replica in self.replicas:
                replica.positions.append((now, position))
        await asyncio.gather(*(self._check(replica, now) for replica in self.replicas))

    async def _check(self, replica: Replica, now: float) -> None:
        try:
            row = await replica.store.fetchrow(sql.REPLICA_REPLAY_POSITION)
        except Exception as exc:  # down, frozen past the bounds, or a DSN the driver refuses
            self._judge(replica, None, f"unreachable: {_why(exc)}")
            return
        assert row is not None
        if not row["standby"] or row["replayed"] is None:
            self._judge(replica, None, "not a standby (promoted, or not a replica at all)")
            return
        replayed = int(row["replayed"])
        positions = replica.positions
        while positions and positions[0][1] <= replayed:
            positions.popleft()  # replayed: no longer a measure of lag
        if len(positions) > MAX_POSITIONS:
            del positions[1]  # thin the middle; the oldest is what the lag is measured by
        lag = now - positions[0][0] if positions else 0.0
        if lag > self.max_lag_s:
            self._judge(replica, lag, f"{lag:.3f} s behind the primary")
        else:
            self._judge(replica, lag, None)

    def _judge(self, replica: Replica, lag: float | None, problem: str | None) -> None:
        if lag is not None:
            replica.lag_s = lag
        healthy = problem is None
        first = replica.reason == NOT_CHECKED
        if healthy != replica.in_rotation or (first and not healthy):
            if healthy:
                log.info("replica %s in rotation", replica.name)
            else:
                log.warning("replica %s out of rotation: %s", replica.name, problem)
        replica.in_rotation = healthy
        replica.reason = problem or "current"

    def reading(self) -> ReplicaReading:
        return ReplicaReading(
            lag_s={r.name: r.lag_s for r in self.replicas},
            in_rotation={r.name: r.in_rotation for r in self.replicas},
            reads=dict(self.reads),
            fallbacks=dict(self.fallbacks),
        )


def _why(exc: Exception) -> str:
    return exc.message if isinstance(exc, StoreError) else f"{type(exc).__name__}: {exc}"


def where(url: str) -> str:
    """host:port/database of a DSN, without its user or password."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = f":{parts.port}" if parts.port else ""
    return f"{host}{port}{parts.path or ''}"


def parse_urls(raw: str) -> list[str]:
    """`SLOTCAST_REPLICA_URLS`: PostgreSQL URLs separated by whitespace (a URL may hold
    commas); `ValueError`, naming the setting but not the password, for anything else."""
    urls = raw.split()
    for url in urls:
        if urlsplit(url).scheme not in ("postgres", "postgresql"):
            raise ValueError(f"SLOTCAST_REPLICA_URLS: {where(url)!r} is not a postgresql:// URL")
    return urls
