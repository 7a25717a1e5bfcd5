"""Incoming audience transitions: the canonical JSON line and Lytics audience-trigger payloads.

Parsing never raises: every input becomes transitions or a counted rejection with a reason
(DESIGN.md invariant 6). Shapes are in DESIGN.md §5 and ``shared/lytics/INPUTS.md``.

Event times decide which change wins (last writer wins per user and audience, invariant 3), so a
time is only accepted inside a sane window (:data:`MIN_EVENT_MS`, :data:`MAX_FUTURE_MS`): one event
stamped far in the future would make every later real change for that user stale until then. Every
accepted time is an integer number of milliseconds well below 2**53, so the buffer's Lua script
(whose numbers are doubles) compares it exactly.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from worker import jsonio

# Reasons a payload is rejected before routing; operators see counts by reason.
NOT_JSON = "not_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_AUDIENCE = "missing_audience"
BAD_EVENT = "bad_event"
#: The time cannot be read as a time at all (wrong type, syntax, NaN, a number too large for any unit).
BAD_TIMESTAMP = "bad_timestamp"
#: The time reads fine but lies more than :data:`MAX_FUTURE_MS` ahead of our clock.
TIMESTAMP_IN_FUTURE = "timestamp_in_future"
#: The time reads fine but lies before :data:`MIN_EVENT_MS` (2000-01-01).
TIMESTAMP_TOO_OLD = "timestamp_too_old"
MISSING_USER = "missing_user"
NO_SEGMENT_EVENTS = "no_segment_events"
#: Arrays and CloudEvents envelopes nested deeper than :data:`MAX_ENVELOPE_DEPTH`.
NESTED_TOO_DEEPLY = "nested_too_deeply"
#: Last resort: reading the payload failed in a way nothing above foresaw (counted, never raised).
UNREADABLE = "unreadable"

EVENTS = ("enter", "exit")

#: The earliest event time accepted: 2000-01-01T00:00:00Z. No audience transition this service
#: exports predates it, so an earlier time is a mistake (a unit mix-up, a default date, a typo);
#: refusing it with a reason shows the producer's bug instead of hiding it in stale counts.
MIN_EVENT_MS: Final = 946_684_800_000
#: How far ahead of our clock an event time may be: one day, which covers clock skew and a wrong
#: time zone (offsets reach 14 hours). Last writer wins by event time, so anything later would make
#: every real change for that user and audience stale until that time comes (``9999-12-31`` or a
#: microsecond epoch read as milliseconds: forever).
MAX_FUTURE_MS: Final = 86_400_000
#: Epoch numbers: the unit is inferred from the magnitude. Every band's upper edge is the year 5138
#: in its unit and the next band starts at 1973 in its own, so the edges fall far outside the
#: accepted window and no accepted time is ambiguous. A number at or above the last edge is no time
#: in any unit. (Upper edge, numerator and denominator of the conversion to ms, unit.)
EPOCH_UNITS: Final = (
    (10**11, 1000, 1, "seconds"),
    (10**14, 1, 1, "milliseconds"),
    (10**17, 1, 1000, "microseconds"),
    (10**20, 1, 1_000_000, "nanoseconds"),
)
#: Where the milliseconds band of EPOCH_UNITS ends.
_MS_BAND_END: Final = EPOCH_UNITS[1][0]
#: Numeric strings: ASCII digits with an optional fraction (``str.isdigit`` also accepts ``"²"``).
_EPOCH_TEXT = re.compile(r"[0-9]{1,20}(?:\.[0-9]{1,12})?", re.ASCII)
#: Longer strings are no timestamp (ISO-8601 with nanoseconds and an offset takes 35 characters).
MAX_TIME_TEXT = 64
#: Lists and CloudEvents envelopes nest at most this deep: a Lytics batch is an array of triggers,
#: a CloudEvents envelope may carry one more array. The bound keeps parsing off Python's recursion limit.
MAX_ENVELOPE_DEPTH = 8

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_ONE_MS = dt.timedelta(milliseconds=1)


@dataclass(slots=True)
class Transition:
    """A user entering (``enter=True``) or exiting one audience at ``at_ms`` (epoch ms).

    Not frozen: one is built per transition, and a frozen dataclass's ``__init__`` (one
    ``object.__setattr__`` per field) cost about 7k instructions against 2k. Nothing assigns to one.
    """

    audience: str
    enter: bool
    at_ms: int
    user: Mapping[str, Any] = field(repr=False)  # profile data: kept out of reprs and logs


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: str
    detail: str


def shown(value: Any) -> str:
    """A short, safe rendering of an input value for a rejection's detail.

    Never the whole value: it may be megabytes, nested a thousand levels (``repr`` would recurse), or
    an integer too long for ``repr`` to convert.
    """
    if value is None or isinstance(value, bool | float):
        return repr(value)
    if isinstance(value, int):
        if abs(value) < 10**30:
            return repr(value)
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    if isinstance(value, str):
        return repr(value[:60]) + ("..." if len(value) > 60 else "")
    kind = {"dict": "an object", "list": "an array"}.get(type(value).__name__)
    return kind or f"a {type(value).__name__}"


def _ms_from_datetime(parsed: dt.datetime) -> int:
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return (parsed - _EPOCH) // _ONE_MS


def _number_ms(value: int | float) -> int | Rejected:
    """Epoch ms of a finite number by its magnitude's unit, or why not (the window is checked later)."""
    if value < 0:
        return Rejected(TIMESTAMP_TOO_OLD, f"epoch number {shown(value)} is before 1970")
    for edge, num, den, _unit in EPOCH_UNITS:
        if value < edge:
            if isinstance(value, int):
                return value * num // den
            return math.floor(value * num / den)
    return Rejected(
        BAD_TIMESTAMP,
        f"epoch number {shown(value)} is too large for seconds, milliseconds, microseconds or nanoseconds",
    )


def _read_ms(value: Any) -> int | Rejected:
    """Epoch ms of a time value, before the window check."""
    if isinstance(value, bool):
        return Rejected(BAD_TIMESTAMP, f"a time must be an ISO-8601 string or epoch number, got {value!r}")
    if isinstance(value, int):
        return _number_ms(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return Rejected(BAD_TIMESTAMP, f"epoch number {shown(value)} is not finite")
        return _number_ms(value)
    if not isinstance(value, str):
        return Rejected(
            BAD_TIMESTAMP, f"a time must be an ISO-8601 string or epoch number, got {shown(value)}"
        )
    text = value.strip()
    if not text or len(text) > MAX_TIME_TEXT:
        return Rejected(BAD_TIMESTAMP, f"{shown(value)} is not an ISO-8601 time or epoch number")
    if _EPOCH_TEXT.fullmatch(text):
        whole, _, fraction = text.partition(".")
        return _number_ms(float(text) if fraction else int(whole))
    iso = text.replace("Z", "+00:00").replace("z", "+00:00")
    # Python 3.11 parses at most 6 fractional digits; Lytics sends nanoseconds.
    if "." in iso:
        head, _, rest = iso.partition(".")
        digits = len(rest) - len(rest.lstrip("0123456789"))
        iso = head + "." + rest[: min(digits, 6)] + rest[digits:]
    try:
        return _ms_from_datetime(dt.datetime.fromisoformat(iso))
    except (ValueError, OverflowError):
        return Rejected(BAD_TIMESTAMP, f"{shown(value)} is not an ISO-8601 time or epoch number")


def _iso(ms: int) -> str:
    return (_EPOCH + ms * _ONE_MS).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_time_ms(value: Any, now_ms: int | None = None) -> int | Rejected:
    """Epoch ms of an event time, or why it cannot be used.

    Accepts an ISO-8601 string (any offset; naive means UTC) or an epoch number (or a string of ASCII
    digits) in seconds, milliseconds, microseconds or nanoseconds, told apart by magnitude
    (:data:`EPOCH_UNITS`). The result lies in [:data:`MIN_EVENT_MS`, ``now_ms`` +
    :data:`MAX_FUTURE_MS`] (``now_ms`` defaults to the clock); anything else is a :class:`Rejected`
    (:data:`BAD_TIMESTAMP`, :data:`TIMESTAMP_TOO_OLD` or :data:`TIMESTAMP_IN_FUTURE`). Never raises.
    """
    now = now_ms if now_ms is not None else int(time.time() * 1000)
    if type(value) is int and MIN_EVENT_MS <= value <= now + MAX_FUTURE_MS and value < _MS_BAND_END:
        return value  # epoch ms inside the window, the usual case: _read_ms would return it as is
    try:
        ms = _read_ms(value)
    except (ValueError, ArithmeticError):  # last resort: a value nothing above foresaw
        return Rejected(BAD_TIMESTAMP, f"{shown(value)} is not an ISO-8601 time or epoch number")
    if isinstance(ms, Rejected):
        return ms
    if ms < MIN_EVENT_MS:
        return Rejected(TIMESTAMP_TOO_OLD, f"time {shown(value)} is before 2000-01-01")
    if ms > now + MAX_FUTURE_MS:
        return Rejected(
            TIMESTAMP_IN_FUTURE,
            f"time {shown(value)} ({_iso(ms)}) is more than a day ahead of now ({_iso(now)})",
        )
    return ms


def parse_time_ms(value: Any, now_ms: int | None = None) -> int | None:
    """:func:`read_time_ms` without the reason: epoch ms, or None when the time cannot be used."""
    ms = read_time_ms(value, now_ms)
    return ms if isinstance(ms, int) else None


def parse_line(line: str | bytes, received_ms: int | None = None) -> Iterator[Transition | Rejected]:
    """Transitions in one JSON text (a line of JSONL or a webhook body). Never raises."""
    try:
        # Lenient (integers beyond 64 bits, NaN are read) rather than rejecting a whole event for one
        # odd value.
        payload = jsonio.loads(line)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer too long to convert
        yield Rejected(NOT_JSON, f"not valid JSON: {exc}")
        return
    except RecursionError:  # jsonio turns deep nesting into a decode error; kept as a last resort
        yield Rejected(NOT_JSON, "not valid JSON: nested too deeply")
        return
    yield from parse_payload(payload, received_ms)


def parse_payload(payload: Any, received_ms: int | None = None) -> Iterator[Transition | Rejected]:
    """Transitions in a decoded payload: canonical, Lytics trigger, a CloudEvents envelope or a list.

    Never raises: what cannot be used is a :class:`Rejected` with a reason, and the rest goes on.
    """
    now = int(time.time() * 1000)
    received = received_ms if received_ms is not None else now
    try:
        yield from _payload(payload, received, now, 0)
    except Exception as exc:  # last resort: counted like any unusable input, never a crash
        yield Rejected(UNREADABLE, f"the payload could not be read ({type(exc).__name__})")


def _payload(payload: Any, received: int, now: int, depth: int) -> Iterator[Transition | Rejected]:
    if depth > MAX_ENVELOPE_DEPTH:
        yield Rejected(
            NESTED_TOO_DEEPLY, f"arrays and envelopes are nested more than {MAX_ENVELOPE_DEPTH} deep"
        )
        return
    if isinstance(payload, list):
        for item in payload:
            yield from _payload(item, received, now, depth + 1)
        return
    if not isinstance(payload, dict):
        yield Rejected(NOT_AN_OBJECT, f"expected a JSON object, got {shown(payload)}")
        return
    if "specversion" in payload and isinstance(payload.get("data"), dict | list):
        yield from _payload(payload["data"], received, now, depth + 1)
        return
    data = payload.get("data")
    if isinstance(data, dict) and "segment_events" in data:
        yield from _lytics(data, received, now)
        return
    if "segment_events" in payload:  # a trigger body without the outer envelope
        yield from _lytics(payload, received, now)
        return
    yield _canonical(payload, now)


def _canonical(obj: dict[str, Any], now: int) -> Transition | Rejected:
    audience = obj.get("audience")
    if not isinstance(audience, str) or not audience.strip():
        return Rejected(MISSING_AUDIENCE, "'audience' must be a non-empty string")
    event = obj.get("event")
    if not isinstance(event, str) or event not in EVENTS:
        return Rejected(BAD_EVENT, f"'event' must be 'enter' or 'exit', got {shown(event)}")
    user = obj.get("user")
    if not isinstance(user, dict) or not user:
        return Rejected(MISSING_USER, "'user' must be a non-empty object of profile fields")
    at = read_time_ms(obj.get("at"), now)
    if isinstance(at, Rejected):
        return Rejected(at.reason, f"'at': {at.detail}")
    return Transition(audience.strip(), event == "enter", at, user)


#: Where a segment event's time may be, in order; the first is the event's own name (``enter``/``exit``).
_EVENT_TIME_KEYS = ("timestamp", "at", "time")


def _lytics(data: dict[str, Any], received_ms: int, now: int) -> Iterator[Transition | Rejected]:
    events = data.get("segment_events")
    if not isinstance(events, list) or not events:
        yield Rejected(NO_SEGMENT_EVENTS, "'segment_events' must be a non-empty list")
        return
    user = {k: v for k, v in data.items() if k != "segment_events"}
    if not user:
        yield Rejected(MISSING_USER, "the trigger carries no profile fields")
        return
    for ev in events:
        if not isinstance(ev, dict):
            yield Rejected(NOT_AN_OBJECT, "a segment event must be an object")
            continue
        slug = ev.get("slug")
        if not isinstance(slug, str) or not slug.strip():
            yield Rejected(MISSING_AUDIENCE, "segment event has no 'slug'")
            continue
        kind = ev.get("event")
        if not isinstance(kind, str) or kind not in EVENTS:
            yield Rejected(BAD_EVENT, f"segment event 'event' must be 'enter' or 'exit', got {shown(kind)}")
            continue
        # The time key is named after the event ("enter"/"exit"); fall back to other names, then
        # to the time we received it (documented: ordering then follows arrival). A time that is
        # there but unusable refuses the event rather than falling back to arrival.
        raw_time = next(
            (
                ev[key]
                for key in (kind, *_EVENT_TIME_KEYS)
                if ev.get(key) is not None and not (isinstance(ev[key], str) and not ev[key].strip())
            ),
            None,
        )
        at = read_time_ms(raw_time, now) if raw_time is not None else received_ms
        if isinstance(at, Rejected):
            yield Rejected(at.reason, f"segment event time: {at.detail}")
            continue
        yield Transition(slug.strip(), kind == "enter", at, user)
