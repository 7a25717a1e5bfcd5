"""The webhook receiver (worker/webhook.py) in process: Starlette's TestClient, fakeredis, and a
dispatcher that records what would be sent to the broker."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import fakeredis
import pytest
from starlette.testclient import TestClient

from worker.cli.main import main as cli_main
from worker.mapping.transitions import Transition, parse_line
from worker.pipeline import inbox
from worker.store import keys
from worker.webhook.receiver import (
    DEFAULT_MAX_BYTES,
    RedactTokenFilter,
    WebhookConfigError,
    WebhookSettings,
    create_app,
)

TOKEN = "t0ken-for-unit-tests-0123456789"
OTHER_TOKEN = "second-token-for-rotation-9876"
URL = "/v1/transitions"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


def trigger(
    email: str, event: str = "enter", slug: str = "vip", at: str = "2026-11-26T17:00:00Z"
) -> dict[str, Any]:
    """A Lytics audience-trigger body (shared/lytics/INPUTS.md)."""
    return {
        "id": "7076027172059065053",
        "data": {
            "email": email,
            "first_name": "Beth",
            "segment_events": [{"id": "42976a26", "event": event, "slug": slug, event: at}],
        },
        "meta": {},
    }


def canonical(email: str, event: str = "enter") -> dict[str, Any]:
    return {"audience": "vip", "event": event, "at": "2026-11-26T17:00:00Z", "user": {"email": email}}


@dataclass
class RecordingDispatcher:
    """The drains the receiver asks for (each a task with no arguments but its countdown)."""

    drains: list[tuple[Any, ...]] = field(default_factory=list)
    fail: bool = False

    def drain(self, *args: Any, **kwargs: Any) -> None:
        if self.fail:
            raise ConnectionError("broker down")
        assert not kwargs
        self.drains.append(args)


class Receiver:
    """A receiver app under test with its Redis and dispatcher."""

    def __init__(self, settings: WebhookSettings) -> None:
        self.server = fakeredis.FakeServer()
        self.redis = fakeredis.FakeRedis(server=self.server)
        self.dispatch = RecordingDispatcher()
        self.client = TestClient(create_app(settings, self.redis, self.dispatch))

    def post(
        self,
        body: Any = None,
        *,
        content: bytes | str | None = None,
        headers: dict[str, str] | None = None,
        **kw: Any,
    ) -> Any:
        hdrs = {"Content-Type": "application/json", **BEARER, **(headers or {})}
        if content is None:
            content = json.dumps(body)
        return self.client.post(URL, content=content, headers=hdrs, **kw)

    def chunks(self) -> dict[str, list[bytes]]:
        ids = [i.decode() for i in cast(list[bytes], self.redis.zrange(keys.inbox_pending(), 0, -1))]
        return {
            i: [x if isinstance(x, bytes) else x.encode() for x in inbox.read_chunk(self.redis, i)]
            for i in ids
        }

    def assert_nothing_queued(self) -> None:
        assert self.chunks() == {}
        assert self.redis.keys("aex:inbox:*") == []
        assert self.dispatch.drains == []


@pytest.fixture
def rx() -> Iterator[Receiver]:
    r = Receiver(WebhookSettings(tokens=(TOKEN,)))
    with r.client:
        yield r


def accepted_chunk(rx: Receiver, response: Any, lines: int) -> list[bytes]:
    """Checks a 202: one chunk holding ``lines`` raw texts, and a drain asked for (nothing queued yet)."""
    assert response.status_code == 202, response.text
    answer = response.json()
    assert answer["accepted"] == lines
    chunks = rx.chunks()
    assert list(chunks) == [answer["chunk"]]
    assert rx.dispatch.drains == [(inbox.DRAIN_GATHER_SECONDS,)]
    stored = chunks[answer["chunk"]]
    assert len(stored) == lines
    return stored


# --- accepted shapes --------------------------------------------------------------------------------


def test_a_lytics_trigger_body_is_stored_raw_as_one_chunk_and_only_its_id_is_dispatched(rx: Receiver) -> None:
    body = json.dumps(trigger("ada@x.io"), indent=2)  # pretty-printed: stored byte for byte
    response = rx.post(content=body)
    assert response.json()["transitions"] == 1 and response.json()["unusable"] == {}
    stored = accepted_chunk(rx, response, 1)
    assert stored == [body.encode()]
    (t,) = parse_line(stored[0])
    assert isinstance(t, Transition) and t.audience == "vip" and t.enter and t.user["email"] == "ada@x.io"
    # The broker message is a drain with no arguments: no e-mail address, no profile field.
    assert "ada" not in json.dumps(rx.dispatch.drains)


def test_a_lytics_batch_array_is_one_line_with_every_transition_counted(rx: Receiver) -> None:
    batch = [trigger(f"u{i}@x.io") for i in range(5)] + [trigger("z@x.io", "exit")]
    response = rx.post(batch)
    assert response.json()["transitions"] == 6
    (line,) = accepted_chunk(rx, response, 1)
    assert json.loads(line) == batch


def test_a_cloudevents_envelope_is_accepted(rx: Receiver) -> None:
    envelope = {
        "specversion": "1.0",
        "type": "com.lytics.audience.user.event",
        "source": "work-123",
        "id": "ev-1",
        "data": trigger("ce@x.io", "exit"),
    }
    response = rx.post(envelope, headers={"Content-Type": "application/cloudevents+json; charset=utf-8"})
    (line,) = accepted_chunk(rx, response, 1)
    (t,) = parse_line(line)
    assert isinstance(t, Transition) and not t.enter and t.user["email"] == "ce@x.io"


def test_a_canonical_transition_is_accepted(rx: Receiver) -> None:
    response = rx.post(canonical("c@x.io"))
    assert response.json()["transitions"] == 1
    accepted_chunk(rx, response, 1)


def test_ndjson_lines_are_stored_one_by_one_without_blank_lines_or_carriage_returns(rx: Receiver) -> None:
    lines = [json.dumps(canonical("a@x.io")), json.dumps(trigger("b@x.io")), json.dumps([trigger("c@x.io")])]
    content = lines[0] + "\r\n\n" + lines[1] + "\n   \n" + lines[2]  # no final newline either
    response = rx.post(content=content, headers={"Content-Type": "application/x-ndjson"})
    assert response.json()["transitions"] == 3
    assert accepted_chunk(rx, response, 3) == [x.encode() for x in lines]


def test_a_request_without_content_type_is_read_as_json(rx: Receiver) -> None:
    response = rx.client.post(URL, content=json.dumps(trigger("a@x.io")).encode(), headers=BEARER)
    accepted_chunk(rx, response, 1)


def test_a_batch_with_some_unusable_events_is_accepted_whole_and_lists_them(rx: Receiver) -> None:
    """Lytics does not retry a 400: refusing the batch would lose its good events."""
    bad_slug = trigger("b@x.io")
    del bad_slug["data"]["segment_events"][0]["slug"]
    batch = [trigger("a@x.io"), bad_slug, trigger("c@x.io", at="yesterday-ish"), "junk"]
    response = rx.post(batch)
    answer = response.json()
    assert answer["transitions"] == 1
    assert answer["unusable"] == {"missing_audience": 1, "bad_timestamp": 1, "not_an_object": 1}
    (line,) = accepted_chunk(rx, response, 1)
    assert json.loads(line) == batch  # ingest counts the unusable ones by reason


def test_a_configured_lytics_method_is_accepted_and_others_are_405() -> None:
    r = Receiver(WebhookSettings(tokens=(TOKEN,), methods=("POST", "PUT")))
    with r.client:
        put = r.client.put(URL, content=json.dumps(trigger("a@x.io")), headers=BEARER)
        assert put.status_code == 202
        patch = r.client.patch(URL, content=json.dumps(trigger("a@x.io")), headers=BEARER)
        assert patch.status_code == 405 and patch.json()["error"] == "method_not_allowed"
        assert patch.headers["allow"] == "POST, PUT"
        assert len(r.chunks()) == 1


# --- auth -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "params"),
    [
        ({"Authorization": f"Bearer {TOKEN}"}, {}),
        ({"Authorization": f"bearer   {TOKEN}"}, {}),
        ({"X-Webhook-Token": TOKEN}, {}),
        ({}, {"token": TOKEN}),
        ({"Authorization": "Bearer wrong-but-long-enough-token"}, {"token": TOKEN}),
    ],
    ids=["bearer", "bearer-case-and-spaces", "custom-header", "query", "one-right-among-several"],
)
def test_each_token_carrier_is_accepted(
    rx: Receiver, headers: dict[str, str], params: dict[str, str]
) -> None:
    response = rx.client.post(
        URL,
        content=json.dumps(trigger("a@x.io")),
        headers={"Content-Type": "application/json", **headers},
        params=params,
    )
    accepted_chunk(rx, response, 1)


@pytest.mark.parametrize(
    ("headers", "params"),
    [
        ({}, {}),
        ({"Authorization": "Bearer wrong-but-long-enough-token"}, {}),
        ({"Authorization": TOKEN}, {}),  # no scheme
        ({"Authorization": f"Basic {TOKEN}"}, {}),
        ({"X-Webhook-Token": TOKEN[:-1]}, {}),
        ({}, {"token": TOKEN + "x"}),
        ({}, {"token": "ünïcödé-token-0123456789"}),
    ],
    ids=["none", "wrong", "no-scheme", "basic", "prefix", "suffix", "non-ascii"],
)
def test_missing_or_wrong_credentials_get_401_without_a_hint_and_nothing_is_queued(
    rx: Receiver, headers: dict[str, str], params: dict[str, str]
) -> None:
    response = rx.client.post(
        URL,
        content=json.dumps(trigger("a@x.io")),
        headers={"Content-Type": "application/json", **headers},
        params=params,
    )
    assert response.status_code == 401
    assert response.json() == {"error": "unauthorized", "message": "missing or invalid credentials"}
    assert TOKEN not in response.text
    rx.assert_nothing_queued()


def test_auth_is_checked_before_the_body_so_strangers_learn_nothing_about_limits(rx: Receiver) -> None:
    response = rx.client.post(
        URL, content=b"x" * (DEFAULT_MAX_BYTES + 1), headers={"Content-Type": "text/plain"}
    )
    assert response.status_code == 401
    rx.assert_nothing_queued()


def test_several_tokens_allow_rotation() -> None:
    r = Receiver(WebhookSettings.from_env({"WEBHOOK_TOKEN": f" {TOKEN} , {OTHER_TOKEN} "}))
    with r.client:
        for token in (TOKEN, OTHER_TOKEN):
            assert r.post(trigger("a@x.io"), headers={"Authorization": f"Bearer {token}"}).status_code == 202
        assert (
            r.post(trigger("a@x.io"), headers={"Authorization": "Bearer nope-nope-nope-nope"}).status_code
            == 401
        )


def test_insecure_mode_needs_no_token() -> None:
    r = Receiver(WebhookSettings.from_env({}, insecure_no_auth=True))
    with r.client:
        response = r.client.post(URL, json=trigger("a@x.io"))
        assert response.status_code == 202


# --- refused bodies ---------------------------------------------------------------------------------


def test_a_body_that_is_not_json_gets_400_with_the_position(rx: Receiver) -> None:
    response = rx.post(content='{"id": "1",\n "data": {"email": "a@x.io" "segment_events": []}}')
    assert response.status_code == 400
    answer = response.json()
    assert answer["error"] == "invalid_json"
    assert (answer["line"], answer["column"], answer["position"]) == (2, 29, 40)
    assert "line 2 column 29" in answer["message"]
    rx.assert_nothing_queued()


def test_an_ndjson_line_that_is_not_json_gets_400_naming_the_line(rx: Receiver) -> None:
    content = json.dumps(canonical("a@x.io")) + "\n\n" + '{"audience": "vip", oops}' + "\n"
    response = rx.post(content=content, headers={"Content-Type": "application/x-ndjson"})
    assert response.status_code == 400
    answer = response.json()
    assert answer["error"] == "invalid_json" and answer["line"] == 3 and answer["column"] == 21
    assert answer["message"].startswith("line 3 is not valid JSON")
    rx.assert_nothing_queued()


def test_invalid_utf8_gets_400(rx: Receiver) -> None:
    response = rx.post(content=b'{"audience": "\xff\xfe"}')
    assert response.status_code == 400 and response.json()["error"] == "invalid_json"
    rx.assert_nothing_queued()


@pytest.mark.parametrize("content", [b"", b"   \n\t ", b"\n\n"])
def test_an_empty_body_gets_400(rx: Receiver, content: bytes) -> None:
    response = rx.post(content=content)
    assert response.status_code == 400 and response.json()["error"] == "empty_body"
    rx.assert_nothing_queued()


@pytest.mark.parametrize("content", ["42", '"hello"', "null", "true"])
def test_a_top_level_scalar_gets_400(rx: Receiver, content: str) -> None:
    response = rx.post(content=content)
    assert response.status_code == 400 and response.json()["error"] == "not_an_object"
    rx.assert_nothing_queued()


def test_an_empty_array_gets_400(rx: Receiver) -> None:
    response = rx.post([])
    assert response.status_code == 400 and response.json()["error"] == "no_transitions"
    rx.assert_nothing_queued()


def test_a_body_with_no_usable_transition_gets_400_with_the_reasons(rx: Receiver) -> None:
    """Nothing in it can ever reach Attentive: a 400 shows the misconfiguration in Lytics at once."""
    no_slug = trigger("a@x.io")
    del no_slug["data"]["segment_events"][0]["slug"]
    response = rx.post([no_slug, {"hello": "world"}])
    assert response.status_code == 400
    answer = response.json()
    assert answer["error"] == "no_usable_transitions"
    assert answer["unusable"] == {"missing_audience": 2}
    assert "segment event has no 'slug'" in answer["message"] and "'audience'" in answer["message"]
    rx.assert_nothing_queued()


def test_a_body_over_the_limit_gets_413_by_content_length_or_while_streaming() -> None:
    limit = 1000
    r = Receiver(WebhookSettings(tokens=(TOKEN,), max_bytes=limit))
    body = json.dumps([trigger(f"u{i}@x.io") for i in range(20)]).encode()
    assert len(body) > limit
    with r.client:
        declared = r.post(content=body)
        assert declared.status_code == 413 and "WEBHOOK_MAX_BYTES" in declared.json()["message"]

        def chunked() -> Iterator[bytes]:  # no Content-Length: the limit applies while reading
            for start in range(0, len(body), 100):
                yield body[start : start + 100]

        streamed = r.post(content=chunked())  # type: ignore[arg-type]
        assert streamed.status_code == 413
        r.assert_nothing_queued()
        small = json.dumps(trigger("a@x.io")).encode()
        assert len(small) <= limit and r.post(content=small).status_code == 202


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data",
        "application/json; charset=latin-1",
    ],
)
def test_a_wrong_content_type_gets_415(rx: Receiver, content_type: str) -> None:
    response = rx.post(trigger("a@x.io"), headers={"Content-Type": content_type})
    assert response.status_code == 415 and response.json()["error"] == "unsupported_media_type"
    rx.assert_nothing_queued()


# --- Redis and broker failures ----------------------------------------------------------------------


def test_redis_down_gets_503_with_retry_after_and_no_dispatch(rx: Receiver) -> None:
    rx.server.connected = False
    response = rx.post(trigger("a@x.io"))
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert response.json()["error"] == "unavailable"
    assert rx.dispatch.drains == []
    health = rx.client.get("/healthz")
    assert health.status_code == 503 and health.json() == {"status": "unavailable", "redis": "unreachable"}

    rx.server.connected = True
    accepted_chunk(rx, rx.post(trigger("a@x.io")), 1)  # Lytics' retry goes through


def test_a_broker_failure_after_the_chunk_is_stored_still_answers_202_and_leaves_it_for_the_sweep(
    rx: Receiver,
) -> None:
    rx.dispatch.fail = True
    response = rx.post(trigger("a@x.io"))
    assert response.status_code == 202
    chunk = response.json()["chunk"]
    assert list(rx.chunks()) == [chunk]
    # No drain counts as queued, so the next request asks again ...
    assert not rx.redis.exists(keys.inbox_drain_queued())
    rx.dispatch.fail = False
    assert rx.post(trigger("b@x.io")).status_code == 202
    assert rx.dispatch.drains == [(inbox.DRAIN_GATHER_SECONDS,)]
    # ... and the chunk is pending in the inbox, so the sweep re-drives it once it is old enough.
    written = rx.redis.zscore(keys.inbox_pending(), chunk)
    assert written is not None
    assert chunk in inbox.orphaned_chunks(rx.redis, now_ms=int(written) + 1 + inbox.ORPHAN_AFTER_MS)


def test_requests_while_a_drain_is_queued_ask_for_none_and_one_after_it_started_asks_again(
    rx: Receiver,
) -> None:
    for n in range(5):
        assert rx.post(trigger(f"u{n}@x.io")).status_code == 202
    assert len(rx.chunks()) == 5
    assert rx.dispatch.drains == [(inbox.DRAIN_GATHER_SECONDS,)]  # one drain for all five
    inbox.drain_started(rx.redis)  # the drain began: a request from now on needs one of its own
    assert rx.post(trigger("late@x.io")).status_code == 202
    assert rx.dispatch.drains == [(inbox.DRAIN_GATHER_SECONDS,)] * 2


def test_healthz_is_ok_without_credentials(rx: Receiver) -> None:
    response = rx.client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


# --- configuration and logging ----------------------------------------------------------------------


def test_settings_refuse_to_start_without_a_token_unless_auth_is_off_explicitly() -> None:
    with pytest.raises(WebhookConfigError, match="WEBHOOK_TOKEN is not set"):
        WebhookSettings.from_env({})
    with pytest.raises(WebhookConfigError, match="WEBHOOK_TOKEN is not set"):
        WebhookSettings.from_env({"WEBHOOK_TOKEN": " , "})
    assert WebhookSettings.from_env({}, insecure_no_auth=True).require_auth is False
    # A token that is set is enforced even with the flag.
    forced = WebhookSettings.from_env({"WEBHOOK_TOKEN": TOKEN}, insecure_no_auth=True)
    assert forced.require_auth and forced.tokens == (TOKEN,)


def test_settings_validate_tokens_size_and_method() -> None:
    with pytest.raises(WebhookConfigError, match="at least 16"):
        WebhookSettings.from_env({"WEBHOOK_TOKEN": "short"})
    with pytest.raises(WebhookConfigError, match="WEBHOOK_MAX_BYTES"):
        WebhookSettings.from_env({"WEBHOOK_TOKEN": TOKEN, "WEBHOOK_MAX_BYTES": "5MB"})
    with pytest.raises(WebhookConfigError, match="WEBHOOK_MAX_BYTES"):
        WebhookSettings.from_env({"WEBHOOK_TOKEN": TOKEN, "WEBHOOK_MAX_BYTES": "0"})
    with pytest.raises(WebhookConfigError, match="WEBHOOK_METHOD"):
        WebhookSettings.from_env({"WEBHOOK_TOKEN": TOKEN, "WEBHOOK_METHOD": "OPTIONS"})
    s = WebhookSettings.from_env(
        {
            "WEBHOOK_TOKEN": TOKEN,
            "WEBHOOK_MAX_BYTES": "2048",
            "WEBHOOK_METHOD": "put",
            "REDIS_URL": "redis://r:1/2",
        }
    )
    assert (s.max_bytes, s.methods, s.redis_url) == (2048, ("POST", "PUT"), "redis://r:1/2")
    assert TOKEN not in repr(s)


def test_the_drain_gather_time_is_a_setting_the_receiver_uses() -> None:
    assert (
        WebhookSettings.from_env({"WEBHOOK_TOKEN": TOKEN}).drain_gather_seconds == inbox.DRAIN_GATHER_SECONDS
    )
    for bad in ("-1", "11", "soon", "nan"):
        with pytest.raises(WebhookConfigError, match="WEBHOOK_DRAIN_GATHER_SECONDS"):
            WebhookSettings.from_env({"WEBHOOK_TOKEN": TOKEN, "WEBHOOK_DRAIN_GATHER_SECONDS": bad})
    settings = WebhookSettings.from_env({"WEBHOOK_TOKEN": TOKEN, "WEBHOOK_DRAIN_GATHER_SECONDS": "1.5"})
    rx = Receiver(settings)
    with rx.client:
        assert rx.post(trigger("a@x.io")).status_code == 202
    assert rx.dispatch.drains == [(1.5,)]


def test_the_token_never_reaches_the_access_log() -> None:
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "POST", f"/v1/transitions?a=1&token={TOKEN}&b=2", "1.1", 202),
        None,
    )
    assert RedactTokenFilter().filter(record)
    line = record.getMessage()
    assert TOKEN not in line and "token=***&b=2" in line and "?a=1&" in line


def test_module_level_app_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import worker.webhook.receiver as webhook

    monkeypatch.setattr(webhook, "_app", None)
    monkeypatch.delenv("WEBHOOK_TOKEN", raising=False)
    with pytest.raises(WebhookConfigError):
        _ = webhook.app
    monkeypatch.setenv("WEBHOOK_TOKEN", TOKEN)
    assert webhook.app is webhook.app
    assert webhook.app.state.receiver.settings.tokens == (TOKEN,)


def test_cli_serve_without_a_token_exits_2_with_one_clear_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("WEBHOOK_TOKEN", raising=False)
    assert cli_main(["serve", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: WEBHOOK_TOKEN is not set") and "--insecure-no-auth" in err
