"""Every `web.AppKey` of the application, in one place, and the small state one of them holds.

Modules that read the app's services import their keys from here; this module
imports only what the keys hold, never a module that reads them, so it can sit
below every handler and lifecycle step without an import cycle.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiohttp import web

from server.apikeys import ApiKeys
from server.guard import Guard
from server.health import Health
from server.identity import Verifier
from server.limits import Limiter
from server.metrics import Metrics
from server.rooms import Rooms
from server.service import Clock, Scheduling
from server.session import Session
from server.settings import Settings
from server.webhooks import Dispatcher
from store.broker import Broker
from store.outbox import Outbox
from store.pool import Store
from store.replicas import Replicas


@dataclass(slots=True)
class ServerState:
    """Flipped by the drain (`server.lifecycle`); read by `/readyz` and the WebSocket handshake."""

    draining: bool = False


SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
BROKER = web.AppKey("broker", Broker)
ROOMS = web.AppKey("rooms", Rooms)
SCHEDULING = web.AppKey("scheduling", Scheduling)
OUTBOX = web.AppKey("outbox", Outbox)
CLOCK: web.AppKey[Clock] = web.AppKey("clock")
METRICS = web.AppKey("metrics", Metrics)
STATE = web.AppKey("state", ServerState)
# Facing the internet: caps, origins, idle sockets (server.guard); rate limits (server.limits).
GUARD = web.AppKey("guard", Guard)
LIMITER = web.AppKey("limiter", Limiter)
HEALTH = web.AppKey("health", Health)
# Where the unlocked reads go: read replicas, fenced by version (store/replicas.py).
REPLICAS = web.AppKey("replicas", Replicas)
# Whose tokens are accepted, and the key `slotcast token` and the demo sign-in sign with.
VERIFIER = web.AppKey("verifier", Verifier)
# One session per open WebSocket: what a drain closes and `slotcast_connections` counts.
CONNECTIONS: web.AppKey[set[Session]] = web.AppKey("connections")
# The connections' own tasks (server.ws.Client: one while a connection has frames to run
# or is closing), cancelled and awaited at shutdown (server.lifecycle.close_connections).
INBOUND: web.AppKey[set[asyncio.Task[None]]] = web.AppKey("inbound")
# Webhook delivery (server.webhooks): woken by this instance's commits.
WEBHOOKS = web.AppKey("webhooks", Dispatcher)
# Webhook delivery's own small pool (SLOTCAST_WEBHOOK_DB_POOL), apart from STORE's, so
# delivery never takes a connection a booking waits for.
WEBHOOK_STORE = web.AppKey("webhook_store", Store)
# The clinic's services' API keys (server.apikeys): made, revoked, checked and cached.
API_KEYS = web.AppKey("api_keys", ApiKeys)
