"""The Broker contract, run against both implementations, plus Redis outages.

Rooms rely on exactly these promises: a subscribed channel delivers what was
published, byte for byte, in the publisher's order; an unsubscribed one
delivers nothing; and after a Redis outage the broker resubscribes by itself
and says which channels may have lost messages. A broker that breaks any of
them leaves watchers silently stale, so each is pinned down here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import pytest

from store.broker import Broker, RedisBroker, open_broker
from store.errors import Unavailable
from testkit.harness import RedisServer, free_port

WAIT_S = 5.0  # generous bound for anything that should take milliseconds
RECOVERY_S = 15.0  # bound for a reconnect after Redis comes back
OUTAGE_S = 1.0  # how long Redis stays down: longer than the reader's first backoff


class Inbox:
    """Collects what a broker delivers, so tests can wait for it with a bound."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.reconnects: list[frozenset[str]] = []
        self._changed = asyncio.Event()

    def on_message(self, channel: str, data: bytes) -> None:
        self.messages.append((channel, data))
        self._changed.set()

    def on_reconnect(self, channels: frozenset[str]) -> None:
        self.reconnects.append(channels)
        self._changed.set()

    def on(self, channel: str) -> list[bytes]:
        return [data for ch, data in self.messages if ch == channel]

    async def until(self, done: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
        """Wait until `done()` holds, waking on every delivery instead of polling blindly."""
        deadline = time.monotonic() + timeout
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)


async def wait_for_condition(done: Callable[[], bool], what: str, timeout: float) -> None:
    """For state no callback announces (e.g. the reader noticing an outage)."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture(params=["memory", "redis"])
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[Broker]:
    """Each contract test runs once per implementation, opened the way the app opens it."""
    url = "memory://" if request.param == "memory" else request.getfixturevalue("redis_url")
    async with open_broker(url) as b:
        assert b.kind == request.param
        yield b


@pytest.fixture
def inbox(broker: Broker) -> Inbox:
    box = Inbox()
    broker.listen(box.on_message, box.on_reconnect)
    return box


async def barrier(broker: Broker, inbox: Inbox, control: str) -> None:
    """Publish on a subscribed control channel and wait for it.

    Anything published before it on the same broker has then either arrived or
    never will, which is how absence is proven without sleeping.
    """
    token = f"barrier-{len(inbox.on(control))}".encode()
    await broker.publish(control, token)
    await inbox.until(lambda: token in inbox.on(control), f"barrier on {control}")


# ---- the contract, for both implementations ------------------------------------------------


async def test_subscribed_channel_delivers_exact_bytes(broker: Broker, inbox: Inbox) -> None:
    await broker.subscribe("a")
    payload = bytes(range(256)) + b"\x00tail"  # every byte value, including NUL
    await broker.publish("a", payload)
    await inbox.until(lambda: bool(inbox.messages), "the message on a")
    assert inbox.messages == [("a", payload)]


async def test_unsubscribed_channel_delivers_nothing(broker: Broker, inbox: Inbox) -> None:
    await broker.subscribe("control")
    await broker.publish("elsewhere", b"not for us")
    await barrier(broker, inbox, "control")
    assert inbox.on("elsewhere") == []
    assert [ch for ch, _ in inbox.messages] == ["control"]


async def test_nothing_arrives_after_unsubscribe(broker: Broker, inbox: Inbox) -> None:
    await broker.subscribe("a")
    await broker.subscribe("control")
    await broker.publish("a", b"before")
    await inbox.until(lambda: inbox.on("a") == [b"before"], "the first message on a")
    await broker.unsubscribe("a")
    await broker.publish("a", b"after")
    await barrier(broker, inbox, "control")
    assert inbox.on("a") == [b"before"]


async def test_channels_reflect_subscriptions(broker: Broker) -> None:
    assert broker.channels == frozenset()
    await broker.subscribe("a")
    await broker.subscribe("b")
    await broker.subscribe("a")  # subscribing twice is one subscription
    assert broker.channels == {"a", "b"}
    await broker.unsubscribe("a")
    assert broker.channels == {"b"}
    await broker.unsubscribe("never-subscribed")
    assert broker.channels == {"b"}


async def test_ping_succeeds(broker: Broker) -> None:
    await broker.ping()


async def test_one_publisher_is_delivered_in_order(broker: Broker, inbox: Inbox) -> None:
    """Rooms treat a version arriving early as a gap; reordering would cost a log read each time."""
    await broker.subscribe("a")
    sent = [f"m{i}".encode() for i in range(200)]
    for data in sent:
        await broker.publish("a", data)
    await inbox.until(lambda: len(inbox.on("a")) >= len(sent), "200 messages")
    assert inbox.on("a") == sent


async def test_a_batch_is_delivered_in_order_across_channels(broker: Broker, inbox: Inbox) -> None:
    """The outbox publishes a batch at once (a pipeline on Redis): each change before its
    patient notes, and the changes of one doctor in version order."""
    await broker.subscribe("a")
    await broker.subscribe("b")
    sent = [("a" if i % 3 else "b", f"m{i}".encode()) for i in range(60)]
    await broker.publish_many(sent)
    await broker.publish_many([("a", b"alone")])
    await inbox.until(lambda: len(inbox.messages) >= len(sent) + 1, "61 messages")
    assert inbox.messages == [*sent, ("a", b"alone")]


# ---- Redis only -----------------------------------------------------------------------------


async def test_two_instances_share_one_redis(redis_url: str) -> None:
    """What one server instance publishes reaches the watchers of another."""
    async with open_broker(redis_url) as one, open_broker(redis_url) as two:
        heard_by_one, heard_by_two = Inbox(), Inbox()
        one.listen(heard_by_one.on_message)
        two.listen(heard_by_two.on_message)
        await two.subscribe("doctor")
        await one.subscribe("control")
        await one.publish("doctor", b"booked")
        await heard_by_two.until(lambda: bool(heard_by_two.messages), "the other instance")
        assert heard_by_two.messages == [("doctor", b"booked")]
        # The publisher itself is not subscribed to the doctor and must hear nothing of it.
        await barrier(one, heard_by_one, "control")
        assert heard_by_one.on("doctor") == []


async def test_unknown_url_scheme_is_refused() -> None:
    with pytest.raises(ValueError, match="unsupported broker URL"):
        async with open_broker("kafka://localhost:9092"):
            pass


async def test_unreachable_redis_raises_unavailable() -> None:
    """Startup and readiness catch `Unavailable`; a raw redis exception would escape them."""
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with pytest.raises(Unavailable):
        async with open_broker(url):
            pass


@contextlib.asynccontextmanager
async def outage(server: RedisServer) -> AsyncIterator[None]:
    """Redis is down inside the block, and running again afterwards whatever happened.

    The server is the whole suite's Redis, so leaving it stopped would fail
    every later test that needs it.
    """
    await asyncio.to_thread(server.stop)
    try:
        yield
    finally:
        if server.process is None:
            await asyncio.to_thread(server.start)


async def test_reconnects_resubscribes_and_delivers_after_restart(
    redis_url: str, redis_process: RedisServer
) -> None:
    """A Redis restart that outlasts the first reconnect attempt must not end delivery."""
    async with open_broker(redis_url) as broker:
        assert isinstance(broker, RedisBroker)
        inbox = Inbox()
        broker.listen(inbox.on_message, inbox.on_reconnect)
        await broker.subscribe("a")
        await broker.subscribe("b")
        await broker.publish("a", b"before")
        await inbox.until(lambda: inbox.on("a") == [b"before"], "delivery before the outage")

        async with outage(redis_process):
            await wait_for_condition(
                lambda: not broker.healthy, "the reader to notice the outage", WAIT_S
            )
            await asyncio.sleep(OUTAGE_S)  # the outage itself, not a synchronisation
            assert inbox.reconnects == []  # nothing to reconnect to yet

        await inbox.until(lambda: bool(inbox.reconnects), "on_reconnect", RECOVERY_S)
        assert inbox.reconnects[0] == {"a", "b"}
        assert broker.reconnects == 1  # what slotcast_broker_reconnects_total reads

        # At-most-once: a publish racing the resubscription may be lost (or fail on a
        # connection that died with the old server), so keep publishing until one lands.
        deadline = time.monotonic() + RECOVERY_S
        while not inbox.on("b"):
            assert time.monotonic() < deadline, "no message delivered after the restart"
            with contextlib.suppress(Unavailable):
                await broker.publish("b", b"after")
            with contextlib.suppress(AssertionError):
                await inbox.until(lambda: bool(inbox.on("b")), "delivery after restart", 0.5)
        assert set(inbox.on("b")) == {b"after"}
        assert broker.healthy


async def test_first_publish_after_restart_succeeds(
    redis_url: str, redis_process: RedisServer
) -> None:
    """Once Redis answers again, publishing must work: a failed publish is a change
    that no other instance hears of until some later change exposes the gap."""
    async with open_broker(redis_url) as broker:
        await broker.publish("a", b"warm up the pooled connection")
        async with outage(redis_process):
            pass
        await broker.publish("a", b"after the restart")
        await broker.ping()
