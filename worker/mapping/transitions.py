"""Incoming audience transitions: the canonical JSON line and Lytics audience-trigger payloads.

Parsing never raises: every input becomes transitions or a counted rejection with a reason
(DESIGN.md invariant 6). Shapes are in DESIGN.md §5 and ``shared/lytics/INPUTS.md``.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from worker import jsonio

# Reasons a payload is rejected before routing; operators see counts by reason.
NOT_JSON = "not_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_AUDIENCE = "missing_audience"
BAD_EVENT = "bad_event"
BAD_TIMESTAMP = "bad_timestamp"
MISSING_USER = "missing_user"
NO_SEGMENT_EVENTS = "no_segment_events"

EVENTS = ("enter", "exit")


@dataclass(frozen=True, slots=True)
class Transition:
    """A user entering (``enter=True``) or exiting one audience at ``at_ms`` (epoch ms)."""

    audience: str
    enter: bool
    at_ms: int
    user: Mapping[str, Any] = field(repr=False)  # profile data: kept out of reprs and logs


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: str
    detail: str


def parse_time_ms(value: Any) -> int | None:
    """Epoch ms from an ISO-8601 string (any offset; naive means UTC) or epoch seconds/ms number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        if not math.isfinite(value) or value <= 0:
            return None
        return int(value if value > 1e11 else value * 1000)
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    if text.replace(".", "", 1).isdigit():
        return parse_time_ms(float(text))
    text = text.replace("Z", "+00:00").replace("z", "+00:00")
    # Python 3.11 parses at most 6 fractional digits; Lytics sends nanoseconds.
    if "." in text:
        head, _, rest = text.partition(".")
        digits = len(rest) - len(rest.lstrip("0123456789"))
        text = head + "." + rest[: min(digits, 6)] + rest[digits:]
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return int(parsed.timestamp() * 1000)


def parse_line(line: str | bytes, received_ms: int | None = None) -> Iterator[Transition | Rejected]:
    """Transitions in one JSON text (a line of JSONL or a webhook body)."""
    try:
        # Lenient (integers beyond 64 bits, NaN are read) rather than rejecting a whole event for one
        # odd value.
        payload = jsonio.loads(line)
    except ValueError as exc:
        yield Rejected(NOT_JSON, f"not valid JSON: {exc}")
        return
    yield from parse_payload(payload, received_ms)


def parse_payload(payload: Any, received_ms: int | None = None) -> Iterator[Transition | Rejected]:
    """Transitions in a decoded payload: canonical, Lytics trigger, a CloudEvents envelope or a list."""
    received = received_ms if received_ms is not None else int(time.time() * 1000)
    if isinstance(payload, list):
        for item in payload:
            yield from parse_payload(item, received)
        return
    if not isinstance(payload, dict):
        yield Rejected(NOT_AN_OBJECT, f"expected a JSON object, got {type(payload).__name__}")
        return
    if "specversion" in payload and isinstance(payload.get("data"), dict | list):
        yield from parse_payload(payload["data"], received)
        return
    data = payload.get("data")
    if isinstance(data, dict) and "segment_events" in data:
        yield from _lytics(data, received)
        return
    if "segment_events" in payload:  # a trigger body without the outer envelope
        yield from _lytics(payload, received)
        return
    yield _canonical(payload)


def _canonical(obj: dict[str, Any]) -> Transition | Rejected:
    audience = obj.get("audience")
    if not isinstance(audience, str) or not audience.strip():
        return Rejected(MISSING_AUDIENCE, "'audience' must be a non-empty string")
    event = obj.get("event")
    if event not in EVENTS:
        return Rejected(BAD_EVENT, f"'event' must be 'enter' or 'exit', got {event!r}")
    at = parse_time_ms(obj.get("at"))
    if at is None:
        return Rejected(
            BAD_TIMESTAMP, f"'at' must be an ISO-8601 time or epoch number, got {obj.get('at')!r}"
        )
    user = obj.get("user")
    if not isinstance(user, dict) or not user:
        return Rejected(MISSING_USER, "'user' must be a non-empty object of profile fields")
    return Transition(audience.strip(), event == "enter", at, user)


def _lytics(data: dict[str, Any], received_ms: int) -> Iterator[Transition | Rejected]:
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
        if kind not in EVENTS:
            yield Rejected(BAD_EVENT, f"segment event 'event' must be 'enter' or 'exit', got {kind!r}")
            continue
        # The time key is named after the event ("enter"/"exit"); fall back to other names, then
        # to the time we received it (documented: ordering then follows arrival).
        raw_time = ev.get(kind) or ev.get("timestamp") or ev.get("at") or ev.get("time")
        at = parse_time_ms(raw_time) if raw_time is not None else received_ms
        if at is None:
            yield Rejected(BAD_TIMESTAMP, f"segment event time {raw_time!r} is not ISO-8601")
            continue
        yield Transition(slug.strip(), kind == "enter", at, user)
