"""Prometheus metrics, one registry per app (tests run many apps in one process).

Counts on the fan-out path are added once per change, not once per recipient,
so measuring costs nothing per delivered message.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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
        self.errors = Counter("slotcast_errors", "Error replies by code", ["code"], registry=r)
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
        self.metrics_refused = Counter(
            "slotcast_metrics_refused", "/metrics requests from outside its allow list", registry=r
        )
        self.broker_up = Gauge(
            "slotcast_broker_up",
            "1 while the broker answers and its listener hears; 0 while this instance is "
            "degraded (it still serves its clients and delivers its own changes)",
            registry=r,
        )

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

    def track_broker(self, up: Callable[[], bool]) -> None:
        """`slotcast_broker_up`, read at scrape time."""
        self.broker_up.set_function(lambda: float(up()))

    def render(self) -> bytes:
        data: bytes = generate_latest(self.registry)
        return data


def _pick(read: Callable[[], dict[str, int]], key: str) -> float:
    return float(read()[key])
