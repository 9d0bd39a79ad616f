"""Every route of the server, wired in one place."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from server import api, ws


def setup_routes(app: web.Application, static_dir: Path) -> None:
    app.router.add_get("/ws", ws.websocket, name="ws")
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/readyz", api.readyz)
    app.router.add_get("/api/doctors", api.list_doctors)
    app.router.add_get("/api/doctors/{doctor_id}/slots", api.doctor_slots)
    app.router.add_post("/api/appointments", api.book)
    if static_dir.is_dir():
        index = static_dir / "index.html"
        if index.is_file():

            async def home(_: web.Request) -> web.FileResponse:
                return web.FileResponse(index)

            app.router.add_get("/", home)
        app.router.add_static("/static/", static_dir, name="static")
