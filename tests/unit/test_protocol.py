"""Property tests for wire protocol v1: every message round-trips, nothing else gets through.

`Codec.decode` is the only gate between untrusted bytes and the handlers, so two
properties carry the protocol: whatever the server or a client may legally send
decodes back to exactly what was encoded, in both codecs; and whatever else arrives
is refused with a `ProtocolError` carrying a stable code, never another exception
(which the server would report as `internal` and log as a crash).

Strategies are derived from the message dataclasses' own annotations, so a new
field or message is covered as soon as it is declared, and a field type the
derivation cannot handle fails `test_every_registered_message_has_a_strategy`.

The last section holds docs/protocol.md to the code: its examples must be what the
codec produces, and every message, error code and REST route must be in it, since
client authors in other languages read that page, not this package.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import re
import types
import typing
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, date, datetime, time, timedelta, timezone
from typing import Annotated, Any

import msgpack
import msgspec
import orjson
import pytest
from aiohttp import WSCloseCode, web
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from protocol import messages
from protocol.codec import (
    CODECS,
    DEFAULT_MAX_FRAME,
    JSON,
    MSGPACK,
    SUBPROTOCOLS,
    Codec,
    codec_for,
    to_wire,
)
from protocol.errors import ErrorCode, ProtocolError
from protocol.messages import (
    CLIENT_MESSAGES,
    PROTOCOL,
    SERVER_MESSAGES,
    Authenticated,
    Envelope,
    Message,
    Ping,
)
from protocol.vocabulary import Role
from server.api import HTTP_STATUS
from server.commands import REGISTRY
from server.connection import CLOSE_SERVICE_RESTART, CLOSE_SLOW_CONSUMER
from server.guard import CLOSE_IDLE
from server.limits import CLOSE_RATE_LIMITED
from server.metrics import Metrics
from server.routes import setup_routes
from server.settings import Settings
from server.ws import CLOSE_INTERNAL_ERROR, CLOSE_PROTOCOL_ERROR, HANDLERS
from testkit.harness import REPO

# Many parametrized cases share the time budget: the whole file must stay well under 10 s.
# A PER_CASE example checks everything its drawn message allows (both codecs for a round
# trip, every way to break a field), so 8 of them go further than one check each would.
THOROUGH = settings(max_examples=100, deadline=None)
PER_CASE = settings(max_examples=8, deadline=None)

Registry = Mapping[str, type[Message]]
RequestId = str | int | None
Path = tuple[str | int, ...]

REGISTRIES: dict[str, Registry] = {"client": CLIENT_MESSAGES, "server": SERVER_MESSAGES}
ALL_MESSAGES: list[type[Message]] = [*CLIENT_MESSAGES.values(), *SERVER_MESSAGES.values()]
# The only codes decoding may produce; anything else means a layer above leaked in.
DECODE_CODES = {
    ErrorCode.BAD_MESSAGE,
    ErrorCode.UNKNOWN_TYPE,
    ErrorCode.INVALID,
    ErrorCode.TOO_LARGE,
}
INT64 = st.integers(-(2**63), 2**63 - 1)  # what both JSON (orjson) and MessagePack carry


def registry_of(cls: type[Message]) -> Registry:
    return CLIENT_MESSAGES if cls.TYPE in CLIENT_MESSAGES else SERVER_MESSAGES


# ---- strategies derived from the annotations ----------------------------------------------

# RFC 3339 offsets have minutes, not seconds, so whole-minute offsets are what the wire
# can carry exactly (see test_sub_minute_utc_offsets_survive_encoding for the rest).
WHOLE_MINUTE_ZONES: SearchStrategy[timezone] = st.just(UTC) | st.integers(
    -(24 * 60 - 1), 24 * 60 - 1
).map(lambda minutes: timezone(timedelta(minutes=minutes)))
# Years 2-9998: every such instant has a UTC equivalent; the two edges have their own test.
AWARE_DATETIMES = st.datetimes(
    datetime(2, 1, 1), datetime(9998, 12, 31), timezones=WHOLE_MINUTE_ZONES
)

TEXT = 40  # the longest valid string drawn (see strategy_for)
# Weekly hours and day overrides are wall-clock times in the doctor's zone, so they are
# naive: the zone comes from the doctor, and PostgreSQL's `time` would drop an offset.
LOCAL_TIMES: SearchStrategy[time] = st.times()

VALID_REQUEST_IDS: SearchStrategy[RequestId] = st.one_of(
    st.none(), st.text(min_size=1, max_size=64), st.integers(0, 2**53 - 1)
)
CODEC_STRATEGY = st.sampled_from([JSON, MSGPACK])


def unwrap(tp: Any) -> tuple[Any, msgspec.Meta | None]:
    """Split `Annotated[T, Meta(...)]` into T and its constraints."""
    if typing.get_origin(tp) is Annotated:
        base, *extras = typing.get_args(tp)
        return base, next((m for m in extras if isinstance(m, msgspec.Meta)), None)
    return tp, None


def arms(tp: Any) -> list[Any]:
    """The alternatives of a union (a non-union is its own only arm)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return list(typing.get_args(tp))
    return [tp]


def hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def int_range(meta: msgspec.Meta) -> tuple[int, int]:
    """The inclusive range of an integer field; unbounded above means PostgreSQL's bigint."""
    low = int(meta.ge) if meta.ge is not None else -(2**63)
    return low, int(meta.le) if meta.le is not None else 2**63 - 1


def strategy_for(tp: Any, *, nonempty: bool = False) -> SearchStrategy[Any]:
    """Values of annotation `tp` that decoding must accept; `nonempty` fills every list."""
    if len(arms(tp)) > 1:
        options = arms(tp)
        if nonempty and any(dataclasses.is_dataclass(unwrap(a)[0]) for a in options):
            # An optional nested view (`delta.doctor`) appears too, like a list's items.
            options = [a for a in options if unwrap(a)[0] is not type(None)]
        return st.one_of([strategy_for(arm, nonempty=nonempty) for arm in options])
    base, meta = unwrap(tp)
    meta = meta or msgspec.Meta()
    if base is type(None):
        return st.none()
    if isinstance(base, type) and issubclass(base, enum.Enum):
        return st.sampled_from(list(base))
    if base is int:  # unconstrained counts (e.g. `doctors.limit`) still travel as int64
        return st.integers(*int_range(meta))
    if base is bool:  # flags (`search_doctors.include_retired`)
        return st.booleans()
    if base is str:
        # Long strings cost draws, not coverage: test_boundary_values_are_accepted sends
        # each declared maximum length (a 4096-character token, a 500-character reason).
        low = meta.min_length or 0
        text = st.text(min_size=low, max_size=max(low, min(meta.max_length or TEXT, TEXT)))
        if meta.pattern is not None:  # msgspec searches, it does not fullmatch
            return text.filter(re.compile(meta.pattern).search)
        return text
    if base is datetime and meta.tz:
        return AWARE_DATETIMES
    if base is date:  # a client's dates keep a day from each end (messages.FIRST_DATE)
        return st.dates(messages.FIRST_DATE, messages.LAST_DATE)
    if base is time:
        return LOCAL_TIMES
    if typing.get_origin(base) is list:
        (item,) = typing.get_args(base)
        return st.lists(strategy_for(item, nonempty=nonempty), min_size=int(nonempty), max_size=3)
    if dataclasses.is_dataclass(base) and isinstance(base, type):
        return message_strategy(base, nonempty=nonempty)
    raise NotImplementedError(f"no strategy for {tp!r}: teach strategy_for() about it")


_BUILT: dict[tuple[type[Any], bool], SearchStrategy[Any]] = {}


def message_strategy(cls: type[Any], *, nonempty: bool = False) -> SearchStrategy[Any]:
    """Valid instances of a message (or nested view) dataclass, every field drawn."""
    if (cls, nonempty) not in _BUILT:
        types_ = hints(cls)
        fields = {
            f.name: strategy_for(types_[f.name], nonempty=nonempty) for f in dataclasses.fields(cls)
        }
        _BUILT[cls, nonempty] = st.builds(cls, **fields)
    return _BUILT[cls, nonempty]


def any_message() -> SearchStrategy[Message]:
    return st.sampled_from(ALL_MESSAGES).flatmap(message_strategy)


# ---- where a field can be broken, and how ------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Site:
    """One field of one message at any depth, addressed by its path inside `body`.

    `owner` is the dataclass declaring the field and `local` the path from it, so the
    same view field nested in several messages can be recognised as one.
    """

    message: type[Message]
    path: Path
    annotation: Any
    owner: type[Any]
    local: Path

    def __str__(self) -> str:
        return self.message.TYPE + self.json_path[1:]

    @property
    def json_path(self) -> str:
        """The path as msgspec names it in an error: `$.weekly[0].start`."""
        return "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in self.path)


def sites_of(message: type[Message]) -> list[Site]:
    """Every field, nested view field and list item of a message, depth first."""
    found: list[Site] = []

    def walk(owner: type[Any], prefix: Path) -> None:
        owner_hints = hints(owner)
        for f in dataclasses.fields(owner):
            visit(owner_hints[f.name], (*prefix, f.name), owner, (f.name,))

    def visit(tp: Any, path: Path, owner: type[Any], local: Path) -> None:
        found.append(Site(message, path, tp, owner, local))
        for arm in arms(tp):
            base, _ = unwrap(arm)
            if typing.get_origin(base) is list:
                visit(typing.get_args(base)[0], (*path, 0), owner, (*local, 0))
            elif dataclasses.is_dataclass(base) and isinstance(base, type):
                walk(base, path)

    walk(message, ())
    return found


def distinct(sites: list[Site]) -> list[Site]:
    """Each field once: a view's fields in the smallest message holding the view, and
    every message field.

    msgspec validates a nested view by its type wherever it sits, so breaking
    `AppointmentView.status` inside `held` proves it inside `booked` and `dashboard`
    too. Every place a view sits still gets its own cases (a wrong kind for the view
    itself), every site is in DOCUMENTED_LIMITS, and the mutation test roams every
    path. This keeps the file inside its time budget as views are reused by more
    messages: each case draws a whole message, and a `dashboard` (lists of
    appointments and slots) costs many times a `held`.
    """
    size = Counter(site.message for site in sites)
    seen: set[tuple[type[Any], Path]] = set()
    kept: list[Site] = []
    for site in sorted(sites, key=lambda s: size[s.message]):  # stable: ties keep order
        if (site.owner, site.local) not in seen:
            seen.add((site.owner, site.local))
            kept.append(site)
    return kept


ALL_SITES = [site for cls in ALL_MESSAGES for site in sites_of(cls)]
CASE_SITES = distinct(ALL_SITES)

JSON_SCALARS: SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    INT64,
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
JSON_VALUES: SearchStrategy[Any] = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
VALUES_OF_KIND: dict[str, SearchStrategy[Any]] = {
    "null": st.none(),
    "bool": st.booleans(),
    "int": INT64,
    "float": st.floats(allow_nan=False, allow_infinity=False),
    "str": st.text(max_size=20),
    "array": st.lists(JSON_SCALARS, max_size=3),
    "object": st.dictionaries(st.text(max_size=8), JSON_SCALARS, max_size=3),
}


def wire_kinds(tp: Any) -> set[str]:
    """The JSON kinds a field of annotation `tp` may legally hold on the wire."""
    kinds: set[str] = set()
    for arm in arms(tp):
        base, _ = unwrap(arm)
        if base is type(None):
            kinds.add("null")
        elif base is int:
            kinds.add("int")
        elif base is bool:
            kinds.add("bool")
        elif base in (str, date, datetime, time) or (
            isinstance(base, type) and issubclass(base, str)
        ):
            kinds.add("str")  # enums, dates, instants and times of day travel as strings
        elif typing.get_origin(base) is list:
            kinds.add("array")
        elif dataclasses.is_dataclass(base):
            kinds.add("object")
        else:
            raise NotImplementedError(f"no wire kind for {arm!r}")
    return kinds


# Strings that can never parse as a date or a time: msgspec wants ASCII digits.
DIGITLESS_TEXT = st.text(st.characters(exclude_categories=["Nd", "Cs"]), max_size=12)


# Near misses of `HH:MM:SS[.ffffff]`: out-of-range fields, missing seconds or padding,
# ISO basic format, an offset of a day. Plus whole dates and instants, which are not times.
IMPOSSIBLE_TIMES = st.sampled_from(
    ["24:00:00", "09:60:00", "09:00:60", "9:00:00", "09:00", "0900", "09:00:00+24:00", "T09:00:00"]
)


def replicated(item: Any, count: int) -> SearchStrategy[list[Any]]:
    """`count` copies of one valid list item, as builtins: long lists without drawing each."""
    return strategy_for(item).map(lambda value: [msgspec.to_builtins(value)] * count)


def text_outside(values: frozenset[str]) -> SearchStrategy[str]:
    return st.text(max_size=20).filter(lambda s: s not in values)


# Characters that patterns tend to exclude: a new pattern these cannot break needs its own.
PATTERN_BREAKERS = st.sampled_from(["\x00", "\n", " ", "/", "a", "Z", "0", "é", "\u2028"])


def text_not_matching(pattern: str, max_length: int | None) -> SearchStrategy[str]:
    match = re.compile(pattern).search
    return st.text(PATTERN_BREAKERS, min_size=1, max_size=max_length or 20).filter(
        lambda s: not match(s)
    )


def bad_values(site: Site) -> dict[str, SearchStrategy[Any]]:
    """Each way this field's wire value can be wrong, keyed by a name for the test id."""
    accepted = wire_kinds(site.annotation)
    found: dict[str, SearchStrategy[Any]] = {
        "wrong_kind": st.one_of([v for k, v in VALUES_OF_KIND.items() if k not in accepted])
    }
    for arm in arms(site.annotation):
        base, meta = unwrap(arm)
        if base is int and meta is not None:
            low, high = int_range(meta)
            outside: list[SearchStrategy[Any]] = [st.integers(-(2**63), low - 1)]
            if high < 2**63 - 1:
                outside.append(st.integers(high + 1, 2**63 - 1))
            found["out_of_range"] = st.one_of(outside)
        elif base is str and meta is not None:
            wrong: list[SearchStrategy[Any]] = []
            if meta.max_length is not None:
                too_long = st.integers(meta.max_length + 1, meta.max_length + 8)
                char = st.characters(exclude_categories=["Cs"])
                wrong.append(st.builds(lambda c, n: c * n, char, too_long))
            if meta.min_length:
                wrong.append(st.text(max_size=meta.min_length - 1))
            if wrong:
                found["bad_length"] = st.one_of(wrong)
            if meta.pattern is not None:
                found["no_match"] = text_not_matching(meta.pattern, meta.max_length)
        elif base is datetime:
            found["naive_time"] = st.datetimes().map(datetime.isoformat)
            found["not_a_time"] = DIGITLESS_TEXT | st.dates().map(date.isoformat)
        elif base is date:
            impossible = st.sampled_from(["2023-02-29", "2024-13-01", "2024-04-31", "24-01-01"])
            found["not_a_date"] = (
                DIGITLESS_TEXT | impossible | AWARE_DATETIMES.map(datetime.isoformat)
            )
        elif base is time:
            if meta is not None and meta.tz is False:  # local wall-clock times: no offset
                found["with_offset"] = st.times(timezones=WHOLE_MINUTE_ZONES).map(time.isoformat)
            found["not_a_time_of_day"] = (
                DIGITLESS_TEXT
                | IMPOSSIBLE_TIMES
                | st.dates().map(date.isoformat)
                | AWARE_DATETIMES.map(datetime.isoformat)
            )
        elif typing.get_origin(base) is list and meta is not None and meta.max_length:
            (item,) = typing.get_args(base)
            found["too_many"] = replicated(item, meta.max_length + 1)
        elif isinstance(base, type) and issubclass(base, enum.Enum):
            found["not_in_enum"] = text_outside(frozenset(m.value for m in base))
    return found


# One case per field, trying each of its ways to be wrong in every example: one drawn
# message serves them all, which halves the cost of this, the file's largest test.
BAD_FIELD_CASES = [pytest.param(site, bad_values(site), id=str(site)) for site in CASE_SITES]


def set_at(tree: Any, path: Path, value: Any) -> None:
    for step in path[:-1]:
        tree = tree[step]
    tree[path[-1]] = value


def get_at(tree: Any, path: Path) -> Any:
    for step in path:
        tree = tree[step]
    return tree


def attribute_at(obj: Any, path: Path) -> Any:
    """`get_at` for a message object: fields by name, list items by index."""
    for step in path:
        obj = obj[step] if isinstance(step, int) else getattr(obj, step)
    return obj


def sites_holding(*kinds: type) -> list[Site]:
    """Every site (nested ones too) one of whose arms is one of `kinds`."""
    return [s for s in ALL_SITES if any(unwrap(arm)[0] in kinds for arm in arms(s.annotation))]


TEMPORAL_SITES = sites_holding(date, datetime, time)


def paths_in(tree: Any, prefix: Path = ()) -> Iterator[Path]:
    """Every node of a builtins tree, the root included."""
    yield prefix
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from paths_in(value, (*prefix, key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield from paths_in(value, (*prefix, index))


def decode_or_error(
    codec: Codec, frame: bytes | str, registry: Registry, **kw: Any
) -> Envelope | ProtocolError:
    """Decode, turning only a ProtocolError into a value: any other exception fails the test."""
    try:
        return codec.decode(frame, registry, **kw)
    except ProtocolError as exc:
        error = exc
    assert isinstance(error.code, ErrorCode)
    assert error.code in DECODE_CODES, error.code
    assert error.message
    return error


def rejected(codec: Codec, frame: bytes | str, registry: Registry, **kw: Any) -> ProtocolError:
    outcome = decode_or_error(codec, frame, registry, **kw)
    assert isinstance(outcome, ProtocolError), f"accepted {frame!r} as {outcome!r}"
    return outcome


# ---- the registries -------------------------------------------------------------------------


def test_every_message_class_is_registered_exactly_once() -> None:
    """A message class left out of a registry (or shadowed by a copy-pasted TYPE) is undecodable."""
    declared = {
        cls
        for _, cls in inspect.getmembers(messages, inspect.isclass)
        if issubclass(cls, Message) and cls is not Message and cls.__module__ == messages.__name__
    }
    assert sorted(c.__name__ for c in ALL_MESSAGES) == sorted(c.__name__ for c in declared)
    assert set(CLIENT_MESSAGES).isdisjoint(SERVER_MESSAGES)
    for registry in REGISTRIES.values():
        assert all(name == cls.TYPE for name, cls in registry.items())


@pytest.mark.parametrize("cls", ALL_MESSAGES, ids=lambda c: c.TYPE)
def test_every_registered_message_has_a_strategy(cls: type[Message]) -> None:
    """Fails when a message gains a field type the derivation cannot generate yet.

    Building the strategy derives every field's eagerly; drawing from it is left to
    the round trips, which do it for every message anyway.
    """
    for nonempty in (False, True):
        assert isinstance(message_strategy(cls, nonempty=nonempty), SearchStrategy)


# ---- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ALL_MESSAGES, ids=lambda c: c.TYPE)
@PER_CASE
@given(data=st.data(), request_id=VALID_REQUEST_IDS, nonempty=st.booleans())
def test_every_message_round_trips(
    cls: type[Message], data: st.DataObject, request_id: RequestId, nonempty: bool
) -> None:
    """In both codecs, with lists empty or not (`nonempty` forces nested views to appear).

    Datetimes compare by instant: aware datetime equality ignores the offset's spelling.
    One drawn message serves both codecs, which halves the cost of drawing.
    """
    message = data.draw(message_strategy(cls, nonempty=nonempty))
    assert type(message) is cls
    for codec in (JSON, MSGPACK):
        frame = codec.encode(message, request_id)
        assert codec.decode(frame, registry_of(cls)) == Envelope(request_id, message), codec.name


@THOROUGH
@given(data=st.data(), codec=CODEC_STRATEGY, request_id=VALID_REQUEST_IDS)
def test_frames_have_the_documented_shape(
    data: st.DataObject, codec: Codec, request_id: RequestId
) -> None:
    """Clients in other languages parse the envelope by hand; its shape is the contract."""
    message = data.draw(any_message())
    frame = codec.encode(message, request_id)
    if codec.binary:
        raw = msgpack.unpackb(frame, raw=False)
    else:
        text = frame.decode("utf-8")  # travels as a text frame, so it must be UTF-8
        raw = orjson.loads(text)
        assert codec.decode(text, registry_of(type(message))).body == message
    assert list(raw) == ["type", "id", "body"]
    assert raw["type"] == message.TYPE
    assert raw["id"] == request_id
    assert isinstance(raw["body"], dict)


@THOROUGH
@given(data=st.data(), request_id=VALID_REQUEST_IDS)
def test_a_wrapped_body_is_byte_for_byte_the_frame_encode_builds(
    data: st.DataObject, request_id: RequestId
) -> None:
    """Fan-out serializes a body once and splices it into its envelope (`Codec.wrap`);
    a client must not be able to tell that frame from one `encode` built whole."""
    message = data.draw(any_message())
    body = to_wire(message)["body"]
    for codec in (JSON, MSGPACK):
        wrapped = codec.wrap(message.TYPE, codec.encode_body(body), request_id)
        assert wrapped == codec.encode(message, request_id), codec.name
        decoded = codec.decode(wrapped, registry_of(type(message)), max_size=len(wrapped))
        assert decoded == Envelope(request_id, message), codec.name


@THOROUGH
@given(
    codec=CODEC_STRATEGY,
    moment=st.datetimes(timezones=st.just(UTC)),
    subject=st.text(min_size=1, max_size=10),
)
def test_utc_times_travel_as_rfc3339_strings_ending_in_z(
    codec: Codec, moment: datetime, subject: str
) -> None:
    """docs/protocol.md promises `...Z` strings in both codecs (not MessagePack timestamps)."""
    frame = codec.encode(Authenticated(subject, Role.PATIENT, moment))
    raw = msgpack.unpackb(frame, raw=False) if codec.binary else orjson.loads(frame)
    wire = raw["body"]["expires_at"]
    assert isinstance(wire, str)
    assert wire.endswith("Z")
    assert datetime.fromisoformat(wire) == moment


def raw_frame(codec: Codec, frame: bytes) -> Any:
    """A frame parsed by the format's own library, as a client in another language sees it."""
    return msgpack.unpackb(frame, raw=False) if codec.binary else orjson.loads(frame)


# The formats docs/protocol.md promises, fractions only when not zero, six digits then.
# `datetime` comes first: it is a subclass of `date`.
WIRE_FORMATS: list[tuple[type[date] | type[time], str]] = [
    (datetime, r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{6})?Z"),
    (date, r"\d{4}-\d{2}-\d{2}"),
    (time, r"\d{2}:\d{2}:\d{2}(\.\d{6})?"),
]


@THOROUGH
@given(data=st.data(), codec=CODEC_STRATEGY)
def test_instants_dates_and_times_travel_in_their_documented_formats(
    data: st.DataObject, codec: Codec
) -> None:
    """Every such field at any depth, not just `expires_at`: instants in UTC ending in `Z`
    (a view that forgot to normalise would send the offset it was built with), dates as
    `YYYY-MM-DD`, a schedule's times of day as `HH:MM:SS` with no offset."""
    site = data.draw(st.sampled_from(TEMPORAL_SITES), label="site")
    message = data.draw(message_strategy(site.message, nonempty=True))
    wire = get_at(raw_frame(codec, codec.encode(message))["body"], site.path)
    value = attribute_at(message, site.path)
    if value is None:
        assert wire is None
        return
    kind, pattern = next((k, p) for k, p in WIRE_FORMATS if isinstance(value, k))
    assert isinstance(wire, str)
    assert re.fullmatch(pattern, wire), wire
    assert ("." in wire) == (getattr(value, "microsecond", 0) != 0), wire
    assert kind.fromisoformat(wire) == value


CLIENT_DATE_SITES = [s for s in sites_holding(date) if s.message.TYPE in CLIENT_MESSAGES]


@pytest.mark.parametrize("edge", ["0001-01-01", "9999-12-31"])
@settings(max_examples=10, deadline=None)
@given(data=st.data(), codec=CODEC_STRATEGY)
def test_a_client_date_at_an_end_of_the_calendar_is_invalid(
    edge: str, data: st.DataObject, codec: Codec
) -> None:
    """The server steps a day either side of a date; on the first or last day a date type
    holds that would overflow, so the decoder refuses them (`invalid`, the field named)."""
    assert {s.message.TYPE for s in CLIENT_DATE_SITES} == {
        "watch",
        "watch_dashboard",
        "list_appointments",
        "set_schedule",
        "preview_schedule",
    }
    site = data.draw(st.sampled_from(CLIENT_DATE_SITES), label="site")
    wire = to_wire(data.draw(message_strategy(site.message, nonempty=True)), 5)
    set_at(wire["body"], site.path, edge)
    error = rejected(codec, codec.dumps(wire), CLIENT_MESSAGES)
    assert error.code is ErrorCode.INVALID
    assert f"`{site.path[-1]}` must be a date from 0001-01-02 to 9999-12-30" in error.message
    assert error.request_id == 5
    set_at(wire["body"], site.path, "9999-12-30" if edge.startswith("9") else "0001-01-02")
    assert not isinstance(decode_or_error(codec, codec.dumps(wire), CLIENT_MESSAGES), Exception)


@pytest.mark.parametrize("codec", [JSON, MSGPACK], ids=lambda c: c.name)
@pytest.mark.parametrize(
    "offset",
    [
        # Local mean times, as zoneinfo gives them for old dates: Asia/Kolkata, Asia/Tehran.
        timedelta(hours=5, minutes=53, seconds=28),  # sent as +05:53
        timedelta(hours=3, minutes=25, seconds=44),  # sent as +03:26
        timedelta(hours=-5, microseconds=1),  # sent as -05:00
    ],
    ids=["seconds_rounded_down", "seconds_rounded_up", "microseconds"],
)
def test_sub_minute_utc_offsets_survive_encoding(codec: Codec, offset: timedelta) -> None:
    """Any aware datetime is a valid `Instant`, so its instant must survive the wire."""
    moment = datetime(1850, 6, 1, 12, tzinfo=timezone(offset))
    message = Authenticated("s", Role.ADMIN, moment)
    decoded = codec.decode(codec.encode(message), SERVER_MESSAGES).body
    assert isinstance(decoded, Authenticated)
    assert decoded.expires_at == moment


@pytest.mark.parametrize("codec", [JSON, MSGPACK], ids=lambda c: c.name)
@pytest.mark.parametrize(
    "moment",
    [
        datetime.min.replace(tzinfo=timezone(timedelta(hours=23, minutes=59))),
        datetime.max.replace(tzinfo=timezone(-timedelta(hours=23, minutes=59))),
    ],
    ids=["year_1_east", "year_9999_west"],
)
def test_instants_at_the_calendar_edges_never_crash_the_decoder(
    codec: Codec, moment: datetime
) -> None:
    """Their UTC equivalent falls outside `datetime`'s range: a normalising decoder must
    refuse them as `invalid`, not raise OverflowError (hypothesis rarely draws these)."""
    body = {"subject": "s", "role": "admin", "expires_at": moment.isoformat()}
    frame = codec.dumps({"type": "authenticated", "id": 1, "body": body})
    outcome = decode_or_error(codec, frame, SERVER_MESSAGES)
    if isinstance(outcome, ProtocolError):
        assert outcome.code is ErrorCode.INVALID
    else:
        assert isinstance(outcome.body, Authenticated)
        assert outcome.body.expires_at == moment


@THOROUGH
@given(
    cls=st.sampled_from(ALL_MESSAGES),
    envelope_extra=st.dictionaries(
        st.text(max_size=8).filter(lambda k: k not in {"type", "id", "body"}), JSON_SCALARS
    ),
    body_extra=st.dictionaries(
        st.text(min_size=1, max_size=8).map(lambda k: "x_" + k), JSON_SCALARS, max_size=3
    ),
    data=st.data(),
)
def test_unknown_keys_are_ignored_for_forward_compatibility(
    cls: type[Message],
    envelope_extra: dict[str, Any],
    body_extra: dict[str, Any],
    data: st.DataObject,
) -> None:
    """A v1 peer must keep working when the other side adds fields in a later minor version."""
    message = data.draw(message_strategy(cls))
    codec = data.draw(CODEC_STRATEGY)
    wire = to_wire(message, 7)
    wire["body"].update(body_extra)
    frame = codec.dumps({**envelope_extra, **wire})
    assert codec.decode(frame, registry_of(cls)) == Envelope(7, message)


@pytest.mark.parametrize("codec", [JSON, MSGPACK], ids=lambda c: c.name)
@pytest.mark.parametrize(
    "wire",
    [{"type": "ping"}, {"type": "ping", "id": None, "body": None}, {"type": "ping", "body": {}}],
    ids=["omitted", "null", "empty"],
)
def test_a_fieldless_message_may_omit_its_body_and_id(codec: Codec, wire: dict[str, Any]) -> None:
    """`{"type": "ping"}` is the smallest useful frame; clients should not need more."""
    assert codec.decode(codec.dumps(wire)) == Envelope(None, Ping())


# ---- rejection: the frame -------------------------------------------------------------------


@THOROUGH
@given(codec=CODEC_STRATEGY, frame=st.binary(max_size=200))
def test_random_bytes_never_escape_as_another_exception(codec: Codec, frame: bytes) -> None:
    for registry in REGISTRIES.values():
        decode_or_error(codec, frame, registry)


@THOROUGH
@given(frame=st.text(max_size=200))
def test_random_text_never_escapes_as_another_exception(frame: str) -> None:
    decode_or_error(JSON, frame, CLIENT_MESSAGES)
    assert rejected(MSGPACK, frame, CLIENT_MESSAGES).code is ErrorCode.BAD_MESSAGE


@THOROUGH
@given(
    codec=CODEC_STRATEGY,
    value=JSON_SCALARS | st.lists(JSON_VALUES, max_size=3),
)
def test_a_frame_that_is_not_an_object_is_a_bad_message(codec: Codec, value: Any) -> None:
    error = rejected(codec, codec.dumps(value), CLIENT_MESSAGES)
    assert error.code is ErrorCode.BAD_MESSAGE
    assert error.request_id is None


@THOROUGH
@given(
    codec=CODEC_STRATEGY,
    request_id=VALID_REQUEST_IDS,
    kind=JSON_VALUES.filter(lambda v: not isinstance(v, str)),
    omit=st.booleans(),
)
def test_a_missing_or_non_string_type_is_a_bad_message_that_keeps_the_id(
    codec: Codec, request_id: RequestId, kind: Any, omit: bool
) -> None:
    wire: dict[str, Any] = {"id": request_id, "body": {}}
    if not omit:
        wire["type"] = kind
    error = rejected(codec, codec.dumps(wire), CLIENT_MESSAGES)
    assert error.code is ErrorCode.BAD_MESSAGE
    assert error.request_id == request_id


@THOROUGH
@given(
    codec=CODEC_STRATEGY,
    request_id=VALID_REQUEST_IDS,
    registry_name=st.sampled_from(list(REGISTRIES)),
    kind=st.text(max_size=20),
)
def test_an_unknown_type_keeps_the_request_id(
    codec: Codec, request_id: RequestId, registry_name: str, kind: str
) -> None:
    registry = REGISTRIES[registry_name]
    assume(kind not in registry)
    error = rejected(codec, codec.dumps({"type": kind, "id": request_id}), registry)
    assert error.code is ErrorCode.UNKNOWN_TYPE
    assert error.request_id == request_id


@pytest.mark.parametrize("cls", ALL_MESSAGES, ids=lambda c: c.TYPE)
@pytest.mark.parametrize("codec", [JSON, MSGPACK], ids=lambda c: c.name)
def test_a_message_sent_the_wrong_way_is_an_unknown_type(cls: type[Message], codec: Codec) -> None:
    """A server must not accept `welcome` from a client, nor a client `watch` from a server."""
    other = SERVER_MESSAGES if registry_of(cls) is CLIENT_MESSAGES else CLIENT_MESSAGES
    error = rejected(codec, codec.dumps({"type": cls.TYPE, "id": "r1", "body": {}}), other)
    assert error.code is ErrorCode.UNKNOWN_TYPE
    assert error.request_id == "r1"


BAD_REQUEST_IDS: SearchStrategy[Any] = st.one_of(
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.just(""),
    st.text(min_size=65, max_size=80),
    st.integers(-(2**63), -1),
    st.integers(2**53, 2**63 - 1),
    st.lists(JSON_SCALARS, max_size=2),
    st.dictionaries(st.text(max_size=3), JSON_SCALARS, max_size=2),
)


@THOROUGH
@given(codec=CODEC_STRATEGY, request_id=BAD_REQUEST_IDS)
def test_a_bad_request_id_is_a_bad_message_without_an_id(codec: Codec, request_id: Any) -> None:
    """An id the client could not have meant must not be echoed back to it."""
    error = rejected(codec, codec.dumps({"type": "ping", "id": request_id}), CLIENT_MESSAGES)
    assert error.code is ErrorCode.BAD_MESSAGE
    assert error.request_id is None


@pytest.mark.parametrize("codec", [JSON, MSGPACK], ids=lambda c: c.name)
@pytest.mark.parametrize("request_id", [True, False, 1.0, 1.5, "", "x" * 65, -1, 2**53], ids=repr)
def test_each_documented_bad_request_id_is_refused(codec: Codec, request_id: Any) -> None:
    error = rejected(codec, codec.dumps({"type": "ping", "id": request_id}), CLIENT_MESSAGES)
    assert error.code is ErrorCode.BAD_MESSAGE


@pytest.mark.parametrize("codec", [JSON, MSGPACK], ids=lambda c: c.name)
@pytest.mark.parametrize("request_id", ["x", "x" * 64, 0, 2**53 - 1], ids=repr)
def test_each_request_id_bound_is_accepted(codec: Codec, request_id: RequestId) -> None:
    frame = codec.dumps({"type": "ping", "id": request_id})
    assert codec.decode(frame).id == request_id


@THOROUGH
@given(data=st.data(), codec=CODEC_STRATEGY, request_id=VALID_REQUEST_IDS)
def test_the_size_limit_is_inclusive_and_checked_before_parsing(
    data: st.DataObject, codec: Codec, request_id: RequestId
) -> None:
    message = data.draw(any_message())
    frame = codec.encode(message, request_id)
    registry = registry_of(type(message))
    assert codec.decode(frame, registry, max_size=len(frame)).body == message
    error = rejected(codec, frame, registry, max_size=len(frame) - 1)
    assert error.code is ErrorCode.TOO_LARGE
    assert error.request_id is None  # not parsed, so not known


@pytest.mark.parametrize("codec", [JSON, MSGPACK], ids=lambda c: c.name)
def test_an_oversized_frame_is_too_large_whatever_it_holds(codec: Codec) -> None:
    """The default limit is the server's default, and garbage over it is not even parsed."""
    assert Settings.__dataclass_fields__["max_frame_bytes"].default == DEFAULT_MAX_FRAME
    assert rejected(codec, b"\xff" * (DEFAULT_MAX_FRAME + 1), CLIENT_MESSAGES).code is (
        ErrorCode.TOO_LARGE
    )
    padded = codec.encode(messages.Auth("t" * 4096), 1) + b" " * DEFAULT_MAX_FRAME
    assert rejected(codec, padded, CLIENT_MESSAGES).code is ErrorCode.TOO_LARGE


@THOROUGH
@given(data=st.data(), request_id=VALID_REQUEST_IDS)
def test_frames_in_the_other_codec_are_bad_messages(
    data: st.DataObject, request_id: RequestId
) -> None:
    """A client that negotiated one subprotocol and sends the other gets a clear error."""
    message = data.draw(any_message())
    registry = registry_of(type(message))
    as_json = JSON.encode(message, request_id)
    assert rejected(MSGPACK, as_json, registry).code is ErrorCode.BAD_MESSAGE
    assert rejected(MSGPACK, as_json.decode(), registry).code is ErrorCode.BAD_MESSAGE
    assert rejected(JSON, MSGPACK.encode(message, request_id), registry).code is (
        ErrorCode.BAD_MESSAGE
    )


def test_a_msgpack_frame_sent_as_text_is_a_bad_message() -> None:
    """MessagePack must travel in binary frames; a text frame is refused, not re-encoded."""
    frame = MSGPACK.encode(Ping(), 1).decode("latin-1")
    error = rejected(MSGPACK, frame, CLIENT_MESSAGES)
    assert error.code is ErrorCode.BAD_MESSAGE
    assert "binary" in error.message


@pytest.mark.parametrize(
    "frame",
    [
        msgpack.packb({"type": "ping", "id": 1, "body": None}) + b"\xc0",
        msgpack.packb({"type": "ping"})[:-1],
        b"\x91" * 5000 + b"\xc0",
        msgpack.packb({1: "ping"}),
    ],
    ids=["trailing_data", "truncated", "nested_too_deep", "integer_map_key"],
)
def test_malformed_msgpack_is_a_bad_message(frame: bytes) -> None:
    assert rejected(MSGPACK, frame, CLIENT_MESSAGES).code is ErrorCode.BAD_MESSAGE


@pytest.mark.parametrize(
    "value",
    [
        msgpack.Timestamp(1_700_000_000),
        msgpack.ExtType(5, b"x"),
        b"2030-01-01T00:00:00Z",
        b"09:00:00",
    ],
    ids=["timestamp_ext", "other_ext", "bin", "bin_time_of_day"],
)
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_msgpack_times_must_be_strings_not_extensions_or_binary(
    value: Any, data: st.DataObject
) -> None:
    """Many MessagePack libraries send dates as the Timestamp extension; v1 wants strings,
    for instants, dates and times of day alike (a schedule's hours included)."""
    site = data.draw(st.sampled_from(TEMPORAL_SITES), label="site")
    wire = to_wire(data.draw(message_strategy(site.message, nonempty=True)), 3)
    set_at(wire["body"], site.path, value)
    error = rejected(MSGPACK, msgpack.packb(wire, use_bin_type=True), registry_of(site.message))
    assert error.code is ErrorCode.INVALID
    assert f"`{site.json_path}`" in error.message, error.message
    assert error.request_id == 3


# ---- rejection: the fields ------------------------------------------------------------------

NO_NUL = "^[^\x00]*$"  # PostgreSQL text cannot hold NUL
ID = ("int", 1, 2**53 - 1)  # a safe JavaScript integer
DOCTOR_ID = ("int", 1, 2**31 - 1)  # fits the int4 advisory-lock key
KEY = ("text", 1, 128, NO_NUL)  # idempotency keys and patient ids (token subjects)
# A phone number (digits, optional +, the usual separators) or something@somewhere.tld.
CONTACT = r"^(?:\+?[0-9(][0-9 ().\-/]{2,38}|[^@\s\x00]{1,64}@[^@\s\x00]+\.[^@\s\x00]+)$"
AWARE = ("aware",)
COUNT = ("int", 0, None)
SLOT_LIMITS = {"id": ID, "start": AWARE, "end": AWARE, "hold_expires_at": AWARE}
APPOINTMENT_LIMITS = {
    "id": ID,
    "slot_id": ID,
    "doctor_id": DOCTOR_ID,
    "patient_id": KEY,
    "start": AWARE,
    "end": AWARE,
    "hold_expires_at": AWARE,
    "replaces_id": ID,
    "cancelled_at": AWARE,
}


def nested(prefix: str, limits: Mapping[str, tuple[Any, ...]]) -> dict[str, tuple[Any, ...]]:
    """A view's limits wherever a message nests it: each place is its own wire path."""
    return {f"{prefix}.{name}": limit for name, limit in limits.items()}


# The limits docs/protocol.md publishes. The generic tests below derive their cases from
# the annotations, so this table is what stops a silently loosened annotation.
DOCUMENTED_LIMITS: dict[str, tuple[Any, ...]] = {
    # client -> server
    "auth.token": ("text", 1, 4096, None),
    "watch.doctor_id": DOCTOR_ID,
    "watch.since": COUNT,  # a version to resume from
    "unwatch.doctor_id": DOCTOR_ID,
    "watch_dashboard.doctor_id": DOCTOR_ID,
    "unwatch_dashboard.doctor_id": DOCTOR_ID,
    "hold.slot_id": ID,
    "hold.idempotency_key": KEY,
    "hold.patient_id": KEY,  # on a patient's behalf
    "hold.patient_name": ("text", 1, 200, NO_NUL),
    "hold.visit_reason": ("text", 1, 300, NO_NUL),
    "hold.patient_contact": ("text", 3, 120, CONTACT),
    "release.appointment_id": ID,
    "release.idempotency_key": KEY,
    "release.patient_id": KEY,
    "book.slot_id": ID,
    "book.idempotency_key": KEY,
    "book.hold_id": ID,
    "book.patient_id": KEY,
    "book.patient_name": ("text", 1, 200, NO_NUL),
    "book.visit_reason": ("text", 1, 300, NO_NUL),
    "book.patient_contact": ("text", 3, 120, CONTACT),
    "cancel.appointment_id": ID,
    "cancel.reason": ("text", 1, 500, NO_NUL),
    "cancel.idempotency_key": KEY,
    "cancel.patient_id": KEY,
    "reschedule.appointment_id": ID,
    "reschedule.slot_id": ID,
    "reschedule.idempotency_key": KEY,
    "reschedule.patient_id": KEY,
    "block.slot_id": ID,
    "block.idempotency_key": KEY,
    "unblock.slot_id": ID,
    "unblock.idempotency_key": KEY,
    "mark.appointment_id": ID,
    "unmark.appointment_id": ID,
    "unmark.idempotency_key": KEY,
    "mark.idempotency_key": KEY,
    "set_schedule.doctor_id": DOCTOR_ID,
    "set_schedule.weekly": ("items", None, 100),
    "set_schedule.weekly[0].weekday": ("int", 1, 7),  # ISO: Monday = 1
    "set_schedule.overrides": ("items", None, 400),
    "set_schedule.slot_minutes": ("int", 5, 480),
    "set_schedule.buffer_minutes": ("int", 0, 240),
    "set_schedule.min_notice_minutes": ("int", 0, 43200),  # 30 days
    "set_schedule.horizon_days": ("int", 1, 366),
    "set_schedule.idempotency_key": KEY,
    "get_schedule.doctor_id": DOCTOR_ID,
    "next_available.doctor_id": DOCTOR_ID,
    "next_available.after": AWARE,
    "block_range.doctor_id": DOCTOR_ID,
    "block_range.start": AWARE,
    "block_range.end": AWARE,
    "block_range.reason": ("text", 1, 500, NO_NUL),
    "block_range.idempotency_key": KEY,
    "unblock_range.doctor_id": DOCTOR_ID,
    "unblock_range.start": AWARE,
    "unblock_range.end": AWARE,
    "unblock_range.idempotency_key": KEY,
    "preview_schedule.doctor_id": DOCTOR_ID,
    "preview_schedule.weekly": ("items", None, 100),
    "preview_schedule.weekly[0].weekday": ("int", 1, 7),
    "preview_schedule.overrides": ("items", None, 400),
    "preview_schedule.slot_minutes": ("int", 5, 480),
    "preview_schedule.buffer_minutes": ("int", 0, 240),
    "preview_schedule.min_notice_minutes": ("int", 0, 43200),
    "preview_schedule.horizon_days": ("int", 1, 366),
    "list_appointments.doctor_id": DOCTOR_ID,
    "search_doctors.q": ("text", None, 100, NO_NUL),
    "search_doctors.limit": ("int", 1, 100),
    "search_doctors.offset": ("int", 0, 1_000_000),
    "create_doctor.name": ("text", 1, 200, NO_NUL),
    "create_doctor.timezone": ("text", 1, 64, NO_NUL),  # an IANA name, checked by the server
    "create_doctor.specialty": ("text", None, 200, NO_NUL),
    "create_doctor.external_id": ("text", 1, 128, NO_NUL),
    "create_doctor.idempotency_key": KEY,
    "update_doctor.doctor_id": DOCTOR_ID,
    "update_doctor.name": ("text", 1, 200, NO_NUL),
    "update_doctor.timezone": ("text", 1, 64, NO_NUL),
    "update_doctor.specialty": ("text", None, 200, NO_NUL),
    "update_doctor.external_id": ("text", 1, 128, NO_NUL),
    "update_doctor.idempotency_key": KEY,
    "retire_doctor.doctor_id": DOCTOR_ID,
    "retire_doctor.idempotency_key": KEY,
    # server -> client
    "authenticated.expires_at": AWARE,
    "snapshot.doctor_id": DOCTOR_ID,
    "snapshot.version": COUNT,
    **nested("snapshot.slots[0]", SLOT_LIMITS),
    "snapshot.bookable_from": AWARE,
    "snapshot.bookable_until": AWARE,
    "delta.doctor_id": DOCTOR_ID,
    "delta.version": ("int", 1, None),
    **nested("delta.slots[0]", SLOT_LIMITS),
    "delta.removed[0]": ID,
    "delta.since": COUNT,  # set on a merged delta
    "resumed.doctor_id": DOCTOR_ID,
    "resumed.since": COUNT,
    "resumed.version": COUNT,
    "unwatched.doctor_id": DOCTOR_ID,
    "dashboard.doctor_id": DOCTOR_ID,
    "dashboard.version": COUNT,
    **nested("dashboard.appointments[0]", APPOINTMENT_LIMITS),
    **nested("dashboard.slots[0]", SLOT_LIMITS),
    "dashboard.conflicts[0]": ID,
    "dashboard.watchers": COUNT,
    "dashboard_delta.doctor_id": DOCTOR_ID,
    "dashboard_delta.version": ("int", 1, None),
    **nested("dashboard_delta.appointments[0]", APPOINTMENT_LIMITS),
    **nested("dashboard_delta.slots[0]", SLOT_LIMITS),
    "dashboard_delta.removed[0]": ID,
    "dashboard_delta.conflicts[0]": ID,
    "presence.doctor_id": DOCTOR_ID,
    "presence.watchers": COUNT,
    "appointment_event.doctor_id": DOCTOR_ID,
    "appointment_event.version": ("int", 1, None),
    **nested("appointment_event.appointment", APPOINTMENT_LIMITS),
    "resync.doctor_id": DOCTOR_ID,
    "reconnect.retry_after_ms": COUNT,
    "error.retry_after_ms": COUNT,
    **nested("held.appointment", APPOINTMENT_LIMITS),
    **nested("booked.appointment", APPOINTMENT_LIMITS),
    **nested("appointment.appointment", APPOINTMENT_LIMITS),
    **nested("rescheduled.appointment", APPOINTMENT_LIMITS),
    **nested("rescheduled.replaced", APPOINTMENT_LIMITS),
    "slot.doctor_id": DOCTOR_ID,
    **nested("slot.slot", SLOT_LIMITS),
    "schedule.doctor_id": DOCTOR_ID,
    "next_slot.doctor_id": DOCTOR_ID,
    **nested("next_slot.slot", SLOT_LIMITS),
    "schedule.weekly[0].weekday": ("int", 1, 7),
    "schedule_updated.doctor_id": DOCTOR_ID,
    "schedule_updated.version": COUNT,
    "schedule_updated.opened": COUNT,
    "schedule_updated.removed": COUNT,
    "schedule_updated.conflicts[0]": ID,
    **nested("appointments.appointments[0]", APPOINTMENT_LIMITS),
    "doctors.doctors[0].id": DOCTOR_ID,
    "doctors.doctors[0].retired_at": AWARE,
    "delta.doctor.id": DOCTOR_ID,
    "delta.doctor.retired_at": AWARE,
    "doctor.doctor.id": DOCTOR_ID,
    "doctor.doctor.retired_at": AWARE,
    "doctor.version": COUNT,
    "dashboard.blocks[0].slot_id": ID,
    "dashboard_delta.blocks[0].slot_id": ID,
    "slots.doctor_id": DOCTOR_ID,
    **nested("slots.slots[0]", SLOT_LIMITS),
    "schedule_preview.doctor_id": DOCTOR_ID,
    **nested("schedule_preview.conflicts[0]", APPOINTMENT_LIMITS),
    "schedule_preview.total": COUNT,
}


def limit_of(site: Site) -> tuple[Any, ...] | None:
    for arm in arms(site.annotation):
        base, meta = unwrap(arm)
        if meta is None:
            continue
        if base is int:
            return ("int", meta.ge, meta.le)
        if base is str:
            return ("text", meta.min_length, meta.max_length, meta.pattern)
        if base is datetime and meta.tz:
            return ("aware",)
        if typing.get_origin(base) is list:
            return ("items", meta.min_length, meta.max_length)
    return None


def test_the_decoder_enforces_exactly_the_documented_limits() -> None:
    enforced = {str(site): limit_of(site) for site in ALL_SITES if limit_of(site) is not None}
    assert enforced == DOCUMENTED_LIMITS


@pytest.mark.parametrize(("site", "ways"), BAD_FIELD_CASES)
@PER_CASE
@given(data=st.data(), codec=CODEC_STRATEGY, request_id=VALID_REQUEST_IDS)
def test_a_bad_field_is_invalid_and_keeps_the_request_id(
    site: Site,
    ways: dict[str, SearchStrategy[Any]],
    data: st.DataObject,
    codec: Codec,
    request_id: RequestId,
) -> None:
    """Covers wrongly-typed fields, out-of-range numbers, bad lengths, too many list items,
    naive instants, impossible dates and times of day, and bad enums.

    The error must name the broken field: a refusal for some other reason (say, a
    strategy that drew an invalid neighbour) would otherwise pass for this one.
    """
    message = data.draw(message_strategy(site.message, nonempty=True))
    for kind, values in ways.items():
        wire = to_wire(message, request_id)
        set_at(wire["body"], site.path, data.draw(values, label=kind))
        error = rejected(codec, codec.dumps(wire), registry_of(site.message))
        assert error.code is ErrorCode.INVALID, f"{kind}: {error.message}"
        assert f"`{site.json_path}`" in error.message, f"{kind}: {error.message}"
        assert error.request_id == request_id


# Text of a given length that a pattern with a shape of its own accepts (others take "é"s).
SHAPED_TEXT: dict[str, Callable[[int], str]] = {
    # The shortest contact is a phone number; the longest an e-mail address.
    CONTACT: lambda n: "1" * n if n <= 40 else "a" * 60 + "@" + "b" * (n - 65) + ".org",
}


def bounds(site: Site) -> dict[str, SearchStrategy[Any]]:
    """The extreme wire values a constrained field must still accept, keyed by a test id."""
    values: dict[str, SearchStrategy[Any]] = {}
    for arm in arms(site.annotation):
        base, meta = unwrap(arm)
        if meta is None:
            continue
        if base is int:
            values |= {str(v): st.just(v) for v in (meta.ge, meta.le) if v is not None}
        elif base is str:
            lengths = (meta.min_length, meta.max_length)
            sample = SHAPED_TEXT.get(meta.pattern or "", lambda n: "é" * n)
            values |= {f"{n}_chars": st.just(sample(n)) for n in lengths if n is not None}
        elif typing.get_origin(base) is list and meta.max_length is not None:
            (item,) = typing.get_args(base)
            values[f"{meta.max_length}_items"] = replicated(item, meta.max_length)
    return values


BOUND_CASES = [
    pytest.param(site, bounds(site), id=f"{site}={','.join(bounds(site))}")
    for site in CASE_SITES
    if bounds(site)
]


@pytest.mark.parametrize(("site", "extremes"), BOUND_CASES)
@settings(max_examples=4, deadline=None)
@given(data=st.data(), codec=CODEC_STRATEGY)
def test_boundary_values_are_accepted(
    site: Site, extremes: dict[str, SearchStrategy[Any]], data: st.DataObject, codec: Codec
) -> None:
    """Limits are inclusive (lengths count characters, not bytes; lists count items)."""
    message = data.draw(message_strategy(site.message, nonempty=True))
    for label, values in extremes.items():
        wire = to_wire(message)
        value = data.draw(values, label=label)
        set_at(wire["body"], site.path, value)
        decoded = codec.decode(codec.dumps(wire), registry_of(site.message)).body
        assert get_at(msgspec.to_builtins(decoded), site.path) == value, label


@THOROUGH
@given(
    data=st.data(),
    codec=CODEC_STRATEGY,
    registry_name=st.sampled_from(list(REGISTRIES)),
    delete=st.booleans(),
)
def test_mutated_frames_decode_or_raise_protocol_error(
    data: st.DataObject, codec: Codec, registry_name: str, delete: bool
) -> None:
    """Whatever the mutation, the outcome is a valid message or a ProtocolError, nothing else."""
    message = data.draw(any_message())
    wire: Any = to_wire(message, data.draw(VALID_REQUEST_IDS))
    path = data.draw(st.sampled_from(list(paths_in(wire))))
    if not path:
        wire = data.draw(JSON_VALUES)
    elif delete and isinstance(get_at(wire, path[:-1]), dict):
        del get_at(wire, path[:-1])[path[-1]]
    else:
        set_at(wire, path, data.draw(JSON_VALUES))
    outcome = decode_or_error(codec, codec.dumps(wire), REGISTRIES[registry_name])
    if isinstance(outcome, Envelope):  # what was accepted must itself be a valid message
        again = codec.encode(outcome.body, outcome.id)
        assert codec.decode(again, REGISTRIES[registry_name]) == outcome


# ---- subprotocol selection --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        ("slotcast.v1.json", JSON),
        ("slotcast.v1.msgpack", MSGPACK),
        (None, JSON),
        ("", JSON),
        ("slotcast.v2.msgpack", JSON),
        ("SLOTCAST.V1.MSGPACK", JSON),
        ("msgpack", JSON),
    ],
)
def test_codec_for_picks_the_subprotocol_and_defaults_to_json(
    requested: str | None, expected: Codec
) -> None:
    assert codec_for(requested) is expected


def test_subprotocols_name_the_protocol_version_and_frame_kind() -> None:
    """Clients hard-code these names; JSON travels in text frames, MessagePack in binary."""
    assert (f"{PROTOCOL}.json", f"{PROTOCOL}.msgpack") == SUBPROTOCOLS
    assert PROTOCOL == "slotcast.v1"
    assert {name: c.binary for name, c in CODECS.items()} == {
        "slotcast.v1.json": False,
        "slotcast.v1.msgpack": True,
    }
    assert all(codec_for(name).subprotocol == name for name in SUBPROTOCOLS)


# ---- docs/protocol.md is the contract client authors read ----------------------------------

DOCS = REPO / "docs" / "protocol.md"
DOC_TEXT = DOCS.read_text(encoding="utf-8")


def documented_frames() -> list[str]:
    """Every line of the page's JSON examples that is an envelope (REST bodies are not).

    Lines are stripped: examples inside list items are indented.
    """
    lines = (
        line.strip()
        for block in re.findall(r"```json\n(.*?)```", DOC_TEXT, re.DOTALL)
        for line in block.splitlines()
        if line.strip()
    )
    return [line for line in lines if list(orjson.loads(line)) == ["type", "id", "body"]]


DOCUMENTED_FRAMES = documented_frames()


def test_the_page_has_examples_to_check() -> None:
    """Guards the parsing below: a reformatted page must not make its checks vacuous."""
    assert len(DOCUMENTED_FRAMES) >= len(ALL_MESSAGES)


@pytest.mark.parametrize("line", DOCUMENTED_FRAMES, ids=lambda line: orjson.loads(line)["type"])
def test_every_documented_example_is_exactly_what_the_codec_sends(line: str) -> None:
    """The page promises its examples were produced by `protocol.codec.JSON`: each must
    decode, and re-encode to the very same bytes (all fields, in order, canonical values)."""
    kind = orjson.loads(line)["type"]
    envelope = JSON.decode(line, CLIENT_MESSAGES if kind in CLIENT_MESSAGES else SERVER_MESSAGES)
    assert JSON.encode(envelope.body, envelope.id).decode() == line


def test_every_message_is_documented_with_a_heading_and_an_example() -> None:
    """A message a client author cannot find on the page does not exist for them."""
    examples = {orjson.loads(line)["type"] for line in DOCUMENTED_FRAMES}
    headings = set(re.findall(r"^#### `(\w+)`$", DOC_TEXT, re.MULTILINE))
    types_ = {cls.TYPE for cls in ALL_MESSAGES}
    assert types_ - examples == set()
    assert headings == types_


def test_every_error_code_is_documented_with_the_status_rest_answers() -> None:
    """The error table is what clients branch on; its HTTP column must be what api.py sends."""
    rows = re.findall(r"^\| `(\w+)` \| (\d{3}) \|", DOC_TEXT, re.MULTILINE)
    documented = {code: int(status) for code, status in rows}
    assert documented == {code.value: status for code, status in HTTP_STATUS.items()}
    assert set(documented) == {code.value for code in ErrorCode}


def rest_routes() -> dict[str, web.AbstractRoute]:
    """The server's routes by `METHOD /path/{param}`, as server/routes.py wires them."""
    app = web.Application()
    setup_routes(app, Settings(static_dir=DOCS.parent / "no-static-dir"))
    found = {}
    for route in app.router.routes():
        if route.method != "HEAD" and route.resource is not None:  # HEAD: aiohttp's, per GET
            found[f"{route.method} {route.resource.canonical}"] = route
    return found


def test_every_rest_route_is_documented_and_nothing_else() -> None:
    """Each route has a `###` section headed by its method and path, and no section names
    a route the server does not have (a renamed path would leave a stale one behind)."""
    routes = set(rest_routes())
    headings = [line for line in DOC_TEXT.splitlines() if line.startswith("### ")]
    documented = {
        f"{method} {path}"
        for line in headings
        for method, path in re.findall(r"`(GET|POST|PUT|PATCH|DELETE) (/[^`?\s]*)", line)
    }
    assert "GET /ws" in routes
    assert documented == routes - {"GET /ws"}  # the WebSocket has the rest of the page


def test_operational_routes_run_no_command() -> None:
    """Health, readiness and metrics are for balancers and scrapers: they must not be
    mistaken for (or turn into) a command route, which would need a message."""
    operational = {"GET /healthz", "GET /readyz", "GET /metrics"}
    routes = rest_routes()
    assert operational <= set(routes)
    for where in operational:
        assert not getattr(routes[where].handler, "__name__", "").endswith("_endpoint"), where


def test_every_metric_is_documented_with_its_type() -> None:
    """Dashboards and alerts are written against the page's metric table."""
    documented = dict(re.findall(r"^\| `(slotcast_\w+)` \| (\w+) \|", DOC_TEXT, re.MULTILINE))
    families = list(Metrics().registry.collect())
    exported = {
        family.name + ("_total" if family.type == "counter" else ""): family.type
        for family in families
        if family.name.startswith("slotcast_")
    }
    assert documented == exported
    # prometheus_client's own (process_*, python_*) are named in the page, by prefix.
    others = {family.name.split("_", 1)[0] for family in families} - {"slotcast"}
    assert others == {"process", "python"}
    for prefix in others:
        assert f"`{prefix}_*`" in DOC_TEXT


def test_every_close_code_the_server_uses_is_documented() -> None:
    """Clients branch on close codes to decide how to reconnect."""
    section = DOC_TEXT.split("\n## Close codes\n", 1)[1].split("\n## ", 1)[0]
    documented = {int(code) for code in re.findall(r"^\| (\d{4}) \|", section, re.MULTILINE)}
    used = {
        WSCloseCode.GOING_AWAY,  # shutdown, after the drain
        WSCloseCode.MESSAGE_TOO_BIG,  # aiohttp's reader, over 4x the frame limit
        CLOSE_PROTOCOL_ERROR,  # aiohttp's reader, a frame it cannot parse (server.ws)
        CLOSE_INTERNAL_ERROR,  # the greeting failed after the upgrade (server.ws)
        CLOSE_SERVICE_RESTART,  # the drain, after a `reconnect` notice
        CLOSE_SLOW_CONSUMER,
        CLOSE_IDLE,  # an anonymous connection in no room (server.guard)
        CLOSE_RATE_LIMITED,  # kept sending while refused for rate (server.limits)
    }
    assert documented == {int(code) for code in used}


def test_every_command_has_one_rest_route_whose_path_names_its_fields() -> None:
    """A path parameter that is not a field of the message would be dropped silently."""
    seen: list[str] = []
    for where, route in rest_routes().items():
        name = getattr(route.handler, "__name__", "")
        if not name.endswith("_endpoint"):
            continue
        cls: type[Any] = CLIENT_MESSAGES[name.removesuffix("_endpoint")]
        seen.append(cls.TYPE)
        params = set(re.findall(r"\{(\w+)\}", where))
        assert params <= {f.name for f in dataclasses.fields(cls)}, where
    assert sorted(seen) == sorted(cls.TYPE for cls in REGISTRY)


def test_every_client_message_is_a_session_handler_or_a_registered_command() -> None:
    """A message with neither would decode, then fail as `internal` on every socket."""
    handled = set(HANDLERS)
    registered = set(REGISTRY)
    assert handled.isdisjoint(registered)
    assert handled | registered == set(CLIENT_MESSAGES.values())


def test_a_command_takes_an_idempotency_key_exactly_when_the_registry_says() -> None:
    """REST copies `Idempotency-Key` into the message only for idempotent commands."""
    for cls, command in REGISTRY.items():
        fields = {f.name for f in dataclasses.fields(cls)}
        assert command.idempotent == ("idempotency_key" in fields), cls.TYPE
