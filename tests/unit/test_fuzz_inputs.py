"""Fuzzing every input surface: ingest lines, webhook bodies, backfill file lines, job files.

Whatever arrives (invalid UTF-8, deep nesting, huge numbers, NaN/Infinity, duplicate keys, odd or
very long slugs, thousands of fields, non-string identifiers, Unicode digits, times far ahead or in
other units), the properties are:

* no exception escapes other than the documented refusals (``FileBackfillError`` for a profile
  without ``--audience``, ``JobConfigError`` for a job file);
* the webhook never answers 5xx;
* every refusal carries a non-empty reason;
* good lines next to bad ones are still accepted, and counted.

Defects found here are pinned by plain examples in ``test_poison.py``. Runs are derandomized (the
same examples every run, so CI is stable) and small (``max_examples``), a few seconds in all;
``FUZZ_SCALE`` (below) turns them into a longer exploration.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from worker.backfill import steps as backfill
from worker.backfill.steps import FileBackfillError, FileReport
from worker.mapping.transitions import (
    BAD_TIMESTAMP,
    MAX_FUTURE_MS,
    MIN_EVENT_MS,
    TIMESTAMP_IN_FUTURE,
    TIMESTAMP_TOO_OLD,
    Rejected,
    Transition,
    parse_line,
    parse_payload,
    read_time_ms,
)
from worker.pipeline.buffer import JobBuffer
from worker.pipeline.ingest import ingest_lines
from worker.setup.jobconfig import (
    ExportJobConfig,
    JobConfigError,
    JobState,
    load_job_config,
    parse_job_config,
)
from worker.setup.jobs import ExportJob, JobStore
from worker.store import keys
from worker.webhook.receiver import WebhookSettings, create_app

#: ``FUZZ_SCALE=20 pytest tests/unit/test_fuzz_inputs.py`` explores: 20 times the examples, new ones
#: each run. The default (1) runs the same small set every time, in a few seconds.
SCALE = int(os.environ.get("FUZZ_SCALE") or 1)


def examples(n: int) -> int:
    return n * SCALE


FUZZ = settings(
    deadline=None,
    derandomize=SCALE == 1,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
AT = "2026-11-26T17:00:00Z"
AT_MS = 1_795_712_400_000
TIME_REASONS = {BAD_TIMESTAMP, TIMESTAMP_TOO_OLD, TIMESTAMP_IN_FUTURE}


# --- strategies ------------------------------------------------------------------------------------------
UNICODE_DIGITS = st.text(
    alphabet=st.sampled_from(
        "0123456789²³¹⁰⁴⁵⁶⁷⁸⁹\u0660\u0663\u06f5\u0966\uff11\uff19\U0001d7d9\u2460\u00bd.-+:TZ "
    ),
    min_size=1,
    max_size=24,
)
EPOCHS = st.integers(MIN_EVENT_MS, AT_MS).flatmap(
    lambda ms: st.sampled_from(
        [ms // 1000, ms, ms * 1000, ms * 1_000_000, ms / 1000, str(ms // 1000), str(ms)]
    )
)
ISO_TIMES = st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()) | st.sampled_from(
    ["9999-12-31T23:59:59Z", "0001-01-01T00:00:00+14:00", "2026-11-26T17:00:00.123456789-07:00", "2026-W48-4"]
)
ODD_NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(10**300), 10**300),
    st.sampled_from([1e300, -1e300, 2**53, 2**63, 2**64 + 1, 10**19, 10**20, 0, -1, 0.5, 1e-300]),
)
TIMES = st.one_of(
    EPOCHS,
    ISO_TIMES,
    ODD_NUMBERS,
    UNICODE_DIGITS,
    st.text(max_size=40),
    st.booleans(),
    st.none(),
    st.just([AT]),
)
ODD_TEXT = st.one_of(
    st.text(max_size=30),
    st.text(
        alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF) | st.characters(), max_size=10
    ),
    st.sampled_from(["vip", " vip ", "VIP", "vip\t", "v|p", "a" * 5000, "", "\x00", "\ud800", "lapsed"]),
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**40), 10**40),
    st.floats(allow_nan=True, allow_infinity=True),
    ODD_TEXT,
)
JSONISH = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ODD_TEXT, inner, max_size=4),
    max_leaves=12,
)
SLUGS = st.one_of(st.sampled_from(["vip", "lapsed", " vip ", "vip"]), ODD_TEXT, JSONISH)
PROFILES = st.fixed_dictionaries(
    {"email": st.one_of(st.just("odd@x.io"), ODD_TEXT, SCALARS)},
    optional={"phone": SCALARS, "first_name": JSONISH, "nested": JSONISH},
)
#: Thousands of fields: rarer than the rest (one in ten), since each costs milliseconds to serialize.
MANY_FIELDS = st.builds(
    lambda n: {f"f{i}": i for i in range(n)} | {"email": "many@x.io"}, st.integers(1000, 3000)
)
USERS = st.one_of(*[PROFILES] * 6, JSONISH, JSONISH, JSONISH, MANY_FIELDS)
EVENTS = st.one_of(st.sampled_from(["enter", "exit"]), ODD_TEXT, JSONISH)


@st.composite
def canonical(draw: st.DrawFn) -> dict[str, Any]:
    obj = {"audience": draw(SLUGS), "event": draw(EVENTS), "at": draw(TIMES), "user": draw(USERS)}
    for key in draw(st.sets(st.sampled_from(list(obj)), max_size=2)):
        del obj[key]
    return obj


@st.composite
def lytics(draw: st.DrawFn) -> dict[str, Any]:
    event = draw(EVENTS)
    segment: dict[str, Any] = {"id": "4297", "slug": draw(SLUGS), "event": event}
    time_key = event if isinstance(event, str) else "enter"
    if draw(st.booleans()):
        segment[time_key] = draw(TIMES)
    user = draw(USERS)
    data = dict(user) if isinstance(user, dict) else {"email": "x@x.io"}
    data["segment_events"] = draw(
        st.one_of(st.just([segment]), st.lists(st.one_of(st.just(segment), JSONISH)))
    )
    return {"id": "1", "data": data} if draw(st.booleans()) else data


@st.composite
def payloads(draw: st.DrawFn) -> Any:
    one = st.one_of(canonical(), lytics(), JSONISH)
    item = draw(one)
    wrap = draw(st.sampled_from(["none", "list", "cloudevents", "deep"]))
    if wrap == "list":
        return [item, *draw(st.lists(one, max_size=3))]
    if wrap == "cloudevents":
        return {"specversion": "1.0", "type": "com.lytics.audience.user.event", "data": item}
    if wrap == "deep":
        for _ in range(draw(st.integers(1, 40))):
            item = [item] if draw(st.booleans()) else {"specversion": "1.0", "data": item}
    return item


def dumps(payload: Any, ascii_only: bool) -> bytes:
    """JSON text for ``payload``; NaN and Infinity come out as the tokens producers send."""
    text = json.dumps(payload, ensure_ascii=ascii_only)
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate becomes invalid UTF-8


@st.composite
def texts(draw: st.DrawFn) -> bytes:
    """One line or body as bytes: a serialized payload, maybe mangled, or raw junk."""
    kind = draw(
        st.sampled_from(["payload", "payload", "payload", "mangled", "dupes", "deep", "bigint", "junk"])
    )
    if kind == "junk":
        return draw(st.binary(max_size=200))
    if kind == "deep":
        depth = draw(st.sampled_from([100, 1000, 1022, 1023, 1024, 1025, 5000]))
        opener, closer = draw(
            st.sampled_from([("[", "]"), ('{"a":', "}"), ('{"specversion":"1","data":', "}")])
        )
        return (
            opener * depth
            + draw(st.sampled_from(["1", "{}", "[]", json.dumps({"audience": "vip"})]))
            + closer * depth
        ).encode()
    if kind == "bigint":
        digits = draw(st.sampled_from([20, 300, 4300, 4301, 10_000]))
        return (
            '{"audience": "vip", "event": "enter", "at": ' + "7" * digits + ', "user": {"email": "b@x.io"}}'
        ).encode()
    if kind == "dupes":
        audience = json.dumps(draw(st.sampled_from(["vip", "lapsed", 5])))
        at = json.dumps(draw(TIMES))
        text = f'{{"audience": "vip", "audience": {audience}, "event": "enter", "at": "{AT}", "at": {at}, '
        return (text + '"user": {"email": "d@x.io"}}').encode("utf-8", "surrogatepass")
    raw = dumps(draw(payloads()), draw(st.booleans()))
    if kind == "mangled" and raw:
        cut = draw(st.integers(0, len(raw) - 1))
        raw = raw[:cut] + draw(st.binary(min_size=1, max_size=3)) + raw[cut + 1 :]
    return raw


def good_line(i: int, audience: str = "vip") -> bytes:
    return json.dumps(
        {"audience": audience, "event": "enter", "at": AT_MS + i, "user": {"email": f"good{i}@ok.io"}}
    ).encode()


def check_items(items: list[Transition | Rejected], now_ms: int) -> None:
    for item in items:
        if isinstance(item, Rejected):
            assert isinstance(item.reason, str) and item.reason, item
            assert isinstance(item.detail, str) and item.detail, item
            item.detail.encode("utf-8")  # shown safely: lone surrogates are escaped
            assert len(item.detail) < 1000
        else:
            assert isinstance(item, Transition)
            assert isinstance(item.audience, str) and item.audience == item.audience.strip() and item.audience
            assert type(item.at_ms) is int and MIN_EVENT_MS <= item.at_ms < 2**53
            assert item.at_ms <= now_ms + MAX_FUTURE_MS + 60_000
            assert isinstance(item.user, dict) and item.user


# --- times ------------------------------------------------------------------------------------------------
@settings(FUZZ, max_examples=examples(400))
@given(TIMES)
def test_any_time_value_is_a_time_in_the_window_or_a_reason(value: Any) -> None:
    out = read_time_ms(value, AT_MS)
    if isinstance(out, Rejected):
        assert out.reason in TIME_REASONS and out.detail
    else:
        assert type(out) is int and MIN_EVENT_MS <= out <= AT_MS + MAX_FUTURE_MS


@settings(FUZZ, max_examples=examples(200))
@given(st.integers(MIN_EVENT_MS, AT_MS + MAX_FUTURE_MS))
def test_every_epoch_unit_maps_to_the_same_millisecond(ms: int) -> None:
    for value in (ms, ms * 1000, ms * 1000 + 999, ms * 1_000_000 + 999_999, str(ms), str(ms * 1000)):
        assert read_time_ms(value, AT_MS) == ms, value
    assert read_time_ms(ms // 1000, AT_MS) == ms - ms % 1000


# --- ingest lines -----------------------------------------------------------------------------------------
@settings(FUZZ, max_examples=examples(250))
@given(texts())
def test_parse_line_never_raises_and_every_refusal_has_a_reason(raw: bytes) -> None:
    for line in (raw, raw.decode("utf-8", "surrogateescape")):
        check_items(list(parse_line(line, received_ms=AT_MS)), AT_MS)


@settings(FUZZ, max_examples=examples(150))
@given(payloads())
def test_parse_payload_never_raises_on_decoded_values(payload: Any) -> None:
    check_items(list(parse_payload(payload, received_ms=AT_MS)), AT_MS)


def _fresh_job() -> tuple[fakeredis.FakeRedis, JobStore, ExportJob]:
    client = fakeredis.FakeRedis()
    jobs = JobStore(client)
    config = parse_job_config(
        {
            "label": "fuzz",
            "authorization": "auth-1",
            "audiences": ["vip", "lapsed"],
            "identifier_mappings": {"email": "email", "phone": "phone"},
            "attribute_mappings": {"first_name": "firstName"},
            "custom_attributes": ["nested"],
        }
    )
    return client, jobs, jobs.create(config, state=JobState.RUNNING)


@settings(FUZZ, max_examples=examples(40))
@given(st.lists(texts(), min_size=1, max_size=6), st.randoms(use_true_random=False))
def test_ingest_never_fails_a_chunk_and_its_good_lines_arrive(bad: list[bytes], rnd: Any) -> None:
    client, jobs, job = _fresh_job()
    good = [good_line(i, rnd.choice(["vip", "lapsed"])) for i in range(3)]
    lines = [*bad, *good]
    rnd.shuffle(lines)
    expected = sum(len(list(parse_line(x))) for x in lines)
    report = ingest_lines(client, jobs, lines)
    assert report.received == expected
    assert all(reason for reason in report.rejected)
    for raw in good:
        line = json.loads(raw)
        got = JobBuffer(client, job.id).last_accepted([(line["user"]["email"], line["audience"])])[0]
        assert got == line["at"], line
    counters = {k.decode(): int(v) for k, v in client.hgetall(keys.ingest_status()).items()}
    assert counters["received"] == expected
    assert sum(v for k, v in counters.items() if k.startswith("rejected:")) == sum(report.rejected.values())
    client.close()


# --- webhook bodies ----------------------------------------------------------------------------------------
class _Dispatch:
    def drain(self, countdown: float = 0.0) -> None:
        pass


@pytest.fixture(scope="module")
def webhook() -> Iterator[TestClient]:
    client = TestClient(create_app(WebhookSettings(require_auth=False), fakeredis.FakeRedis(), _Dispatch()))
    with client:
        yield client


def _post(client: TestClient, body: bytes, ndjson: bool) -> Any:
    kind = "application/x-ndjson" if ndjson else "application/json"
    return client.post("/v1/transitions", content=body, headers={"Content-Type": kind})


def _check_answer(response: Any) -> dict[str, Any]:
    assert response.status_code < 500, response.text
    assert response.status_code in {202, 400, 413}, response.text
    answer: dict[str, Any] = response.json()
    if response.status_code == 202:
        assert answer["transitions"] >= 1 and all(reason for reason in answer["unusable"])
    else:
        assert answer["error"] and answer["message"]
    return answer


@settings(FUZZ, max_examples=examples(150))
@given(texts(), st.booleans())
def test_the_webhook_never_answers_5xx(webhook: TestClient, body: bytes, ndjson: bool) -> None:
    _check_answer(_post(webhook, body, ndjson))


@settings(FUZZ, max_examples=examples(60))
@given(st.lists(payloads(), min_size=1, max_size=5), st.integers(0, 5))
def test_the_webhook_accepts_the_good_events_of_a_batch_with_bad_ones(
    webhook: TestClient, bad: list[Any], position: int
) -> None:
    """Lytics does not retry a 400: one bad event must not take the good ones down with it."""
    good = {"audience": "vip", "event": "enter", "at": AT, "user": {"email": "good@ok.io"}}
    batch = [*bad]
    batch.insert(min(position, len(batch)), good)
    body = json.dumps(batch).encode("utf-8", "surrogatepass")
    expected = [x for x in parse_payload(batch) if isinstance(x, Transition)]
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:  # a lone surrogate: the body is not UTF-8 and refused whole (a clear 400)
        assert _check_answer(_post(webhook, body, False))["error"] == "invalid_json"
        return
    answer = _check_answer(_post(webhook, body, False))
    assert answer["transitions"] == len(expected) >= 1


@settings(FUZZ, max_examples=examples(60))
@given(st.lists(texts(), min_size=1, max_size=4))
def test_ndjson_with_a_good_line_never_gets_5xx(webhook: TestClient, bad: list[bytes]) -> None:
    lines = [b.replace(b"\n", b" ").replace(b"\r", b" ") for b in bad] + [good_line(0)]
    _check_answer(_post(webhook, b"\n".join(lines), True))


# --- backfill file lines ----------------------------------------------------------------------------------
LINES = st.one_of(
    texts(),
    texts().map(lambda b: b.decode("utf-8", "surrogateescape")),
    texts().map(lambda b: b.decode("latin-1")),
    st.builds(lambda e: json.dumps({"event": "enter", "audience": e}), JSONISH),
    st.sampled_from(["", "\n", "   ", "\r\n"]),
)


@settings(FUZZ, max_examples=examples(120))
@given(st.lists(LINES, max_size=6), st.sampled_from(["vip", None]), st.randoms(use_true_random=False))
def test_file_lines_skip_what_they_cannot_use_with_a_reason(
    lines: list[Any], audience: str | None, rnd: Any
) -> None:
    good = [json.dumps({"email": f"p{i}@ok.io", "first_name": "P"}) + "\n" for i in range(2)]
    good_transition = good_line(7).decode()
    mixed = [*lines, *(good if audience else []), good_transition]
    rnd.shuffle(mixed)
    report = FileReport()
    try:
        out = list(backfill.file_lines(mixed, ["vip", "lapsed"], audience, AT_MS, report))
    except FileBackfillError as exc:
        assert audience is None and "give --audience" in str(exc)
        return
    assert all(type(x) is bytes for x in out)
    assert len(out) == report.profiles + report.transitions
    assert report.skipped == sum(report.reasons.values()) and all(report.reasons)
    parsed = [t for x in out for t in parse_line(x, received_ms=AT_MS)]
    check_items(parsed, AT_MS)
    transitions = [t for t in parsed if isinstance(t, Transition)]
    emails = {t.user.get("email") for t in transitions if isinstance(t.user, dict)}
    assert "good7@ok.io" in emails
    if audience:
        assert {"p0@ok.io", "p1@ok.io"} <= emails
        profiles = [t for t in transitions if t.user.get("email") in {"p0@ok.io", "p1@ok.io"}]
        assert all(t.at_ms == AT_MS and t.audience == "vip" and t.enter for t in profiles)


# --- job configuration files ------------------------------------------------------------------------------
BASE_CONFIG: dict[str, Any] = {
    "label": "vip export",
    "authorization": "auth-1",
    "audiences": ["vip", "lapsed"],
    "identifier_mappings": {"email": "email", "phone_number": "phone"},
    "attribute_mappings": {"first_name": "firstName", "address.city": "city"},
    "custom_attributes": ["tier"],
    "extra_identifiers": ["loyalty_id"],
    "backfill": {"lytics_segments": {"vip": "4f6a2c0e"}, "page_size": 50},
    "batch_size": 100,
}
CONFIG_VALUES = st.one_of(
    JSONISH,
    st.lists(ODD_TEXT, max_size=120),
    st.dictionaries(ODD_TEXT, ODD_TEXT, max_size=5),
    st.sampled_from([10**30, -1, 0, 257, 1.5, float("nan"), "30", True, None, [], {}]),
)


@st.composite
def configs(draw: st.DrawFn) -> Any:
    data: dict[Any, Any] = dict(BASE_CONFIG)
    for key in draw(
        st.sets(st.sampled_from([*BASE_CONFIG, *ExportJobConfig.model_fields, "typo", 5, None]), max_size=3)
    ):
        if draw(st.booleans()):
            data.pop(key, None)
        else:
            data[key] = draw(CONFIG_VALUES)
    return data if draw(st.integers(0, 9)) else draw(JSONISH)


def _check_config(load: Any) -> None:
    try:
        config = load()
    except JobConfigError as exc:
        assert exc.problems and all(isinstance(p, str) and p.strip() for p in exc.problems)
        return
    assert isinstance(config, ExportJobConfig)
    ExportJobConfig.model_validate(config.model_dump())  # a valid config stays valid after a round trip


@settings(FUZZ, max_examples=examples(150))
@given(configs())
def test_parse_job_config_gives_a_config_or_a_job_config_error(data: Any) -> None:
    _check_config(lambda: parse_job_config(data))


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("jobconfig")


@st.composite
def config_files(draw: st.DrawFn) -> tuple[str, bytes]:
    suffix = draw(st.sampled_from([".json", ".yaml", ".yml"]))
    kind = draw(st.sampled_from(["dump", "dump", "mangled", "deep", "bigint", "junk", "dupes", "yaml-odd"]))
    data = draw(configs())
    if kind == "junk":
        return suffix, draw(st.binary(max_size=200))
    if kind == "deep":
        # Deep YAML takes PyYAML a second or two to refuse: 5,000 levels only in test_poison.py.
        depth = draw(st.sampled_from([20, 100] if suffix != ".json" else [100, 1000, 5000]))
        return suffix, ("[" * depth + "]" * depth).encode()
    if kind == "bigint":
        return suffix, ("batch_size: " if suffix != ".json" else '{"batch_size": ').encode() + b"9" * draw(
            st.sampled_from([30, 4300, 4301, 9000])
        ) + (b"}" if suffix == ".json" else b"")
    if kind == "dupes":
        return suffix, b'{"label": "a", "label": "b", "audiences": ["vip"], "audiences": 5}'
    if kind == "yaml-odd":
        return ".yaml", draw(
            st.sampled_from(
                [
                    b"label: 2020-13-45\n",
                    b"label: !!python/object/apply:os.system [echo]\n",
                    b"a: &a [*a]\n",
                    b"? [a, b]\n: c\n",
                    b"label: !!binary aGVsbG8=\n",
                    b"audiences: !!set {vip, lapsed}\n",
                    b"batch_size: .inf\n",
                    b"%YAML 1.1\n---\nlabel: x\n...\n---\nlabel: y\n",
                    b"\xef\xbb\xbflabel: x\n",
                    b"label: \x00\n",
                ]
            )
        )
    try:
        text = json.dumps(data) if suffix == ".json" else yaml.safe_dump(data, allow_unicode=True)
    except (ValueError, TypeError, yaml.YAMLError):
        text = "{}"
    raw = text.encode("utf-8", "surrogatepass")
    if kind == "mangled" and raw:
        cut = draw(st.integers(0, len(raw) - 1))
        raw = raw[:cut] + draw(st.binary(min_size=1, max_size=3)) + raw[cut + 1 :]
    return suffix, raw


@settings(FUZZ, max_examples=examples(120))
@given(config_files())
def test_load_job_config_gives_a_config_or_a_job_config_error(
    config_dir: Path, file: tuple[str, bytes]
) -> None:
    suffix, content = file
    path = config_dir / f"job{suffix}"
    path.write_bytes(content)
    _check_config(lambda: load_job_config(path))
