"""Small pure pieces of the server: settings, tokens, and the HTTP status of each error code."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from protocol.errors import ErrorCode
from protocol.vocabulary import Role
from server import auth
from server.api import HTTP_STATUS
from server.settings import DEV_SECRET, Settings


def test_every_error_code_has_an_http_status() -> None:
    """A code without a status would surface over REST as a 500."""
    assert set(HTTP_STATUS) == set(ErrorCode)
    assert all(400 <= status < 600 for status in HTTP_STATUS.values())


def test_settings_come_from_defaults_env_then_overrides() -> None:
    env = {
        "SLOTCAST_PORT": "9001",
        "SLOTCAST_DEMO": "yes",
        "SLOTCAST_HOLD_TTL_S": "30.5",
        "SLOTCAST_DATA_DIR": "/tmp/x",
        "DATABASE_URL": "postgresql://db/x",
        "REDIS_URL": "redis://r:6379/0",
    }
    s = Settings.from_env(env, port=9002)
    assert s.port == 9002  # a CLI flag beats the environment
    assert s.demo is True
    assert s.hold_ttl_s == 30.5
    assert s.data_dir == Path("/tmp/x")
    assert s.database_url == "postgresql://db/x"
    assert s.broker_url == "redis://r:6379/0"


def test_slotcast_prefixed_urls_beat_the_generic_ones() -> None:
    env = {"DATABASE_URL": "postgresql://a/a", "SLOTCAST_DATABASE_URL": "postgresql://b/b"}
    assert Settings.from_env(env).database_url == "postgresql://b/b"


def test_defaults_are_the_embedded_ones() -> None:
    s = Settings.from_env({})
    assert (s.host, s.port, s.database_url, s.broker_url) == ("127.0.0.1", 8080, None, "memory://")
    assert s.jwt_secret == DEV_SECRET


@pytest.mark.parametrize(
    ("name", "value"), [("SLOTCAST_PORT", "eighty"), ("SLOTCAST_DEMO", "maybe")]
)
def test_a_malformed_setting_names_itself(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=name):
        Settings.from_env({name: value})


def test_tokens_round_trip_and_expire() -> None:
    token = auth.issue("s" * 32, subject="7", role=Role.DOCTOR)
    who = auth.verify("s" * 32, token)
    assert (who.subject, who.role) == ("7", Role.DOCTOR)
    expired = auth.issue("s" * 32, subject="7", role=Role.DOCTOR, ttl=timedelta(seconds=-1))
    with pytest.raises(auth.AuthError) as caught:
        auth.verify("s" * 32, expired)
    assert caught.value.code is ErrorCode.TOKEN_EXPIRED
