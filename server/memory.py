"""Where a connection's bytes go: a census of live objects, for bench/connmem.py only.

Memory per connection is a target (issue 14), and RSS alone says how much, not
what. This route answers "what": live objects counted by type (`gc`, so only
objects the collector tracks, sized with `sys.getsizeof`, shallow) and, once
asked to, `tracemalloc`'s growth by allocating line. Both are slow and tracing
costs memory of its own, so the route exists only with `SLOTCAST_DEBUG_MEMORY`
on, which only the benchmark sets; it is never served in production.

`GET /debug/memory?mark=1` records the census (and starts tracing, with
`&trace=1`); a later `GET /debug/memory` answers with what grew since the mark,
the `top` (40) kinds and lines that grew most.
"""

from __future__ import annotations

import gc
import logging
import sys
import tracemalloc
from collections import Counter
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

_TOP = 40  # rows of each table: the long tail is noise

_marks: dict[str, Any] = {}  # the census and snapshot to diff against (one per process)


def census() -> dict[str, tuple[int, int]]:
    """type name -> (live objects, bytes by getsizeof), over what `gc` tracks.

    Dicts and lists that belong to an object are counted as dicts and lists, so a
    class with `__dict__` shows as itself plus one dict per instance.
    """
    counts: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    for obj in gc.get_objects():
        kind = type(obj)
        name = f"{kind.__module__}.{kind.__qualname__}"
        counts[name] += 1
        sizes[name] += sys.getsizeof(obj)
    return {name: (counts[name], sizes[name]) for name in counts}


def _grown(
    before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]], top: int
) -> list[Any]:
    rows: list[tuple[str, int, int]] = []
    for name, (count, size) in after.items():
        count0, size0 = before.get(name, (0, 0))
        if size - size0 > 0:
            rows.append((name, count - count0, size - size0))
    rows.sort(key=lambda r: r[2], reverse=True)
    return rows[:top]


async def debug_memory(request: web.Request) -> web.Response:
    gc.collect()
    if request.query.get("mark"):
        if request.query.get("trace") and not tracemalloc.is_tracing():
            tracemalloc.start(1)
        _marks["census"] = census()
        _marks["snapshot"] = tracemalloc.take_snapshot() if tracemalloc.is_tracing() else None
        log.warning("memory census marked (debug_memory is on: never in production)")
        return web.json_response({"marked": True, "tracing": tracemalloc.is_tracing()})
    top = int(request.query.get("top", _TOP))
    body: dict[str, Any] = {"types": _grown(_marks.get("census", {}), census(), top)}
    before = _marks.get("snapshot")
    if before is not None and tracemalloc.is_tracing():
        stats = tracemalloc.take_snapshot().compare_to(before, "lineno")
        body["lines"] = [
            [str(s.traceback), s.count_diff, s.size_diff]
            for s in sorted(stats, key=lambda s: s.size_diff, reverse=True)[:top]
        ]
        body["traced_growth"] = sum(s.size_diff for s in stats)
    return web.json_response(body)
