"""A Connection's outbox, with no server: merging, order, limits and the bytes it writes.

The Connection is driven with a fake transport whose buffer the test controls, so
the exact merge and close rules are pinned without depending on kernel buffer
sizes; tests/server/test_realtime.py makes a real socket back up. A section pins
what a connection costs in bytes (back-pressure, the byte limit, `police`'s stall
and budget rules; tests/server/test_memory.py holds them against raw sockets). The
last tests hold the spliced envelopes fan-out writes to the bytes clients have
always had.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, timedelta
from typing import Any, cast

import msgspec
import pytest

from protocol.codec import JSON, MSGPACK, Codec
from protocol.messages import (
    SERVER_MESSAGES,
    AppointmentView,
    Delta,
    Message,
    Pong,
    Reconnect,
    SlotView,
    Snapshot,
)
from protocol.vocabulary import AppointmentStatus, SlotStatus
from server import connection
from server.connection import (
    CLOSE_SERVICE_RESTART,
    CLOSE_SLOW_CONSUMER,
    COALESCE_AFTER,
    HIGH_WATER,
    Connection,
    pending_total,
    police,
)
from server.frames import frame
from server.room import Frames
from server.rooms import Rooms
from store.broker import MemoryBroker
from store.changes import Change, PatientNote
from store.constants import patient_channel
from store.pool import Store
from testkit.wire import WAIT_S, eventually

# ---- the Connection's outbox, with a transport whose buffer the test controls ---------------


class FakeTransport:
    """The slice of an asyncio transport a Connection uses; the test decides how full it is."""

    def __init__(self, buffered: int = 0) -> None:
        self.buffered = buffered
        self.written: list[bytes] = []
        self.aborted = False
        self.shut = False  # closed: what is buffered still goes out

    def is_closing(self) -> bool:
        return self.aborted or self.shut

    def close(self) -> None:
        self.shut = True

    def abort(self) -> None:
        self.aborted = True
        self.buffered = 0

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def write(self, data: bytes) -> None:
        self.written.append(data)


class FakeSocket:
    """The client's end of a Connection: it hears the connection decide to end (`woken`,
    the session's cue to leave its rooms and close), and answers our close frame as a
    client does, so `Connection.close()` completes its handshake."""

    answers = True

    def __init__(self) -> None:
        self.woken = False
        self.transport: FakeTransport | None = None

    def end(self) -> None:
        self.woken = True

    @property
    def close_args(self) -> tuple[int, bytes] | None:
        """The code and reason of the close frame we wrote, if any."""
        assert self.transport is not None
        for data in self.transport.written:
            if data[:1] == b"\x88":
                return int.from_bytes(data[2:4], "big"), data[4:]
        return None


def attach(ws: FakeSocket, transport: FakeTransport, codec: Codec, **kwargs: Any) -> Connection:
    """A Connection on `transport`, whose client end is `ws`."""
    conn = Connection(transport, codec, **kwargs)
    conn.on_end = ws.end
    ws.transport = transport
    if ws.answers:
        write = transport.write

        def answering(data: bytes) -> None:
            write(data)
            if data[:1] == b"\x88":  # our close frame: the client answers it
                asyncio.get_running_loop().call_soon(conn.closed_by_peer)

        transport.write = answering  # type: ignore[method-assign]
    return conn


def data_frames(transport: FakeTransport) -> list[bytes]:
    """What was written, but the close frame."""
    return [data for data in transport.written if data[:1] != b"\x88"]


def payload(frame: bytes) -> bytes:
    """The payload of one unmasked server frame (RFC 6455 section 5.2)."""
    length = frame[1] & 0x7F
    return frame[{126: 4, 127: 10}.get(length, 2) :]


def decode(frame: bytes) -> Message:
    return JSON.decode(payload(frame), SERVER_MESSAGES, max_size=1 << 30).body


def slot(slot_id: int, status: SlotStatus) -> SlotView:
    start = datetime(2031, 1, 1, 8, tzinfo=UTC) + timedelta(minutes=30 * slot_id)
    return SlotView(slot_id, start, start + timedelta(minutes=30), status)


def change(doctor_id: int, version: int, slots: list[SlotView], removed: list[int]) -> Change:
    return Change.build(doctor_id, version, slots, removed)


def offer(conn: Connection, c: Change) -> None:
    conn.send_delta(c.doctor_id, c.public, Frames(c).get("availability", JSON))


async def test_outbox_merges_a_doctors_deltas_once_behind_and_keeps_order() -> None:
    """Past COALESCE_AFTER queued frames a doctor's deltas collapse into one, sent where the
    first of them would have been, covering (since, version]; applied after what came
    before, the client ends exactly where applying every delta would have left it."""
    transport, ws = FakeTransport(), FakeSocket()
    conn = attach(ws, transport, JSON, outbox_limit=1000)
    try:
        transport.buffered = HIGH_WATER  # the kernel has stopped taking data
        cycle = [SlotStatus.BUSY, SlotStatus.BUSY_TENTATIVE, SlotStatus.FREE]
        changes = []
        for v in range(1, 41):
            slots = [slot(v % 3 + 1, cycle[v % 3])]
            removed = []
            if v == 35:
                slots, removed = [], [2]  # removed ...
            if v == 38:
                slots = [slot(2, SlotStatus.BUSY_UNAVAILABLE)]  # ... and offered again
            if v == 39:
                slots, removed = [], [7]  # removed for good
            changes.append(change(5, v, slots, removed))
        for c in changes[:COALESCE_AFTER]:
            offer(conn, c)
        conn.send(Pong())  # a reply queued between deltas keeps its place
        for c in changes[COALESCE_AFTER:]:
            offer(conn, c)
        other = change(6, 12, [slot(100, SlotStatus.BUSY)], [])
        offer(conn, other)
        assert transport.written == []

        transport.buffered = 0
        await eventually(lambda: len(transport.written) == COALESCE_AFTER + 3, "the outbox")
        sent = [decode(f) for f in transport.written]
        individual = sent[:COALESCE_AFTER]
        assert [(d.version, d.since) for d in individual if isinstance(d, Delta)] == [
            (v, None) for v in range(1, COALESCE_AFTER + 1)
        ]
        assert isinstance(sent[COALESCE_AFTER], Pong)
        merged, merged_other = sent[COALESCE_AFTER + 1 :]
        assert isinstance(merged, Delta)
        assert isinstance(merged_other, Delta)
        assert (merged.doctor_id, merged.since, merged.version) == (5, COALESCE_AFTER, 40)
        assert (merged_other.doctor_id, merged_other.since, merged_other.version) == (6, 11, 12)

        # Applying the stream gives what applying every change would.
        def apply(state: dict[int, SlotView], d: Delta) -> None:
            state.update({s.id: s for s in d.slots})
            for sid in d.removed:
                state.pop(sid, None)

        initial = {i: slot(i, SlotStatus.FREE) for i in (1, 2, 3, 7)}
        expected, got = dict(initial), dict(initial)
        for c in changes:
            apply(expected, msgspec.convert(c.public, Delta))
        for d in [*individual, merged]:
            assert isinstance(d, Delta)
            apply(got, d)
        assert got == expected
        assert 2 in got
        assert 7 not in got
        assert merged.removed == [7]  # 2 came back, so it is not in `removed`
    finally:
        await conn.close()


async def test_outbox_over_the_limit_closes_4008_once_the_command_is_done() -> None:
    transport, ws = FakeTransport(), FakeSocket()
    slow: list[str] = []
    conn = attach(ws, transport, JSON, outbox_limit=3, on_slow=slow.append)
    transport.buffered = HIGH_WATER
    conn.busy = True  # a command is in flight: its reply must not be cut off
    for _ in range(3):
        conn.send(Pong())
    assert slow == []
    assert not ws.woken
    conn.send(Pong())  # one too many
    assert slow == ["frames"]
    await asyncio.sleep(0)  # deliberately let anything premature run
    assert not ws.woken
    assert not conn.closing
    conn.command_done()
    assert ws.woken  # the handler's loop leaves...
    assert conn.closing
    conn.send(Pong())  # ignored: closing
    assert slow == ["frames"]
    await conn.close()  # ...and closes the socket with our code
    assert ws.close_args == (CLOSE_SLOW_CONSUMER, b"slow consumer")
    assert conn.finished
    transport.buffered = 0
    conn.send(Pong())
    offer(conn, change(5, 1, [slot(1, SlotStatus.BUSY)], []))
    assert data_frames(transport) == []  # the queue was dropped; the client will resume


async def test_closing_while_the_writer_waits_for_the_socket_does_not_crash_it() -> None:
    """The close clears the outbox while the writer waits for the kernel to take data;
    when the socket then drains (the client reads the backlog before the close frame),
    the writer must notice there is nothing left rather than die, since the handler's
    `Connection.close()` awaits it and would re-raise its error."""
    transport, ws = FakeTransport(), FakeSocket()
    conn = attach(ws, transport, JSON, outbox_limit=3)
    transport.buffered = HIGH_WATER
    for _ in range(3):
        conn.send(Pong())
    await asyncio.sleep(0.02)  # deliberately: the writer is now waiting for the socket
    conn.send(Pong())  # one too many: closed, and the outbox cleared
    assert ws.woken
    transport.buffered = 0  # the client reads what the kernel held
    await asyncio.sleep(0.05)  # deliberately: the writer polls every 5 ms
    await conn.close()  # IndexError: pop from an empty deque, from the writer task
    assert data_frames(transport) == []


class UvloopTransport(FakeTransport):
    """As uvloop's TCPTransport behaves once the peer is gone: closing, nothing buffered
    any more, and a write raises RuntimeError ("... the handler is closed")."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    def is_closing(self) -> bool:
        return self.closed

    def lose_connection(self) -> None:
        self.closed, self.buffered = True, 0

    def write(self, data: bytes) -> None:
        if self.closed:
            raise RuntimeError("unable to perform operation on <TCPTransport closed=True>")
        super().write(data)


@pytest.mark.parametrize("then_close", [False, True], ids=["handler_done", "close_soon"])
async def test_a_socket_lost_while_frames_wait_is_not_written_to(then_close: bool) -> None:
    """The peer goes away (a reset) while the writer waits for the kernel with frames
    queued: the wait ends because the buffer is gone, not drained, and the writer must
    see the transport closed rather than write to it (uvloop raises, and the handler's
    `close()` re-raised that as a logged traceback)."""
    transport, ws = UvloopTransport(), FakeSocket()
    conn = attach(ws, transport, JSON, outbox_limit=100)
    transport.buffered = HIGH_WATER
    for _ in range(5):
        conn.send(Pong())
    await asyncio.sleep(0.02)  # deliberately: the writer is now waiting for the socket
    transport.lose_connection()
    await asyncio.sleep(0.05)  # deliberately: the writer polls every 5 ms
    if then_close:
        conn.close_soon(CLOSE_SERVICE_RESTART, "service restart")  # a drain, meanwhile
    assert conn._writer is not None
    assert not (conn._writer.done() and conn._writer.exception())
    await conn.close()
    assert transport.written == []
    conn.send(Pong())  # late frames for a lost socket are dropped, not written
    assert transport.written == []


async def test_a_batch_of_deltas_is_one_write_while_the_socket_keeps_up() -> None:
    transport, ws = FakeTransport(), FakeSocket()
    conn = attach(ws, transport, JSON, outbox_limit=1000)
    try:
        changes = [change(5, v, [slot(v, SlotStatus.BUSY)], []) for v in (1, 2, 3)]
        frames = [Frames(c).get("availability", JSON) for c in changes]
        conn.send_deltas(5, [c.public for c in changes], frames, b"".join(frames))
        assert transport.written == [b"".join(frames)]
    finally:
        await conn.close()


async def test_a_batch_of_deltas_for_a_client_behind_queues_and_merges_each_change() -> None:
    """Behind, a batch is not one opaque item: each delta counts toward the merge threshold
    and the outbox limit, and the merged delta covers exactly the batch's tail."""
    transport, ws = FakeTransport(), FakeSocket()
    conn = attach(ws, transport, JSON, outbox_limit=1000)
    try:
        transport.buffered = HIGH_WATER
        total = COALESCE_AFTER + 5
        changes = [change(5, v, [slot(v, SlotStatus.BUSY)], []) for v in range(1, total + 1)]
        frames = [Frames(c).get("availability", JSON) for c in changes]
        conn.send_deltas(5, [c.public for c in changes], frames, b"".join(frames))
        assert transport.written == []
        transport.buffered = 0
        await eventually(lambda: len(transport.written) == COALESCE_AFTER + 1, "the outbox")
        sent = [decode(f) for f in transport.written]
        assert all(isinstance(d, Delta) for d in sent)
        deltas = cast(list[Delta], sent)
        assert [(d.version, d.since) for d in deltas[:COALESCE_AFTER]] == [
            (v, None) for v in range(1, COALESCE_AFTER + 1)
        ]
        merged = deltas[-1]
        assert (merged.since, merged.version) == (COALESCE_AFTER, total)
        assert sorted(s.id for s in merged.slots) == list(range(COALESCE_AFTER + 1, total + 1))
    finally:
        await conn.close()


async def test_a_connection_that_never_queued_starts_no_writer_and_closes_with_its_code() -> None:
    """The writer task is created on the first queued frame only; and `close()` returns
    after the close frame we began has gone out, so the handler returning cannot let
    aiohttp close with 1000 first."""
    transport, ws = FakeTransport(), FakeSocket()
    conn = attach(ws, transport, JSON, outbox_limit=10)
    conn.send(Pong())
    assert conn._writer is None
    conn.close_soon(CLOSE_SERVICE_RESTART, "service restart")
    await conn.close()
    assert ws.close_args == (CLOSE_SERVICE_RESTART, b"service restart")
    other = attach(FakeSocket(), FakeTransport(buffered=HIGH_WATER), JSON, outbox_limit=10)
    other.send(Pong())  # behind: queued, so now there is a writer
    assert other._writer is not None
    await other.close()


class SilentSocket(FakeSocket):
    """A client that never answers our close frame."""

    answers = False


async def test_a_close_the_client_never_answers_is_cut_off_after_a_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The handshake is waited for, but not forever: a drain waits on it, and a client that
    does not even read would otherwise keep its socket and buffers."""
    monkeypatch.setattr(connection, "CLOSE_HANDSHAKE_S", 0.05)
    aborted: list[bool] = []
    transport, ws = FakeTransport(), SilentSocket()
    transport.abort = lambda: aborted.append(True)  # type: ignore[attr-defined]
    conn = attach(ws, transport, JSON, outbox_limit=10)
    conn.close_soon(CLOSE_SERVICE_RESTART, "service restart")
    assert not conn.finished
    await asyncio.wait_for(conn.close(), WAIT_S)
    assert ws.close_args == (CLOSE_SERVICE_RESTART, b"service restart")
    assert aborted == [True]
    assert conn.finished


async def test_a_client_that_is_behind_still_gets_the_reconnect_notice_of_a_drain() -> None:
    """On SIGTERM every client is told when to come back (a jittered `retry_after_ms`) and
    then closed with 1012. A client whose outbox is not empty at that moment must still
    get the notice; otherwise all such clients fall back to their own backoff at once."""
    transport, ws = FakeTransport(), FakeSocket()
    conn = attach(ws, transport, JSON, outbox_limit=100)
    transport.buffered = HIGH_WATER
    conn.send(Pong())  # the client is a little behind: this waits in the outbox
    conn.send_now(Reconnect(retry_after_ms=700))  # what lifecycle.drain does, then:
    conn.close_soon(CLOSE_SERVICE_RESTART, "service restart")
    assert ws.woken
    transport.buffered = 0
    await conn.close()
    assert ws.close_args == (CLOSE_SERVICE_RESTART, b"service restart")
    notices = [m for m in map(decode, data_frames(transport)) if isinstance(m, Reconnect)]
    assert notices == [Reconnect(retry_after_ms=700)], "the notice was dropped with the outbox"


async def test_deltas_after_a_new_snapshot_are_not_merged_ahead_of_it() -> None:
    """A merge open when the client re-watches sits before the new snapshot in the outbox;
    versions after that snapshot must come after it, or the client would miss them."""
    transport, ws = FakeTransport(), FakeSocket()
    conn = attach(ws, transport, JSON, outbox_limit=1000)
    transport.buffered = HIGH_WATER  # the client is behind: everything queues
    for _ in range(COALESCE_AFTER):
        conn.send(Pong())
    offer(conn, change(1, 11, [slot(1, SlotStatus.BUSY)], []))  # opens a merge
    conn.seal(1)  # what a re-watch does before its reply
    conn.send(Snapshot(1, 12, "UTC", date(2031, 1, 1), date(2031, 1, 2), []))
    offer(conn, change(1, 13, [slot(2, SlotStatus.BUSY)], []))
    transport.buffered = 0
    conn.send(Pong())  # wakes the writer
    await asyncio.sleep(0.05)  # deliberately: the writer drains on its own task
    await conn.close()
    order = [
        (type(m).__name__, getattr(m, "version", None))
        for m in map(decode, data_frames(transport))
        if not isinstance(m, Pong)
    ]
    assert order[-1] == ("Delta", 13), order
    assert order.index(("Snapshot", 12)) < order.index(("Delta", 13)), order


# ---- what a connection costs, in bytes -------------------------------------------------------


def snapshot_of(slots: int) -> Snapshot:
    """A reply the size of a real one: `slots` slots, about 115 bytes each in JSON."""
    views = [slot(i, SlotStatus.FREE) for i in range(slots)]
    return Snapshot(1, 12, "UTC", date(2031, 1, 1), date(2031, 1, 8), views)


def connect(
    transport: FakeTransport, *, outbox_bytes: int, slow: list[str] | None = None
) -> tuple[Connection, FakeSocket]:
    ws = FakeSocket()
    on_slow = slow.append if slow is not None else None
    conn = attach(
        ws,
        transport,
        JSON,
        outbox_limit=1000,
        outbox_bytes=outbox_bytes,
        on_slow=on_slow,
    )
    return conn, ws


async def test_replies_count_in_bytes_and_past_the_limit_the_client_is_closed_4008() -> None:
    """Snapshots are few frames but many bytes: the byte limit, not the frame limit, stops
    a client that asks for them and does not read; its pending bytes never pass the limit."""
    reply = snapshot_of(40)
    size = len(frame(JSON.encode(reply, 1), binary=False))
    transport, slow = FakeTransport(buffered=HIGH_WATER), []
    conn, ws = connect(transport, outbox_bytes=HIGH_WATER + 5 * size + size // 2, slow=slow)
    assert conn.pending() == HIGH_WATER  # what the transport holds counts too
    assert conn.backed_up()
    for sent in range(1, 6):
        conn.send(reply, 1)
        assert conn.pending() == HIGH_WATER + sent * size
    assert slow == []
    conn.send(reply, 1)  # the sixth would pass the limit
    assert slow == ["bytes"]
    assert ws.woken  # the handler's loop leaves, to close the socket with our code
    assert conn.pending() == HIGH_WATER  # the outbox is dropped at once; the transport aborts
    conn.send(reply, 1)
    assert slow == ["bytes"], "closed once, counted once"
    await conn.close()
    assert ws.close_args == (CLOSE_SLOW_CONSUMER, b"slow consumer")


async def test_bytes_in_the_transport_count_when_nothing_is_queued() -> None:
    """A client that answers pings but never reads grows the transport's buffer, not the
    outbox: with nothing queued at all it is still over the limit."""
    transport, slow = FakeTransport(), []
    conn, _ = connect(transport, outbox_bytes=HIGH_WATER * 2, slow=slow)
    try:
        big = snapshot_of(5000)  # over the limit, yet written straight: the socket keeps up
        assert len(frame(JSON.encode(big, 1), binary=False)) > HIGH_WATER * 2
        conn.send(big, 1)
        assert len(transport.written) == 1
        assert slow == []
        transport.buffered = HIGH_WATER * 2 - 10  # the kernel took none of it
        conn.send(Pong(), 2)
        assert slow == ["bytes"]
        assert len(transport.written) == 1
    finally:
        await conn.close()


async def test_merged_deltas_count_toward_the_byte_limit_and_leave_with_the_outbox() -> None:
    """Merging keeps one delta per doctor, but what it holds grows with every change merged
    in: each counts (an upper bound) until the merged delta is written."""
    transport = FakeTransport(buffered=HIGH_WATER)
    conn, _ = connect(transport, outbox_bytes=HIGH_WATER * 4)
    try:
        for _ in range(COALESCE_AFTER):
            conn.send(Pong())
        queued = conn.pending() - HIGH_WATER
        changes = [change(5, v, [slot(v, SlotStatus.BUSY)], []) for v in range(1, 11)]
        sizes = 0
        for c in changes:
            data = Frames(c).get("availability", JSON)
            conn.send_delta(5, c.public, data)
            sizes += len(data)
        assert conn.pending() == HIGH_WATER + queued + sizes
        assert len(conn._outbox) == COALESCE_AFTER + 1  # merged into one
        transport.buffered = 0
        await eventually(lambda: len(transport.written) == COALESCE_AFTER + 1, "the outbox")
        assert conn.pending() == 0
    finally:
        await conn.close()


async def test_merging_past_the_byte_limit_closes_the_connection() -> None:
    transport, slow = FakeTransport(buffered=HIGH_WATER), []
    conn, ws = connect(transport, outbox_bytes=HIGH_WATER + 4096, slow=slow)
    for _ in range(COALESCE_AFTER):
        conn.send(Pong())
    version = 0
    while not slow:
        version += 1
        offer(conn, change(5, version, [slot(version, SlotStatus.BUSY)], []))
        assert conn.pending() <= HIGH_WATER + 4096
    assert slow == ["bytes"]
    assert ws.woken  # the handler's loop leaves, to close the socket with our code
    await conn.close()


async def test_a_backed_up_connection_waits_until_its_output_drains_or_it_closes() -> None:
    """Back-pressure: the handler awaits `drained` before taking the client's next request."""
    transport = FakeTransport(buffered=HIGH_WATER - 1)
    conn, _ = connect(transport, outbox_bytes=HIGH_WATER * 4)
    assert not conn.backed_up()
    await asyncio.wait_for(conn.drained(), WAIT_S)  # under the mark: no wait at all
    transport.buffered = HIGH_WATER
    assert conn.backed_up()
    waiting = asyncio.create_task(conn.drained())
    await asyncio.sleep(0.03)  # deliberately: it must still be waiting
    assert not waiting.done()
    transport.buffered = HIGH_WATER // 2
    await asyncio.wait_for(waiting, WAIT_S)

    transport.buffered = HIGH_WATER
    waiting = asyncio.create_task(conn.drained())
    conn.close_soon(CLOSE_SLOW_CONSUMER, "slow consumer")  # a close ends the wait too
    await asyncio.wait_for(waiting, WAIT_S)
    await conn.close()


async def test_police_closes_a_connection_stuck_over_the_high_water_mark() -> None:
    """However the client keeps the socket alive (answering pings, sending frames), output
    that stays over the high-water mark for `stall_s` closes it; draining resets the clock."""
    stuck, reading = FakeTransport(buffered=HIGH_WATER), FakeTransport(buffered=HIGH_WATER)
    slow: list[str] = []
    (a, ws_a), (b, ws_b) = (
        connect(t, outbox_bytes=HIGH_WATER * 4, slow=slow) for t in (stuck, reading)
    )
    budget = 1 << 30
    assert police([a, b], budget=budget, stall_s=10, now=100.0) == 2 * HIGH_WATER
    reading.buffered = 0  # b reads
    police([a, b], budget=budget, stall_s=10, now=105.0)
    reading.buffered = HIGH_WATER  # b falls behind again: its clock starts over
    police([a, b], budget=budget, stall_s=10, now=109.9)
    assert slow == []
    police([a, b], budget=budget, stall_s=10, now=110.0)
    assert slow == ["stalled"]
    assert ws_a.woken
    assert not ws_b.woken
    await a.close()
    await b.close()


async def test_police_closes_the_biggest_first_when_the_budget_is_spent() -> None:
    sizes = [100_000, 300_000, 50_000, 200_000]
    transports = [FakeTransport(buffered=n) for n in sizes]
    slow: list[str] = []
    conns = [connect(t, outbox_bytes=1 << 20, slow=slow) for t in transports]
    everyone = [c for c, _ in conns]
    assert pending_total(everyone) == (650_000, 1)  # one of them is over the high-water mark
    assert police(everyone, budget=400_000, stall_s=60, now=0.0) == 650_000
    assert slow == ["budget"]  # 300 kB closed: 350 kB left, under the budget
    assert conns[1][1].woken
    # Until its transport lets go, the closed one still holds its bytes: they count as
    # freed, so the next sweep closes no one else.
    police(everyone, budget=400_000, stall_s=60, now=1.0)
    assert slow == ["budget"]
    transports[0].buffered = 260_000
    police(everyone, budget=400_000, stall_s=60, now=2.0)  # 510 kB kept: the 260 kB one goes
    assert slow == ["budget", "budget"]
    assert conns[0][0].ending
    assert not conns[3][0].ending
    for conn, _ in conns:
        await conn.close()


async def test_a_slow_consumer_that_never_reads_its_close_frame_is_aborted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The close frame waits behind everything the client did not read; a client that never
    reads would keep those bytes in the transport for good, so the transport is aborted."""
    monkeypatch.setattr(connection, "ABORT_AFTER_S", 0.01)
    stuck, reads = FakeTransport(buffered=HIGH_WATER), FakeTransport(buffered=HIGH_WATER)
    a, _ = connect(stuck, outbox_bytes=1 << 20)
    b, _ = connect(reads, outbox_bytes=1 << 20)
    a.too_slow("stalled")
    b.too_slow("stalled")
    reads.buffered = 0  # b read up to its close frame
    await a.close()  # what each handler does once its loop has left
    await b.close()
    await eventually(lambda: stuck.aborted, "the stuck transport to be aborted")
    await asyncio.sleep(0.02)  # deliberately: b's timer would have fired too
    assert not reads.aborted
    assert a.pending() == 0


async def test_a_connection_that_ends_with_bytes_its_client_never_read_is_aborted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """However the handler ended (the heartbeat dropped the client, say), closing a transport
    waits for its buffer to go out; from a client that never reads, it never does."""
    monkeypatch.setattr(connection, "ABORT_AFTER_S", 0.01)
    stuck, drained = FakeTransport(buffered=1000), FakeTransport()
    for transport in (stuck, drained):
        conn, _ = connect(transport, outbox_bytes=1 << 20)
        await conn.close()  # what the handler does once the socket has closed
    await eventually(lambda: stuck.aborted, "the stuck transport to be aborted")
    assert not drained.aborted


# ---- the bytes fan-out writes: spliced envelopes, as clients have always received them -------


def whole_envelope(codec: Codec, kind: str, body: dict[str, Any]) -> bytes:
    """A server frame as built before bodies were spliced in: the whole envelope encoded."""
    return frame(codec.dumps({"type": kind, "id": None, "body": body}), binary=codec.binary)


@pytest.mark.parametrize("codec", [JSON, MSGPACK], ids=lambda c: c.name)
async def test_deltas_and_merged_deltas_keep_their_bytes_on_the_wire(codec: Codec) -> None:
    c = change(5, 7, [slot(1, SlotStatus.BUSY), slot(2, SlotStatus.FREE)], [3])
    assert Frames(c).get("availability", codec) == whole_envelope(codec, "delta", c.public)

    transport, ws = FakeTransport(), FakeSocket()
    conn = attach(ws, transport, codec, outbox_limit=1000)
    try:
        transport.buffered = HIGH_WATER
        for _ in range(COALESCE_AFTER):
            conn.send(Pong())
        later = [change(5, v, [slot(v, SlotStatus.BUSY)], [v - 1]) for v in (8, 9)]
        for c in later:
            conn.send_delta(5, c.public, Frames(c).get("availability", codec))
        transport.buffered = 0
        conn.send(Pong())  # wakes the writer
        await eventually(lambda: len(transport.written) == COALESCE_AFTER + 2, "the outbox")
        merged = {  # 9 removed slot 8, which 8 had changed
            "doctor_id": 5,
            "version": 9,
            "slots": later[1].public["slots"],
            "removed": [7, 8],
            "since": 7,
            "doctor": None,
        }
        assert transport.written[COALESCE_AFTER] == whole_envelope(codec, "delta", merged)
    finally:
        await conn.close()


async def test_appointment_events_keep_their_bytes_on_the_wire() -> None:
    """One frame per codec for the patient's room, spliced; each codec's bytes as before."""
    broker = MemoryBroker()
    rooms = Rooms(cast(Store, None), broker, "test-instance")  # a patient room reads no store
    transports = {codec.name: FakeTransport() for codec in (JSON, MSGPACK)}
    conns = [
        attach(FakeSocket(), transports[codec.name], codec, outbox_limit=9)
        for codec in (JSON, MSGPACK)
    ]
    try:
        for conn in conns:
            await rooms.join_patient(conn, "p-1")
        start = datetime(2031, 1, 1, 8, tzinfo=UTC)
        view = AppointmentView(
            11, 3, 5, "p-1", start, start + timedelta(minutes=30), AppointmentStatus.BOOKED
        )
        note = PatientNote("p-1", 5, 42, msgspec.to_builtins(view))
        await broker.publish(patient_channel("p-1"), note.pack())
        await eventually(lambda: all(t.written for t in transports.values()), "the events")
        body = {"doctor_id": 5, "version": 42, "appointment": note.appointment}
        for codec in (JSON, MSGPACK):
            expected = whole_envelope(codec, "appointment_event", body)
            assert transports[codec.name].written == [expected], codec.name
    finally:
        await rooms.close()
        for conn in conns:
            await conn.close()
