"""Small pure pieces of the server: settings, tokens, and the HTTP status of each error code."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from protocol.errors import ErrorCode
from protocol.vocabulary import Role
from server import auth
from server.api import HTTP_STATUS
from server.app import create_app
from server.settings import DEV_SECRET, Settings
from store.replicas import parse_urls


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


# ---- the front door's settings (server/limits.py, server/guard.py) ----------------------------


def test_a_bad_rate_or_network_setting_is_named_at_startup() -> None:
    from server.guard import networks
    from server.limits import budget

    assert budget("off", "rate_address") is None
    limit = budget("1000/15 minutes", "rate_address")
    assert limit is not None
    assert (limit.amount, limit.get_expiry()) == (1000, 900)
    with pytest.raises(ValueError, match="SLOTCAST_RATE_ADDRESS='lots'"):
        budget("lots", "rate_address")
    assert len(networks("10.0.0.0/8, ::1 192.0.2.7", "trusted_proxies")) == 3
    with pytest.raises(ValueError, match="SLOTCAST_TRUSTED_PROXIES: 'haproxy'"):
        networks("10.0.0.1 haproxy", "trusted_proxies")


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        ("203.0.113.1", "198.51.100.9", "203.0.113.1"),  # not a proxy: the header is ignored
        ("10.0.0.5", "198.51.100.9", "198.51.100.9"),  # the proxy says who it saw
        ("10.0.0.5", "1.2.3.4, 198.51.100.9", "198.51.100.9"),  # the client's own entry: left
        ("10.0.0.5", "198.51.100.9, 10.0.0.6", "198.51.100.9"),  # proxies all the way
        ("10.0.0.5", "10.0.0.7, 10.0.0.6", "10.0.0.7"),  # only proxies: the farthest
        ("10.0.0.5", "1.2.3.4, garbage", "10.0.0.5"),  # unreadable: believe nothing further
        ("10.0.0.5", None, "10.0.0.5"),
    ],
)
def test_the_client_address_believes_forwarded_for_only_from_trusted_proxies(
    peer: str, forwarded: str | None, client: str
) -> None:
    from unittest import mock

    from aiohttp.test_utils import make_mocked_request

    from server.guard import client_address, networks

    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (
        (peer, 4242) if name == "peername" else default
    )
    headers = {"X-Forwarded-For": forwarded} if forwarded else {}
    request = make_mocked_request("GET", "/ws", headers=headers, transport=transport)
    assert client_address(request, networks("10.0.0.0/24", "trusted_proxies")) == client


def test_replica_urls_are_postgresql_urls_and_a_wrong_one_is_refused_without_its_password() -> None:
    assert parse_urls("") == []
    assert parse_urls(" postgresql://u:pw@r1:5432/db\n postgres://r2/db ") == [
        "postgresql://u:pw@r1:5432/db",
        "postgres://r2/db",
    ]
    settings = Settings(
        jwt_secret="x" * 32, replica_urls="postgresql://r1/db mysql://u:hunter2@r2:3306/db"
    )
    with pytest.raises(ValueError, match="SLOTCAST_REPLICA_URLS") as refused:
        create_app(settings)
    assert "r2:3306/db" in str(refused.value)
    assert "hunter2" not in str(refused.value)
