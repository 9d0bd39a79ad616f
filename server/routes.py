"""Every route of the server, wired in one place."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from html import escape
from pathlib import Path

from aiohttp import web

from server import api, apikey_api, ics, memory, signin, webhook_api, ws
from server.commands import REGISTRY
from server.guard import host_origins
from server.keys import GUARD
from server.settings import Settings


def setup_routes(app: web.Application, settings: Settings) -> None:
    r = app.router
    static_dir = settings.static_dir
    r.add_get("/ws", _websocket, name="ws")
    r.add_get("/healthz", api.healthz)
    r.add_get("/readyz", api.readyz)
    r.add_get("/metrics", _metrics)
    # Public availability (the WebSocket `watch` gives the same snapshot, then live deltas).
    r.add_get("/api/doctors/{doctor_id}/slots", api.doctor_slots)
    # Every command, where its registry entry says (server.commands.REGISTRY).
    for command in REGISTRY.values():
        r.add_route(command.route.method, command.route.path, api.endpoint(command))
    # An appointment as a calendar file, for its patient and staff (server.ics).
    ics.setup(app)
    # Webhook endpoints, for admins (server.webhook_api; docs/webhooks.md).
    webhook_api.setup(app)
    # API keys, for admins (server.apikey_api; docs/protocol.md, "API keys").
    apikey_api.setup(app)
    # Demo mode only: development tokens for demo identities (`not_found` otherwise).
    r.add_get("/api/demo", signin.identities)
    r.add_post("/api/demo/token", signin.token)
    # The pages: the patient's slot picker, the doctor's dashboard and the front desk's
    # overview of every doctor's day (static/).
    origins = host_origins(settings.host_origins)
    pages = (("/", "index.html"), ("/doctor", "doctor.html"), ("/clinic", "clinic.html"))
    for path, page in pages:
        if (static_dir / page).is_file():
            r.add_get(path, _page(static_dir / page, origins, settings))
    if static_dir.is_dir():
        r.add_static("/static/", static_dir, name="static")
    if settings.debug_memory:  # bench/connmem.py only (server.memory)
        r.add_get("/debug/memory", memory.debug_memory)


async def _websocket(request: web.Request) -> web.StreamResponse:
    """Origin and connection caps are checked before the upgrade (server.guard)."""
    return await request.app[GUARD].upgrade(request, ws.websocket)


async def _metrics(request: web.Request) -> web.StreamResponse:
    """Only for the allowed addresses, or with the metrics token (server.guard)."""
    return await request.app[GUARD].metrics(request, api.metrics)


# The pages load only their own modules and styles and talk only to this origin
# (CSP 'self' covers the same-origin WebSocket); an injected script has nowhere
# to come from and nowhere to send a token. Only the configured host application
# may frame them, and only it may hand them tokens (the meta tag tells the page).
_CSP = (
    "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'self'"
)
_HOST_META = '<meta name="slotcast-host-origins" content="">'
# Whether demo mode is on: the page asks the demo endpoints only then (a production page
# that asked would get a 404 and log an error in every visitor's console).
_DEMO_META = '<meta name="slotcast-demo" content="">'
# The attendance window (`mark`, `unmark`), so the doctor's page offers a mark only when
# the server would take it: minutes an arrival may be early, seconds a mark may be undone.
_ATTENDANCE_META = '<meta name="slotcast-attendance" content="">'
# The clinic's name (SLOTCAST_CLINIC_NAME): the place a patient's confirmation names.
_CLINIC_META = '<meta name="slotcast-clinic" content="">'


def _page(
    file: Path, origins: list[str], settings: Settings
) -> Callable[[web.Request], Awaitable[web.Response]]:
    html = file.read_text()
    for meta in (_HOST_META, _DEMO_META):
        if meta not in html:
            raise ValueError(f"{file} lacks {meta}")
    listed = " ".join(origins)
    html = html.replace(_HOST_META, f'<meta name="slotcast-host-origins" content="{listed}">')
    mode = "on" if settings.demo else "off"
    html = html.replace(_DEMO_META, f'<meta name="slotcast-demo" content="{mode}">')
    window = f"{settings.arrive_early_minutes} {settings.unmark_window_s:g}"
    html = html.replace(_ATTENDANCE_META, f'<meta name="slotcast-attendance" content="{window}">')
    clinic = escape(settings.clinic_name, quote=True)
    html = html.replace(_CLINIC_META, f'<meta name="slotcast-clinic" content="{clinic}">')
    headers = {
        "Content-Security-Policy": " ".join([_CSP, *origins]),
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
    }
    body = html.encode()

    async def serve(_: web.Request) -> web.Response:
        return web.Response(body=body, content_type="text/html", headers=headers)

    return serve
