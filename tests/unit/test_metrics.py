"""The Prometheus collector (worker/observe/metrics.py) on fakeredis: every figure is read from
Redis at scrape time and agrees with ``status``; labels stay bounded; a missing Redis or a missing
newer structure never fails a scrape."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from worker.observe import heartbeat, metrics
from worker.observe.status import job_status
from worker.pipeline.buffer import Change, JobBuffer
from worker.setup.jobconfig import JobState, parse_job_config
from worker.setup.jobs import ExportJob, JobStore
from worker.store import keys
from worker.webhook.receiver import WebhookSettings, create_app

ROOT = Path(__file__).resolve().parents[2]
NOW = 1_800_000_000.0
KEY_HASH = "0123456789abcdef"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def r() -> Iterator[fakeredis.FakeRedis]:
    client = fakeredis.FakeRedis()
    yield client
    client.close()


def make_job(
    client: fakeredis.FakeRedis, label: str = "vip export", authorization: str = "acme"
) -> ExportJob:
    config = {
        "label": label,
        "authorization": authorization,
        "audiences": ["vip", "lapsed"],
        "identifier_mappings": {"email": "email"},
    }
    return JobStore(client).create(parse_job_config(config))


def authorize(client: fakeredis.FakeRedis, label: str = "acme", key_hash: str = KEY_HASH) -> None:
    """An authorization record as the store keeps it (the collector never decrypts the key)."""
    record = {
        "id": "au_0123456789ab",
        "label": label,
        "created_at": "2026-11-26T17:00:00Z",
        "key_hint": "••••abcd",
        "key_hash": key_hash,
        "encrypted_key": "not-read-by-the-collector",
    }
    client.hset(keys.authorizations(), record["id"], json.dumps(record))


def change(user: str, audience: str = "vip", at_ms: int = 1_000) -> Change:
    record = json.dumps(
        {"identifiers": {"email": f"{user}@example.com"}, "customAttributes": {audience: True}}
    )
    return Change(user, audience, at_ms, record, f"email:{user}@example.com")


def scrape(client: Any, *, clock: float = NOW, broker: Any = None) -> Samples:
    collector = metrics.ExportCollector(client, broker=broker, clock=lambda: clock)
    reg = metrics.CollectorRegistry(auto_describe=False)
    reg.register(collector)
    return parse(metrics.scrape_text(reg))


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(metrics.PREFIX + name, frozenset(labels.items()))]


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


def test_job_counters_and_live_figures_agree_with_status(r: fakeredis.FakeRedis) -> None:
    job = make_job(r)
    buffer = JobBuffer(r, job.id, 256)
    buffer.ingest([change(f"u{i}", at_ms=2_000) for i in range(5)] + [change("m", "lapsed", 2_000)])
    buffer.ingest([change("u0", at_ms=1_000), change("u1", at_ms=1_000)])  # older than accepted: stale
    buffer.seal_now()
    buffer.ingest([change("late", at_ms=3_000)])
    assert buffer.claim(lease_ms=60_000) is not None  # one batch under a flush lease
    r.hset(
        keys.job_status(job.id),
        mapping={"received": 9, "users_delivered": 4, "responses_429": 3, "rate_limited_seconds": 1.25},
    )
    r.hincrby(keys.job_skips(job.id), "no_identifier", 2)
    r.hincrby(keys.job_field_drops(job.id), "invalid_phone", 1)

    status = job_status(r, job.id)
    got = scrape(r)
    j = job.id
    c = status["counters"]
    assert value(got, "transitions_total", export_job=j, outcome="accepted") == c["accepted"] == 7
    assert value(got, "transitions_total", export_job=j, outcome="stale") == c["stale"] == 2
    assert value(got, "transitions_total", export_job=j, outcome="skipped") == 2
    assert value(got, "transitions_received_total", export_job=j) == c["received"] == 9
    assert value(got, "transitions_skipped_total", export_job=j, reason="no_identifier") == 2
    assert value(got, "field_drops_total", export_job=j, reason="invalid_phone") == 1
    assert value(got, "batches_total", export_job=j, event="sealed") == c["batches_sealed"] == 1
    assert value(got, "users_delivered_total", export_job=j) == c["users_delivered"] == 4
    b = status["buffer"]
    assert value(got, "open_batch_users", export_job=j) == b["users_in_open_batch"] == 1
    assert value(got, "batches_now", export_job=j, state="sending") == 1
    assert value(got, "batches_now", export_job=j, state="waiting") == b["batches_waiting_to_send"] == 0
    assert value(got, "users_in_flight", export_job=j) == b["users_in_unfinished_batches"] == 6
    # No authorization record for "acme" here: the key hash is left empty rather than guessed.
    assert value(got, "responses_429_total", export_job=j, key_hash="") == 3
    assert value(got, "rate_limited_seconds_total", export_job=j, key_hash="") == 1.25
    assert value(got, "job_state", export_job=j, state="running") == 1
    assert value(got, "job_state", export_job=j, state="paused") == 0
    assert value(got, "redis_up") == 1


def test_a_state_change_shows_at_the_next_scrape(r: fakeredis.FakeRedis) -> None:
    job = make_job(r)
    assert value(scrape(r), "job_state", export_job=job.id, state="running") == 1
    JobStore(r).set_state(job.id, JobState.PAUSED, "paused by an operator")
    got = scrape(r)
    assert value(got, "job_state", export_job=job.id, state="paused") == 1
    assert value(got, "job_state", export_job=job.id, state="running") == 0


def test_no_user_identifier_or_record_ever_appears_in_the_exposition(r: fakeredis.FakeRedis) -> None:
    job = make_job(r)
    JobBuffer(r, job.id, 256).ingest([change(f"person{i}") for i in range(3)])
    text = metrics.scrape_text(metrics.registry(r))
    assert "person" not in text and "example.com" not in text


def test_reason_labels_are_capped_with_the_rest_summed_under_other(r: fakeredis.FakeRedis) -> None:
    job = make_job(r)
    for i in range(metrics.MAX_LABEL_VALUES + 20):
        r.hincrby(keys.job_skips(job.id), f"reason_{i:03d}", i + 1)
    got = scrape(r)
    reasons = {
        dict(labels)["reason"]: v
        for (name, labels), v in got.items()
        if name == metrics.PREFIX + "transitions_skipped_total"
    }
    assert len(reasons) == metrics.MAX_LABEL_VALUES
    assert "other" in reasons
    n = metrics.MAX_LABEL_VALUES + 20
    assert sum(reasons.values()) == n * (n + 1) / 2  # nothing lost by the cap
    assert "reason_069" in reasons and "reason_000" not in reasons  # the largest kept


def test_redis_down_still_answers_with_redis_up_zero() -> None:
    server = fakeredis.FakeServer()
    client = fakeredis.FakeRedis(server=server)
    make_job(client)
    server.connected = False
    got = scrape(client)
    assert value(got, "redis_up") == 0
    assert names(got) == {metrics.PREFIX + "redis_up", metrics.PREFIX + "scrape_duration_seconds"}


def test_a_broker_down_loses_only_the_queue_depths(r: fakeredis.FakeRedis) -> None:
    server = fakeredis.FakeServer()
    broker = fakeredis.FakeRedis(server=server)
    broker.rpush("ingest", "m1", "m2")
    broker.rpush("ingest\x06\x163", "m3")  # a priority step's list counts too
    got = scrape(r, broker=broker)
    assert value(got, "queue_messages", queue="ingest") == 3
    assert value(got, "queue_messages", queue="flush") == 0
    server.connected = False
    got = scrape(r, broker=broker)
    assert value(got, "redis_up") == 1
    assert metrics.PREFIX + "queue_messages" not in names(got)


def test_in_flight_age_and_overdue_batches_come_from_the_in_flight_schedule(r: fakeredis.FakeRedis) -> None:
    job = make_job(r)
    now_ms = int(NOW * 1000)
    if not hasattr(keys, "in_flight"):
        pytest.skip("this version has no per-job in-flight schedule")
    r.zadd(keys.in_flight(job.id), {"1": now_ms - 13 * 3600_000, "2": now_ms - 5_000})
    got = scrape(r)
    assert value(got, "oldest_batch_in_flight_seconds", export_job=job.id) == 13 * 3600
    assert value(got, "batches_overdue", export_job=job.id, over="12h") == 1
    assert value(got, "batches_overdue", export_job=job.id, over="24h") == 0


def test_structures_newer_code_adds_are_left_out_when_absent(
    r: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("in_flight", "job_deadletter_counts", "parked_polls"):
        monkeypatch.delattr(keys, name, raising=False)
    job = make_job(r)
    got = scrape(r)
    assert value(got, "redis_up") == 1
    assert value(got, "open_batch_users", export_job=job.id) == 0
    assert not names(got) & {
        metrics.PREFIX + n
        for n in ("oldest_batch_in_flight_seconds", "deadletters_by_reason_total", "polls_parked")
    }
    # Status fields nobody writes yet are left out too, not shown as 0.
    assert metrics.PREFIX + "users_sent_total" not in names(got)
    assert metrics.PREFIX + "last_error_timestamp_seconds" not in names(got)


def test_deadletter_counts_by_reason_when_the_hash_exists(r: fakeredis.FakeRedis) -> None:
    if not hasattr(keys, "job_deadletter_counts"):
        pytest.skip("this version keeps no dead-letter counts by reason")
    job = make_job(r)
    r.hset(keys.job_deadletter_counts(job.id), mapping={"attentive_400": 3, "gave_up_after_failed_sends": 1})
    r.hset(keys.job_status(job.id), "deadlettered_users", 4)
    got = scrape(r)
    assert value(got, "deadletters_by_reason_total", export_job=job.id, reason="attentive_400") == 3
    assert value(got, "deadletters_total", export_job=job.id) == 4


def test_heartbeat_ages_and_workers_alive(r: fakeredis.FakeRedis) -> None:
    now_ms = int(NOW * 1000)
    heartbeat.worker_beat(r, "w1@a", at_ms=now_ms - 2_000)
    heartbeat.worker_beat(r, "w2@b", at_ms=now_ms - 90_000)  # silent: counted, not alive
    heartbeat.beat(r, heartbeat.BEAT, at_ms=now_ms - 1_500)
    got = scrape(r)
    assert value(got, "worker_heartbeat_age_seconds", worker="w1@a") == 2
    assert value(got, "worker_heartbeat_age_seconds", worker="w2@b") == 90
    assert value(got, "workers_alive") == 1
    assert value(got, "heartbeat_age_seconds", component="beat") == 1.5
    assert (metrics.PREFIX + "heartbeat_age_seconds", frozenset({("component", "sweep")})) not in got


def test_rate_limit_wait_is_read_from_the_keys_shared_schedule(r: fakeredis.FakeRedis) -> None:
    authorize(r)
    job = make_job(r)
    seconds, micros = r.time()
    now_us = int(seconds) * 1_000_000 + int(micros)
    r.set(keys.ratelimit(KEY_HASH), now_us + 3_000_000)  # the schedule runs 3 s ahead
    r.set(keys.ratelimit_backoff(KEY_HASH), now_us + 1_000_000)
    r.set(keys.ratelimit_streak(KEY_HASH), 4)
    got = scrape(r)
    slack = (4 / 90) + 1e-3  # four tokens of burst at 90/s
    assert 3 - slack - 0.5 < value(got, "ratelimit_wait_seconds", key_hash=KEY_HASH) <= 3
    assert 0.5 < value(got, "ratelimit_backoff_seconds", key_hash=KEY_HASH) <= 1
    assert value(got, "ratelimit_429_streak", key_hash=KEY_HASH) == 4
    assert value(got, "job_info", export_job=job.id, authorization="acme", key_hash=KEY_HASH) == 1


def test_ingest_counters_before_routing(r: fakeredis.FakeRedis) -> None:
    r.hset(keys.ingest_status(), mapping={"received": 10, "rejected:not_json": 2, "unroutable": 3})
    chunk_at = NOW * 1000 - 7_000
    r.zadd(keys.inbox_pending(), {"c1": chunk_at})
    got = scrape(r)
    assert value(got, "ingest_transitions_received_total") == 10
    assert value(got, "ingest_transitions_rejected_total", reason="not_json") == 2
    assert value(got, "ingest_transitions_unroutable_total") == 3
    assert value(got, "inbox_chunks_pending") == 1
    assert value(got, "inbox_oldest_chunk_age_seconds") == 7


def test_webhook_receiver_serves_the_same_metrics(r: fakeredis.FakeRedis) -> None:
    job = make_job(r)
    app = create_app(WebhookSettings(require_auth=False), r, dispatcher=None)
    with TestClient(app) as http:
        answer = http.get("/metrics")
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
        got = parse(answer.text)
        assert value(got, "redis_up") == 1
        assert value(got, "job_state", export_job=job.id, state="running") == 1
        open_metrics = http.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        assert open_metrics.headers["content-type"].startswith("application/openmetrics-text")
        assert open_metrics.text.rstrip().endswith("# EOF")


def round_trips(client: fakeredis.FakeRedis) -> int:
    """Round trips one scrape makes: single commands plus pipelines (one each)."""
    calls = 0

    def counted(real: Any) -> Any:
        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            return real(self, *args, **kwargs)

        return call

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fakeredis.FakeRedis, "execute_command", counted(fakeredis.FakeRedis.execute_command))
        mp.setattr(redis.client.Pipeline, "execute", counted(redis.client.Pipeline.execute))
        scrape(client)
    return calls


def test_a_scrape_costs_one_round_trip_per_job_whatever_the_buffers_hold(r: fakeredis.FakeRedis) -> None:
    make_job(r, label="job 0")
    base = round_trips(r)
    assert base <= 8, base
    for i in (1, 2):
        job = make_job(r, label=f"job {i}")
        JobBuffer(r, job.id, 256).ingest([change(f"u{k}") for k in range(300)])
    assert round_trips(r) == base + 2


def test_the_grafana_dashboard_uses_only_metrics_the_collector_exports(
    r: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "attentive-export.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"\battentive_export_\w+", e)}
    # Every structure present, so conditional metrics show up too.
    authorize(r)
    job = make_job(r)
    JobBuffer(r, job.id, 256).ingest([change("u1")])
    r.hset(keys.job_status(job.id), mapping={"users_sent": 1, "last_error_at_ms": 1})
    r.hset(keys.job_deadletter_counts(job.id), "attentive_400", 1)
    r.hincrby(keys.job_skips(job.id), "no_identifier", 1)
    r.hset(keys.ingest_status(), "rejected:not_json", 1)
    heartbeat.worker_beat(r, "w1@a")
    heartbeat.beat(r, heartbeat.BEAT)
    heartbeat.note_sweep(r)
    monkeypatch.setattr(r, "info", lambda *_a: {"used_memory": 1, "maxmemory": 0})  # fakeredis has no INFO
    exported = {name for name, _ in scrape(r, broker=fakeredis.FakeRedis())}
    assert len(dashboard["panels"]) >= 5
    assert used and used <= exported, sorted(used - exported)
