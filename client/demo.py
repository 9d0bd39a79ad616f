"""`slotcast watch` and `slotcast book`: the Python client driven from a terminal.

They exist so a newcomer can see the live slice with nothing but the CLI: two
terminals watching a demo doctor, a third booking, both watchers updating.
The `slotcast` entry point stays in `server.cli` (one command for everything)
and hands these two subcommands to `add_parsers` and `run`; minting the
patient's token stays there too, since only the server holds the secret.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from datetime import date, timedelta
from typing import Any

from client.commands import SlotcastClient
from client.connection import ClientError
from protocol.messages import Delta
from protocol.vocabulary import SlotStatus

COMMANDS = ("watch", "book")


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    watch = sub.add_parser("watch", help="watch a doctor's slots live (Python client)")
    watch.add_argument("doctor", type=int)
    watch.add_argument("--days", type=int, default=7)
    watch.add_argument("--codec", choices=["json", "msgpack"], default="json")
    watch.add_argument("--url", default=None, help="default: ws://127.0.0.1:$SLOTCAST_PORT/ws")

    book = sub.add_parser("book", help="book a doctor's first free slot as a patient")
    book.add_argument("--doctor", type=int, required=True)
    book.add_argument("--sub", default="demo-patient", help="the patient's subject")
    book.add_argument("--url", default=None, help="default: ws://127.0.0.1:$SLOTCAST_PORT/ws")


def run(
    args: argparse.Namespace, *, default_url: str, patient_token: Callable[[str], str]
) -> Coroutine[Any, Any, int]:
    """The subcommand's coroutine, for the caller's event loop (uvloop where there is one)."""
    url = args.url or default_url
    if args.command == "watch":
        return watch(url, args.doctor, args.days, args.codec)
    return book_first_free(url, patient_token(args.sub), args.doctor)


async def watch(url: str, doctor_id: int, days: int, codec: str) -> int:
    start = date.today()
    async with SlotcastClient.connect(url, codec="msgpack" if codec == "msgpack" else "json") as c:
        snapshot = await c.watch(doctor_id, start, start + timedelta(days=days))
        free = sum(1 for s in snapshot.slots if s.status is SlotStatus.FREE)
        print(
            f"doctor {doctor_id} ({snapshot.timezone}) v{snapshot.version}: "
            f"{free} free of {len(snapshot.slots)} slots; watching ({codec})...",
            flush=True,
        )
        with contextlib.suppress(asyncio.CancelledError, KeyboardInterrupt):
            while True:
                event = await c.events.get()
                if isinstance(event, Delta):
                    for slot in event.slots:
                        print(
                            f"v{event.version}: slot {slot.id} at "
                            f"{slot.start.isoformat()} is now {slot.status.value}",
                            flush=True,
                        )
    return 0


async def book_first_free(url: str, token: str, doctor_id: int) -> int:
    start = date.today() + timedelta(days=1)
    async with SlotcastClient.connect(url, token=token) as c:
        snapshot = await c.watch(doctor_id, start, start + timedelta(days=14))
        free = [s for s in snapshot.slots if s.status is SlotStatus.FREE]
        if not free:
            print("no free slot in the next two weeks")
            return 1
        try:
            appointment = await c.book(free[0].id)
        except ClientError as exc:
            print(f"refused: {exc.code.value}: {exc.message}")
            return 1
        print(
            f"booked appointment {appointment.id}: slot {appointment.slot_id} "
            f"at {appointment.start.isoformat()} for {appointment.patient_id}"
        )
    return 0
