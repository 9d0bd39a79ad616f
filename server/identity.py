"""Whose tokens the server accepts: its own keys (`server.auth.KeyRing`) and, when
configured, an identity provider's, fetched from its JWKS (`IdentityProvider`).

The provider's keys come through PyJWT's `PyJWKClient`, which is synchronous
(urllib): a fetch runs in a thread, within `SLOTCAST_JWT_JWKS_TIMEOUT_MS`, so the
event loop never waits on the provider. The keys are kept for
`SLOTCAST_JWT_JWKS_CACHE_S` and fetched again early when a token names a key id not
yet seen (the provider rotated), but never more than once per
`SLOTCAST_JWT_JWKS_REFRESH_S` and one fetch at a time: tokens with made-up key ids
cost the provider nothing. While the provider cannot be reached, tokens whose keys
are known (even from an expired fetch) are still checked, and the others get
`unavailable` (retryable): they were not found invalid, they could not be checked.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt

from protocol.errors import ErrorCode, SlotcastError
from protocol.vocabulary import Role
from server.apikeys import ApiKeys
from server.auth import (
    ALGORITHM,
    AuthError,
    ConfigError,
    Identity,
    KeyRing,
    bearer,
    decode,
    header_of,
    identity_of,
)
from server.settings import Settings

log = logging.getLogger(__name__)

# What an identity provider may sign with: asymmetric only, its public keys are ours.
PROVIDER_ALGORITHMS = frozenset({"RS256", "ES256"})
# Verified tokens of our own keys kept at most (each a few hundred bytes): one per active
# client is the point, and past it the oldest is checked again on its next request.
VERIFIED_TOKENS = 10_000


class IdentityProvider:
    """An identity provider's signing keys, from its JWKS, and how its claims map to ours."""

    def __init__(
        self,
        url: str,
        *,
        issuer: str,
        audience: str,
        algorithms: frozenset[str] = PROVIDER_ALGORITHMS,
        subject_claim: str = "sub",
        role_claim: str = "role",
        cache_s: float = 300.0,
        refresh_s: float = 10.0,
        timeout_s: float = 2.0,
    ) -> None:
        try:
            # Its own cache is off: ours decides when to fetch (rate-bounded, off the loop).
            self._client = jwt.PyJWKClient(url, cache_jwk_set=False, timeout=timeout_s)
        except jwt.PyJWKClientError as exc:
            raise ConfigError(f"SLOTCAST_JWT_JWKS_URL={url!r}: {exc}") from None
        self.url = url
        self.issuer = issuer
        self.audience = audience
        self.algorithms = algorithms
        self.subject_claim = subject_claim
        self.role_claim = role_claim
        self.cache_s = cache_s
        self.refresh_s = refresh_s
        self.timeout_s = timeout_s
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at: float | None = None  # when the last fetch that worked began
        self._tried_at: float | None = None  # when the last attempt began (monotonic)
        self._ended_at: float | None = None  # and when it ended
        self._failure: str | None = None  # why the last attempt failed
        self._lock = asyncio.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> IdentityProvider:
        algorithms = frozenset(settings.jwt_algorithms.split())
        if not algorithms or not algorithms <= PROVIDER_ALGORITHMS:
            raise ConfigError(
                f"SLOTCAST_JWT_ALGORITHMS={settings.jwt_algorithms!r}: "
                f"choose from {' '.join(sorted(PROVIDER_ALGORITHMS))}"
            )
        if not settings.jwt_issuer or not settings.jwt_audience:
            raise ConfigError(
                "SLOTCAST_JWT_JWKS_URL needs SLOTCAST_JWT_ISSUER and SLOTCAST_JWT_AUDIENCE: "
                "without them, any token the provider signs for anyone would be accepted"
            )
        return cls(
            settings.jwt_jwks_url,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            algorithms=algorithms,
            subject_claim=settings.jwt_subject_claim,
            role_claim=settings.jwt_role_claim,
            cache_s=settings.jwt_jwks_cache_s,
            refresh_s=settings.jwt_jwks_refresh_s,
            timeout_s=settings.jwt_jwks_timeout_ms / 1000,
        )

    async def verify(self, token: str, header: Mapping[str, Any]) -> Identity:
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AuthError("the identity provider's token names no key (`kid`)")
        key = await self.key(kid[:256])
        claims = decode(
            token,
            key,
            algorithms=sorted(self.algorithms),
            issuer=self.issuer,
            audience=self.audience,
            options={"require": ["exp", "iss", "aud"]},
        )
        role = self._role(_dig(claims, self.role_claim))
        return identity_of(claims, subject=self._subject(claims), role=role)

    async def key(self, kid: str) -> jwt.PyJWK:
        """The provider's key `kid`: cached, else fetched once more (within the bounds)."""
        asked_at = time.monotonic()
        fresh = self._fetched_at is not None and asked_at - self._fetched_at < self.cache_s
        if not fresh or kid not in self._keys:
            await self._refresh(asked_at)
        key = self._keys.get(kid)
        if key is not None:
            return key
        if self._failure is not None:  # the reason is in the log, not for the client
            raise SlotcastError(
                "the identity provider's keys cannot be fetched to check this token: retry later",
                code=ErrorCode.UNAVAILABLE,
            )
        raise AuthError(f"the identity provider has no key {kid[:64]!r}")

    async def _refresh(self, asked_at: float) -> None:
        """Fetch the keys, unless an attempt ended since `asked_at` (its answer is as new as
        ours would be: a burst of tokens costs one fetch) or began under `refresh_s` ago."""
        async with self._lock:
            tried, ended = self._tried_at, self._ended_at
            if ended is not None and ended >= asked_at:
                return
            if tried is not None and time.monotonic() - tried < self.refresh_s:
                return
            self._tried_at = time.monotonic()
            try:
                await self._fetch()
            finally:
                self._ended_at = time.monotonic()

    async def _fetch(self) -> None:
        try:
            async with asyncio.timeout(self.timeout_s):
                found = await asyncio.to_thread(self._client.get_jwk_set, refresh=True)
        except (TimeoutError, OSError, ValueError, jwt.PyJWTError) as exc:
            failure = str(exc) or f"no answer within {self.timeout_s:g} s"
            if self._failure is None:
                log.warning("identity provider keys: cannot fetch %s: %s", self.url, failure)
            self._failure = failure
            return
        keys = {
            k.key_id: k
            for k in found.keys
            if k.key_id
            and k.public_key_use in {"sig", None}
            and k.algorithm_name in self.algorithms
        }
        if self._failure is not None or set(keys) != set(self._keys):
            log.info("identity provider keys from %s: %s", self.url, " ".join(sorted(keys)))
        self._keys = keys
        self._fetched_at = self._tried_at
        self._failure = None

    def _subject(self, claims: Mapping[str, Any]) -> object:
        subject = _dig(claims, self.subject_claim)
        if isinstance(subject, int) and not isinstance(subject, bool):
            return str(subject)  # a doctor's id as a number
        if subject is None:
            raise AuthError(f"the token has no {self.subject_claim!r} claim")
        return subject

    def _role(self, value: object) -> str:
        """A role claim is one role or a list of roles, of which exactly one is Slotcast's."""
        named = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        roles = {r for r in named if isinstance(r, str) and r in Role.__members__.values()}
        if len(roles) != 1:
            raise AuthError(
                f"the token's {self.role_claim!r} claim must name exactly one of "
                "patient, doctor, admin"
            )
        return roles.pop()


def _dig(claims: Mapping[str, Any], path: str) -> object:
    """A claim by name, or nested by dotted name ("realm_access.roles")."""
    if path in claims:
        return claims[path]
    found: object = claims
    for part in path.split("."):
        if not isinstance(found, Mapping) or part not in found:
            return None
        found = found[part]
    return found


class Verifier:
    """Every token the server accepts, whoever signed it, and the clinic's API keys: the
    front doors' one check. `keys` is set once the database is open (`server.app`)."""

    def __init__(self, ring: KeyRing, provider: IdentityProvider | None = None) -> None:
        self.ring = ring
        self.provider = provider
        self.keys: ApiKeys | None = None
        # Tokens of our own keys already verified, by their exact text, until they expire:
        # a REST client sends the same token with every request, and checking it again
        # (two base64 and JSON decodes and an HMAC) was several per cent of a booking.
        self._verified: dict[str, Identity] = {}

    async def caller(self, authorization: str | None, api_key: str | None) -> Identity | None:
        """Who a request says it is: an `Authorization: Bearer` token or an `X-Api-Key`
        (not both), or nobody. `AuthError` for credentials that are not accepted."""
        if api_key:
            if authorization:
                raise AuthError("send a token or an API key, not both")
            return await self.verify_key(api_key)
        token = bearer(authorization)
        return await self.verify(token) if token is not None else None

    def _remember(self, token: str, identity: Identity) -> None:
        """Keep a verified token of our own keys (which change only with a restart) until
        it expires; the oldest goes first once `VERIFIED_TOKENS` are kept."""
        if identity.expires_at is None:
            return
        if len(self._verified) >= VERIFIED_TOKENS:
            del self._verified[next(iter(self._verified))]
        self._verified[token] = identity

    async def verify_key(self, presented: str) -> Identity:
        if self.keys is None:
            raise SlotcastError(
                "API keys cannot be checked yet: retry later", code=ErrorCode.UNAVAILABLE
            )
        return await self.keys.verify(presented)

    @classmethod
    def from_settings(cls, settings: Settings) -> Verifier:
        """`ConfigError` for identity settings that must not be served (see `KeyRing`)."""
        provider = IdentityProvider.from_settings(settings) if settings.jwt_jwks_url else None
        return cls(KeyRing.from_settings(settings), provider)

    def issue(
        self,
        *,
        subject: str,
        role: Role,
        ttl: timedelta = timedelta(hours=12),
        name: str | None = None,
    ) -> str:
        return self.ring.issue(subject=subject, role=role, ttl=ttl, name=name)

    async def verify(self, token: str) -> Identity:
        """The token's identity; `AuthError` if it is not one we accept, `unavailable` if
        the identity provider's keys cannot be fetched to tell."""
        known = self._verified.get(token)
        if known is not None:
            if known.expires_at is not None and datetime.now(UTC) < known.expires_at:
                return known
            del self._verified[token]  # expired: verified afresh, which says so
        header = header_of(token)
        algorithm = header.get("alg")
        if algorithm == ALGORITHM:
            identity = self.ring.verify(token, header)
            self._remember(token, identity)
            return identity
        # A provider's tokens are checked every time: its keys rotate while we run.
        if self.provider is not None and algorithm in self.provider.algorithms:
            return await self.provider.verify(token, header)
        raise AuthError(f"tokens signed with {str(algorithm)[:16]!r} are not accepted")
