"""Every `web.AppKey` of the application, in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from server.connection import Connection
from server.metrics import Metrics
from server.rooms import Rooms
from server.service import Clock, Scheduling
from server.settings import Settings
from store.broker import Broker
from store.outbox import Outbox
from store.runner import Store

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
BROKER = web.AppKey("broker", Broker)
ROOMS = web.AppKey("rooms", Rooms)
SCHEDULING = web.AppKey("scheduling", Scheduling)
OUTBOX = web.AppKey("outbox", Outbox)
if TYPE_CHECKING:
    from server.lifecycle import ServerState

CLOCK: web.AppKey[Clock] = web.AppKey("clock")
METRICS = web.AppKey("metrics", Metrics)
STATE: web.AppKey[ServerState] = web.AppKey("state")
CONNECTIONS: web.AppKey[set[Connection]] = web.AppKey("connections")
