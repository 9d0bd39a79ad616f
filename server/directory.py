"""`slotcast doctors import FILE` and `slotcast doctors export`: the clinic's staff list in
and out, as CSV or JSON.

An operator's file is read and every row checked before the database is touched, so a
bad row costs nothing and is reported with its line (CSV) or index (JSON); the rows are
then written in one transaction (`store.directory.import_entries`), all or nothing.
What an export writes, an import reads back unchanged.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TextIO

import orjson

from protocol.errors import ErrorCode, SlotcastError
from protocol.vocabulary import Role
from store.directory import Entry, checked
from store.errors import Invalid
from store.tx import Actor

log = logging.getLogger(__name__)

COLUMNS = ("external_id", "name", "specialty", "timezone")
OPTIONAL = ("retired",)  # written by `export --include-retired`
# Who the change log names for a change made from the command line.
OPERATOR = Actor("cli", Role.ADMIN)
MAX_REPORTED = 20  # bad rows listed before "and N more"


class BadFile(SlotcastError):
    """The file cannot be imported; the message says where and why, row by row."""

    code = ErrorCode.INVALID


def read_entries(path: Path) -> list[Entry]:
    """Every row of `path` (`.csv` or `.json`), checked, or `BadFile` naming each bad one."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".json"):
        raise BadFile(f"{path}: give a .csv or a .json file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadFile(f"{path}: cannot read it: {exc}") from None
    rows = _csv_rows(path, text) if suffix == ".csv" else _json_rows(path, text)
    entries: list[Entry] = []
    problems: list[str] = []
    seen: dict[str, str] = {}
    for where, raw in rows:
        try:
            entry = checked(_entry(raw))
        except Invalid as exc:
            problems.append(f"{where}: {exc.message}")
            continue
        if entry.external_id in seen:
            problems.append(
                f"{where}: external_id: {entry.external_id!r} already given at"
                f" {seen[entry.external_id]}"
            )
            continue
        seen[entry.external_id] = where
        entries.append(entry)
    if problems:
        more = len(problems) - MAX_REPORTED
        listed = problems[:MAX_REPORTED] + ([f"... and {more} more"] if more > 0 else [])
        raise BadFile("nothing imported:\n  " + "\n  ".join(listed))
    return entries


def _csv_rows(path: Path, text: str) -> Iterable[tuple[str, Mapping[str, Any]]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    missing = [c for c in COLUMNS if c not in header]
    unknown = [c for c in header if c not in COLUMNS + OPTIONAL]
    if missing or unknown:
        raise BadFile(
            f"{path}: the header must be {','.join(COLUMNS)} (and optionally retired);"
            + (f" missing {', '.join(missing)}" if missing else "")
            + (f" unknown {', '.join(unknown)}" if unknown else "")
        )
    rows: list[tuple[str, Mapping[str, Any]]] = []
    for row in reader:
        if None in row:  # more cells than the header names
            rows.append((f"{path} line {reader.line_num}", {"_extra": True}))
            continue
        rows.append((f"{path} line {reader.line_num}", row))
    return rows


def _json_rows(path: Path, text: str) -> Iterable[tuple[str, Mapping[str, Any]]]:
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise BadFile(f"{path}: not JSON: {exc}") from None
    if not isinstance(data, list):
        raise BadFile(f"{path}: give a JSON list of objects with {', '.join(COLUMNS)}")
    return [(f"{path} item {i}", item) for i, item in enumerate(data)]


def _entry(raw: Mapping[str, Any]) -> Entry:
    if not isinstance(raw, Mapping):
        raise Invalid(f"an object with {', '.join(COLUMNS)} is expected")
    if "_extra" in raw:
        raise Invalid("more cells than the header has columns")
    unknown = [k for k in raw if k not in COLUMNS + OPTIONAL]
    if unknown:
        raise Invalid(f"unknown field {', '.join(map(str, unknown))}")
    values: dict[str, str] = {}
    for column in COLUMNS:
        value = raw.get(column)
        if value is None and column == "specialty":
            value = ""
        if not isinstance(value, str):
            raise Invalid(f"{column}: text is required")
        values[column] = value
    return Entry(**values, retired=_retired(raw.get("retired")))


def _retired(value: Any) -> bool | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise Invalid("retired: true or false")


def write_entries(entries: list[Entry], fmt: str, out: TextIO, *, with_retired: bool) -> None:
    """The entries as `read_entries` reads them (`retired` only when asked for)."""
    columns = COLUMNS + (OPTIONAL if with_retired else ())
    rows = [
        {c: (str(getattr(e, c)).lower() if c == "retired" else getattr(e, c)) for c in columns}
        for e in entries
    ]
    if fmt == "json":
        if with_retired:
            for row, entry in zip(rows, entries, strict=True):
                row["retired"] = bool(entry.retired)
        out.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
