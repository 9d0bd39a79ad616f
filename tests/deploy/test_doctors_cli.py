"""`slotcast doctors import` and `export`, run as subprocesses the way an operator runs them
(the database from `DATABASE_URL`, as for `slotcast migrate`), against real PostgreSQL
and, for the live check, a real `slotcast serve` process."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from datetime import date, time, timedelta
from pathlib import Path

import asyncpg
import orjson

from client import SlotcastClient
from protocol.messages import Delta, WeeklyBlock
from protocol.vocabulary import Role
from testkit.fixtures import Spawn, token
from testkit.harness import REPO
from testkit.wire import expect

HEADER = "external_id,name,specialty,timezone\n"
ROWS = [
    "HR-1,Dr. Ada Moreau,General practice,Europe/Paris\n",
    "HR-2,Dr. Kenji Sato,Cardiology,Asia/Tokyo\n",
    'HR-3,"Dr. Maya Patel, MD",Pediatrics,America/New_York\n',
]


def slotcast(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args],
        cwd=REPO,
        env={
            "DATABASE_URL": database_url,
            "PATH": "/usr/bin:/bin",
            "SLOTCAST_LOG_LEVEL": "WARNING",
        },
        capture_output=True,
        text=True,
        timeout=120,
    )


def imported(database_url: str, file: Path) -> str:
    done = slotcast(database_url, "doctors", "import", str(file))
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


async def directory(database_url: str) -> list[tuple[str, str, str, str, bool]]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT external_id, name, specialty, timezone, retired_at IS NOT NULL AS retired"
            " FROM doctors ORDER BY external_id"
        )
        return [tuple(r.values()) for r in rows]  # type: ignore[misc]
    finally:
        await conn.close()


async def change_count(database_url: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        count: int = await conn.fetchval("SELECT count(*) FROM changes")
        return count
    finally:
        await conn.close()


async def test_import_is_idempotent_all_or_nothing_and_round_trips_through_export(
    database_url: str, empty_database_url: str, tmp_path: Path
) -> None:
    staff = tmp_path / "doctors.csv"
    staff.write_text(HEADER + "".join(ROWS))
    assert imported(database_url, staff) == f"{staff}: 3 created, 0 updated, 0 unchanged, 0 retired"
    changes = await change_count(database_url)
    # The same file again changes nothing: no version, no change record.
    assert imported(database_url, staff) == f"{staff}: 0 created, 0 updated, 3 unchanged, 0 retired"
    assert await change_count(database_url) == changes

    # An edited file updates what changed, by external_id.
    staff.write_text(
        HEADER + ROWS[0] + ROWS[1].replace("Cardiology", "Cardiology; adults") + ROWS[2]
    )
    assert imported(database_url, staff).endswith("0 created, 1 updated, 2 unchanged, 0 retired")

    # One bad row: nothing written, every bad row named, exit status 1.
    before = await directory(database_url)
    bad = tmp_path / "bad.csv"
    bad.write_text(
        HEADER
        + "HR-9,Dr. New,,Europe/Paris\n"
        + "HR-1,Dr. Ada Moreau,GP,Mars/Base\n"
        + "HR-8,,,UTC\n"
    )
    failed = slotcast(database_url, "doctors", "import", str(bad))
    assert failed.returncode == 1
    assert f"{bad} line 3: timezone: 'Mars/Base' is not an IANA time zone name" in failed.stderr
    assert f"{bad} line 4: name: must not be empty" in failed.stderr
    assert await directory(database_url) == before

    # JSON, with a retirement: export it all, import it into a new database, get the same.
    retire = tmp_path / "retire.json"
    retire.write_text(
        orjson.dumps(
            [
                {
                    "external_id": "HR-3",
                    "name": "Dr. Maya Patel, MD",
                    "specialty": "Pediatrics",
                    "timezone": "America/New_York",
                    "retired": True,
                }
            ]
        ).decode()
    )
    assert imported(database_url, retire).endswith("0 created, 0 updated, 0 unchanged, 1 retired")
    for fmt in ("csv", "json"):
        export = slotcast(database_url, "doctors", "export", "--format", fmt, "--include-retired")
        assert export.returncode == 0, export.stderr
        copy = tmp_path / f"export.{fmt}"
        copy.write_text(export.stdout)
        assert imported(database_url, copy).endswith("3 unchanged, 0 retired")
    active = slotcast(database_url, "doctors", "export")
    assert active.stdout.splitlines()[0] == HEADER.strip()
    assert [line.split(",")[0] for line in active.stdout.splitlines()[1:]] == ["HR-1", "HR-2"]

    unmigrated = slotcast(empty_database_url, "doctors", "import", str(tmp_path / "export.json"))
    assert unmigrated.returncode == 1
    assert "run `slotcast migrate` first" in unmigrated.stderr
    assert "Traceback" not in unmigrated.stderr
    migrated = slotcast(empty_database_url, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert imported(empty_database_url, tmp_path / "export.json").startswith(
        f"{tmp_path / 'export.json'}: 3 created, 0 updated, 0 unchanged, 1 retired"
    )
    assert await directory(empty_database_url) == await directory(database_url)


async def test_an_import_reaches_a_watcher_of_a_running_server(
    database_url: str, spawn_server: Spawn, tmp_path: Path
) -> None:
    """The CLI has no broker: the server's relay publishes what it committed."""
    staff = tmp_path / "doctors.csv"
    staff.write_text(HEADER + ROWS[1])
    imported(database_url, staff)
    server = spawn_server()
    async with (
        SlotcastClient.connect(server.ws_url, token=token(Role.ADMIN, "root")) as admin,
        SlotcastClient.connect(server.ws_url) as watcher,
    ):
        (doctor,) = await admin.search_doctors("sato")
        await admin.set_schedule(
            doctor.id, [WeeklyBlock(d, time(9), time(10)) for d in range(1, 8)]
        )
        start = date.today() + timedelta(days=2)
        await watcher.watch(doctor.id, start, start + timedelta(days=2))
        staff.write_text(HEADER + ROWS[1].replace("Dr. Kenji Sato", "Dr. Kenji Sato-Ito"))
        await asyncio.to_thread(imported, database_url, staff)
        delta = await expect(watcher, Delta, timeout=20)
        assert delta.doctor is not None
        assert delta.doctor.name == "Dr. Kenji Sato-Ito"
