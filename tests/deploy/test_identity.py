"""Secrets and identity as an operator meets them: `slotcast serve` and `slotcast token`
processes configured through the environment and `_FILE`s, an identity provider
(`testkit.idp`: real keys, a real HTTP JWKS) beside them.

Start-up refuses what must not be served; keys rotate without signing anyone out
(docs/operating.md, "Rotating the signing key"); the provider's RS256 and ES256
tokens sign in, others are refused and still count as failed sign-ins. The rules
one by one, without processes, are in tests/unit/test_identity.py and
tests/server/test_identity.py.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest

from client import ClientError, SlotcastClient
from protocol.vocabulary import Role
from server.auth import KeyRing
from testkit.fixtures import Spawn
from testkit.harness import REPO, ServerProcess
from testkit.idp import TestIdentityProvider

pytestmark = pytest.mark.processes

OLD = "old-key-0123456789abcdefghijklmnopqrstuvwxyz"
NEW = "new-key-0123456789abcdefghijklmnopqrstuvwxyz"
NOWHERE = "postgresql://slotcast@127.0.0.1:1/never-reached"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def slotcast(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """Run the `slotcast` command line as an operator would, with only `env`."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server.cli",
        *args,
        cwd=REPO,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode().strip(), err.decode().strip()


async def test_start_up_refuses_a_missing_or_short_secret_in_one_line(tmp_path: Path) -> None:
    """Before touching the database: its address here is one nothing listens on."""
    cases = {
        "missing": ({}, 1, "cannot start: no JWT secret: set SLOTCAST_JWT_SECRET"),
        "short": ({"SLOTCAST_JWT_SECRET": "abc"}, 1, "SLOTCAST_JWT_SECRET is 3 bytes"),
        "file": (
            {"SLOTCAST_JWT_SECRET_FILE": str(tmp_path / "missing")},
            2,
            "SLOTCAST_JWT_SECRET_FILE=",
        ),
        "provider": (
            {"SLOTCAST_JWT_JWKS_URL": "https://idp.example/jwks"},
            1,
            "needs SLOTCAST_JWT_ISSUER and SLOTCAST_JWT_AUDIENCE",
        ),
    }
    runs = await asyncio.gather(
        *(
            slotcast("serve", env={"SLOTCAST_DATABASE_URL": NOWHERE, **env})
            for env, _, _ in cases.values()
        )
    )
    for (name, (_, code, line)), (returncode, out, err) in zip(cases.items(), runs, strict=True):
        assert returncode == code, (name, err)
        assert line in err, (name, err)
        assert len(err.splitlines()) == 1, (name, err)  # one clear line, no traceback
        assert out == ""
    # `slotcast token` will not sign with the development secret unless told it is a demo.
    code, out, err = await slotcast("token", "--role", "admin", "--sub", "ops", env={})
    assert (code, out) == (1, "")
    assert "no JWT secret" in err
    code, out, err = await slotcast("token", "--demo", "--role", "admin", "--sub", "ops", env={})
    assert code == 0
    assert "only a --demo server takes it" in err


async def test_keys_rotate_and_the_identity_provider_signs_in_through_processes(
    spawn_server: Spawn,
    database_url: str,
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    idp = TestIdentityProvider()
    idp.add_key("rsa-1", "RS256")
    idp.add_key("ec-1", "ES256")
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "dsn").write_text(database_url + "\n")
    (secrets / "keys-during").write_text(f"old:{OLD}\nnew:{NEW}\n")
    (secrets / "keys-after").write_text(f"new:{NEW}\n")
    common = {
        # Everything secret from files, as a container's secrets are handed over.
        "SLOTCAST_DATABASE_URL": "",
        "SLOTCAST_DATABASE_URL_FILE": str(secrets / "dsn"),
        "SLOTCAST_JWT_SECRET": "",
        "SLOTCAST_JWT_JWKS_URL": idp.url,
        "SLOTCAST_JWT_ISSUER": "https://idp.clinic.test/realms/clinic",
        "SLOTCAST_JWT_AUDIENCE": "slotcast",
        "SLOTCAST_RATE_AUTH_FAILURES": "12/15 minutes",
    }
    # `during`: the new key signs, the old one still verifies, and a made-up key id never
    # makes it ask the provider again within the hour. `after`: the old key is gone, and
    # a key id it has not seen is looked up at once.
    during_env = {
        **common,
        "SLOTCAST_JWT_KEYS_FILE": str(secrets / "keys-during"),
        "SLOTCAST_JWT_SIGNING_KEY_ID": "new",
        "SLOTCAST_JWT_JWKS_REFRESH_S": "3600",
    }
    after_env = {
        **common,
        "SLOTCAST_JWT_KEYS_FILE": str(secrets / "keys-after"),
        "SLOTCAST_JWT_JWKS_REFRESH_S": "0",
    }
    async with idp.serving():
        during, after = await asyncio.gather(
            asyncio.to_thread(spawn_server, "during", env=during_env),
            asyncio.to_thread(spawn_server, "after", env=after_env),
        )

        async def me(server: ServerProcess, token: str) -> tuple[int, Any]:
            """A patient's own appointments: the status, and the error's body if any."""
            headers = {"Authorization": f"Bearer {token}"}
            async with http.get(f"{server.http_url}/api/me/appointments", headers=headers) as r:
                return r.status, (await r.json()).get("error", {})

        # The operator's token: signed with the signing key, named in its header.
        env = {k: v for k, v in during_env.items() if k.startswith("SLOTCAST_JWT")}
        code, issued, err = await slotcast("token", "--role", "patient", "--sub", "alice", env=env)
        assert code == 0, err
        assert jwt.get_unverified_header(issued)["kid"] == "new"
        assert (await me(during, issued))[0] == 200
        assert (await me(after, issued))[0] == 200

        # A token signed before the rotation: valid while its key is listed, not after.
        old = KeyRing(keys={"old": OLD.encode()}, signing="old").issue(
            subject="bob", role=Role.PATIENT
        )
        assert (await me(during, old))[0] == 200
        status, body = await me(after, old)
        assert (status, body["code"]) == (401, "token_invalid")
        # Without a key id: the signing key's (no SLOTCAST_JWT_SECRET is set).
        legacy = KeyRing.single(NEW).issue(subject="carol", role=Role.PATIENT)
        assert (await me(during, legacy))[0] == 200

        # The provider's tokens, both algorithms.
        assert (await me(during, idp.token("rsa-1")))[0] == 200
        assert (await me(during, idp.token("ec-1", sub="dan")))[0] == 200
        fetched = idp.fetches
        for wrong in (
            idp.token("rsa-1", issuer="https://evil.example"),
            idp.token("rsa-1", audience="another-app"),
        ):
            status, body = await me(during, wrong)
            assert (status, body["code"]) == (401, "token_invalid")
        strangers = [_signed_as(idp, f"made-up-{n}") for n in range(5)]
        results = await asyncio.gather(*(me(during, t) for t in strangers))
        assert {(s, b["code"]) for s, b in results} == {(401, "token_invalid")}
        assert idp.fetches == fetched  # within the hour: the provider was not asked again

        # The provider rotates: a key id not seen yet is fetched once, and signs in.
        assert (await me(after, idp.token("rsa-1")))[0] == 200
        fetched = idp.fetches
        idp.add_key("rsa-2", "RS256")
        assert (await me(after, idp.token("rsa-2", sub="erin")))[0] == 200
        assert idp.fetches == fetched + 1

        # The provider is down: known keys still sign in; the others cannot be checked,
        # over REST as over a WebSocket's `auth`.
        idp.up = False
        assert (await me(after, idp.token("rsa-2")))[0] == 200
        idp.add_key("rsa-3", "RS256")
        status, body = await me(after, idp.token("rsa-3"))
        assert (status, body["code"]) == (503, "unavailable")
        async with SlotcastClient.connect(after.ws_url) as ws:
            who = await ws.auth(idp.token("ec-1", sub="7", role="doctor"))
            assert (who.subject, who.role) == ("7", Role.DOCTOR)
            with pytest.raises(ClientError) as refused:
                await ws.auth(idp.token("rsa-3"))
            assert refused.value.code == "unavailable"
        idp.up = True

        # Refused tokens of every kind count toward the address's failed sign-ins (12 in
        # 15 minutes; 7 spent above): then not even a good token from it is checked.
        codes = []
        for _ in range(8):
            status, body = await me(during, idp.token("rsa-1", audience="another-app"))
            codes.append(body["code"])
        assert codes[-1] == "rate_limited"
        assert (await me(during, idp.token("rsa-1")))[0] == 429


def _signed_as(idp: TestIdentityProvider, kid: str) -> str:
    """Signed with a real provider key, but naming a key id the provider does not have."""
    algorithm, key = idp.keys["rsa-1"]
    claims = {
        "sub": "x",
        "role": "patient",
        "iss": "https://idp.clinic.test/realms/clinic",
        "aud": "slotcast",
        "exp": 2**31,
    }
    return jwt.encode(claims, key, algorithm=algorithm, headers={"kid": kid})
