"""The `slotcast` command line, run as a subprocess the way an operator runs it."""

from __future__ import annotations

import subprocess
import sys

from protocol.vocabulary import Role
from server import auth
from testkit.harness import REPO


def test_cli_prints_a_token_signed_with_the_configured_secret() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "server.cli", "token", "--role", "admin", "--sub", "root"],
        cwd=REPO,
        env={"SLOTCAST_JWT_SECRET": "t" * 40, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    who = auth.verify("t" * 40, out.stdout.strip())
    assert (who.subject, who.role) == ("root", Role.ADMIN)
