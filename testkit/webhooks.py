"""A webhook receiver for tests: a real aiohttp server that verifies every delivery with
the Standard Webhooks library, and can fail, hang, or go away and come back.

Shared by tests/server/test_webhooks.py (in-process app) and
tests/deploy/test_webhook_processes.py (real `slotcast serve` processes).
"""

from __future__ import annotations

import asyncio
import inspect
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from standardwebhooks import Webhook, WebhookVerificationError

from testkit.harness import free_port


@dataclass
class Delivery:
    id: str
    payload: dict[str, Any]
    body: bytes
    signature: str
    timestamp: str

    def headers(self) -> dict[str, str]:
        return {
            "webhook-id": self.id,
            "webhook-signature": self.signature,
            "webhook-timestamp": self.timestamp,
        }


@dataclass
class Receiver:
    """Answers 204 to a delivery whose signature verifies against `secret`; records it.

    `fail_next` requests get 500 (with `retry_after` as Retry-After if set), `hang_next`
    are held past any sensible timeout, and `delay_s` slows every answer. Requests for
    doctor `held_doctor` wait until `release` is set; `most_in_flight` is, per doctor,
    the most of its requests ever open at once (one, if its order is kept)."""

    secret: str = ""
    port: int = field(default_factory=free_port)
    deliveries: list[Delivery] = field(default_factory=list)
    requests: int = 0
    bad_signatures: int = 0
    fail_next: int = 0
    hang_next: int = 0
    delay_s: float = 0.0
    retry_after: str | None = None
    held_doctor: int | None = None
    release: asyncio.Event = field(default_factory=asyncio.Event)
    in_flight: dict[int, int] = field(default_factory=dict)
    most_in_flight: dict[int, int] = field(default_factory=dict)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        body = await request.read()
        doctor = int(orjson.loads(body)["data"]["doctor_id"])
        self.in_flight[doctor] = self.in_flight.get(doctor, 0) + 1
        self.most_in_flight[doctor] = max(
            self.most_in_flight.get(doctor, 0), self.in_flight[doctor]
        )
        try:
            return await self._answer(request, body, doctor)
        finally:
            self.in_flight[doctor] -= 1

    async def _answer(self, request: web.Request, body: bytes, doctor: int) -> web.Response:
        if doctor == self.held_doctor:
            await self.release.wait()
        if self.hang_next > 0:
            self.hang_next -= 1
            await asyncio.sleep(30)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail_next > 0:
            self.fail_next -= 1
            headers = {"Retry-After": self.retry_after} if self.retry_after else {}
            return web.Response(status=500, headers=headers)
        try:
            payload = Webhook(self.secret).verify(body, dict(request.headers))
        except WebhookVerificationError:
            self.bad_signatures += 1
            return web.Response(status=400)
        self.deliveries.append(
            Delivery(
                request.headers["webhook-id"],
                payload,
                body,
                request.headers["webhook-signature"],
                request.headers["webhook-timestamp"],
            )
        )
        return web.Response(status=204)

    def versions(self, doctor_id: int) -> list[int]:
        return [
            d.payload["data"]["version"]
            for d in self.deliveries
            if d.payload["data"]["doctor_id"] == doctor_id
        ]

    def distinct(self) -> dict[str, bytes]:
        """Each webhook-id once, checking a duplicate carried the very same body."""
        seen: dict[str, bytes] = {}
        for d in self.deliveries:
            assert seen.setdefault(d.id, d.body) == d.body, "a duplicate with another body"
        return seen


async def eventually(check: Any, *, timeout: float = 20.0, what: str = "condition") -> None:
    """Wait until `check()` (a function, or a coroutine function) is true, polling; fail
    with `what` after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await _true(check):
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def _true(check: Any) -> bool:
    result = check()
    if inspect.isawaitable(result):
        result = await result
    return bool(result)
