"""The store at national scale: 100,000 doctors and 10^8 slot rows, and whether hash
partitioning of `slots` by doctor pays (issue 12, item 4).

Why this exists: the clinic network this product first served has 1,000 doctors and a
few million slots; a national booking service has 100,000 doctors, each with a few
weeks of slots open, so about 10^8 rows in `slots`. Its scaling plan asked for hash
partitioning by doctor. Partitioning is cheap to ask for and expensive to take back
(every key that names a slot would have to carry its doctor), so this script measures
what the size costs the booking path and the snapshot read first, at 10^6, 10^7 and
10^8 rows with the same calendar shape, and with `slots` hash-partitioned for
comparison. docs/benchmarks.md ("Scale") has the results and the decision.

The data
  Each run builds a fresh database (migrated like any other), with --doctors doctors
  of 1,000 slots each: 25 days of 40 quarter-hours (08:00-18:00 UTC) from tomorrow.
  So 1,000 doctors is 10^6 rows, 10,000 is 10^7 and 100,000 is 10^8; every doctor's
  calendar is the same size at every scale, and only the table's size changes. Rows
  are generated set-based (INSERT ... SELECT generate_series), one day of every
  doctor per statement, in the order the horizon sweep would add them in production
  (a day at a time for all doctors): a doctor's week then lies on 7 heap pages, not 2.

  Bulk load, then indexes: `slots_pkey` and `slots_open_start` (and the foreign key
  from `appointments`, which needs the primary key) are dropped before the load and
  built after it, as any bulk import would; the doctors' time zone trigger and the
  foreign-key check on `slots.doctor_id` are skipped for the load
  (`session_replication_role = replica`; the generated doctor ids are valid by
  construction). A production table grown row by row with its indexes in place has
  the same B-trees less densely packed (page splits leave pages half to two-thirds
  full for the (doctor, start) index), so the index sizes here are lower bounds, by
  up to about a third. Then VACUUM (ANALYZE), timed, as autovacuum would eventually.

  --partitions N replaces `slots` before the load by a table
  of the same columns, constraints and identity, PARTITION BY HASH (doctor_id) into N
  partitions: primary key (id, doctor_id), `slots_open_start` as before (it holds the
  partition key), and the appointments' foreign key as (slot_id, doctor_id). This is
  what a partitioning migration would have to build.

What it measures, per size
  Each size is built once per variant (--partitions, default 0 and 32: one table, and
  32 hash partitions), all side by side; then the variants are measured in turn,
  --rounds times (default 2), so that whatever else runs on this shared machine
  falls on each alike; then each database is dropped.
  - build: seconds to generate the rows, to build the indexes, and the first VACUUM;
  - sizes: the slots heap (`pg_relation_size`, summed over partitions), its indexes
    (`pg_indexes_size`) one by one, the largest partition, and the whole database;
  - per round, latencies p50/p99 in ms:
    - lookup: `SELECT doctor_id FROM slots WHERE id = $1` (what the booking's first
      statement, `sql.SLOT_DOCTOR_LOCK`, reads before it locks), 1,000 random slots;
      and the same with `AND doctor_id = $2`, which a partitioned table can prune;
    - booking: `store.commands.book_slot` (the server's `book` transaction, with an
      idempotency key): 500 serial bookings of random slots of random doctors, then
      1,500 with 10 bookers on a pool of 10 (the server's default pool), then 300 of
      one hot doctor with 10 bookers (all queue on its lock);
    - snapshot: `store.reads.snapshot` of one week (280 slots) of a random doctor,
      500 serial, then 1,500 with 10 readers;
  - the generic plans (EXPLAIN ANALYZE, BUFFERS) of the snapshot's `sql.SLOTS_IN_RANGE`
    and of the lookup: pages touched per query, which the machine's load cannot skew;
  - with --profile, the serial bookings' time statement by statement (where a
    partitioned table's cost lies), at some cost to every other figure;
  - VACUUM (ANALYZE) of `slots` again after the bookings (their dead row versions make
    it scan every index in full: the maintenance cost that grows with the table).

  Latencies are measured in this process (asyncio, uvloop), round trips included.
  The embedded cluster keeps its default shared_buffers (128 MB), so most reads come
  from the OS page cache (this machine has 23 GiB); fsync, synchronous_commit and
  full_page_writes are off, as in the test suite: commits cost no disk flush, so what
  is left is what the table's size costs. Every database is dropped when its size is
  done (also on SIGINT or SIGTERM), and the embedded cluster with them at the end.

Usage (run it niced; other people share this machine)
  nice -n 19 ionice -c3 .venv/bin/python bench/scale.py                   # 10^6, 10^7, 10^8
  nice -n 19 ionice -c3 .venv/bin/python bench/scale.py --doctors 10000 --partitions 0,16,64
  nice -n 19 ionice -c3 .venv/bin/python bench/scale.py --doctors 1000 --profile
  .venv/bin/python bench/scale.py --database-url postgresql://u@h/postgres  # creates dbs there
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `testkit` is not an installed package

import asyncpg  # noqa: E402

from store import commands, embedded, reads, sql  # noqa: E402
from store.migrate import migrate  # noqa: E402
from store.pool import Store, open_store  # noqa: E402
from testkit.harness import with_database  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from booking import Profiler  # noqa: E402

SLOTS_PER_DAY = 40  # 08:00-18:00 in quarter-hours
DAYS = 25  # 1,000 slots per doctor
SLOT_MINUTES = 15
perf = time.perf_counter


def percentile(ordered: list[float], p: float) -> float:
    """Nearest rank, as bench/booking.py computes it."""
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p * len(ordered)) - 1))]


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def mib(n: int) -> str:
    return f"{n / 2**20:,.0f}"


@dataclass
class Result:
    doctors: int
    partitions: int
    rows: int = 0
    timings: dict[str, float] = field(default_factory=dict)  # seconds
    sizes: dict[str, int] = field(default_factory=dict)  # bytes
    latencies: dict[str, list[float]] = field(default_factory=dict)  # seconds
    loadavg: list[float] = field(default_factory=list)
    plans: dict[str, str] = field(default_factory=dict)
    taken: set[tuple[int, int]] = field(default_factory=set)  # (doctor, slot index) booked

    @property
    def database(self) -> str:
        return f"slotcast_scale_{self.doctors}_{self.partitions}"

    @property
    def label(self) -> str:
        shape = f"{self.partitions} hash partitions" if self.partitions else "one table"
        return f"{self.rows:,} rows, {self.doctors:,} doctors, {shape}"


# ---- building the data ------------------------------------------------------------------------


async def partition_slots(conn: asyncpg.Connection, partitions: int) -> None:
    """`slots` as a partitioning migration would leave it, still empty."""
    await conn.execute(
        """
        ALTER TABLE appointments DROP CONSTRAINT appointments_slot_id_fkey;
        CREATE TABLE slots_hashed (LIKE slots INCLUDING DEFAULTS INCLUDING CONSTRAINTS
                                   INCLUDING IDENTITY) PARTITION BY HASH (doctor_id);
        DROP TABLE slots;
        ALTER TABLE slots_hashed RENAME TO slots;
        ALTER TABLE slots ADD FOREIGN KEY (doctor_id) REFERENCES doctors ON DELETE CASCADE;
        """
    )
    for n in range(partitions):
        await conn.execute(
            f"CREATE TABLE slots_p{n:03d} PARTITION OF slots "
            f"FOR VALUES WITH (MODULUS {partitions}, REMAINDER {n})"
        )


async def build(conn: asyncpg.Connection, result: Result, first_day: date) -> None:
    doctors, partitions = result.doctors, result.partitions
    if partitions:
        await partition_slots(conn, partitions)
    else:
        await conn.execute(
            """
            ALTER TABLE appointments DROP CONSTRAINT appointments_slot_id_fkey;
            ALTER TABLE slots DROP CONSTRAINT slots_pkey;
            DROP INDEX slots_open_start;
            """
        )
    await conn.execute("SET session_replication_role = replica")
    await conn.execute(
        """
        INSERT INTO doctors (id, name, specialty, timezone, slot_minutes, horizon_days)
        SELECT d, 'Doctor ' || d, 'specialty ' || (d % 50), 'UTC', $2, 60
        FROM generate_series(1, $1::int) d
        """,
        doctors,
        SLOT_MINUTES,
    )
    started = perf()
    base = datetime.combine(first_day, datetime.min.time(), UTC) + timedelta(hours=8)
    for day in range(DAYS):
        at = base + timedelta(days=day)
        # A lateral reference to d keeps the doctor outermost, so each doctor's day lands
        # on adjacent rows, as the sweep inserts it (without it the planner may put the
        # 40 quarter-hours outermost, and a week then spans 280 heap pages, not 7).
        await conn.execute(
            """
            INSERT INTO slots (doctor_id, starts_at, ends_at)
            SELECT d, $2::timestamptz + k * make_interval(mins => $3),
                      $2::timestamptz + (k + 1) * make_interval(mins => $3)
            FROM generate_series(1, $1::int) d
            CROSS JOIN LATERAL generate_series(0 * d, $4 - 1) k
            """,
            doctors,
            at,
            SLOT_MINUTES,
            SLOTS_PER_DAY,
        )
        if day % 5 == 4:
            print(f"  day {day + 1}/{DAYS} loaded, {perf() - started:.0f} s", flush=True)
    await conn.execute("RESET session_replication_role")
    result.timings["load s"] = perf() - started

    started = perf()
    if partitions:
        await conn.execute("ALTER TABLE slots ADD PRIMARY KEY (id, doctor_id)")
        await conn.execute(
            "CREATE UNIQUE INDEX slots_open_start ON slots (doctor_id, starts_at) "
            "WHERE retired_at IS NULL"
        )
        await conn.execute(
            "ALTER TABLE appointments ADD FOREIGN KEY (slot_id, doctor_id) "
            "REFERENCES slots (id, doctor_id)"
        )
    else:
        await conn.execute("ALTER TABLE slots ADD PRIMARY KEY (id)")
        await conn.execute(
            "CREATE UNIQUE INDEX slots_open_start ON slots (doctor_id, starts_at) "
            "WHERE retired_at IS NULL"
        )
        await conn.execute(
            "ALTER TABLE appointments ADD CONSTRAINT appointments_slot_id_fkey "
            "FOREIGN KEY (slot_id) REFERENCES slots"
        )
    result.timings["indexes s"] = perf() - started
    print(f"  indexes built, {result.timings['indexes s']:.0f} s", flush=True)

    started = perf()
    await conn.execute("VACUUM (ANALYZE) slots")
    await conn.execute("ANALYZE doctors")
    result.timings["first vacuum s"] = perf() - started
    result.rows = await conn.fetchval("SELECT count(*) FROM slots")


# The tables that hold rows: the partitions, or `slots` itself when it has none.
LEAVES = """
WITH leaves AS (
    SELECT relid FROM pg_partition_tree('slots') WHERE isleaf
    UNION ALL
    SELECT oid FROM pg_class WHERE oid = 'slots'::regclass AND relkind = 'r'
)
"""


async def measure_sizes(conn: asyncpg.Connection, result: Result) -> None:
    """Heap and indexes of `slots`, summed over its partitions when it has any."""
    result.sizes["heap"] = await conn.fetchval(
        LEAVES + "SELECT sum(pg_relation_size(relid)) FROM leaves"
    )
    result.sizes["indexes"] = await conn.fetchval(
        LEAVES + "SELECT sum(pg_indexes_size(relid)) FROM leaves"
    )
    rows = await conn.fetch(
        LEAVES
        + """
        SELECT coalesce(p.relname, c.relname) AS name, sum(pg_relation_size(i.indexrelid)) AS size
        FROM leaves t
        JOIN pg_index i ON i.indrelid = t.relid
        JOIN pg_class c ON c.oid = i.indexrelid
        LEFT JOIN pg_inherits h ON h.inhrelid = i.indexrelid
        LEFT JOIN pg_class p ON p.oid = h.inhparent
        GROUP BY 1
        """
    )
    for row in rows:
        result.sizes[f"index {row['name']}"] = row["size"]
    result.sizes["largest partition, heap + indexes"] = await conn.fetchval(
        LEAVES + "SELECT max(pg_relation_size(relid) + pg_indexes_size(relid)) FROM leaves"
    )
    result.sizes["database"] = await conn.fetchval("SELECT pg_database_size(current_database())")


# ---- measuring --------------------------------------------------------------------------------


async def timed_all(
    items: list[int], workers: int, one: Callable[[int], Awaitable[object]]
) -> list[float]:
    """Each item once, by `workers` tasks back to back; the latency of each."""
    queue = list(reversed(items))
    latencies: list[float] = []

    async def worker() -> None:
        while queue:
            item = queue.pop()
            started = perf()
            await one(item)
            latencies.append(perf() - started)

    await asyncio.gather(*(worker() for _ in range(workers)))
    return latencies


async def pick_slots(
    conn: asyncpg.Connection, pairs: list[tuple[int, int]], first_day: date
) -> list[int]:
    """Slot ids of (doctor, slot index) pairs, read before the clock starts."""
    base = datetime.combine(first_day, datetime.min.time(), UTC) + timedelta(hours=8)
    starts = [
        base
        + timedelta(days=i // SLOTS_PER_DAY)
        + timedelta(minutes=SLOT_MINUTES * (i % SLOTS_PER_DAY))
        for _, i in pairs
    ]
    rows = await conn.fetch(
        """SELECT s.id FROM unnest($1::int[], $2::timestamptz[]) AS u(d, t)
           JOIN slots s ON s.doctor_id = u.d AND s.starts_at = u.t AND s.retired_at IS NULL""",
        [d for d, _ in pairs],
        starts,
    )
    ids = [r["id"] for r in rows]
    random.shuffle(ids)
    return ids


async def explain(conn: asyncpg.Connection, query: str, *args: object) -> str:
    """The generic plan, as a prepared statement of the pool runs it after five calls."""
    await conn.execute("SET plan_cache_mode = force_generic_plan")
    try:
        rows = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + query, *args)
    finally:
        await conn.execute("RESET plan_cache_mode")
    return "\n".join(r[0] for r in rows)


async def measure(
    store: Store,
    conn: asyncpg.Connection,
    result: Result,
    first_day: date,
    rng: random.Random,
    profiler: Profiler | None,
) -> None:
    """One round of every latency figure, added to the result's samples."""
    doctors = result.doctors
    taken = result.taken

    def sample(count: int, doctor: int | None = None) -> list[tuple[int, int]]:
        # Slots from the third day on: none starts (too_late) during the run.
        picked: list[tuple[int, int]] = []
        while len(picked) < count:
            pair = (
                doctor if doctor is not None else rng.randint(1, doctors),
                rng.randrange(2 * SLOTS_PER_DAY, DAYS * SLOTS_PER_DAY),
            )
            if pair not in taken:
                taken.add(pair)
                picked.append(pair)
        return picked

    lookups = await pick_slots(conn, [(rng.randint(1, doctors), 0) for _ in range(1000)], first_day)
    doctor_of = {
        r["id"]: r["doctor_id"]
        for r in await conn.fetch(
            "SELECT id, doctor_id FROM slots WHERE id = ANY($1::bigint[])", lookups
        )
    }
    warmup = await pick_slots(conn, sample(100), first_day)
    serial = await pick_slots(conn, sample(500), first_day)
    concurrent = await pick_slots(conn, sample(1500), first_day)
    hot_doctor = rng.randint(1, doctors)
    hot = await pick_slots(conn, sample(300, hot_doctor), first_day)

    async def lookup(slot_id: int) -> None:
        async with store.connection() as c:
            await c.fetchval("SELECT doctor_id FROM slots WHERE id = $1", slot_id)

    async def lookup_pruned(slot_id: int) -> None:
        # What the lookup would cost if every statement naming a slot also named its
        # doctor (the slot id of the wire would have to carry it): one partition.
        async with store.connection() as c:
            await c.fetchval(
                "SELECT doctor_id FROM slots WHERE id = $1 AND doctor_id = $2",
                slot_id,
                doctor_of[slot_id],
            )

    async def book(slot_id: int) -> None:
        await commands.book_slot(
            store,
            slot_id=slot_id,
            patient_id=f"patient-{rng.randrange(1_000_000)}",
            idempotency_key=uuid.uuid4().hex,
        )

    start = first_day + timedelta(days=2)

    async def week(doctor: int) -> None:
        await reads.snapshot(store, doctor, start, start + timedelta(days=7))

    def add(key: str, latencies: list[float]) -> None:
        result.latencies.setdefault(key, []).extend(latencies)

    result.loadavg.append(os.getloadavg()[0])
    await timed_all(warmup, 10, book)
    await timed_all(lookups[:100], 1, lookup)
    add("slot lookup by id, serial", await timed_all(lookups, 1, lookup))
    add("slot lookup by id and doctor, serial", await timed_all(lookups, 1, lookup_pruned))
    if profiler is not None:
        profiler.reset()
    add("book, serial", await timed_all(serial, 1, book))
    if profiler is not None:
        result.plans["booking, serial, statement by statement"] = profiler.report(len(serial))
    add("book, 10 bookers", await timed_all(concurrent, 10, book))
    add("book, one hot doctor, 10 bookers", await timed_all(hot, 10, book))
    weeks = [rng.randint(1, doctors) for _ in range(2000)]
    add("snapshot (a week), serial", await timed_all(weeks[:500], 1, week))
    add("snapshot (a week), 10 readers", await timed_all(weeks[500:], 10, week))
    result.loadavg.append(os.getloadavg()[0])
    result.plans["snapshot, generic plan"] = await explain(
        conn, sql.SLOTS_IN_RANGE, rng.randint(1, doctors), start, start + timedelta(days=7), None
    )
    some = rng.choice(lookups)
    result.plans["slot lookup, generic plan"] = await explain(
        conn, "SELECT doctor_id FROM slots WHERE id = $1", some
    )
    result.plans["slot lookup by id and doctor, generic plan"] = await explain(
        conn, "SELECT doctor_id FROM slots WHERE id = $1 AND doctor_id = $2", some, doctor_of[some]
    )
    print(f"  measured: {result.label}", flush=True)


async def create(admin: str, result: Result, first_day: date) -> None:
    """The run's database, migrated, loaded, indexed, vacuumed and sized."""
    name = result.database
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    dsn = with_database(admin, name)
    await migrate(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SET maintenance_work_mem = '1GB'")
        await conn.execute("SET max_parallel_maintenance_workers = 0")  # 2 shared cores
        print(f"build: {result.doctors:,} doctors, {result.partitions} partitions", flush=True)
        started = perf()
        await build(conn, result, first_day)
        await measure_sizes(conn, result)
        print(f"  built in {perf() - started:.0f} s", flush=True)
    finally:
        await conn.close()


async def drop(admin: str, result: Result) -> None:
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {result.database} WITH (FORCE)")
    finally:
        await conn.close()
    print(f"  database {result.database} dropped", flush=True)


async def scale(
    admin: str,
    args: argparse.Namespace,
    doctors: int,
    rng: random.Random,
    profiler: Profiler | None,
) -> list[Result]:
    """Every variant of one size built side by side, then measured in alternation, so a
    neighbour's load on this shared machine falls on all of them alike."""
    results = [Result(doctors, p) for p in args.partitions]
    first_day = date.today() + timedelta(days=1)
    try:
        for result in results:
            await create(admin, result, first_day)
        for _ in range(args.rounds):
            for result in results:
                dsn = with_database(admin, result.database)
                async with open_store(dsn, min_size=10, max_size=10) as store:
                    conn = await asyncpg.connect(dsn)
                    try:
                        await measure(store, conn, result, first_day, rng, profiler)
                    finally:
                        await conn.close()
        for result in results:
            conn = await asyncpg.connect(with_database(admin, result.database))
            try:
                started = perf()
                await conn.execute("VACUUM (ANALYZE) slots")
                result.timings["vacuum after bookings s"] = perf() - started
            finally:
                await conn.close()
    finally:
        for result in results:
            await drop(admin, result)
    return results


def report(results: list[Result]) -> str:
    out = []
    header = ["figure", *(r.label for r in results)]
    lat_rows = []
    for key in results[0].latencies:
        cells = [key + " (p50 / p99 ms)"]
        for r in results:
            ordered = sorted(r.latencies.get(key, []))
            cells.append(
                f"{percentile(ordered, 0.5) * 1000:.2f} / {percentile(ordered, 0.99) * 1000:.2f}"
            )
        lat_rows.append(cells)
    size_keys = sorted({k for r in results for k in r.sizes})
    size_rows = [
        [f"{k} (MiB)", *(mib(r.sizes[k]) if k in r.sizes else "-" for r in results)]
        for k in size_keys
    ]
    time_rows = [
        [k, *(f"{r.timings.get(k, math.nan):.1f}" for r in results)] for k in results[0].timings
    ]
    load_rows = [
        ["loadavg before / after", *(" / ".join(f"{x:.1f}" for x in r.loadavg) for r in results)]
    ]
    out.append(table(header, lat_rows + size_rows + time_rows + load_rows))
    return "\n".join(out)


@contextlib.contextmanager
def cluster(url: str | None) -> Iterator[str]:
    """An admin DSN: the given server's, or a throwaway embedded cluster's."""
    if url is not None:
        yield url
        return
    root = Path(tempfile.mkdtemp(prefix="slotcast-scale-"))
    admin, handle = embedded.start(root / "pg", throwaway=True)
    try:

        async def tune() -> None:
            conn = await asyncpg.connect(admin)
            try:
                for setting in ("fsync", "synchronous_commit", "full_page_writes"):
                    await conn.execute(f"ALTER SYSTEM SET {setting} = off")
                await conn.execute("ALTER SYSTEM SET max_wal_size = '4GB'")
                await conn.execute("SELECT pg_reload_conf()")
                about = await conn.fetchval(
                    "SELECT version() || ', shared_buffers ' || current_setting('shared_buffers')"
                )
                print(f"PostgreSQL: {about}", flush=True)
            finally:
                await conn.close()

        asyncio.run(tune())
        yield admin
    finally:
        handle.cleanup()
        shutil.rmtree(root, ignore_errors=True)
        print(f"embedded cluster under {root} removed", flush=True)


async def main(args: argparse.Namespace, admin: str) -> int:
    rng = random.Random(args.seed)
    profiler = None
    if args.profile:  # every statement timed, at some cost to every other figure
        profiler = Profiler()
        profiler.install()
    results = []
    for doctors in args.doctors:
        started = perf()
        done = await scale(admin, args, doctors, rng, profiler)
        print(f"  done in {perf() - started:.0f} s\n" + report(done) + "\n", flush=True)
        for result in done:
            for name, plan in result.plans.items():
                print(f"{result.label}: {name}:\n{plan}\n", flush=True)
        results += done
    print("summary\n" + report(results))
    return 0


def run() -> int:
    p = argparse.ArgumentParser(description="The store at 10^6-10^8 slots (see the docstring).")
    p.add_argument("--database-url", help="an admin DSN (default: embedded, throwaway)")
    numbers = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p.add_argument(
        "--doctors",
        type=numbers,
        default=[1000, 10000, 100000],
        help="comma-separated sizes, in doctors of 1,000 slots each (default 1000,10000,100000)",
    )
    p.add_argument(
        "--partitions",
        type=numbers,
        default=[0, 32],
        help="comma-separated variants of each size: 0 = one table, N = N hash partitions",
    )
    p.add_argument("--rounds", type=int, default=2, help="measurements of each variant")
    p.add_argument(
        "--profile",
        action="store_true",
        help="time the serial bookings statement by statement (bench/booking.py's profiler)",
    )
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    # Stopped by a signal, it still drops its databases and removes the embedded cluster.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with cluster(args.database_url) as admin:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main(args, admin))


if __name__ == "__main__":
    raise SystemExit(run())
