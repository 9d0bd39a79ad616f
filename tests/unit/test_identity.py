"""Secrets and our own keys, without a process: `_FILE` settings and the key ring's rules.

The same rules against real `slotcast serve` processes, and an identity provider's
JWKS, are in tests/deploy/test_identity.py and tests/server/test_identity.py.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt
import pytest

from protocol.errors import ErrorCode
from protocol.vocabulary import Role
from server.auth import AuthError, ConfigError, KeyRing
from server.identity import Verifier
from server.settings import DEV_SECRET, Settings

OLD, NEW = "o" * 32, "n" * 40


def ring(**settings: object) -> KeyRing:
    return KeyRing.from_settings(Settings(**settings))  # type: ignore[arg-type]


def test_every_secret_and_dsn_may_come_from_a_file(tmp_path: Path) -> None:
    files = {
        "SLOTCAST_JWT_SECRET_FILE": "s" * 32,
        "SLOTCAST_JWT_KEYS_FILE": f"k1:{OLD}\nk2:{NEW}\n",
        "SLOTCAST_METRICS_TOKEN_FILE": "scrape-me",
        "DATABASE_URL_FILE": "postgresql://slotcast:pw@db/slotcast",
        "REDIS_URL_FILE": "redis://:pw@cache:6379/0",
    }
    env = {}
    for name, content in files.items():
        path = tmp_path / name
        path.write_text(content + "\n")  # editors and `echo` add the newline
        env[name] = str(path)
    s = Settings.from_env(env)
    assert s.jwt_secret == "s" * 32
    assert s.jwt_keys == f"k1:{OLD}\nk2:{NEW}"
    assert s.metrics_token == "scrape-me"
    assert s.database_url == "postgresql://slotcast:pw@db/slotcast"
    assert s.broker_url == "redis://:pw@cache:6379/0"
    # Only secrets: a _FILE beside an ordinary setting means nothing.
    assert Settings.from_env({"SLOTCAST_PORT_FILE": str(tmp_path / "x")}).port == 8080


def test_a_secret_file_that_cannot_be_used_is_named(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    with pytest.raises(ValueError, match=r"SLOTCAST_JWT_SECRET_FILE='.*nope' cannot be read"):
        Settings.from_env({"SLOTCAST_JWT_SECRET_FILE": missing})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match=r"DATABASE_URL_FILE=.* is empty"):
        Settings.from_env({"DATABASE_URL_FILE": str(tmp_path / "empty")})
    (tmp_path / "pw").write_text("s" * 32)
    both = {"SLOTCAST_JWT_SECRET": "x" * 32, "SLOTCAST_JWT_SECRET_FILE": str(tmp_path / "pw")}
    with pytest.raises(ValueError, match="both SLOTCAST_JWT_SECRET and SLOTCAST_JWT_SECRET_FILE"):
        Settings.from_env(both)


def test_outside_demo_mode_a_missing_or_short_secret_is_refused() -> None:
    with pytest.raises(ConfigError, match="no JWT secret: set SLOTCAST_JWT_SECRET"):
        ring()
    with pytest.raises(ConfigError, match="SLOTCAST_JWT_SECRET is 3 bytes: at least 32"):
        ring(jwt_secret="abc")
    with pytest.raises(ConfigError, match="SLOTCAST_JWT_KEYS key 'k2' is 5 bytes"):
        ring(jwt_keys=f"k1:{OLD} k2:short", jwt_signing_key_id="k1")
    assert ring(demo=True).uses_dev_secret  # `make run` needs nothing
    assert ring(demo=True).unnamed == DEV_SECRET.encode()
    assert not ring(jwt_secret="s" * 32).uses_dev_secret


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"jwt_keys": f"{OLD}"}, "`kid:secret` entries"),
        ({"jwt_keys": f"bad/kid:{OLD}"}, "`kid:secret` entries"),
        ({"jwt_keys": f"k1:{OLD} k1:{NEW}"}, "names key 'k1' twice"),
        ({"jwt_keys": f"k1:{OLD} k2:{NEW}"}, "several keys: set SLOTCAST_JWT_SIGNING_KEY_ID"),
        ({"jwt_keys": f"k1:{OLD}", "jwt_signing_key_id": "k9"}, "'k9' is not a key"),
    ],
)
def test_a_malformed_key_list_is_refused(settings: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ring(**settings)


def test_keys_rotate_without_signing_anyone_out() -> None:
    """Step by step as docs/operating.md tells it: add the new key, sign with it, and
    drop the old one once the last token it signed has expired."""
    before = ring(jwt_keys=f"k1:{OLD}")
    old_token = before.issue(subject="alice", role=Role.PATIENT)
    assert jwt.get_unverified_header(old_token)["kid"] == "k1"

    during = ring(jwt_keys=f"k1:{OLD} k2:{NEW}", jwt_signing_key_id="k2")
    new_token = during.issue(subject="ops", role=Role.ADMIN)
    assert jwt.get_unverified_header(new_token)["kid"] == "k2"
    assert during.verify(old_token).subject == "alice"  # still listed: still valid
    assert during.verify(new_token).role is Role.ADMIN

    after = ring(jwt_keys=f"k2:{NEW}")
    assert after.verify(new_token).subject == "ops"
    with pytest.raises(AuthError, match="unknown key id 'k1'") as refused:
        after.verify(old_token)
    assert refused.value.code is ErrorCode.TOKEN_INVALID


def test_tokens_without_a_key_id_check_against_the_unnamed_secret() -> None:
    """Tokens from before key ids (or from a host that sets none) keep working: against
    SLOTCAST_JWT_SECRET while it is set, else against the signing key."""
    legacy = jwt.encode({"sub": "bob", "role": "patient", "exp": 2**32}, OLD, algorithm="HS256")
    moving = ring(jwt_secret=OLD, jwt_keys=f"k2:{NEW}")
    assert moving.verify(legacy).subject == "bob"
    assert "kid" in jwt.get_unverified_header(moving.issue(subject="x", role=Role.PATIENT))
    keyed = ring(jwt_keys=f"k1:{OLD}")
    assert keyed.verify(legacy).subject == "bob"
    with pytest.raises(AuthError, match="Signature verification failed"):
        ring(jwt_keys=f"k2:{NEW}").verify(legacy)
    endless = jwt.encode({"sub": "bob", "role": "patient", "exp": 2**40}, OLD, algorithm="HS256")
    with pytest.raises(AuthError, match="`exp` is out of range"):  # not an internal error
        moving.verify(endless)


def test_a_provider_only_deployment_signs_nothing() -> None:
    with pytest.raises(ConfigError, match="needs SLOTCAST_JWT_ISSUER and SLOTCAST_JWT_AUDIENCE"):
        Verifier.from_settings(Settings(jwt_jwks_url="https://idp.example/jwks"))
    only = ring(jwt_jwks_url="https://idp.example/jwks")
    with pytest.raises(ConfigError, match="no signing key"):
        only.issue(subject="ops", role=Role.ADMIN)
    with pytest.raises(AuthError, match="names no key"):
        only.verify(jwt.encode({"sub": "x"}, NEW, algorithm="HS256"))


async def test_a_verified_token_is_remembered_until_it_expires_then_refused() -> None:
    """REST clients send the same token with every request: it is checked once, but a
    remembered token still ends at its `exp`, and a forged variant is never remembered."""
    keys = ring(jwt_secret=NEW)
    verifier = Verifier(keys)
    token = keys.issue(subject="p-1", role=Role.PATIENT, ttl=timedelta(seconds=1))
    first = await verifier.verify(token)
    assert await verifier.verify(token) is first  # remembered: the same Identity
    forged = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    with pytest.raises(AuthError):
        await verifier.verify(forged)
    assert first.expires_at is not None
    await asyncio.sleep(max(0.0, (first.expires_at - datetime.now(UTC)).total_seconds()) + 0.05)
    with pytest.raises(AuthError) as refused:
        await verifier.verify(token)
    assert refused.value.code is ErrorCode.TOKEN_EXPIRED
