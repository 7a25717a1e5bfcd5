"""Parsing of canonical transitions and Lytics audience-trigger payloads."""

from __future__ import annotations

import json

from worker.mapping.transitions import (
    BAD_EVENT,
    BAD_TIMESTAMP,
    MISSING_AUDIENCE,
    MISSING_USER,
    NOT_AN_OBJECT,
    NOT_JSON,
    Rejected,
    Transition,
    parse_line,
    parse_time_ms,
)


def parse(obj: object) -> list[Transition | Rejected]:
    return list(parse_line(json.dumps(obj), received_ms=42))


def test_canonical_transition_is_parsed() -> None:
    [t] = parse(
        {"audience": "vip", "event": "exit", "at": "2026-11-26T17:00:00Z", "user": {"email": "a@x.io"}}
    )
    assert isinstance(t, Transition)
    assert (t.audience, t.enter, t.at_ms, dict(t.user)) == ("vip", False, 1795712400000, {"email": "a@x.io"})


def test_lytics_trigger_yields_one_transition_per_segment_event() -> None:
    body = {
        "id": "7076027172059065053",
        "data": {
            "email": "beth@x.io",
            "first_name": "Beth",
            "segment_events": [
                {
                    "id": "4297",
                    "event": "enter",
                    "slug": "emailzz5",
                    "enter": "2020-10-14T13:27:33.916374949-07:00",
                },
                {"id": "4298", "event": "exit", "slug": "lapsed", "exit": "2020-10-14T13:27:34Z"},
            ],
        },
        "meta": {},
    }
    first, second = parse(body)
    assert isinstance(first, Transition) and isinstance(second, Transition)
    assert (first.audience, first.enter, first.at_ms) == ("emailzz5", True, 1602707253916)
    assert (second.audience, second.enter) == ("lapsed", False)
    assert dict(first.user) == {"email": "beth@x.io", "first_name": "Beth"}


def test_lytics_event_without_time_uses_arrival_time() -> None:
    [t] = parse({"data": {"email": "a@x.io", "segment_events": [{"event": "enter", "slug": "vip"}]}})
    assert isinstance(t, Transition) and t.at_ms == 42


def test_cloudevents_envelope_and_batched_arrays_are_unwrapped() -> None:
    inner = {"audience": "vip", "event": "enter", "at": 1700000000, "user": {"email": "a@x.io"}}
    out = parse({"specversion": "1.0", "type": "com.lytics.audience.user.event", "data": [inner, inner]})
    assert [type(t) for t in out] == [Transition, Transition]
    assert out[0].at_ms == 1_700_000_000_000  # type: ignore[union-attr]


def test_bad_inputs_are_rejected_with_reasons_never_raised() -> None:
    cases = {
        NOT_JSON: "{nope",
        NOT_AN_OBJECT: "[1]",
        MISSING_AUDIENCE: json.dumps({"event": "enter", "at": 1, "user": {"a": 1}}),
        BAD_EVENT: json.dumps({"audience": "v", "event": "join", "at": 1, "user": {"a": 1}}),
        BAD_TIMESTAMP: json.dumps({"audience": "v", "event": "enter", "at": "yesterday", "user": {"a": 1}}),
        MISSING_USER: json.dumps({"audience": "v", "event": "enter", "at": 1, "user": {}}),
    }
    for reason, line in cases.items():
        [out] = list(parse_line(line))
        assert isinstance(out, Rejected) and out.reason == reason, (reason, out)


def test_time_parsing_accepts_iso_offsets_and_epochs() -> None:
    assert parse_time_ms("2026-11-26T17:00:00+01:00") == 1795708800000
    assert parse_time_ms("2026-11-26T17:00:00") == 1795712400000  # naive means UTC
    assert parse_time_ms(1795712400) == 1795712400000
    assert parse_time_ms(1795712400123) == 1795712400123
    assert parse_time_ms("1795712400") == 1795712400000
    assert parse_time_ms(True) is None
    assert parse_time_ms(float("nan")) is None
    assert parse_time_ms("") is None
