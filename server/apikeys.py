"""API keys: how a service's key is made, checked and cached (docs/protocol.md, "API keys").

A key reads `sk_<id>_<secret>`: the id is visible so that checking a key is one lookup
by primary key, never a scan over hashes, and the secret is 32 random bytes
(`secrets.token_urlsafe`), 256 bits. Only HMAC-SHA256(pepper, secret) is stored,
compared with `hmac.compare_digest` (with no pepper set, HMAC's key is empty: as
strong as plain SHA-256 for such secrets). A password hash (argon2, bcrypt) is built to slow
down guessing *low-entropy* secrets and would cost tens of milliseconds a request here
for nothing: nobody guesses 256 random bits, so a fast keyed hash is the standard for
API keys. The pepper (`SLOTCAST_API_KEY_PEPPER`) lives outside the database, so a
stolen copy of `api_keys` alone cannot even be checked against a candidate key.

Verified keys are cached in process for `SLOTCAST_API_KEY_CACHE_S` (bounded, least
recently used first out), so a key costs no database round trip per request; a
revocation, made on any instance, is honoured everywhere once the cached entry ends,
within that many seconds. `last_used_at` is written by a background task at most once
per `SLOTCAST_API_KEY_TOUCH_S` per key, one statement for all keys used meanwhile: a
busy key costs no write per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from datetime import datetime

from protocol.errors import ErrorCode
from protocol.vocabulary import KeyScope, Role
from server.auth import AuthError, Identity
from store import apikeys
from store.apikeys import ApiKeyView, StoredKey
from store.errors import Unavailable
from store.pool import Store
from store.tx import KeyGrant

log = logging.getLogger(__name__)

PREFIX = "sk_"
# `sk_<id>_<secret>`: an id of digits, a secret of URL-safe base64 (43 characters).
KEY_FORMAT = re.compile(r"sk_([1-9][0-9]{0,15})_([A-Za-z0-9_-]{43})")
SECRET_BYTES = 32


def new_secret() -> str:
    return secrets.token_urlsafe(SECRET_BYTES)


def key_text(key_id: int, secret: str) -> str:
    return f"{PREFIX}{key_id}_{secret}"


class ApiKeys:
    """This instance's view of the keys: verification, its cache, and last-use times."""

    def __init__(
        self,
        store: Store,
        *,
        pepper: str = "",
        cache_s: float = 30.0,
        cache_size: int = 1000,
        touch_s: float = 60.0,
        clock: Callable[[], datetime],
    ) -> None:
        self.store = store
        self._pepper = pepper.encode()
        self.cache_s = cache_s
        self.cache_size = max(1, cache_size)
        self.touch_s = touch_s
        self.clock = clock
        # id -> (until, the key), least recently used first. Unknown ids are not kept: a
        # guess at the next id must not make the key created under it fail for a while
        # (and guesses are paid for by the address's sign-in failures anyway).
        self._cache: OrderedDict[int, tuple[float, StoredKey]] = OrderedDict()
        self._used: dict[int, datetime] = {}  # waiting to be written
        self._touched: dict[int, float] = {}  # when each key's use was last queued

    def hash(self, secret: str) -> bytes:
        return hmac.new(self._pepper, secret.encode(), hashlib.sha256).digest()

    async def create(
        self,
        *,
        name: str,
        scopes: list[KeyScope],
        doctor_id: int | None,
        expires_at: datetime | None,
        created_by: str,
    ) -> tuple[ApiKeyView, str]:
        """A new key and its text: the only time anyone sees the text."""
        secret = new_secret()
        view = await apikeys.create(
            self.store,
            name=name,
            secret_hash=self.hash(secret),
            scopes=scopes,
            doctor_id=doctor_id,
            expires_at=expires_at,
            created_by=created_by,
            now=self.clock(),
        )
        return view, key_text(view.id, secret)

    async def revoke(self, key_id: int) -> ApiKeyView:
        view = await apikeys.revoke(self.store, key_id, now=self.clock())
        self._cache.pop(key_id, None)  # here at once; elsewhere within cache_s
        return view

    async def verify(self, presented: str) -> Identity:
        """The key's identity; `token_invalid` for a key that is not one (malformed,
        unknown, wrong secret, revoked), `token_expired` past its expiry."""
        found = KEY_FORMAT.fullmatch(presented.strip())
        if found is None:
            raise AuthError("malformed API key: expected sk_<id>_<secret>")
        key_id, secret = int(found[1]), found[2]
        stored = await self._lookup(key_id)
        if stored is None or not hmac.compare_digest(stored.secret_hash, self.hash(secret)):
            raise AuthError("unknown API key")
        view = stored.view
        now = self.clock()
        if view.revoked_at is not None and view.revoked_at <= now:
            raise AuthError("this API key was revoked")
        if view.expires_at is not None and view.expires_at <= now:
            raise AuthError("this API key has expired", code=ErrorCode.TOKEN_EXPIRED)
        self._used_now(key_id, now)
        grant = KeyGrant(view.id, frozenset(view.scopes), view.doctor_id)
        return Identity(str(view.id), Role.ADMIN, view.expires_at, key=grant)

    async def _lookup(self, key_id: int) -> StoredKey | None:
        now = time.monotonic()
        cached = self._cache.get(key_id)
        if cached is not None and cached[0] > now:
            self._cache.move_to_end(key_id)
            return cached[1]
        stored = await apikeys.get(self.store, key_id)
        if stored is None:
            self._cache.pop(key_id, None)
            return None
        self._cache[key_id] = (now + self.cache_s, stored)
        self._cache.move_to_end(key_id)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return stored

    def _used_now(self, key_id: int, now: datetime) -> None:
        mono = time.monotonic()
        last = self._touched.get(key_id)
        if last is not None and mono - last < self.touch_s:
            return
        self._touched[key_id] = mono
        self._used[key_id] = now
        if len(self._touched) > 10 * self.cache_size:  # forget keys long unused
            self._touched = {k: t for k, t in self._touched.items() if mono - t < self.touch_s}

    async def flush(self) -> None:
        """Write the last-use times queued since the last flush (one statement)."""
        used, self._used = self._used, {}
        try:
            await apikeys.touch(self.store, used)
        except Unavailable as exc:
            log.warning("API keys: last use not recorded: %s", exc.message)
            for key_id, at in used.items():  # kept for the next flush
                self._used.setdefault(key_id, at)

    @contextlib.asynccontextmanager
    async def touching(self) -> AsyncIterator[None]:
        """The background writer of last-use times, for `app.cleanup_ctx`."""

        async def loop() -> None:
            while True:
                await asyncio.sleep(self.touch_s)
                try:
                    await self.flush()
                except Exception:  # a bug must not end the writer: log it, go on
                    log.exception("API keys: writing last use failed")

        task = asyncio.create_task(loop(), name="api-key-touch")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            with contextlib.suppress(Unavailable):
                await self.flush()
