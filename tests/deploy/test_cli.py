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


def test_an_unknown_log_format_is_one_line_and_exit_code_2() -> None:
    """A typo in SLOTCAST_LOG_FORMAT must not start an instance whose logs nobody parses."""
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve"],
        cwd=REPO,
        env={"SLOTCAST_LOG_FORMAT": "jsonl", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert done.returncode == 2
    assert done.stderr == "slotcast: SLOTCAST_LOG_FORMAT='jsonl': expected one of text, json\n"
