"""server.logs: the ids on every line, in both formats, and what stays out of them.

The process test (tests/deploy/test_observability.py) reads a real instance's JSON
log; this checks the text format and the context's rules without a server.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from protocol.vocabulary import Role
from server import logs
from server.auth import Identity


@pytest.fixture
def lines() -> Iterator[tuple[logging.Logger, io.StringIO, list[logging.Handler]]]:
    logger = logging.getLogger("tests.unit.test_logs")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    out = io.StringIO()
    handlers: list[logging.Handler] = []
    yield logger, out, handlers
    for h in handlers:
        logger.removeHandler(h)


def use(
    setup: tuple[logging.Logger, io.StringIO, list[logging.Handler]], fmt: str
) -> logging.Logger:
    logger, out, handlers = setup
    h = logs.handler(fmt, "inst-1", out)
    handlers.append(h)
    logger.addHandler(h)
    return logger


def identity() -> Identity:
    return Identity("alice", Role.PATIENT, datetime.now(UTC) + timedelta(hours=1))


def test_text_lines_carry_the_ids_only_inside_a_request(
    lines: tuple[logging.Logger, io.StringIO, list[logging.Handler]],
) -> None:
    logger = use(lines, "text")
    logger.info("outside")

    async def request() -> None:
        logs.REQUEST_ID.set("r1")
        logs.CONNECTION_ID.set("r1")
        logs.identify(identity())
        logger.info("inside")

    asyncio.run(request())
    logger.info("after")  # the request's task ended, and its context with it
    outside, inside, after = lines[1].getvalue().splitlines()
    assert outside.endswith(" INFO tests.unit.test_logs: outside")
    assert inside.endswith(" INFO tests.unit.test_logs [req=r1 conn=r1 sub=patient:alice]: inside")
    assert after.endswith(" INFO tests.unit.test_logs: after")


def test_json_lines_are_objects_with_the_context_as_fields(
    lines: tuple[logging.Logger, io.StringIO, list[logging.Handler]],
) -> None:
    logger = use(lines, "json")

    async def request() -> None:
        logs.REQUEST_ID.set("r2")
        logs.identify(identity())
        logger.warning("refused %s", "x", extra={"command": "book"})
        # A room's work scheduled from here does not carry the request's ids.
        done = asyncio.get_running_loop().create_future()

        def fan_out() -> None:
            logger.info("fan-out")
            done.set_result(None)

        asyncio.get_running_loop().call_soon(fan_out, context=logs.detached())
        await done

    asyncio.run(request())
    first, second = (orjson.loads(line) for line in lines[1].getvalue().splitlines())
    assert first["message"] == "refused x"
    assert first["level"] == "WARNING"
    assert first["instance"] == "inst-1"
    assert first["request_id"] == "r2"
    assert (first["subject"], first["role"]) == ("alice", "patient")
    assert first["command"] == "book"
    assert "ids" not in first
    assert second["message"] == "fan-out"
    assert second["instance"] == "inst-1"
    assert not {"request_id", "subject", "connection_id"} & second.keys()


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="SLOTCAST_LOG_FORMAT='xml'"):
        logs.handler("xml", "inst-1", io.StringIO())


def test_the_command_line_is_not_built_when_its_level_is_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="slotcast.commands"):
        logs.command_done("ws", "book", "ok", 0.004, 3)
    assert not caplog.records
    with caplog.at_level(logging.INFO, logger="slotcast.commands"):
        logs.command_done("ws", "book", "ok", 0.004, 3)
        logs.command_done("ws", "ping", "ok", 0.001, None)  # DEBUG: a page's proof of life
    [record] = caplog.records
    assert record.getMessage() == "ws book ok 4.00 ms doctor 3"
    assert record.__dict__["latency_ms"] == 4.0
