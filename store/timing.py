"""Where a change's time goes, stage by stage, from the booking's pool wait to the fan-out.

Commit-to-receipt is one figure; to know what to cut, each stage the change passes
through is timed where it happens (`STAGES`) and counted here in plain integers:
one `bisect` and two additions per observation, no lock, no label lookup, no
allocation. The server's metrics read the counts at scrape time
(`server.metrics.StageReadings`, exported as `slotcast_stage_seconds{stage}`), so the
hot paths never touch the metrics library; the store owns the counts because most
stages are its own, and the server's two (the broker hop and the fan-out) are
measured where the store hands over.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Final

# Finer than the end-to-end histograms: the stages of a light-load change are each
# well under a millisecond to a few, and the buckets must tell 0.3 ms from 0.8 ms.
BUCKETS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.00075,
    0.001,
    0.0015,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)

# In the order a change meets them. The first four are a write command's transaction
# (every command the runner runs); the rest follow each committed change.
STAGES: Final = (
    "pool_wait",  # waiting for a pooled connection
    "lock_wait",  # the locking statement: advisory locks (and the slot's doctor) found
    "statements",  # from the locks to the end of the work: prelude, work, change record
    "commit",  # COMMIT's round trip (the WAL flush, with fsync on)
    "outbox_wait",  # the commit hook to the publisher taking the change
    "publish",  # the doctor channel's PUBLISH round trip
    "broker_hop",  # publish sent -> received by another instance's listener (node clocks)
    "fanout_wait",  # a room's change ready -> its fan-out round begins
    "fanout_write",  # the round: every local member's frame handed to its socket
)


class StageTimes:
    """Cumulative-ready bucket counts and sums per stage, read at scrape time."""

    __slots__ = ("counts", "sums")

    def __init__(self) -> None:
        # counts[stage][i]: observations in bucket i (not cumulative); the last is +Inf.
        self.counts: dict[str, list[int]] = {s: [0] * (len(BUCKETS) + 1) for s in STAGES}
        self.sums: dict[str, float] = dict.fromkeys(STAGES, 0.0)

    def observe(self, stage: str, seconds: float) -> None:
        self.counts[stage][bisect_left(BUCKETS, seconds)] += 1
        self.sums[stage] += seconds
