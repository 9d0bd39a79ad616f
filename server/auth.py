"""Identity: HS256 JWT bearer tokens carrying a subject and a role.

A connection without a token is anonymous: it may watch public availability and
nothing else. Tokens arrive in the `Authorization` header or, for browsers that
cannot set headers on a WebSocket, in a first `auth` message.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import jwt

from protocol.errors import ErrorCode, SlotcastError
from protocol.vocabulary import Role

ALGORITHM = "HS256"


@dataclass(frozen=True, slots=True)
class Identity:
    subject: str
    role: Role
    expires_at: datetime | None = None

    def is_role(self, *roles: Role) -> bool:
        return self.role in roles


class AuthError(SlotcastError):
    code = ErrorCode.TOKEN_INVALID


def issue(secret: str, *, subject: str, role: Role, ttl: timedelta = timedelta(hours=12)) -> str:
    now = datetime.now(UTC)
    claims = {"sub": subject, "role": role.value, "iat": now, "exp": now + ttl}
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify(secret: str, token: str) -> Identity:
    try:
        claims = jwt.decode(
            token, secret, algorithms=[ALGORITHM], options={"require": ["sub", "exp", "role"]}
        )
    except jwt.ExpiredSignatureError:
        raise AuthError("the token has expired", code=ErrorCode.TOKEN_EXPIRED) from None
    except jwt.InvalidTokenError as exc:
        raise AuthError(f"invalid token: {exc}") from None
    try:
        role = Role(claims["role"])
    except ValueError:
        raise AuthError(f"unknown role {claims['role']!r}") from None
    subject = claims["sub"]
    if not isinstance(subject, str) or not 0 < len(subject) <= 128 or "\x00" in subject:
        raise AuthError("the token's subject must be a string of 1-128 characters")
    return Identity(subject, role, datetime.fromtimestamp(claims["exp"], UTC))


def bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, if that is what it is."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("expected `Authorization: Bearer <token>`")
    return token.strip()
