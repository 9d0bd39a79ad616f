"""An identity provider for tests: real keys (`cryptography`), a real JWKS over HTTP.

It signs tokens the way a clinic's identity provider would (RS256 or ES256, its key id in
the header, issuer and audience claims) and publishes its public keys at `url`, counting
the fetches, so tests can rotate its keys, take it down and see how often it is asked.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from testkit.harness import free_port

ISSUER = "https://idp.clinic.test/realms/clinic"
AUDIENCE = "slotcast"

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


class TestIdentityProvider:
    __test__ = False  # not a test class, whatever pytest thinks of its name

    def __init__(self) -> None:
        self.keys: dict[str, tuple[str, PrivateKey]] = {}
        self.fetches = 0
        self.up = True
        self.hanging = False  # answers nothing until the block of `serving` ends
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/jwks.json"

    def add_key(self, kid: str, algorithm: str = "RS256") -> None:
        key: PrivateKey
        if algorithm == "RS256":
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif algorithm == "ES256":
            key = ec.generate_private_key(ec.SECP256R1())
        else:
            raise ValueError(algorithm)
        self.keys[kid] = (algorithm, key)

    def jwks(self) -> dict[str, Any]:
        published = []
        for kid, (algorithm, key) in self.keys.items():
            codec = RSAAlgorithm if algorithm == "RS256" else ECAlgorithm
            jwk = json.loads(codec.to_jwk(key.public_key()))
            published.append({**jwk, "kid": kid, "alg": algorithm, "use": "sig"})
        return {"keys": published}

    def token(
        self,
        kid: str,
        *,
        sub: str = "alice",
        role: object = "patient",
        issuer: str = ISSUER,
        audience: str = AUDIENCE,
        ttl: timedelta = timedelta(minutes=10),
        **claims: Any,
    ) -> str:
        algorithm, key = self.keys[kid]
        now = datetime.now(UTC)
        body = {"sub": sub, "role": role, "iss": issuer, "aud": audience, "iat": now}
        body.update({"exp": now + ttl, **claims})
        return jwt.encode(body, key, algorithm=algorithm, headers={"kid": kid})

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[TestIdentityProvider]:
        """Publish the JWKS on the running event loop until the block ends."""

        released = asyncio.Event()

        async def jwks(request: web.Request) -> web.Response:
            self.fetches += 1
            if self.hanging:
                await released.wait()
            if not self.up:
                return web.Response(status=503, text="identity provider down")
            return web.json_response(self.jwks())

        app = web.Application()
        app.router.add_get("/jwks.json", jwks)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        try:
            yield self
        finally:
            released.set()
            await runner.cleanup()
