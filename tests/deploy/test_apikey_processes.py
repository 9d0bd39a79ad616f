"""An API key against a real `slotcast serve` process: made over REST, its pepper read
from a `_FILE` as an operator keeps it, and presented as `X-Api-Key` on the WebSocket
upgrade, where it acts within its scopes (docs/operating.md, "API keys")."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from client import ClientError, SlotcastClient
from protocol.errors import ErrorCode
from protocol.vocabulary import Role
from testkit.fixtures import SeededDoctor, Spawn, token

pytestmark = pytest.mark.processes


async def test_a_key_on_the_websocket_upgrade_acts_within_its_scopes(
    spawn_server: Spawn, doctor: SeededDoctor, tmp_path: Path
) -> None:
    pepper = tmp_path / "pepper"
    pepper.write_text("a-pepper-kept-outside-the-database\n")
    server = spawn_server(env={"SLOTCAST_API_KEY_PEPPER_FILE": str(pepper)})
    admin = {"Authorization": f"Bearer {token(Role.ADMIN, 'ops')}"}
    async with aiohttp.ClientSession() as http:
        made = await http.post(
            f"{server.http_url}/api/keys",
            json={"name": "phones", "scopes": ["book"], "doctor_id": doctor.id},
            headers=admin,
        )
        assert made.status == 201, await made.text()
        key = (await made.json())["key"]

    async with SlotcastClient.connect(server.ws_url, api_key=key) as desk:
        booked = await desk.book(doctor.slots[0].id, patient_id="gina", patient_name="Gina")
        assert (booked.patient_id, booked.patient_name) == ("gina", "Gina")
        with pytest.raises(ClientError) as no_read:  # `book` is not `read`
            await desk.watch_dashboard(doctor.id, doctor.start)
        assert no_read.value.code is ErrorCode.FORBIDDEN

    forged = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    async with SlotcastClient.connect(server.ws_url, api_key=forged) as stranger:
        with pytest.raises(ClientError) as anonymous:  # the upgrade stays, as anonymous
            await stranger.book(doctor.slots[1].id, patient_id="gina")
        assert anonymous.value.code is ErrorCode.UNAUTHENTICATED
