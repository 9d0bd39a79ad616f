"""API keys of the clinic's services: their rows, never their secrets.

A key is `sk_<id>_<secret>`; the table keeps only `secret_hash`, which the server
computes (`server.apikeys`: HMAC-SHA256 with a server-side pepper) and compares. Looking a
key up by its visible id costs one indexed read, and the server caches what it read
for a short while, so a key costs no round trip per request. Revoked keys stay as rows:
the change log names their actions `key:<id>` for as long as it keeps them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from protocol.vocabulary import KeyScope
from store import sql
from store.errors import NotFound
from store.pool import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ApiKeyView:
    """A key as an admin lists it: everything but its secret, which nobody sees twice."""

    id: int
    name: str
    scopes: list[KeyScope]
    doctor_id: int | None
    expires_at: datetime | None
    created_at: datetime
    created_by: str
    revoked_at: datetime | None
    last_used_at: datetime | None


@dataclass(frozen=True, slots=True)
class StoredKey:
    view: ApiKeyView
    secret_hash: bytes


def _view(row: asyncpg.Record) -> ApiKeyView:
    return ApiKeyView(
        id=row["id"],
        name=row["name"],
        scopes=[KeyScope(s) for s in row["scopes"]],
        doctor_id=row["doctor_id"],
        expires_at=row["expires_at"],
        created_at=row["created_at"],
        created_by=row["created_by"],
        revoked_at=row["revoked_at"],
        last_used_at=row["last_used_at"],
    )


async def create(
    store: Store,
    *,
    name: str,
    secret_hash: bytes,
    scopes: list[KeyScope],
    doctor_id: int | None,
    expires_at: datetime | None,
    created_by: str,
    now: datetime,
) -> ApiKeyView:
    try:
        row = await store.fetchrow(
            sql.API_KEY_INSERT,
            name,
            secret_hash,
            [s.value for s in scopes],
            doctor_id,
            expires_at,
            created_by,
            now,
        )
    except asyncpg.ForeignKeyViolationError:
        raise NotFound(f"no doctor {doctor_id}") from None
    assert row is not None
    log.info("API key %s (%r) created by %s", row["id"], name, created_by)
    return _view(row)


async def listed(store: Store) -> list[ApiKeyView]:
    return [_view(r) for r in await store.fetch(sql.API_KEY_LIST)]


async def get(store: Store, key_id: int) -> StoredKey | None:
    row = await store.fetchrow(sql.API_KEY_GET, key_id)
    return None if row is None else StoredKey(_view(row), bytes(row["secret_hash"]))


async def revoke(store: Store, key_id: int, *, now: datetime) -> ApiKeyView:
    row = await store.fetchrow(sql.API_KEY_REVOKE, key_id, now)
    if row is None:
        raise NotFound(f"no API key {key_id}")
    log.info("API key %s revoked", key_id)
    return _view(row)


async def touch(store: Store, used: dict[int, datetime]) -> None:
    """Record when keys were last used: one statement for every key used since the last."""
    if used:
        await store.execute(sql.API_KEY_TOUCH, list(used), list(used.values()))
