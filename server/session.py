"""One client's session: who it is, which rooms it is in, and one message at a time.

The socket itself (codec, outbox, close handshake) is `server.connection`. What
the client has told us over it lives here: its identity (from the handshake's
header or a later `auth`), its availability watches, the dashboards it follows
and its own appointments room. Rooms hold only the connection, which is all they
need to write to, so membership flows one way: the session joins and leaves
rooms, rooms never reach back up to a session.

A session is built per WebSocket and lives as long as it, so it carries, as
plain references, the app's services its handlers call: one object per client,
however many watches it has.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime

from protocol.errors import ErrorCode
from protocol.messages import Unwatched
from server import auth
from server.auth import Identity
from server.connection import Connection
from server.identity import Verifier
from server.metrics import Metrics
from server.room import Member, PatientMember
from server.rooms import Rooms
from server.service import Scheduling


class Session:
    __slots__ = (
        "api_key",
        "appointments",
        "conn",
        "dashboards",
        "expiring",
        "expiry",
        "identity",
        "max_frame",
        "max_watches",
        "metrics",
        "rooms",
        "scheduling",
        "turn",
        "verifier",
        "watches",
    )

    def __init__(
        self,
        conn: Connection,
        rooms: Rooms,
        scheduling: Scheduling,
        metrics: Metrics,
        *,
        verifier: Verifier,
        max_watches: int,
        max_frame: int,
    ) -> None:
        self.conn = conn
        self.identity: Identity | None = None
        # The `X-Api-Key` of the handshake, checked again (from the cache) before every
        # request, so that a revoked or expired key stops working on open sockets too.
        self.api_key: str | None = None
        self.watches: dict[int, Member] = {}
        self.dashboards: dict[int, Member] = {}
        self.appointments: PatientMember | None = None
        # One message at a time, and the token expiry waits its turn like a message.
        self.turn = asyncio.Lock()
        # The token's expiry is a timer, not a task waiting on it: most sockets have no
        # expiring token (anonymous watchers), and a task with its coroutine and event
        # would cost each of them ~2 KiB for nothing. Only a timer that fires starts a
        # task (`expiring`), to take its turn and leave the private rooms.
        self.expiry: asyncio.TimerHandle | None = None
        self.expiring: asyncio.Task[None] | None = None
        self.rooms = rooms
        self.scheduling = scheduling
        self.metrics = metrics
        self.verifier = verifier
        self.max_watches = max_watches
        self.max_frame = max_frame

    async def authenticate(self, identity: Identity) -> list[Unwatched]:
        """Take a fresh token; the expiry timer restarts from it.

        Returns the `unwatched` notices to send: the private rooms left because they
        were joined as someone else (none when the token names the same identity).
        """
        before = self.identity
        left: list[Unwatched] = []
        if before is not None and (before.subject, before.role) != (
            identity.subject,
            identity.role,
        ):
            # Private rooms were joined as someone else: leave them (public watches stay).
            left = await self.leave_private_rooms()
        self.identity = identity
        self.watch_expiry()
        return left

    async def leave_private_rooms(self) -> list[Unwatched]:
        """Leave the rooms that carry patient details; returns the notices to tell the client."""
        left = []
        for doctor_id, member in list(self.dashboards.items()):
            await self.rooms.leave(member)
            left.append(Unwatched(doctor_id, room="dashboard"))
        self.dashboards.clear()
        if self.appointments is not None:
            await self.rooms.leave_patient(self.appointments)
            self.appointments = None
            left.append(Unwatched(room="appointments"))
        return left

    async def leave_all(self) -> None:
        """The socket is gone: leave every room, so rooms close and unsubscribe."""
        for member in self.watches.values():
            await self.rooms.leave(member)
        self.watches.clear()
        await self.leave_private_rooms()

    def watch_expiry(self) -> None:
        """Dashboards and patient rooms carry patient details: they stop when the token does.

        Commands check the token when they run; a room is joined once and then streams,
        so its membership is what has to end. A fresh `auth` before then keeps it: it
        sets the timer again, for the new token.
        """
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None
        who = self.identity
        if who is None or who.expires_at is None:
            return
        wait = max(0.0, (who.expires_at - datetime.now(UTC)).total_seconds())
        self.expiry = asyncio.get_running_loop().call_later(wait, self._expired, who)

    def _expired(self, who: Identity) -> None:
        self.expiry = None
        if self.identity is not who:  # replaced meanwhile (an API key re-verified)
            self.watch_expiry()
            return
        if self.expiring is None or self.expiring.done():
            self.expiring = asyncio.create_task(self._expire(who), name="token-expiry")

    async def _expire(self, who: Identity) -> None:
        async with self.turn:
            if self.identity is not who:  # renewed while waiting for the turn
                return
            left = await self.leave_private_rooms()
            self.conn.send_error(
                auth.AuthError("the token has expired", code=ErrorCode.TOKEN_EXPIRED)
            )
            for notice in left:
                self.conn.send(notice)

    async def stop_expiry(self) -> None:
        """The socket is gone: no timer left behind, and an expiry under way is over."""
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None
        if self.expiring is not None:
            self.expiring.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.expiring
