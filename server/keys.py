"""Every `web.AppKey` of the application, in one place."""

from __future__ import annotations

from aiohttp import web

from server.connection import Connection
from server.rooms import Rooms
from server.service import Clock, Scheduling
from server.settings import Settings
from store.broker import Broker
from store.database import Store

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
BROKER = web.AppKey("broker", Broker)
ROOMS = web.AppKey("rooms", Rooms)
SCHEDULING = web.AppKey("scheduling", Scheduling)
CLOCK: web.AppKey[Clock] = web.AppKey("clock")
CONNECTIONS: web.AppKey[set[Connection]] = web.AppKey("connections")
