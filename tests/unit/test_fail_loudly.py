"""A job whose API key cannot be read fails loudly: blocked with the reason and the time, tried
again once a minute (not every few seconds), and back by itself once the cause is fixed.

The runtime here reads real authorization records (fake Redis): nothing patches ``client_for``.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import httpx
import pytest
import redis

import worker.cli.main as cli
from worker import runtime as runtime_module
from worker.clients.attentive import AttentiveClient
from worker.observe import summary
from worker.observe.metrics import registry, scrape_text
from worker.observe.status import job_status
from worker.pipeline.attentive_calls import BLOCKED_RETRY_SECONDS
from worker.pipeline.buffer import JobBuffer
from worker.pipeline.flush import flush_job
from worker.pipeline.ingest import ingest_lines
from worker.pipeline.poller import request_pollers, run_poller
from worker.pipeline.sweep import sweep
from worker.runtime import AUTH_RECHECK_SECONDS, Runtime
from worker.settings import Settings
from worker.setup.authorizations import AuthorizationNotFound, AuthorizationStore
from worker.setup.crypto import generate_secret_key
from worker.setup.jobconfig import parse_job_config
from worker.setup.jobs import ExportJob
from worker.store import keys
from worker.store.joberrors import BLOCKED_RETRY_AT, error_recovered
from worker.store.ratelimit import api_key_hash
from worker.store.replies import decode_hash

from .pipeline_kit import BASE_URL, RATE, FakeAttentive, RecordingDispatcher, enter, users

SECRET = generate_secret_key()
API_KEY = "attn_live_0123456789abcdef"


class Deployment:
    """Fake Redis, a fake Attentive that also answers ``/v2/me``, and runtimes with any secret key."""

    def __init__(self, client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
        self.redis = client
        self.attentive = FakeAttentive()
        self.dispatch = RecordingDispatcher()
        monkeypatch.setattr(runtime_module, "AttentiveClient", lambda key, _url: self.client(key))

    def handler(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v2/me":
            return httpx.Response(200, json={"companyName": "Acme", "applicationName": "Export"})
        return self.attentive.handler(request)

    def client(self, api_key: str) -> AttentiveClient:
        return AttentiveClient(api_key, BASE_URL, transport=httpx.MockTransport(self.handler), max_attempts=1)

    def runtime(self, secret: str = SECRET) -> Runtime:
        settings = Settings(
            rate_limit_per_second=RATE, first_poll_seconds=0.01, lease_seconds=60.0, secret_key=secret
        )
        return Runtime(settings, self.redis, self.dispatch)

    def authorize(self, label: str = "acme") -> None:
        AuthorizationStore(self.redis, SECRET, client_factory=self.client).create(label, API_KEY)

    def job(self, rt: Runtime, authorization: str = "acme") -> ExportJob:
        config = {
            "label": "vip export",
            "authorization": authorization,
            "audiences": ["vip"],
            "identifier_mappings": {"email": "email"},
        }
        return rt.jobs.create(parse_job_config(config))

    def sealed(self, rt: Runtime, job: ExportJob, prefix: str = "u") -> None:
        ingest_lines(self.redis, rt.jobs, [json.dumps(enter(e)) for e in users(3, prefix)])
        assert JobBuffer(self.redis, job.id).seal_now()

    def status(self, job: ExportJob) -> dict[str, str]:
        return decode_hash(self.redis.hgetall(keys.job_status(job.id)))

    def a_minute_later(self, job: ExportJob) -> None:
        """The block's next try is due (instead of sleeping through BLOCKED_RETRY_SECONDS)."""
        self.redis.hset(keys.job_status(job.id), BLOCKED_RETRY_AT, int(time.time() * 1000) - 1)


@pytest.fixture
def dep(fake_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> Deployment:
    return Deployment(fake_redis, monkeypatch)


def counting_key_reads(rt: Runtime, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record each time the runtime reads an authorization record."""
    reads: list[str] = []
    store = rt.authorizations
    real_get = store.get

    def get(id_or_label: str) -> Any:
        reads.append(id_or_label)
        return real_get(id_or_label)

    monkeypatch.setattr(store, "get", get)
    return reads


def test_a_deleted_authorization_blocks_the_job_loudly_and_it_recovers_once_saved_again(
    dep: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    dep.authorize()
    rt = dep.runtime()
    job = dep.job(rt)
    dep.sealed(rt, job)
    AuthorizationStore(dep.redis, SECRET).delete("acme")  # as `auth delete --force` would
    reads = counting_key_reads(rt, monkeypatch)
    before = int(time.time() * 1000)

    report = flush_job(rt, job.id)  # no exception: the task would not fail and log a traceback

    assert report.blocked and report.submitted == []
    assert dep.attentive.posts() == []
    assert JobBuffer(dep.redis, job.id).sealed_count() == 1  # nothing lost: still waiting to be sent
    st = job_status(dep.redis, job.id)
    assert st["state"] == "running"
    blocked = st["blocked"]
    assert blocked is not None
    assert "authorization 'acme' no longer exists" in blocked["reason"]
    assert "attentive-export auth add --label acme" in blocked["reason"]
    assert before <= blocked["since_ms"] <= int(time.time() * 1000)
    retry_in = (blocked["retry_at_ms"] - blocked["since_ms"]) / 1000
    assert retry_in == pytest.approx(BLOCKED_RETRY_SECONDS, abs=1)
    assert st["last_error"] == blocked["reason"] and st["last_error_at_ms"] >= before
    assert st["last_error_recovered"] is False
    text = summary.render([st], int(time.time() * 1000))
    assert "RUNNING, BLOCKED" in text and "next try" in text

    # Within the minute nobody tries again: no flush task, no poller, no read of the key.
    reads.clear()
    assert flush_job(rt, job.id).blocked
    dep.redis.hset(keys.job_status(job.id), "last_claim_at", 0)  # long unclaimed, as the sweep sees it
    assert sweep(rt).flushes == 0
    assert request_pollers(rt, [job], int(time.time() * 1000)) == 0
    assert reads == [] and dep.dispatch.flushes == []

    # Saved again: the next try (a minute later) sends, and the block is lifted.
    dep.authorize()
    assert flush_job(rt, job.id).blocked  # not before the next try is due
    dep.a_minute_later(job)
    assert sweep(rt).flushes == 1
    report = flush_job(rt, job.id)
    assert len(report.submitted) == 1 and len(dep.attentive.posts()) == 1
    st = job_status(dep.redis, job.id)
    assert st["blocked"] is None
    assert st["last_error_recovered"] is True  # kept, with its time, shown as recovered
    assert "(recovered)" in summary.render([st], int(time.time() * 1000))


def test_a_worker_with_another_secret_key_blocks_the_job_and_names_its_host(dep: Deployment) -> None:
    dep.authorize()
    good = dep.runtime()
    job = dep.job(good)
    dep.sealed(good, job)
    flush_job(good, job.id)  # sent by a worker with the right key: now at Attentive
    (at_attentive,) = dep.redis.zrange(keys.polls(job.id), 0, -1)
    dep.redis.zadd(keys.polls(job.id), {at_attentive: 0})  # its status check is due
    dep.sealed(good, job, prefix="v")  # and another batch waits to be sent
    wrong = dep.runtime(generate_secret_key())

    assert flush_job(wrong, job.id).blocked
    reason = dep.status(job)["blocked_reason"]
    assert f"on worker host {socket.gethostname()}" in reason
    assert "EXPORT_SECRET_KEY is not the key it was saved with" in reason
    assert API_KEY not in reason

    # The poller of that worker stands down without an exception, and none is queued meanwhile.
    dep.a_minute_later(job)
    report = run_poller(wrong, api_key_hash(API_KEY), budget_seconds=2)
    assert report.checked == 0 and dep.attentive.status_gets() == []
    assert request_pollers(wrong, [job], int(time.time() * 1000)) == 0
    assert dep.status(job)["blocked_reason"] == reason

    # A worker with the right key takes over at the next try: checks, sends, unblocks.
    dep.a_minute_later(job)
    assert request_pollers(good, [job], int(time.time() * 1000)) == 1
    report = run_poller(good, api_key_hash(API_KEY), budget_seconds=2)
    assert report.checked == 1 and "blocked_reason" not in dep.status(job)
    assert len(flush_job(good, job.id).submitted) == 1


def test_a_cached_client_notices_a_deleted_authorization_within_the_recheck_interval(
    dep: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    dep.authorize()
    rt = dep.runtime()
    job = dep.job(rt)
    client = rt.client_for(job)
    AuthorizationStore(dep.redis, SECRET).delete("acme")
    assert rt.client_for(job) is client  # cached: no Redis read per batch
    later = time.monotonic() + AUTH_RECHECK_SECONDS + 1
    monkeypatch.setattr(runtime_module.time, "monotonic", lambda: later)
    with pytest.raises(AuthorizationNotFound):
        rt.client_for(job)
    dep.authorize()  # saved again (a new record): a new client, not the old one
    assert rt.client_for(job) is not client


def test_metrics_and_jobs_list_show_the_block(
    dep: Deployment, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    dep.authorize()
    rt = dep.runtime()
    job = dep.job(rt)
    AuthorizationStore(dep.redis, SECRET).delete("acme")
    assert flush_job(rt, job.id).blocked
    exposition = scrape_text(registry(dep.redis))
    assert f'attentive_export_job_blocked{{export_job="{job.id}"}} 1.0' in exposition
    assert f'attentive_export_job_error_active{{export_job="{job.id}"}} 1.0' in exposition
    monkeypatch.setattr(cli, "_redis", lambda settings: dep.redis)
    assert cli.main(["jobs", "list"]) == 0
    assert "(BLOCKED: the job's authorization 'acme' no longer exists" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("fields", "recovered"),
    [
        ({}, None),
        ({"last_error": "x", "last_error_at_ms": "100"}, False),
        ({"last_error": "x", "last_error_at_ms": "100", "last_flush_at": "99"}, False),
        ({"last_error": "x", "last_error_at_ms": "100", "last_flush_at": "101"}, True),
        ({"last_error": "x", "last_error_at_ms": "100", "last_poll_at": "101"}, True),
        # a send failing right now is not a recovery, whatever the polls say
        (
            {"last_error": "x", "last_error_at_ms": "100", "last_poll_at": "101", "consecutive_errors": "2"},
            False,
        ),
        (
            {"last_error": "x", "last_error_at_ms": "100", "last_flush_at": "101", "blocked_reason": "x"},
            False,
        ),
        ({"last_error": "x", "last_flush_at": "5"}, True),  # older code wrote no time
    ],
)
def test_an_error_counts_as_recovered_only_after_a_later_success(
    fields: dict[str, str], recovered: bool | None
) -> None:
    assert error_recovered(fields) is recovered


def test_status_shows_beat_and_the_sweep_down_when_their_heartbeats_are_stale() -> None:
    service = {
        "workers": {"w1@a": 1.0},
        "workers_alive": 1,
        "beat_age_seconds": 95.0,
        "sweep_age_seconds": 2.0,
        "schedule_stale_seconds": 30.0,
    }
    text = "\n".join(summary.service_lines(service))
    assert "beat          last beat 1 min 35 s ago - DOWN: no sweeps are scheduled" in text
    assert "sweep         last beat 2.0 s ago\n" in text + "\n"
    text = "\n".join(summary.service_lines({**service, "sweep_age_seconds": None}))
    assert "sweep         no heartbeat - DOWN: time-based flushes and crash recovery stop" in text


def test_a_finished_backfill_shows_its_old_error_as_recovered() -> None:
    block = {"audiences": {"vip": {"pages": 3, "members": 250, "finished": True, "last_error": "Lytics 503"}}}
    (_, line) = summary._backfill_lines(block, 0)
    assert "earlier error (recovered): Lytics 503" in line
