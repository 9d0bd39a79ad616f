"""Demo sign-in: pick a demo patient or doctor, get a development token.

Only with `--demo` (`SLOTCAST_DEMO=1`). In production the clinic's own
application signs the tokens and hands one to the pages (`/#token=<jwt>`), so
these endpoints answer `not_found` and the pages say to sign in there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import msgspec
from aiohttp import web

from protocol.errors import ErrorCode, ProtocolError, SlotcastError
from protocol.vocabulary import Role
from server.api import json_response, read_json
from server.keys import SETTINGS, STORE, VERIFIER
from store import demo, doctors, reads

DEMO_DESK = "desk"  # static/js/session.js knows it too
_OFF = "demo sign-in is off: sign in through your clinic's application"


@dataclass(frozen=True, slots=True)
class TokenRequest:
    role: Literal["patient", "doctor", "admin"]
    subject: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


def _require_demo(request: web.Request) -> None:
    if not request.app[SETTINGS].demo:
        raise SlotcastError(_OFF, code=ErrorCode.NOT_FOUND)


async def identities(request: web.Request) -> web.Response:
    _require_demo(request)
    found = await reads.search_doctors(request.app[STORE], None, limit=100)
    return json_response(
        {"patients": demo.PATIENTS, "doctors": [msgspec.to_builtins(d) for d in found]}
    )


async def token(request: web.Request) -> web.Response:
    _require_demo(request)
    try:
        wanted = msgspec.convert(await read_json(request), TokenRequest)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"invalid sign-in: {exc}", code=ErrorCode.INVALID) from None
    if wanted.role == "doctor":
        digits = wanted.subject.isascii() and wanted.subject.isdigit()
        if not digits or not 1 <= int(wanted.subject) < 2**31:
            raise ProtocolError("a doctor's subject is the doctor's id", code=ErrorCode.INVALID)
        await doctors.doctor(request.app[STORE], int(wanted.subject))  # not_found for a stranger
    elif wanted.role == "admin":
        # One staff identity, for the front desk (/clinic): demo mode hands it to anyone,
        # as it does every identity; production admins come from `slotcast token`.
        if wanted.subject != DEMO_DESK:
            raise ProtocolError(f"the demo's admin is {DEMO_DESK!r}", code=ErrorCode.INVALID)
    elif wanted.subject not in {p["subject"] for p in demo.PATIENTS}:
        raise ProtocolError(f"no demo patient {wanted.subject!r}", code=ErrorCode.INVALID)
    role = Role(wanted.role)
    verifier = request.app[VERIFIER]
    # A demo patient's token carries their display name, as an identity provider's would.
    name = next((p["name"] for p in demo.PATIENTS if p["subject"] == wanted.subject), None)
    signed = verifier.issue(
        subject=wanted.subject, role=role, name=name if role is Role.PATIENT else None
    )
    who = await verifier.verify(signed)
    body = {"token": signed, "subject": who.subject, "role": role.value}
    return json_response({**body, "expires_at": msgspec.to_builtins(who.expires_at)}, 201)
