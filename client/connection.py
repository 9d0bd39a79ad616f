"""One WebSocket to the server that survives restarts: the transport half of the client.

It knows frames, request ids and reconnecting, and nothing about calendars:
replies are matched to their request by `id`, everything else is a push handed
to `_on_push` and queued on `events`. Keeping this apart from the command API
(`client.commands`) means the reconnect logic can be read on its own, and the
command API reads as a list of one-line wrappers over `request`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, Literal, Self, TypeVar

import aiohttp

from protocol.codec import JSON, MSGPACK, Codec
from protocol.errors import ErrorCode, SlotcastError
from protocol.messages import (
    SERVER_MESSAGES,
    Auth,
    Authenticated,
    Error,
    Message,
    Reconnect,
    Welcome,
)

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)


class ClientError(SlotcastError):
    """An `error` reply from the server; `code` is its stable error code."""

    def __init__(self, code: str, message: str, retry_after_ms: int | None = None) -> None:
        # A newer server may send a code this client does not know yet: keep the
        # wire spelling and fall back to `internal` so `code` stays an ErrorCode.
        try:
            known = ErrorCode(code)
        except ValueError:
            known = ErrorCode.INTERNAL
        super().__init__(message, code=known)
        self.wire_code = code
        self.retry_after_ms = retry_after_ms  # set with `rate_limited`: wait this long


def _transient(exc: BaseException) -> bool:
    """What a server restart or a dependency outage looks like; anything else is logged louder."""
    if isinstance(exc, ClientError):
        return exc.code in {ErrorCode.UNAVAILABLE, ErrorCode.BUSY, ErrorCode.INTERNAL}
    return isinstance(exc, (TimeoutError, aiohttp.ClientError, OSError))


class Connection:
    def __init__(
        self,
        http: aiohttp.ClientSession,
        url: str,
        codec: Codec,
        *,
        headers: dict[str, str],
        auth_token: str | None,
        reconnect: bool,
        max_backoff: float,
        request_timeout: float = 10.0,
    ) -> None:
        self._http = http
        self._url = url
        self._codec = codec
        self._headers = headers
        self._auth_token = auth_token  # sent in an `auth` message after each (re)connect
        self._reconnect = reconnect
        self._max_backoff = max_backoff
        self.request_timeout = request_timeout  # a request's default wait for its reply
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._welcome: asyncio.Future[Welcome] = asyncio.get_running_loop().create_future()
        self._retry_after: float | None = None
        self._closed = False
        self._reader: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.events: asyncio.Queue[Message] = asyncio.Queue()
        self.close_code: int | None = None
        self.instance: str | None = None
        self.reconnects = 0
        self.restore_failures = 0  # restore attempts after a reconnect that had to be retried
        # What has been restored on the current socket (rooms, identity): a retried restore
        # picks up where the failed attempt stopped. Emptied on each (re)connect.
        self._restored: set[tuple[str, int | None]] = set()
        # Set while connected with every room restored; cleared on each disconnect.
        self.ready = asyncio.Event()

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls,
        url: str,
        *,
        token: str | None = None,
        codec: Literal["json", "msgpack"] = "json",
        token_in_header: bool = True,
        session: aiohttp.ClientSession | None = None,
        reconnect: bool = False,
        max_backoff: float = 5.0,
        request_timeout: float = 10.0,
        api_key: str | None = None,
    ) -> AsyncIterator[Self]:
        """Connect; with `token_in_header=False` the token goes in a first `auth` message.
        A service connects with its `api_key` instead (sent as `X-Api-Key`).

        With `reconnect=True` a dropped connection is re-established with capped,
        fully jittered exponential backoff (or after the delay a `reconnect` notice
        asked for), the token re-presented, and every watch resumed from its version.
        A restore that fails (the server answers `unavailable` while its database is
        down, or a reply takes longer than `request_timeout`) is retried with the same
        backoff until every room is back, the socket drops again, or the client closes.
        """
        chosen = MSGPACK if codec == "msgpack" else JSON
        headers = {"Authorization": f"Bearer {token}"} if token and token_in_header else {}
        if api_key:
            headers["X-Api-Key"] = api_key
        own = session is None
        http = session or aiohttp.ClientSession()
        client = cls(
            http,
            url,
            chosen,
            headers=headers,
            auth_token=None if token_in_header else token,
            reconnect=reconnect,
            max_backoff=max_backoff,
            request_timeout=request_timeout,
        )
        try:
            await client._open()
            try:
                await client._restore()
                yield client
            finally:
                await client.close()
        finally:
            if own:
                await http.close()

    async def _open(self) -> None:
        self._ws = await self._http.ws_connect(
            self._url, protocols=[self._codec.subprotocol], headers=self._headers
        )
        self._welcome = asyncio.get_running_loop().create_future()
        self._restored.clear()
        if self._reader is None:
            self._reader = asyncio.create_task(self._read_forever(), name="slotcast-client-reader")

    async def _restore(self) -> None:
        """After (re)connecting: welcome, identity, then every room, resumed where it was.

        Each step is done once per socket: a retry after a failure skips what is back.
        """
        self.instance = (await self.welcome()).instance
        if self._auth_token and ("auth", None) not in self._restored:
            await self.auth(self._auth_token)
            self._restored.add(("auth", None))
        await self._rejoin()
        self.ready.set()

    async def _rejoin(self) -> None:
        """Overridden by the command API: join again every room joined before a drop,
        adding each to `_restored` once it is back."""

    def _on_push(self, message: Message) -> None:
        """Overridden by the command API: keep its live state current before `events` sees it."""

    # ---- requests ---------------------------------------------------------------------------

    async def welcome(self, timeout: float | None = None) -> Welcome:
        wait = self.request_timeout if timeout is None else timeout
        return await asyncio.wait_for(asyncio.shield(self._welcome), wait)

    async def request(self, message: Message, expect: type[M], timeout: float | None = None) -> M:
        """Send a command and wait for its reply; an `error` reply raises ClientError.

        `timeout` defaults to the client's `request_timeout` (10 s)."""
        reply = await self.request_any(message, (expect,), timeout)
        assert isinstance(reply, expect)
        return reply

    async def request_any(
        self, message: Message, expect: tuple[type[Message], ...], timeout: float | None = None
    ) -> Message:
        rid = next(self._ids)
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        wait = self.request_timeout if timeout is None else timeout
        try:
            await self.send_raw(self._codec.encode(message, rid))
            reply = await asyncio.wait_for(future, wait)
        finally:
            self._pending.pop(rid, None)
        if isinstance(reply, Error):
            raise ClientError(reply.code, reply.message, reply.retry_after_ms)
        if not isinstance(reply, expect):
            names = "/".join(t.TYPE for t in expect)
            raise ClientError("bad_message", f"expected {names}, got {reply.TYPE}")
        return reply

    async def send_raw(self, frame: bytes | str) -> None:
        """Send a frame as is (tests use this to send malformed input)."""
        if self._ws is None or self._ws.closed:
            raise ClientError("unavailable", "not connected")
        if isinstance(frame, str):
            await self._ws.send_str(frame)
        elif self._codec.binary:
            await self._ws.send_bytes(frame)
        else:
            await self._ws.send_str(frame.decode())

    async def auth(self, token: str) -> Authenticated:
        return await self.request(Auth(token), Authenticated)

    async def next_event(self, timeout: float = 10.0) -> Message:
        return await asyncio.wait_for(self.events.get(), timeout)

    async def close(self) -> None:
        self._closed = True
        tasks = [t for t in (self._reader, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._ws is not None:
            await self._ws.close()

    # ---- receiving --------------------------------------------------------------------------

    async def _read_forever(self) -> None:
        while True:
            ws = self._ws
            assert ws is not None
            try:
                async for frame in ws:
                    if frame.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                        continue
                    envelope = self._codec.decode(frame.data, SERVER_MESSAGES, max_size=1 << 30)
                    self._dispatch(envelope.id, envelope.body)
            finally:
                self.ready.clear()
                self.close_code = ws.close_code
                error = ClientError("unavailable", f"connection closed ({ws.close_code})")
                for future in self._pending.values():
                    if not future.done():
                        future.set_exception(error)
                if not self._welcome.done():
                    self._welcome.set_exception(error)
                    self._welcome.exception()  # retrieved: nobody may be waiting
            if self._closed or not self._reconnect:
                return
            await self._reconnect_with_backoff()

    def _backoff(self, attempt: int) -> float:
        """Full jitter: a restart's clients spread out instead of stampeding together."""
        return random.uniform(0, min(self._max_backoff, 0.1 * 2**attempt))

    async def _reconnect_with_backoff(self) -> None:
        attempt = 0
        while not self._closed:
            if self._retry_after is not None:
                delay, self._retry_after = self._retry_after, None
            else:
                delay = self._backoff(attempt)
            await asyncio.sleep(delay)
            attempt += 1
            try:
                await self._open()
            except (aiohttp.ClientError, OSError) as exc:
                log.info("reconnect attempt %d failed: %s", attempt, exc)
                continue
            self.reconnects += 1
            ws = self._ws
            self._spawn(self._retrying(ws, self._restore, "restore after reconnect"))
            return

    async def _retrying(
        self,
        ws: aiohttp.ClientWebSocketResponse | None,
        work: Callable[[], Awaitable[object]],
        what: str,
    ) -> bool:
        """Run `work` until it succeeds on socket `ws`, with capped, fully jittered backoff.

        Any failure is retried: an `unavailable` answer (the server's database is down),
        a reply that timed out, anything else. It stops, returning False, once `ws` is
        no longer the client's live socket (the reader reconnects and starts a fresh
        restore) or the client is closed; cancellation (`close`) propagates.
        """
        attempt = 0
        while True:
            try:
                await work()
                return True
            except Exception as exc:
                if self._closed or ws is not self._ws or ws is None or ws.closed:
                    log.info("%s stopped: the connection is gone (%r)", what, exc)
                    return False
                self.restore_failures += 1
                level = logging.INFO if _transient(exc) else logging.WARNING
                log.log(level, "%s failed (attempt %d), retrying: %r", what, attempt + 1, exc)
                await asyncio.sleep(self._backoff(attempt))
                attempt += 1

    def _dispatch(self, rid: str | int | None, message: Message) -> None:
        if isinstance(message, Welcome) and not self._welcome.done():
            self._welcome.set_result(message)
            return
        if isinstance(message, Reconnect):
            self._retry_after = message.retry_after_ms / 1000
        future = self._pending.get(rid) if isinstance(rid, int) else None
        if future is not None and not future.done():
            future.set_result(message)
            return
        # The protocol sends pushes (deltas, resyncs, notices) with a null id.
        self._on_push(message)
        self.events.put_nowait(message)

    def _spawn(self, work: Coroutine[Any, Any, object]) -> None:
        """Run in the background, cancelled by `close`: the reader itself must never wait."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
