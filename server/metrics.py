"""Prometheus metrics, one registry per app (tests run many apps in one process).

Counts on the fan-out path are added once per change, not once per recipient,
so measuring costs nothing per delivered message.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from protocol.errors import ErrorCode
from store.changes import Change
from store.replicas import FALLBACK_REASONS, ReplicaReading
from store.timing import BUCKETS as STAGE_BUCKETS
from store.timing import STAGES, StageTimes

# Why a connection was closed as a slow consumer (server.connection.SlowReason).
SLOW_REASONS = ("frames", "bytes", "stalled", "budget")

# Fine around the 100 ms fan-out target, and long enough to show a saturated one.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Gauge("slotcast_connections", "Open WebSocket connections", registry=r)
        self.rooms = Gauge("slotcast_rooms", "Rooms with local members", ["kind"], registry=r)
        self.messages_in = Counter(
            "slotcast_messages_in", "Frames received from clients", registry=r
        )
        self.messages_out = Counter(
            "slotcast_messages_out", "Live updates delivered to clients", registry=r
        )
        self.snapshot_reads = Counter(
            "slotcast_snapshot_reads",
            "Watch snapshots served, by where from (cache: a room's calendar; database)",
            ["source"],
            registry=r,
        )
        self.fanout_latency = Histogram(
            "slotcast_fanout_latency_seconds",
            "From commit to this instance handing a change to its members",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.command_latency = Histogram(
            "slotcast_command_seconds",
            "Time to handle one client message",
            ["type"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "slotcast_errors",
            "Error replies by code and transport (ws: `error` messages; rest: error responses)",
            ["code", "transport"],
            registry=r,
        )
        for code in ErrorCode:  # exported at 0, so a rule's increase() sees the first one
            for transport in TRANSPORTS:
                self.errors.labels(code.value, transport)
        self.slow_consumers = Counter(
            "slotcast_slow_consumers",
            "Connections closed (4008) for falling behind, by reason",
            ["reason"],
            registry=r,
        )
        for reason in SLOW_REASONS:
            self.slow_consumers.labels(reason)  # every reason exported, at 0 until it happens
        self.outbox_bytes = Gauge(
            "slotcast_outbox_bytes",
            "Bytes written to WebSockets or queued for them that the kernel has not taken yet",
            registry=r,
        )
        self.backed_up = Gauge(
            "slotcast_backed_up_connections",
            "WebSockets over the high-water mark, whose requests are not being read",
            registry=r,
        )
        self.broker_connected = Gauge(
            "slotcast_broker_connected", "1 while the broker listener hears", registry=r
        )
        self.relayed = Counter(
            "slotcast_relayed_changes", "Changes published by the relay sweep", registry=r
        )
        # Facing the internet: every refusal counts (server.limits, server.guard).
        self.rate_limited = Counter(
            "slotcast_rate_limited", "Requests refused for rate, by budget", ["scope"], registry=r
        )
        self.limiter_unavailable = Counter(
            "slotcast_rate_limiter_unavailable",
            "Requests admitted unchecked because the rate-limit counters did not answer",
            registry=r,
        )
        self.connections_refused = Counter(
            "slotcast_connections_refused",
            "WebSocket upgrades refused before the upgrade, by reason",
            ["reason"],
            registry=r,
        )
        self.connections_closed = Counter(
            "slotcast_connections_closed",
            "WebSockets the server closed to protect itself, by reason",
            ["reason"],
            registry=r,
        )
        self.requests_timed_out = Counter(
            "slotcast_requests_timed_out",
            "HTTP requests cut off for not sending their body in time",
            registry=r,
        )
        self.metrics_refused = metrics_refused(r)
        self.broker_up = Gauge(
            "slotcast_broker_up",
            "1 while the broker answers and its listener hears; 0 while this instance is "
            "degraded (it still serves its clients and delivers its own changes)",
            registry=r,
        )

        self._operations(r)

        # Issue 14: where commit-to-receipt goes, stage by stage (store.timing).
        self.stages = StageReadings()
        r.register(self.stages)

    def _operations(self, r: CollectorRegistry) -> None:
        """What issue 15 added for operators: bookings, the pool, the relay, the process."""
        self.bookings = Counter(
            "slotcast_bookings", "Appointments booked (committed on this instance)", registry=r
        )
        self.cancellations = Counter(
            "slotcast_cancellations",
            "Appointments cancelled (committed on this instance), by who cancelled",
            ["by"],
            registry=r,
        )
        for by in CANCELLED_BY:
            self.cancellations.labels(by)
        self.reschedules = Counter(
            "slotcast_reschedules", "Appointments moved to another slot", registry=r
        )
        self.holds = Counter("slotcast_holds", "Slots held for a patient", registry=r)
        self.holds_ended = Counter(
            "slotcast_holds_ended",
            "Holds that ended without a booking, by how (released, expired)",
            ["how"],
            registry=r,
        )
        for how in ("released", "expired"):
            self.holds_ended.labels(how)
        self.relay_lag = Gauge(
            "slotcast_relay_lag_seconds",
            "Age of the oldest committed change no publish has confirmed (0: none)",
            registry=r,
        )
        self.ready = Gauge(
            "slotcast_ready",
            "1 if /readyz would answer ready at the last scrape (each scrape probes, bounded)",
            registry=r,
        )
        self.draining = Gauge(
            "slotcast_draining", "1 while this instance drains for shutdown", registry=r
        )
        self.database_up = Gauge(
            "slotcast_database_up",
            "1 if the database answered the probe at the last scrape",
            registry=r,
        )
        self._webhooks(r)
        self.readings = Readings()
        r.register(self.readings)
        self.replica_readings = ReplicaReadings(lambda: NO_REPLICAS)
        r.register(self.replica_readings)
        process_collectors(r)

    def _webhooks(self, r: CollectorRegistry) -> None:
        """Per endpoint (by id): what waits, how old it is, how delivery goes."""
        self.webhook_backlog = Gauge(
            "slotcast_webhook_backlog",
            "Changes past a webhook endpoint's cursors, and replays queued",
            ["endpoint"],
            registry=r,
        )
        self.webhook_oldest = Gauge(
            "slotcast_webhook_oldest_undelivered_seconds",
            "Age of the oldest change a webhook endpoint has not been sent (0: none)",
            ["endpoint"],
            registry=r,
        )
        self.webhook_deliveries = WebhookDeliveries(r)

    def webhook_backlog_is(self, found: dict[int, tuple[int, float]]) -> None:
        """Set the gauges to the database's reading; endpoints gone lose their series."""
        for family in (self.webhook_backlog, self.webhook_oldest):
            for labels in list(family._metrics):  # prometheus_client's own list
                if int(labels[0]) not in found:
                    family.remove(*labels)
        for endpoint_id, (count, oldest) in found.items():
            self.webhook_backlog.labels(str(endpoint_id)).set(count)
            self.webhook_oldest.labels(str(endpoint_id)).set(oldest)

    def committed(self, changes: list[Change]) -> None:
        """Count what this instance committed (the store's commit hook): once per commit,
        so summing over instances counts every booking once, and a replay none."""
        for change in changes:
            for kind in change.private.kinds:
                if kind == "slot.booked":
                    self.bookings.inc()
                elif kind == "slot.held":
                    self.holds.inc()
                elif kind == "appointment.cancelled":
                    self.cancellations.labels(_cancelled_by(change.private.actor)).inc()
                elif kind == "appointment.rescheduled":
                    self.reschedules.inc()
                elif kind == "hold.released":
                    self.holds_ended.labels("released").inc()
                elif kind == "hold.expired":
                    self.holds_ended.labels("expired").inc()

    def error(self, code: ErrorCode, transport: str) -> None:
        self.errors.labels(code.value, transport).inc()

    def slow_consumer(self, reason: str) -> None:
        self.slow_consumers.labels(reason).inc()

    def snapshot_read(self, source: str) -> None:
        self.snapshot_reads.labels(source).inc()

    def fanout(self, delivered: int, latency: float) -> None:
        self.messages_out.inc(delivered)
        self.fanout_latency.observe(latency)

    def track(
        self,
        connections: Callable[[], int],
        rooms: Callable[[], dict[str, int]],
        broker_connected: Callable[[], bool],
    ) -> None:
        """Gauges read at scrape time, so the hot paths never touch them."""
        self.connections.set_function(lambda: float(connections()))
        for kind in ("rooms", "patient_rooms"):
            self.rooms.labels(kind).set_function(partial(_pick, rooms, kind))
        self.broker_connected.set_function(lambda: float(broker_connected()))

    def track_replicas(self, reading: Callable[[], ReplicaReading]) -> None:
        """The read replicas' lag, rotation, reads and fallbacks, read at scrape time."""
        self.replica_readings.reading = reading

    def track_broker(self, up: Callable[[], bool]) -> None:
        """`slotcast_broker_up`, read at scrape time."""
        self.broker_up.set_function(lambda: float(up()))

    def render(self) -> bytes:
        data: bytes = generate_latest(self.registry)
        return data


class WebhookDeliveries:
    """The delivery counters apart from the backlog gauges: whichever process delivers
    counts here, a serving instance (inline) or a `slotcast webhooks` worker, which reads
    no backlog (the serving instances export that; they read the database)."""

    def __init__(self, r: CollectorRegistry) -> None:
        self.attempts = Counter(
            "slotcast_webhook_attempts",
            "Webhook deliveries tried by this process",
            ["endpoint"],
            registry=r,
        )
        self.failures = Counter(
            "slotcast_webhook_failures",
            "Webhook deliveries that failed (error, timeout, or a status other than 2xx)",
            ["endpoint"],
            registry=r,
        )

    def attempted(self, endpoint_id: int, ok: bool) -> None:
        """The Dispatcher's `on_attempt`."""
        self.attempts.labels(str(endpoint_id)).inc()
        if not ok:
            self.failures.labels(str(endpoint_id)).inc()


class WorkerMetrics:
    """What a `slotcast webhooks` process serves on its own port: its deliveries per
    endpoint and the process, with the same names as a serving instance's, so a rule
    summing over every scrape target counts each attempt once whoever made it."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.deliveries = WebhookDeliveries(self.registry)
        self.metrics_refused = metrics_refused(self.registry)
        process_collectors(self.registry)

    def render(self) -> bytes:
        data: bytes = generate_latest(self.registry)
        return data


def metrics_refused(r: CollectorRegistry) -> Counter:
    return Counter(
        "slotcast_metrics_refused", "/metrics requests from outside its allow list", registry=r
    )


def process_collectors(r: CollectorRegistry) -> None:
    """The process: CPU, memory, open files (Linux), the interpreter and its collector."""
    ProcessCollector(registry=r)
    r.register(PLATFORM_COLLECTOR)
    r.register(GC_COLLECTOR)


TRANSPORTS = ("ws", "rest")
CANCELLED_BY = ("patient", "doctor", "admin", "system")


def _cancelled_by(actor: str | None) -> str:
    """`role:subject` (store.tx.Actor) as the label: the role, or `system` for expiry and
    upkeep, never the subject (a label per patient would grow without bound)."""
    if actor is None or actor == "admin:system":
        return "system"
    role = actor.partition(":")[0]
    return role if role in CANCELLED_BY else "system"


@dataclass(frozen=True, slots=True)
class PoolReading:
    """The database pool as the store sees it (the server never touches asyncpg)."""

    size: int  # connections open
    idle: int
    max: int
    waiting: int  # callers waiting for a connection


class Readings(Collector):
    """Values read from their owners at scrape time, so no hot path ever updates them."""

    def __init__(self) -> None:
        # Zero until the app's lifetimes open the pool and the broker.
        self.pool: Callable[[], PoolReading] = lambda: PoolReading(0, 0, 0, 0)
        self.broker_reconnects: Callable[[], int] = lambda: 0

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        pool = self.pool()
        yield _gauge("slotcast_db_pool_connections", "Pooled connections open", pool.size)
        yield _gauge(
            "slotcast_db_pool_in_use", "Pooled connections lent out", pool.size - pool.idle
        )
        yield _gauge("slotcast_db_pool_max", "The pool's size limit", pool.max)
        yield _gauge(
            "slotcast_db_pool_waiting", "Requests waiting for a pooled connection", pool.waiting
        )
        yield CounterMetricFamily(
            "slotcast_broker_reconnects",
            "Times the broker listener lost Redis and came back",
            value=self.broker_reconnects(),
        )

    def describe(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        return ()  # read lazily: registering must not call the owners yet


class StageReadings(Collector):
    """`slotcast_stage_seconds{stage}`: the store's stage timings (`store.timing`), read at
    scrape time, so observing one is a bisect and two additions, never the library."""

    def __init__(self) -> None:
        self.timings = StageTimes()  # the store's, once the app's lifetimes open it

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(
            "slotcast_stage_seconds",
            "A write's stages, from the pool wait to the fan-out write (docs/benchmarks.md, "
            "Latency breakdown)",
            labels=["stage"],
        )
        bounds = [*(str(b) for b in STAGE_BUCKETS), "+Inf"]
        for stage in STAGES:
            cumulative, buckets = 0, []
            for bound, count in zip(bounds, self.timings.counts[stage], strict=True):
                cumulative += count
                buckets.append((bound, float(cumulative)))
            family.add_metric([stage], buckets, self.timings.sums[stage])
        yield family

    def describe(self) -> Iterable[HistogramMetricFamily]:
        return ()


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _pick(read: Callable[[], dict[str, int]], key: str) -> float:
    return float(read()[key])


NO_REPLICAS = ReplicaReading({}, {}, {"replica": 0, "primary": 0}, {})


class ReplicaReadings(Collector):
    """The read replicas (store/replicas.py), from the store's own counts at scrape time:
    every read and fallback is counted there with a plain integer, off the metrics."""

    def __init__(self, reading: Callable[[], ReplicaReading]) -> None:
        self.reading = reading

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        found = self.reading()
        lag = GaugeMetricFamily(
            "slotcast_replica_lag_seconds",
            "How far each read replica's replay is behind the primary, at its last check",
            labels=["replica"],
        )
        rotation = GaugeMetricFamily(
            "slotcast_replica_in_rotation",
            "1 while a read replica serves reads; 0 while it lags or fails",
            labels=["replica"],
        )
        for name, seconds in found.lag_s.items():
            lag.add_metric([name], seconds)
            rotation.add_metric([name], float(found.in_rotation[name]))
        yield lag
        yield rotation
        reads = CounterMetricFamily(
            "slotcast_db_reads",
            "Unlocked reads (snapshots, resumes, dashboards, search) by where they ran",
            labels=["target"],
        )
        for target, count in found.reads.items():
            reads.add_metric([target], count)
        yield reads
        fallbacks = CounterMetricFamily(
            "slotcast_replica_fallbacks",
            "Reads meant for a replica that the primary answered, by why (behind the "
            "fence, doctor missing there, replica failed, none in rotation)",
            labels=["reason"],
        )
        for reason in FALLBACK_REASONS:
            fallbacks.add_metric([reason], found.fallbacks.get(reason, 0))
        yield fallbacks

    def describe(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        return ()
