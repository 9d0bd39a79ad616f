"""A TCP relay in front of PostgreSQL that a test can cut and restore: the database
"goes down" for one app only, while the suite's shared server keeps running.

`cut()` closes every relayed connection and stops listening, so the app's pooled
connections break mid-use and new ones are refused, as when PostgreSQL is stopped;
`restore()` listens again on the same port. Other tests, and the test's own direct
connections (the `store`, `db` fixtures), go around it and never notice.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit


class PgProxy:
    def __init__(self, dsn: str) -> None:
        parts = urlsplit(dsn)
        query = dict(parse_qsl(parts.query))
        host = query.pop("host", None) or parts.hostname or "127.0.0.1"
        port = parts.port or 5432
        # asyncpg's `host=/dir` means the Unix socket /dir/.s.PGSQL.<port>.
        self._unix = f"{host}/.s.PGSQL.{port}" if host.startswith("/") else None
        self._upstream = (host, port)
        self._upstream_dsn = dsn
        self._server: asyncio.Server | None = None
        self._port = 0
        self._pipes: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def dsn(self) -> str:
        """The upstream DSN, pointed at the relay."""
        parts = urlsplit(self._upstream_dsn)
        query = {k: v for k, v in parse_qsl(parts.query) if k != "host"}
        credentials, at, _ = parts.netloc.rpartition("@")
        netloc = f"{credentials}{at}127.0.0.1:{self._port}"
        return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query)))

    async def restore(self) -> None:
        """Listen (again, on the same port once one was chosen)."""
        self._server = await asyncio.start_server(
            self._relay, "127.0.0.1", self._port, reuse_address=True
        )
        self._port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        """Stop listening and break every relayed connection, as a stopped server would."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._pipes):
            writer.transport.abort()
        self._pipes.clear()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self._unix is not None:
                up_reader, up_writer = await asyncio.open_unix_connection(self._unix)
            else:
                up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            writer.transport.abort()
            return
        self._pipes.update((writer, up_writer))
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        self._pipes.discard(sink)
        sink.transport.abort()

    async def close(self) -> None:
        await self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def pg_proxy(dsn: str) -> AsyncIterator[PgProxy]:
    proxy = PgProxy(dsn)
    await proxy.restore()
    try:
        yield proxy
    finally:
        await proxy.close()
