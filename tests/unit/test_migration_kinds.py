"""Every migration says whether older code still runs after it (docs/operating.md,
"Upgrades"), and the ones already applied in the field never change.

A migration without a marker from 0006 on would silently count as an expand step,
so a contract step could slip into a rolling upgrade unannounced; an edited early
migration would be refused by every database that applied it.
"""

from __future__ import annotations

import pytest

from store.errors import StoreError
from store.migrate import Compatibility, Migration, available, code_schema

APPLIED_IN_THE_FIELD = {
    1: "cba2223071cfd8bcccb443d15a1348e3d68a245a7344ff42e7faee4b5453c894",
    2: "832cc5058c8b12af09c3b27316680c186110f5ffa0ce6fb0e5ed095afd350f2f",
    3: "3b3e35b1ee69ad78706f1392b36de7123099a435a211f6adee809229e8f419e6",
    4: "573bd1386c4763c71b37c9d1fa102fdd59a1ce869e2faf68fb5fb120d8a485d2",
}


def test_migrations_before_markers_are_unchanged() -> None:
    shipped = {m.version: m.checksum for m in available()}
    assert {v: shipped[v] for v in APPLIED_IN_THE_FIELD} == APPLIED_IN_THE_FIELD


def test_every_migration_from_0006_declares_its_kind() -> None:
    later = [m for m in available() if m.version >= 6]
    assert later, "0006 ships with this code"
    for m in later:
        kind = [line for line in m.text.splitlines() if line.startswith("-- slotcast:")]
        assert len(kind) == 1, f"{m.version:04d} {m.name} needs one `-- slotcast:` marker"
        if m.contract:
            assert m.min_code <= m.version, f"{m.version:04d} requires code from its future"


def test_markers_set_the_oldest_code_that_may_run() -> None:
    assert Migration(7, "x", "-- slotcast:expand\nSELECT 1;").min_code == 0
    assert Migration(8, "x", "SELECT 1;").min_code == 0
    contract = Migration(9, "drop", "-- slotcast:contract 0008\nALTER TABLE t DROP c;")
    assert (contract.min_code, contract.contract) == (8, True)
    assert contract.label == "0009 drop (contract: needs code 0008)"
    with pytest.raises(StoreError, match="2 slotcast markers"):
        _ = Migration(10, "x", "-- slotcast:expand\n-- slotcast:contract 0010\n").min_code


def test_what_a_database_lets_this_code_do() -> None:
    expand = Migration(8, "add", "-- slotcast:expand\n")
    contract = Migration(9, "drop", "-- slotcast:contract 0008\n")

    def state(applied: list[Migration], pending: list[Migration], min_code: int) -> Compatibility:
        return Compatibility(
            code=9,
            applied={m.version: m.checksum for m in applied},
            min_code=min_code,
            pending=pending,
            changed=[],
        )

    # A pending contract step only removes what this code no longer uses: it may run.
    assert state([expand], [contract], 0).problem(pending_allowed=False) is None
    # A pending expand step is needed, unless this start may apply it.
    missing = state([], [expand, contract], 0)
    assert missing.needed == [expand]
    assert "lacks migrations 0008 add" in str(missing.problem(pending_allowed=False))
    assert missing.problem(pending_allowed=True) is None
    # A schema contracted for newer code is refused, however it got there.
    newer = state([expand, contract], [], 10)
    assert "requires code of schema 0010 or newer; this instance knows up to 0009" in str(
        newer.problem(pending_allowed=True)
    )
    assert code_schema() == max(m.version for m in available())
