"""Poison never blocks: one unreadable value makes one line unusable, with a counted reason.

Each test names the input that once failed a whole chunk, file or delivery (found by review or by
the fuzzers in ``test_fuzz_inputs.py``) and pins what happens to it now.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from starlette.testclient import TestClient

from worker.backfill import steps as backfill
from worker.backfill.steps import FILE_PART, FileReport, run_step
from worker.mapping.transitions import (
    BAD_TIMESTAMP,
    MAX_FUTURE_MS,
    MIN_EVENT_MS,
    NESTED_TOO_DEEPLY,
    NOT_AN_OBJECT,
    NOT_JSON,
    TIMESTAMP_IN_FUTURE,
    TIMESTAMP_TOO_OLD,
    Rejected,
    Transition,
    parse_line,
    parse_payload,
    parse_time_ms,
    read_time_ms,
)
from worker.observe.status import ingest_status
from worker.pipeline import inbox
from worker.pipeline.buffer import JobBuffer
from worker.pipeline.ingest import ingest_chunk, ingest_lines
from worker.setup.jobconfig import JobConfigError, JobState, load_job_config, parse_job_config
from worker.setup.jobs import ExportJob, JobStore
from worker.webhook.receiver import WebhookSettings, create_app

NOW = 1_795_712_400_000  # 2026-11-26T17:00:00Z, epoch ms
AT = "2026-11-26T17:00:00Z"


def canonical(email: str, at: Any = AT, event: str = "enter", audience: str = "vip") -> dict[str, Any]:
    return {"audience": audience, "event": event, "at": at, "user": {"email": email}}


def line(email: str, at: Any = AT, **kw: Any) -> str:
    return json.dumps(canonical(email, at, **kw))


def only(items: Iterator[Transition | Rejected]) -> Transition | Rejected:
    [item] = list(items)
    return item


def reason_of(value: Any, now: int = NOW) -> str:
    out = read_time_ms(value, now)
    assert isinstance(out, Rejected), (value, out)
    assert out.detail
    return out.reason


# --- event times ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value",
    [
        "²",
        "1²",
        "1795712400²",
        "¹⁷⁹⁵⁷¹²⁴⁰⁰",  # superscripts
        "\u0663",  # ARABIC-INDIC DIGIT THREE (float() reads it: it was accepted as 1970)
        "\u0661\u0667\u0669\u0665\u0667\u0661\u0662\u0664\u0660\u0660",  # Arabic-Indic 1795712400
        "\uff11\uff17\uff19\uff15\uff17\uff11\uff12\uff14\uff10\uff10",  # fullwidth 1795712400
        "\U0001d7d9\U0001d7df\U0001d7e1",  # mathematical double-struck digits
    ],
)
def test_unicode_digits_are_a_bad_timestamp_not_a_crash(value: str) -> None:
    """``"²".isdigit()`` is true and ``float("²")`` raises: this failed every ingest of the chunk."""
    assert reason_of(value) == BAD_TIMESTAMP
    assert parse_time_ms(value) is None
    out = only(parse_line(line("a@x.io", value)))
    assert isinstance(out, Rejected) and out.reason == BAD_TIMESTAMP and "'at'" in out.detail


@pytest.mark.parametrize(
    "value",
    ["9999-12-31T23:59:59Z", "2100-01-01", NOW + MAX_FUTURE_MS + 1, (NOW + MAX_FUTURE_MS) // 1000 + 1],
)
def test_a_time_more_than_a_day_ahead_is_refused(value: Any) -> None:
    """Last writer wins by event time: a year-9999 enter made the user's later changes stale forever."""
    assert reason_of(value) == TIMESTAMP_IN_FUTURE


def test_a_day_ahead_is_still_accepted() -> None:
    assert read_time_ms(NOW + MAX_FUTURE_MS, NOW) == NOW + MAX_FUTURE_MS


@pytest.mark.parametrize(
    "value",
    ["1999-12-31T23:59:59Z", "0001-01-01T00:00:00+14:00", 946_684_799, 946_684_799_999, 0, -5, 1, 0.5],
)
def test_a_time_before_2000_is_refused(value: Any) -> None:
    assert reason_of(value) == TIMESTAMP_TOO_OLD


def test_the_window_starts_at_2000() -> None:
    assert read_time_ms("2000-01-01T00:00:00Z", NOW) == MIN_EVENT_MS
    assert read_time_ms(946_684_800, NOW) == MIN_EVENT_MS


@pytest.mark.parametrize(
    ("value", "ms"),
    [
        (1_795_712_400, NOW),  # seconds
        (1_795_712_400.123, NOW + 123),
        ("1795712400", NOW),
        ("1795712400.5", NOW + 500),
        (1_795_712_400_123, NOW + 123),  # milliseconds
        ("1795712400123", NOW + 123),
        (1_795_712_400_123_456, NOW + 123),  # microseconds: once read as ms, 56,000 years ahead
        (1_795_712_400_123_456_789, NOW + 123),  # nanoseconds
        ("1795712400123456789", NOW + 123),
        (1.7957124001234568e18, NOW + 123),
    ],
)
def test_epoch_units_are_told_apart_by_magnitude(value: Any, ms: int) -> None:
    assert read_time_ms(value, NOW) == ms


@pytest.mark.parametrize(
    "value",
    [1e300, float("inf"), float("-inf"), float("nan"), 10**20, 10**300, "1e300", "nan", "Infinity"],
)
def test_non_finite_and_huge_numbers_are_refused(value: Any) -> None:
    """1e300 went to the buffer script as a number that Lua turned negative."""
    assert reason_of(value) == BAD_TIMESTAMP


@pytest.mark.parametrize("value", [True, None, [], {}, {"$date": 1}, "", "   ", "x" * 10_000, "yesterday"])
def test_values_that_are_no_time_are_a_bad_timestamp(value: Any) -> None:
    assert reason_of(value) == BAD_TIMESTAMP


def test_every_accepted_time_is_an_integer_below_2_to_the_53() -> None:
    for value in ("2026-11-26T17:00:00.999999999-14:00", 1_795_712_400.9999999, 1.7957124e18):
        ms = read_time_ms(value)
        assert type(ms) is int and 0 < ms < 2**53


def test_a_huge_value_is_shown_short_in_the_detail() -> None:
    out = only(parse_line(line("a@x.io", "9" * 100_000)))
    assert isinstance(out, Rejected) and out.reason == BAD_TIMESTAMP and len(out.detail) < 200
    event = only(parse_payload({"audience": "vip", "event": "x" * 1_000_000, "at": AT, "user": {"a": 1}}))
    assert isinstance(event, Rejected) and len(event.detail) < 200
    big = only(parse_payload(canonical("a@x.io", 10**5000)))
    assert isinstance(big, Rejected) and "digits" in big.detail


def test_a_lytics_event_with_a_superscript_time_is_refused_and_its_neighbour_kept() -> None:
    body = {
        "data": {
            "email": "a@x.io",
            "segment_events": [
                {"event": "enter", "slug": "vip", "enter": "²"},
                {"event": "exit", "slug": "lapsed", "exit": AT},
            ],
        }
    }
    bad, good = parse_payload(body)
    assert isinstance(bad, Rejected) and bad.reason == BAD_TIMESTAMP
    assert isinstance(good, Transition) and good.audience == "lapsed"


def test_a_lytics_event_time_that_is_there_but_unusable_is_not_replaced_by_arrival() -> None:
    """``"enter": 0`` used to fall through to the arrival time; now only an absent or empty time does."""
    for time_value, reason in ((0, TIMESTAMP_TOO_OLD), (False, BAD_TIMESTAMP), ([], BAD_TIMESTAMP)):
        body = {
            "data": {
                "email": "a@x.io",
                "segment_events": [{"event": "enter", "slug": "vip", "enter": time_value}],
            }
        }
        out = only(parse_payload(body, received_ms=NOW))
        assert isinstance(out, Rejected) and out.reason == reason
    for absent in (None, "", "  "):
        body = {
            "data": {
                "email": "a@x.io",
                "segment_events": [{"event": "enter", "slug": "vip", "enter": absent}],
            }
        }
        arrived = only(parse_payload(body, received_ms=NOW))
        assert isinstance(arrived, Transition) and arrived.at_ms == NOW


# --- nesting --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [9, 500, 1000, 1022])
def test_deeply_nested_arrays_are_refused_without_a_recursion_error(depth: int) -> None:
    """Depths 1000-1023 parse (orjson allows 1024) and then overflowed Python's recursion limit."""
    out = only(parse_line("[" * depth + json.dumps(canonical("a@x.io")) + "]" * depth))
    assert isinstance(out, Rejected) and out.reason == NESTED_TOO_DEEPLY


def test_deeply_nested_cloudevents_envelopes_are_refused() -> None:
    text = '{"specversion": "1.0", "data": ' * 1000 + json.dumps(canonical("a@x.io")) + "}" * 1000
    out = only(parse_line(text))
    assert isinstance(out, Rejected) and out.reason == NESTED_TOO_DEEPLY


def test_a_lytics_batch_in_a_cloudevents_envelope_is_within_the_depth() -> None:
    trigger = {
        "data": {"email": "a@x.io", "segment_events": [{"event": "enter", "slug": "vip", "enter": AT}]}
    }
    out = list(parse_payload([{"specversion": "1.0", "data": [trigger, trigger]}]))
    assert [type(t) for t in out] == [Transition, Transition]


@pytest.mark.parametrize("depth", [1025, 5000])
def test_nesting_beyond_the_parser_limit_is_not_json(depth: int) -> None:
    out = only(parse_line("[" * depth + "]" * depth))
    assert isinstance(out, Rejected) and out.reason == NOT_JSON


# --- ingest: one poison line, the rest of the chunk goes on --------------------------------------------------
@pytest.fixture
def redis_client() -> Iterator[fakeredis.FakeRedis]:
    client = fakeredis.FakeRedis()
    yield client
    client.close()


def make_job(client: fakeredis.FakeRedis, state: JobState = JobState.RUNNING) -> ExportJob:
    config = parse_job_config(
        {
            "label": "poison",
            "authorization": "auth-1",
            "audiences": ["vip", "lapsed"],
            "identifier_mappings": {"email": "email"},
        }
    )
    return JobStore(client).create(config, state=state)


def lww(client: fakeredis.FakeRedis, job: ExportJob, email: str, audience: str = "vip") -> int | None:
    return JobBuffer(client, job.id).last_accepted([(email, audience)])[0]


POISON_LINES = [
    line("p1@x.io", "²"),
    line("p2@x.io", "9999-12-31T23:59:59Z"),
    line("p3@x.io", 1e300),
    '{"audience": "vip", "event": "enter", "at": ' + "9" * 5000 + ', "user": {"email": "p4@x.io"}}',
    "[" * 1000 + "]" * 1000,
    '{"audience": "vip", "event": "enter", "at": NaN, "user": {"email": "p5@x.io"}}',
]


def test_a_chunk_with_poison_lines_is_ingested_and_its_good_lines_arrive(
    redis_client: fakeredis.FakeRedis,
) -> None:
    """The chunk used to fail its ingest task on ``"²"`` and be re-driven every minute, forever."""
    job = make_job(redis_client)
    good = [line(f"g{i}@x.io", f"2026-11-26T17:00:0{i}Z") for i in range(3)]
    chunk = inbox.put_chunk(redis_client, [good[0], *POISON_LINES, good[1], b'{"\xff": 1}', good[2]])
    report = ingest_chunk(redis_client, JobStore(redis_client), chunk, owner="task-1")
    assert inbox.read_chunk(redis_client, chunk) == []  # done: dropped, not re-driven
    assert sum(report.rejected.values()) == len(POISON_LINES) + 1
    assert report.rejected == {
        BAD_TIMESTAMP: 3,
        TIMESTAMP_IN_FUTURE: 1,
        NESTED_TOO_DEEPLY: 1,
        NOT_JSON: 2,  # the 5,000-digit integer and the invalid UTF-8
    }
    for i in range(3):
        assert lww(redis_client, job, f"g{i}@x.io") == NOW + i * 1000
    for i in range(1, 6):
        assert lww(redis_client, job, f"p{i}@x.io") is None
    status = ingest_status(redis_client)
    assert status["rejected:bad_timestamp"] == 3 and status["received"] == 3 + len(POISON_LINES) + 1


def test_a_microsecond_epoch_no_longer_freezes_the_user(redis_client: fakeredis.FakeRedis) -> None:
    """Read as milliseconds it was 56,000 years ahead: every later real change was stale."""
    job = make_job(redis_client)
    ingest_lines(redis_client, JobStore(redis_client), [line("u@x.io", NOW * 1000)])
    assert lww(redis_client, job, "u@x.io") == NOW
    ingest_lines(redis_client, JobStore(redis_client), [line("u@x.io", NOW + 1000, event="exit")])
    assert lww(redis_client, job, "u@x.io") == NOW + 1000


def test_a_far_future_enter_does_not_block_the_real_exit(redis_client: fakeredis.FakeRedis) -> None:
    job = make_job(redis_client)
    jobs = JobStore(redis_client)
    report = ingest_lines(redis_client, jobs, [line("u@x.io", "9999-12-31T23:59:59Z")])
    assert report.rejected == {TIMESTAMP_IN_FUTURE: 1}
    ingest_lines(redis_client, jobs, [line("u@x.io", AT, event="exit")])
    assert lww(redis_client, job, "u@x.io") == NOW


def test_an_unexpected_failure_routing_one_transition_is_counted_not_raised(
    redis_client: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Last resort in ingest: a bug met by one transition must not fail (and re-drive) the chunk."""
    import worker.pipeline.ingest as ingest

    job = make_job(redis_client)
    monkeypatch.setattr(ingest, "compiled_mapper", _failing_for("boom@x.io", RuntimeError("a bug")))
    report = ingest_lines(redis_client, JobStore(redis_client), [line("boom@x.io"), line("ok@x.io")])
    assert report.rejected == {"mapping_error": 1}
    assert lww(redis_client, job, "ok@x.io") == NOW and lww(redis_client, job, "boom@x.io") is None


def test_redis_errors_still_fail_the_ingest_so_the_chunk_is_retried(
    redis_client: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis

    import worker.pipeline.ingest as ingest

    make_job(redis_client)
    monkeypatch.setattr(ingest, "compiled_mapper", _failing_for("a@x.io", redis.ConnectionError("down")))
    with pytest.raises(redis.ConnectionError):
        ingest_lines(redis_client, JobStore(redis_client), [line("a@x.io")])


def _failing_for(email: str, error: Exception) -> Any:
    """A ``compiled_mapper`` whose mapper raises ``error`` for one e-mail address."""
    import worker.pipeline.ingest as ingest

    real = ingest.compiled_mapper

    def compiled(job_id: str, config: Any) -> Any:
        mapper = real(job_id, config)

        class Failing:
            def map(self, profile: Any, *args: Any, **kwargs: Any) -> Any:
                if profile.get("email") == email:
                    raise error
                return mapper.map(profile, *args, **kwargs)

        return Failing()

    return compiled


# --- file backfill: a poison first line blocked every profile behind it -----------------------------------
def test_a_file_backfill_whose_first_line_is_poison_still_loads_the_rest(
    redis_client: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = make_job(redis_client)
    dispatch = _Dispatcher()
    report = FileReport()
    lines = [line("x@x.io", "²"), *(json.dumps({"email": f"m{i}@x.io"}) + "\n" for i in range(5))]
    converted = backfill.file_lines(lines, job.config.audiences, "lapsed", NOW, report)
    backfill.enqueue_file(redis_client, job, converted, report, dispatch, chunk_lines=2)
    assert (report.transitions, report.profiles, report.chunks) == (1, 5, 3)
    for _ in range(10):
        step = run_step(redis_client, job.id, FILE_PART)
        if step.next_in is None:
            break
    assert step.finished and not step.error
    assert all(lww(redis_client, job, f"m{i}@x.io", "lapsed") == NOW for i in range(5))
    assert ingest_status(redis_client)["rejected:bad_timestamp"] == 1


class _Dispatcher:
    def __init__(self) -> None:
        self.backfills: list[tuple[str, str]] = []

    def backfill(self, job_id: str, part: str, countdown: float = 0.0) -> None:
        self.backfills.append((job_id, part))

    def ingest(self, chunk_id: str) -> None:
        pass

    def flush(self, job_id: str, countdown: float = 0.0) -> None:
        pass


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"email": "\xff\xfe"}\n', NOT_JSON),  # the CLI read files as UTF-8 text: a traceback
        ("\udcff\n", NOT_JSON),  # text decoded with surrogateescape
        ('{"event": "enter", "audience": []}', backfill.AUDIENCE_NOT_EXPORTED),  # was TypeError: unhashable
        ('{"event": "enter", "audience": {"a": 1}}', backfill.AUDIENCE_NOT_EXPORTED),
        ("[1, 2]", NOT_AN_OBJECT),
        ("{}", NOT_AN_OBJECT),
        ("[" * 5000 + "]" * 5000, NOT_JSON),
    ],
)
def test_file_lines_skip_unusable_lines_with_a_reason(raw: str | bytes, reason: str) -> None:
    report = FileReport()
    good = json.dumps({"email": "ok@x.io"})
    out = list(backfill.file_lines([raw, good], ["vip"], "vip", NOW, report))
    assert report.skipped == 1 and report.reasons == {reason: 1}
    assert len(out) == 1 and json.loads(out[0])["user"] == {"email": "ok@x.io"}


@pytest.mark.parametrize(
    "profile",
    [
        '{"email": "a@x.io", "ltv": 123456789012345678901234567890}',  # orjson.dumps refused it
        '{"email": "a@x.io", "deep": ' + "[" * 300 + "]" * 300 + "}",  # orjson.dumps: over 255 levels
        '{"email": "a@x.io", "ltv": NaN}',
    ],
)
def test_a_profile_line_is_kept_as_written_not_re_encoded(profile: str) -> None:
    report = FileReport()
    [out] = backfill.file_lines([profile], ["vip"], "vip", NOW, report)
    assert report.profiles == 1
    [t] = parse_line(out)
    assert isinstance(t, Transition) and t.at_ms == NOW and t.user["email"] == "a@x.io"


def test_a_byte_order_mark_does_not_spoil_the_first_profile() -> None:
    report = FileReport()
    [out] = backfill.file_lines([b'\xef\xbb\xbf{"email": "a@x.io"}\n'], ["vip"], "vip", NOW, report)
    [t] = parse_line(out)
    assert isinstance(t, Transition) and t.user == {"email": "a@x.io"}


def test_cli_ingest_and_backfill_read_files_that_are_not_utf8(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    redis_client: fakeredis.FakeRedis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """They opened the file as UTF-8 text: one bad byte ended the command in a traceback."""
    import worker.cli.main as cli
    import worker.dispatch

    job = make_job(redis_client)
    dispatch = _Dispatcher()
    monkeypatch.setattr(cli, "_redis", lambda settings: redis_client)
    monkeypatch.setattr(worker.dispatch, "CeleryDispatcher", lambda: dispatch)
    data = tmp_path / "mixed.jsonl"
    data.write_bytes(b'{"email": "\xff"}\n' + json.dumps({"email": "ok@x.io"}).encode() + b"\n")
    assert cli.main(["ingest", str(data)]) == 0
    # Neither line holds a transition (the second is a profile, for backfill): nothing is queued,
    # and the summary says why, by reason and line.
    out = capsys.readouterr().out
    assert out.startswith(
        "queued 0 lines in 0 chunks; not queued: 2 unusable lines (missing_audience 1, not_json 1;"
    )
    assert "line 1: not valid JSON: 'utf-8' codec can't decode byte 0xff" in out
    assert cli.main(["backfill", job.id, "--audience", "vip", str(data)]) == 0
    assert (
        "queued 1 profiles and 0 transitions in 1 chunks, 1 skipped (not_json: 1)" in capsys.readouterr().out
    )
    assert cli.main(["backfill", job.id, "--audience", "vip", "--at", "9999-12-31", str(data)]) == 2
    assert "more than a day ahead" in capsys.readouterr().err
    assert cli.main(["backfill", job.id, "--audience", "vip", "--at", "²", str(data)]) == 2
    assert "--at: '²' is not an ISO-8601 time" in capsys.readouterr().err


# --- webhook: 4xx, never 500 ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def webhook() -> Iterator[TestClient]:
    client = TestClient(create_app(WebhookSettings(require_auth=False), fakeredis.FakeRedis(), _Dispatcher()))
    with client:
        yield client


def post(client: TestClient, content: str | bytes, headers: dict[str, Any] | None = None) -> Any:
    return client.post(
        "/v1/transitions", content=content, headers={"Content-Type": "application/json", **(headers or {})}
    )


def test_webhook_answers_400_not_500_to_a_superscript_time(webhook: TestClient) -> None:
    response = post(webhook, line("a@x.io", "²"))
    assert response.status_code == 400 and response.json()["unusable"] == {BAD_TIMESTAMP: 1}


def test_webhook_accepts_the_good_events_of_a_batch_with_a_superscript_time(webhook: TestClient) -> None:
    response = post(webhook, json.dumps([canonical("a@x.io", "²"), canonical("b@x.io")]))
    assert response.status_code == 202
    assert response.json()["transitions"] == 1 and response.json()["unusable"] == {BAD_TIMESTAMP: 1}


@pytest.mark.parametrize("depth", [1000, 1023, 1024, 100_000])
def test_webhook_answers_400_to_deep_nesting(webhook: TestClient, depth: int) -> None:
    response = post(webhook, "[" * depth + json.dumps(canonical("a@x.io")) + "]" * depth)
    assert response.status_code == 400 and response.json()["error"] in {
        "no_usable_transitions",
        "invalid_json",
    }


def test_webhook_answers_400_to_an_integer_too_long_to_read(webhook: TestClient) -> None:
    """orjson refuses it, and the standard library raised a plain ValueError (4,300 digits): a 500."""
    response = post(
        webhook, '{"audience": "vip", "event": "enter", "at": ' + "1" * 5000 + ', "user": {"a": 1}}'
    )
    assert response.status_code == 400 and response.json()["error"] == "invalid_json"
    assert "4300 digits" in response.json()["message"]


def test_webhook_answers_400_to_a_superscript_content_length(webhook: TestClient) -> None:
    """``"²".isdigit()`` is true, then ``int("²")`` raised: a 500."""
    response = post(webhook, line("a@x.io"), {"Content-Length": "²".encode("latin-1")})
    assert response.status_code == 400 and response.json()["error"] == "bad_request"


def test_webhook_answers_400_if_checking_a_body_fails_unexpectedly(
    webhook: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker.webhook.receiver as receiver

    def boom(*args: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(receiver, "check_lines", boom)
    response = post(webhook, line("a@x.io"))
    assert response.status_code == 400 and response.json()["error"] == "unreadable_body"


# --- job configuration files ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("big.json", '{"label": ' + "1" * 5000 + "}"),  # ValueError from json.loads
        ("big.yaml", "label: " + "1" * 5000),  # ValueError from yaml's int constructor
        ("deep.json", "[" * 5000 + "]" * 5000),  # RecursionError
        ("deep.yaml", "[" * 1100 + "]" * 1100),  # RecursionError (PyYAML takes seconds on deeper ones)
        ("deepmap.yaml", "a:\n" + "".join(" " * (i + 1) + "a:\n" for i in range(2000))),
        ("date.yaml", "label: 2020-13-45\n"),  # ValueError: month must be in 1..12
        ("date2.yaml", "batch_size: 2021-02-30\n"),  # ValueError: day is out of range for month
    ],
)
def test_a_job_file_that_cannot_be_read_is_a_job_config_error(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(JobConfigError) as info:
        load_job_config(path)
    assert info.value.problems and all(p.startswith(str(path)) for p in info.value.problems)
    assert "sys.set_int_max_str_digits" not in str(info.value)


def test_the_time_window_constants_are_where_the_readme_says() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert "MIN_EVENT_MS" in readme and "MAX_FUTURE_MS" in readme
    assert MIN_EVENT_MS == 946_684_800_000 and MAX_FUTURE_MS == 86_400_000
    assert (NOW + MAX_FUTURE_MS) < 2**53 and time.time() * 1000 + MAX_FUTURE_MS < 2**53
