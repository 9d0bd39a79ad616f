"""Identity: JWT bearer tokens carrying a subject and a role.

A connection without a token is anonymous: it may watch public availability and
nothing else. Tokens arrive in the `Authorization` header or, for browsers that
cannot set headers on a WebSocket, in a first `auth` message.

Two kinds of token are accepted, told apart by their `alg` header:

- **HS256**, signed with a shared secret: Slotcast's own (`slotcast token`, the demo
  sign-in) and a host application's. Secrets have ids (`kid`), so that a new key can
  sign while the previous one still verifies: rotating a key signs nobody out
  (`KeyRing`). A token without a `kid` is checked against the one unnamed secret.
- **RS256 / ES256**, signed by an identity provider and checked against its published
  keys (`server.identity.IdentityProvider`), when one is configured.

The algorithm a token claims only picks which keys to try; each kind of key is
used with its own algorithms only, so an HS256 token can never be checked against
a public key taken for a secret.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import jwt

from protocol.errors import ErrorCode, SlotcastError
from protocol.vocabulary import Role
from server.settings import DEV_SECRET, Settings
from store.tx import KeyGrant

log = logging.getLogger(__name__)

ALGORITHM: Final = "HS256"
# The display-name claim (OpenID Connect's `name`), kept to this many characters.
NAME_CLAIM: Final = "name"
MAX_NAME: Final = 200
# RFC 7518, 3.2: an HS256 key is at least as long as the hash, 256 bits.
MIN_SECRET_BYTES: Final = 32
KID = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a token or an API key says the caller is. `name` is the token's display name
    (its `name` claim); `key` is set for an API key (`server.apikeys`), whose subject is
    the key's id and whose role is admin within the key's grant."""

    subject: str
    role: Role
    expires_at: datetime | None = None
    name: str | None = None
    key: KeyGrant | None = None

    def is_role(self, *roles: Role) -> bool:
        return self.role in roles


class AuthError(SlotcastError):
    code = ErrorCode.TOKEN_INVALID


class ConfigError(ValueError):
    """Identity settings the server must not start with; the message is one log line."""


@dataclass(frozen=True, slots=True)
class KeyRing:
    """The HS256 secrets: every one that verifies, by key id, and the one that signs.

    `unnamed` checks tokens that carry no `kid` (those signed before keys had ids, or by
    a host application that sets none); `signing` names the key new tokens are signed
    with, and it goes into their header. Either may be absent: an identity-provider-only
    deployment has no secret at all and signs nothing.
    """

    keys: Mapping[str, bytes] = field(default_factory=dict)
    signing: str | None = None
    unnamed: bytes | None = None

    @classmethod
    def single(cls, secret: str) -> KeyRing:
        return cls(unnamed=secret.encode())

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        """The ring the settings describe; `ConfigError` for one that must not be used.

        The built-in development secret is used only in demo mode, and only when nothing
        else is configured.
        """
        keys: dict[str, bytes] = {}
        for entry in settings.jwt_keys.split():
            kid, sep, secret = entry.partition(":")
            if not sep or not KID.fullmatch(kid):
                raise ConfigError(
                    "SLOTCAST_JWT_KEYS holds `kid:secret` entries separated by spaces, "
                    "kid of 1-64 letters, digits, '.', '_' or '-'"
                )
            if kid in keys:
                raise ConfigError(f"SLOTCAST_JWT_KEYS names key {kid!r} twice")
            keys[kid] = _secret(secret, f"SLOTCAST_JWT_KEYS key {kid!r}")
        signing = settings.jwt_signing_key_id or None
        if signing is None and len(keys) == 1:
            signing = next(iter(keys))
        if signing is not None and signing not in keys:
            raise ConfigError(
                f"SLOTCAST_JWT_SIGNING_KEY_ID={signing!r} is not a key of SLOTCAST_JWT_KEYS"
            )
        if keys and signing is None:
            raise ConfigError("SLOTCAST_JWT_KEYS has several keys: set SLOTCAST_JWT_SIGNING_KEY_ID")
        unnamed: bytes | None = None
        if settings.jwt_secret != DEV_SECRET:
            unnamed = _secret(settings.jwt_secret, "SLOTCAST_JWT_SECRET")
        elif signing is not None:
            unnamed = keys[signing]
        elif settings.demo:
            unnamed = DEV_SECRET.encode()
        elif not settings.jwt_jwks_url:
            raise ConfigError(
                "no JWT secret: set SLOTCAST_JWT_SECRET (or SLOTCAST_JWT_SECRET_FILE) to at "
                f"least {MIN_SECRET_BYTES} random bytes, or SLOTCAST_JWT_KEYS, or "
                "SLOTCAST_JWT_JWKS_URL; only --demo runs on the built-in development secret"
            )
        return cls(keys, signing, unnamed)

    @property
    def uses_dev_secret(self) -> bool:
        return self.unnamed == DEV_SECRET.encode() and self.signing is None

    def secret_for(self, kid: object) -> bytes:
        if kid is None:
            if self.unnamed is None:
                raise AuthError("the token names no key (`kid`)")
            return self.unnamed
        if not isinstance(kid, str) or kid not in self.keys:
            raise AuthError(f"unknown key id {str(kid)[:64]!r}")
        return self.keys[kid]

    def issue(
        self,
        *,
        subject: str,
        role: Role,
        ttl: timedelta = timedelta(hours=12),
        name: str | None = None,
    ) -> str:
        """A token signed with the signing key, named in its header."""
        if self.signing is not None:
            secret, headers = self.keys[self.signing], {"kid": self.signing}
        elif self.unnamed is not None:
            secret, headers = self.unnamed, None
        else:
            raise ConfigError(
                "no signing key: set SLOTCAST_JWT_KEYS and SLOTCAST_JWT_SIGNING_KEY_ID, "
                "or SLOTCAST_JWT_SECRET"
            )
        now = datetime.now(UTC)
        claims: dict[str, Any] = {"sub": subject, "role": role.value, "iat": now, "exp": now + ttl}
        if name is not None:
            claims[NAME_CLAIM] = name
        return jwt.encode(claims, secret, algorithm=ALGORITHM, headers=headers)

    def verify(self, token: str, header: Mapping[str, Any] | None = None) -> Identity:
        if header is None:
            header = header_of(token)
        claims = decode(
            token,
            self.secret_for(header.get("kid")),
            algorithms=[ALGORITHM],
            options={"require": ["sub", "exp", "role"]},
        )
        return identity_of(claims, subject=claims["sub"], role=claims["role"])


def _secret(secret: str, name: str) -> bytes:
    raw = secret.encode()
    if len(raw) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"{name} is {len(raw)} bytes: at least {MIN_SECRET_BYTES} are required "
            "(e.g. `openssl rand -base64 48`)"
        )
    return raw


def header_of(token: str) -> Mapping[str, Any]:
    try:
        header: Mapping[str, Any] = jwt.get_unverified_header(token)
        return header
    except jwt.InvalidTokenError as exc:
        raise AuthError(f"invalid token: {exc}") from None


def decode(token: str, key: Any, **kwargs: Any) -> dict[str, Any]:
    try:
        claims: dict[str, Any] = jwt.decode(token, key, **kwargs)
    except jwt.ExpiredSignatureError:
        raise AuthError("the token has expired", code=ErrorCode.TOKEN_EXPIRED) from None
    except jwt.InvalidTokenError as exc:
        raise AuthError(f"invalid token: {exc}") from None
    return claims


def identity_of(claims: Mapping[str, Any], *, subject: object, role: object) -> Identity:
    """An `Identity` from verified claims, their subject and role already picked out."""
    try:
        if not isinstance(role, str):
            raise ValueError(role)
        known = Role(role)
    except ValueError:
        raise AuthError(f"unknown role {str(role)[:64]!r}") from None
    if not isinstance(subject, str) or not 0 < len(subject) <= 128 or "\x00" in subject:
        raise AuthError("the token's subject must be a string of 1-128 characters")
    try:
        expires_at = datetime.fromtimestamp(claims["exp"], UTC)
    except (ValueError, OverflowError, OSError):  # past year 9999: a token that never ends
        raise AuthError("the token's `exp` is out of range") from None
    return Identity(subject, known, expires_at, display_name(claims.get(NAME_CLAIM)))


def display_name(value: object) -> str | None:
    """The `name` claim as stored: a string, NULs dropped, at most `MAX_NAME` characters.

    Anything else is ignored rather than refused: a name is for display, and a provider's
    odd claim must not keep a patient from signing in."""
    if not isinstance(value, str):
        return None
    cleaned = value.replace("\x00", "").strip()[:MAX_NAME]
    return cleaned or None


def issue(
    secret: str,
    *,
    subject: str,
    role: Role,
    ttl: timedelta = timedelta(hours=12),
    name: str | None = None,
) -> str:
    """A token signed with one unnamed secret: tests, benchmarks and the demo client."""
    return KeyRing.single(secret).issue(subject=subject, role=role, ttl=ttl, name=name)


def verify(secret: str, token: str) -> Identity:
    """`issue`'s counterpart, for one unnamed secret."""
    return KeyRing.single(secret).verify(token)


def bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, if that is what it is."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("expected `Authorization: Bearer <token>`")
    return token.strip()
