"""`slotcast serve` takes all the open files it may, and says when that is too few.

Every WebSocket is a file descriptor, and so is every database and Redis connection:
past the limit, accepting fails and so does the pool. The process's real limits are
used (nothing is faked): the soft limit ends at the hard one.
"""

from __future__ import annotations

import logging
import resource

import pytest

from server.cli import raise_fd_limit
from server.settings import Settings


def test_the_soft_limit_is_raised_to_the_hard_one_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with caplog.at_level(logging.INFO, logger="slotcast"):
        raise_fd_limit(Settings(max_connections=10))
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    assert [r.levelname for r in caplog.records] == ["INFO"]
    assert "SLOTCAST_MAX_CONNECTIONS 10" in caplog.text


def test_no_cap_or_a_cap_past_the_limit_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:  # pragma: no cover - no limit: nothing to warn about
        pytest.fail("this test needs a finite RLIMIT_NOFILE")
    with caplog.at_level(logging.INFO, logger="slotcast"):
        raise_fd_limit(Settings(max_connections=0))
        raise_fd_limit(Settings(max_connections=soft))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2
    assert "no cap" in warnings[0]
    assert "raise the hard limit (LimitNOFILE) or lower SLOTCAST_MAX_CONNECTIONS" in warnings[1]
