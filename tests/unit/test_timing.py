"""The stage timings (store/timing.py): Prometheus' bucket rule, and the broker hop's clock."""

from __future__ import annotations

from store.changes import Change, unpack
from store.timing import BUCKETS, STAGES, StageTimes


def test_an_observation_counts_in_the_first_bucket_it_is_at_most() -> None:
    times = StageTimes()
    times.observe("commit", BUCKETS[0])  # le is inclusive, as in Prometheus
    times.observe("commit", 0.0011)
    times.observe("commit", 99.0)  # past the last bound: +Inf
    counts = times.counts["commit"]
    assert counts[0] == 1
    assert counts[BUCKETS.index(0.0015)] == 1
    assert counts[-1] == 1
    assert sum(counts) == 3
    assert times.sums["commit"] == BUCKETS[0] + 0.0011 + 99.0
    assert all(sum(times.counts[s]) == 0 for s in STAGES if s != "commit")


def test_a_published_change_carries_when_it_was_sent_and_an_older_one_reads_as_zero() -> None:
    change = Change.build(7, 3, [])
    received = unpack(change.pack(sent_at=1234.5))
    assert isinstance(received, Change)
    assert (received.version, received.sent_at) == (3, 1234.5)
    assert received.committed_at == change.committed_at
