"""An identity provider's tokens, checked against its JWKS served over real HTTP.

`server.identity.Verifier` in process, facing `testkit.idp.TestIdentityProvider` (real
RSA and EC keys, a real aiohttp JWKS endpoint): which tokens pass, how often the
provider is asked, and what its outage means. The same through `slotcast serve`
processes is in tests/deploy/test_identity.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest

from protocol.errors import ErrorCode, SlotcastError
from protocol.vocabulary import Role
from server.identity import Verifier
from server.settings import Settings
from testkit.idp import AUDIENCE, ISSUER, TestIdentityProvider


@pytest.fixture
async def idp() -> AsyncIterator[TestIdentityProvider]:
    provider = TestIdentityProvider()
    provider.add_key("rsa-1", "RS256")
    provider.add_key("ec-1", "ES256")
    async with provider.serving():
        yield provider


def verifier(idp: TestIdentityProvider, **settings: Any) -> Verifier:
    return Verifier.from_settings(
        Settings(
            jwt_secret="our-own-secret-that-is-long-enough",
            jwt_jwks_url=idp.url,
            jwt_issuer=ISSUER,
            jwt_audience=AUDIENCE,
            **settings,
        )
    )


async def refused(check: Verifier, token: str) -> SlotcastError:
    with pytest.raises(SlotcastError) as caught:
        await check.verify(token)
    return caught.value


async def test_rs256_and_es256_tokens_of_the_provider_are_accepted(
    idp: TestIdentityProvider,
) -> None:
    check = verifier(idp)
    who = await check.verify(idp.token("rsa-1", sub="alice"))
    assert (who.subject, who.role) == ("alice", Role.PATIENT)
    who = await check.verify(idp.token("ec-1", sub="ops", role="admin"))
    assert (who.subject, who.role) == ("ops", Role.ADMIN)
    assert idp.fetches == 1  # both keys came with the first fetch
    # Our own tokens go on being ours, beside the provider's.
    ours = check.issue(subject="7", role=Role.DOCTOR)
    assert (await check.verify(ours)).role is Role.DOCTOR


async def test_the_provider_claims_map_to_subject_and_role(idp: TestIdentityProvider) -> None:
    """Keycloak-like tokens: the role in a nested list, the doctor's id in its own claim."""
    check = verifier(idp, jwt_subject_claim="doctor_id", jwt_role_claim="realm_access.roles")
    token = idp.token(
        "rsa-1",
        sub="3f6c1c0e-uuid",
        role=None,
        doctor_id=7,
        realm_access={"roles": ["offline_access", "doctor"]},
    )
    who = await check.verify(token)
    assert (who.subject, who.role) == ("7", Role.DOCTOR)
    ambiguous = idp.token("rsa-1", doctor_id=7, realm_access={"roles": ["doctor", "admin"]})
    assert "exactly one of" in (await refused(check, ambiguous)).message
    no_id = idp.token("rsa-1", realm_access={"roles": ["doctor"]})
    assert "no 'doctor_id' claim" in (await refused(check, no_id)).message


@pytest.mark.parametrize(
    ("claims", "message"),
    [
        ({"issuer": "https://evil.example"}, "Invalid issuer"),
        ({"audience": "another-app"}, "Audience doesn't match"),
    ],
)
async def test_a_token_for_another_issuer_or_audience_is_refused(
    idp: TestIdentityProvider, claims: dict[str, str], message: str
) -> None:
    error = await refused(verifier(idp), idp.token("rsa-1", **claims))
    assert error.code is ErrorCode.TOKEN_INVALID
    assert message in error.message


async def test_an_algorithm_not_allowed_is_refused(idp: TestIdentityProvider) -> None:
    """ES256 when only RS256 is allowed; `none`; and the classic confusion: HS256 signed
    with the provider's public key, as if it were a shared secret."""
    rs_only = verifier(idp, jwt_algorithms="RS256")
    assert "'ES256' are not accepted" in (await refused(rs_only, idp.token("ec-1"))).message
    unsigned = jwt.encode({"sub": "x", "role": "admin"}, None, algorithm="none")
    assert (await refused(rs_only, unsigned)).code is ErrorCode.TOKEN_INVALID
    public = idp.jwks()["keys"][0]["n"]  # anything public will do: it is no secret
    forged = jwt.encode(
        {"sub": "x", "role": "admin", "exp": 2**31, "iss": ISSUER, "aud": AUDIENCE},
        public,
        algorithm="HS256",
        headers={"kid": "rsa-1"},
    )
    error = await refused(rs_only, forged)
    assert (error.code, error.message) == (ErrorCode.TOKEN_INVALID, "unknown key id 'rsa-1'")


async def test_unknown_key_ids_cost_the_provider_one_fetch_per_burst(
    idp: TestIdentityProvider,
) -> None:
    """A key rotated in at the provider is found at once; made-up key ids share one fetch
    (all at once) or none (within `refresh_s` of the last)."""
    eager = verifier(idp, jwt_jwks_refresh_s=0)
    await eager.verify(idp.token("rsa-1"))
    idp.add_key("rsa-2", "RS256")  # the provider rotates
    assert (await eager.verify(idp.token("rsa-2", sub="bob"))).subject == "bob"
    assert idp.fetches == 2
    strangers = [_with_kid(idp, f"random-{n}") for n in range(20)]
    errors = await asyncio.gather(*(refused(eager, t) for t in strangers))
    assert {e.code for e in errors} == {ErrorCode.TOKEN_INVALID}
    assert idp.fetches == 3  # one fetch for the burst

    patient = verifier(idp, jwt_jwks_refresh_s=3600)
    await patient.verify(idp.token("rsa-1"))
    before = idp.fetches
    for token in strangers:
        assert (await refused(patient, token)).code is ErrorCode.TOKEN_INVALID
    assert idp.fetches == before  # asked within refresh_s of the last fetch: not again


async def test_with_the_provider_down_known_keys_still_verify_and_others_are_unavailable(
    idp: TestIdentityProvider, caplog: pytest.LogCaptureFixture
) -> None:
    check = verifier(idp, jwt_jwks_cache_s=0.001, jwt_jwks_refresh_s=0)
    await check.verify(idp.token("rsa-1"))
    idp.up = False
    # The cache has expired and the fetch fails: the key we had still checks its tokens.
    assert (await check.verify(idp.token("rsa-1", sub="carol"))).subject == "carol"
    idp.add_key("rsa-3", "RS256")
    error = await refused(check, idp.token("rsa-3"))
    assert error.code is ErrorCode.UNAVAILABLE  # not token_invalid: it could not be checked
    assert "identity provider keys: cannot fetch" in caplog.text  # the operator's side
    assert "503" in caplog.text
    idp.up = True
    assert (await check.verify(idp.token("rsa-3", sub="dan"))).subject == "dan"


async def test_a_provider_that_never_answers_costs_a_bounded_wait(
    idp: TestIdentityProvider,
) -> None:
    """The fetch runs in a thread within its time bound; the event loop goes on meanwhile."""
    check = verifier(idp, jwt_jwks_timeout_ms=200)
    idp.hanging = True
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    ticker = asyncio.create_task(tick())
    error = await refused(check, idp.token("rsa-1"))
    ticker.cancel()
    assert error.code is ErrorCode.UNAVAILABLE
    assert ticks > 1  # the loop was not blocked by the fetch


def _with_kid(idp: TestIdentityProvider, kid: str) -> str:
    """A token signed with a real provider key but naming a key id the provider lacks."""
    algorithm, key = idp.keys["rsa-1"]
    claims = {"sub": "x", "role": "patient", "iss": ISSUER, "aud": AUDIENCE, "exp": 2**31}
    return jwt.encode(claims, key, algorithm=algorithm, headers={"kid": kid})
