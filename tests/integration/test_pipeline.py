"""The real-time pipeline end to end: real Redis, real ``celery worker`` and ``celery beat``
processes, and the Attentive sandbox over HTTP. Each test states one promise of DESIGN.md §2."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest
import redis

from tests.celeryproc import CeleryProcesses, sender_app, wait_for
from tests.conftest import TEST_BROKER_URL, TEST_REDIS_URL
from tests.rabbitmq import private_vhost
from tests.sandboxproc import SandboxProcess
from worker.dispatch import CeleryDispatcher
from worker.observe.status import job_status
from worker.pipeline import inbox
from worker.pipeline.buffer import Change, JobBuffer
from worker.settings import broker_kind
from worker.setup.authorizations import AuthorizationStore
from worker.setup.crypto import generate_secret_key
from worker.setup.jobconfig import JobState, parse_job_config
from worker.setup.jobs import ExportJob, JobStore

pytestmark = pytest.mark.integration


def base_config(**overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "label": "pipeline test",
        "authorization": "sandbox",
        "audiences": ["vip", "lapsed"],
        "identifier_mappings": {"email": "email", "phone": "phone"},
        "attribute_mappings": {"first_name": "firstName", "city": "city"},
        "custom_attributes": ["ltv"],
        "flush_interval_seconds": 1,
    }
    config.update(overrides)
    return config


def line(audience: str, event: str, at: int, **user: Any) -> str:
    return json.dumps({"audience": audience, "event": event, "at": at, "user": user})


class Pipeline:
    """A test's view of one deployment: Redis, sandbox, Celery processes, helpers."""

    def __init__(self, redis_client: redis.Redis, sandbox: SandboxProcess, procs: CeleryProcesses) -> None:
        self.redis = redis_client
        self.sandbox = sandbox
        self.procs = procs
        self.jobs = JobStore(redis_client)
        self.secret = procs.env["EXPORT_SECRET_KEY"]

    def authorize(self, token: str = "test-key", label: str = "sandbox") -> None:
        AuthorizationStore(self.redis, self.secret).create(label, token)

    def job(self, **overrides: Any) -> ExportJob:
        return self.jobs.create(parse_job_config(base_config(**overrides)))

    def send(self, lines: list[str], chunk: int = 500) -> None:
        dispatcher = CeleryDispatcher()
        for start in range(0, len(lines), chunk):
            dispatcher.ingest(inbox.put_chunk(self.redis, lines[start : start + chunk]))

    def status(self, job: ExportJob) -> dict[str, Any]:
        return job_status(self.redis, job.id)

    def settled(self, job: ExportJob) -> bool:
        st = self.status(job)
        return (
            st["counters"]["accepted"] > 0
            and not any(st["buffer"].values())
            and not self.redis.zcard("aex:inbox:pending")
        )

    def wait_settled(self, job: ExportJob, timeout: float = 60) -> dict[str, Any]:
        try:
            wait_for(lambda: self.settled(job), timeout, "the job to deliver everything")
        except AssertionError:
            print(json.dumps(self.status(job), indent=2))
            print(self.procs.log("w1")[-5000:])
            raise
        return self.status(job)

    def custom(self, email: str) -> dict[str, Any]:
        user = self.sandbox.user(email=email)
        return user["custom"] if user else {}


@contextlib.contextmanager
def running_pipeline(
    real_redis: redis.Redis, sandbox: SandboxProcess, broker_url: str = TEST_BROKER_URL, **settings: str
) -> Iterator[Pipeline]:
    """Real workers and beat on the test Redis against ``sandbox``, with test-speed settings;
    ``settings`` adds or overrides environment variables (e.g. ``ATTENTIVE_UNCERTAIN_HOLD_SECONDS``).
    The Celery broker is the test Redis broker database (emptied before and after), or
    ``broker_url``: a RabbitMQ vhost of the test's own (:func:`tests.rabbitmq.private_vhost`)."""
    broker = redis.Redis.from_url(broker_url) if broker_kind(broker_url) == "redis" else None
    if broker is not None:
        broker.flushdb()
    env = {
        "REDIS_URL": TEST_REDIS_URL,
        "CELERY_BROKER_URL": broker_url,
        "ATTENTIVE_API_URL": sandbox.url,
        "EXPORT_SECRET_KEY": generate_secret_key(),
        "ATTENTIVE_FIRST_POLL_SECONDS": "0.3",
        "ATTENTIVE_POLL_CAP_SECONDS": "2",
        "SWEEP_INTERVAL_SECONDS": "0.5",
        "FLUSH_LEASE_SECONDS": "3",
        # A worker killed mid-send holds its users this long (the sandbox's jobs take about 1 s).
        "ATTENTIVE_UNCERTAIN_HOLD_SECONDS": "5",
        **settings,
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    procs = CeleryProcesses(env)
    # The test process dispatches tasks (Pipeline.send, CLI commands run in-process) to the same
    # broker, whichever the process-wide worker.app was configured with when first imported.
    sender = sender_app(broker_url)

    def _dispatch_to_this_broker(dispatcher: CeleryDispatcher) -> None:
        dispatcher._app = sender

    try:
        with mock.patch.object(CeleryDispatcher, "__init__", _dispatch_to_this_broker):
            yield Pipeline(real_redis, sandbox, procs)
    finally:
        procs.stop()
        sender.close()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if broker is not None:
            broker.flushdb()


@contextlib.contextmanager
def broker(kind: str) -> Iterator[str]:
    """A Celery broker URL for one test: the test Redis broker database (``"redis"``), or a RabbitMQ
    vhost of its own (``"rabbitmq"``: skipped locally without RabbitMQ, a failure in CI)."""
    if kind == "redis":
        yield TEST_BROKER_URL
    else:
        with private_vhost() as url:
            yield url


@pytest.fixture
def pipeline(
    request: pytest.FixtureRequest, real_redis: redis.Redis, sandbox: SandboxProcess
) -> Iterator[Pipeline]:
    """The pipeline on the Redis broker, or on the broker a test asks for with :data:`on_both_brokers`."""
    with (
        broker(getattr(request, "param", "redis")) as url,
        running_pipeline(real_redis, sandbox, url) as running,
    ):
        yield running


#: Runs a test that takes the ``pipeline`` fixture once on each broker the service supports: Redis,
#: then RabbitMQ (README, "Which broker"). A representative few use it (delivery, a worker killed
#: mid-flush, Attentive's faults, shutdown), to keep the suite's time in bounds.
on_both_brokers = pytest.mark.parametrize("pipeline", ["redis", "rabbitmq"], indirect=True)


def requests_for(sandbox: SandboxProcess, email: str) -> list[dict[str, Any]]:
    """Accepted bulk requests that carried ``email``, in arrival order, with bodies."""
    out = []
    for req in sandbox.requests(bodies=True):
        for user in req["body"]["users"]:
            if user["identifiers"].get("email") == email:
                out.append(user)
    return out


@on_both_brokers
def test_enter_sets_attribute_true_with_identifiers_and_attributes_and_exit_sets_false(
    pipeline: Pipeline,
) -> None:
    pipeline.authorize()
    job = pipeline.job()
    pipeline.procs.worker()
    pipeline.procs.beat()
    now = int(time.time() * 1000)
    pipeline.send(
        [
            line(
                "vip",
                "enter",
                now,
                email="ada@x.io",
                phone="(415) 555-0142",
                first_name="Ada",
                city="Oakland",
                ltv=12.5,
            ),
            line("vip", "enter", now, email="bo@x.io", first_name="Bo"),
        ]
    )
    pipeline.wait_settled(job)
    ada = pipeline.sandbox.user(email="ada@x.io")
    assert ada is not None
    assert ada["identifiers"]["phone"] == "+14155550142"
    assert ada["attributes"]["firstName"] == "Ada"
    assert ada["attributes"]["location"]["city"] == "Oakland"
    assert ada["custom"] == {"vip": True, "ltv": 12.5}

    pipeline.send([line("vip", "exit", now + 1000, email="ada@x.io")])
    wait_for(lambda: pipeline.custom("ada@x.io").get("vip") is False, 30, "ada's exit to reach Attentive")
    assert pipeline.custom("bo@x.io") == {"vip": True}
    st = pipeline.wait_settled(job)
    assert st["counters"]["users_delivered"] == 3


def test_full_batch_is_flushed_at_once_and_a_partial_one_after_the_interval(pipeline: Pipeline) -> None:
    pipeline.authorize()
    slow = pipeline.job(label="slow flush", flush_interval_seconds=300)
    pipeline.procs.worker()
    pipeline.procs.beat()
    now = int(time.time() * 1000)
    pipeline.send([line("vip", "enter", now, email=f"u{i}@x.io") for i in range(260)], chunk=1000)
    # Well before the 300 s interval, the size trigger alone sends the first 256 users.
    reqs = wait_for(lambda: pipeline.sandbox.requests(), 30, "the size-triggered request")
    assert [r["users"] for r in reqs] == [256]  # type: ignore[union-attr]
    assert pipeline.status(slow)["buffer"]["users_in_open_batch"] == 4

    pipeline.jobs.set_state(slow.id, JobState.STOPPED)
    quick = pipeline.job(label="quick flush", audiences=["lapsed"], flush_interval_seconds=2)
    sent_at = time.time()
    pipeline.send([line("lapsed", "enter", now, email=f"q{i}@x.io") for i in range(3)])
    wait_for(lambda: len(pipeline.sandbox.requests()) == 2, 30, "the interval-triggered request")
    last = pipeline.sandbox.requests()[-1]
    assert last["users"] == 3
    assert last["time"] - sent_at >= 2 - 0.2  # sealed by the interval, not by size
    pipeline.wait_settled(quick)


@pytest.mark.parametrize("completion_order", ["fifo", "random"])
def test_enter_then_exit_in_one_window_are_two_ordered_requests(
    pipeline: Pipeline, completion_order: str
) -> None:
    pipeline.sandbox.set_options(completion_order=completion_order, processing_delay=0.5)
    pipeline.authorize()
    job = pipeline.job(flush_interval_seconds=2)
    pipeline.procs.worker(concurrency=2)
    pipeline.procs.beat()
    now = int(time.time() * 1000)
    others = [line("vip", "enter", now, email=f"o{i}@x.io") for i in range(20)]
    pipeline.send(
        [*others, line("vip", "enter", now, email="eve@x.io"), line("vip", "exit", now + 1, email="eve@x.io")]
    )
    pipeline.wait_settled(job)
    carried = requests_for(pipeline.sandbox, "eve@x.io")
    assert [u["attributes"]["custom"]["vip"] for u in carried] == [True, False]
    assert pipeline.custom("eve@x.io")["vip"] is False
    eve = pipeline.sandbox.user(email="eve@x.io")
    assert eve is not None and [h["custom"]["vip"] for h in eve["history"]] == [True, False]
    for req in pipeline.sandbox.requests():
        assert len(req["identifiers"]) == len({json.dumps(i, sort_keys=True) for i in req["identifiers"]})


def test_out_of_order_and_redelivered_transitions_never_regress(pipeline: Pipeline) -> None:
    pipeline.authorize()
    job = pipeline.job()
    pipeline.procs.worker()
    pipeline.procs.beat()
    t = int(time.time() * 1000)
    newest_exit = line("vip", "exit", t + 10, email="ann@x.io")
    older_enter = line("vip", "enter", t, email="ann@x.io")
    pipeline.send([newest_exit, older_enter, newest_exit])
    pipeline.send([older_enter, newest_exit])  # redelivered later, in another chunk
    st = pipeline.wait_settled(job)
    assert pipeline.custom("ann@x.io") == {"vip": False}
    assert st["counters"]["stale"] == 4
    assert len(requests_for(pipeline.sandbox, "ann@x.io")) == 1


@on_both_brokers
def test_every_transition_arrives_under_429s_and_503s_and_two_workers_stay_under_100_per_second(
    pipeline: Pipeline,
) -> None:
    pipeline.authorize()
    pipeline.sandbox.set_faults(fault_429=0.3, fault_5xx=0.1, processing_delay=0.1)
    # Small batches so the two workers make many requests (and many fail).
    job = pipeline.job(batch_size=8, flush_interval_seconds=1)
    pipeline.procs.worker("w1", concurrency=2)
    pipeline.procs.worker("w2", concurrency=2)
    pipeline.procs.beat()
    now = int(time.time() * 1000)
    users = 400
    pipeline.send([line("vip", "enter", now, email=f"f{i}@x.io") for i in range(users)], chunk=100)
    st = pipeline.wait_settled(job, timeout=120)
    assert st["counters"]["users_delivered"] == users
    assert st["counters"]["responses_429"] > 0
    delivered = {
        u["identifiers"]["email"] for u in pipeline.sandbox.users() if u["custom"].get("vip") is True
    }
    assert delivered == {f"f{i}@x.io" for i in range(users)}
    peak = pipeline.sandbox.counters("test-key")["max_requests_per_second"]
    assert max(peak.values()) <= 100, peak


def test_two_workers_share_one_rate_limit_under_100_per_second(pipeline: Pipeline) -> None:
    pipeline.authorize()
    # Two users per request: 1000 users make 500 submissions and 500+ polls, more than 10 s of
    # work at 90/s, so the shared limiter is what paces the workers.
    job = pipeline.job(batch_size=2, flush_interval_seconds=1)
    pipeline.procs.worker("w1", concurrency=2)
    pipeline.procs.worker("w2", concurrency=2)
    pipeline.procs.beat()
    now = int(time.time() * 1000)
    pipeline.send([line("vip", "enter", now, email=f"s{i}@x.io") for i in range(1000)], chunk=250)
    st = pipeline.wait_settled(job, timeout=120)
    assert st["counters"]["users_delivered"] == 1000
    counters = pipeline.sandbox.counters("test-key")
    peak = counters["max_requests_per_second"]
    # The invariant, whatever the machine's speed: never more than Attentive's 100 in any second.
    # Bug caught: workers not sharing one limiter (each would go at 90/s), on any machine able to
    # offer more than 100 requests/s. The former "busiest second >= 50" was a lower bound on the
    # machine's speed and failed when it was busy; it is replaced by a count: every request went
    # through the budget (500 submissions of two users and a poll for each), over ten seconds of
    # it at the limit, so the bound was checked on a long run, not on a trickle.
    assert max(peak.values()) <= 100, peak
    requests = counters["requests"]
    submissions = sum(requests["POST /v2/bulk/user/attributes"].values())
    polls = sum(requests["GET /v2/bulk/job/{bulkJobId}"].values())
    assert submissions >= 500 and polls >= 500, requests  # (a lease lost under load re-sends a batch)


@on_both_brokers
def test_worker_killed_mid_flush_loses_nothing(pipeline: Pipeline) -> None:
    pipeline.sandbox.set_options(latency_ms=4000)  # every request hangs, so the kill lands mid-POST
    pipeline.authorize()
    job = pipeline.job(flush_interval_seconds=1)
    pipeline.procs.worker("w1")
    pipeline.procs.beat()
    now = int(time.time() * 1000)
    pipeline.send([line("vip", "enter", now, email=f"k{i}@x.io") for i in range(10)])
    wait_for(lambda: pipeline.redis.zcard(f"aex:{{job:{job.id}}}:leases"), 30, "a flush to hold a batch")
    pipeline.procs.kill("w1", signal.SIGKILL)
    pipeline.sandbox.set_options(latency_ms=0)
    pipeline.procs.worker("w2")
    st = pipeline.wait_settled(job, timeout=60)
    assert st["counters"]["users_delivered"] >= 10
    assert all(pipeline.custom(f"k{i}@x.io").get("vip") is True for i in range(10))


def test_a_poisoned_record_is_dead_lettered_and_the_rest_delivered(pipeline: Pipeline) -> None:
    pipeline.authorize()
    job = pipeline.job(flush_interval_seconds=1)
    buffer = JobBuffer(pipeline.redis, job.id)
    now = int(time.time() * 1000)
    good = [
        Change(
            f"g{i}@x.io",
            "vip",
            now,
            json.dumps({"identifiers": {"email": f"g{i}@x.io"}, "attributes": {"custom": {"vip": True}}}),
        )
        for i in range(9)
    ]
    # A record our mapping would never build: Attentive refuses it (phone not E.164).
    poisoned = Change(
        "bad",
        "vip",
        now,
        json.dumps({"identifiers": {"phone": "12345"}, "attributes": {"custom": {"vip": True}}}),
    )
    buffer.ingest([*good[:5], poisoned, *good[5:]])
    pipeline.procs.worker()
    pipeline.procs.beat()
    st = pipeline.wait_settled(job)
    assert all(pipeline.custom(f"g{i}@x.io") == {"vip": True} for i in range(9))
    assert st["counters"]["users_delivered"] == 9
    from worker.pipeline.deadletters import read

    [dead] = read(pipeline.redis, job.id)
    assert dead["user"] == "bad"
    assert "phone" in dead["reason"]


def test_revoked_key_pauses_the_job_and_stops_requests(pipeline: Pipeline) -> None:
    pipeline.sandbox.add_token("revocable-key")
    pipeline.authorize("revocable-key")
    job = pipeline.job()
    pipeline.procs.worker()
    pipeline.procs.beat()
    now = int(time.time() * 1000)
    pipeline.send([line("vip", "enter", now, email="r@x.io")])
    pipeline.wait_settled(job)
    pipeline.sandbox.revoke("revocable-key")
    pipeline.send([line("vip", "enter", now, email=f"r{i}@x.io") for i in range(5)])
    wait_for(lambda: pipeline.jobs.get(job.id).state is JobState.PAUSED, 30, "the job to pause")
    assert "401" in pipeline.jobs.get(job.id).pause_reason

    def refused() -> int:
        return pipeline.sandbox.counters("revocable-key")["requests"]["POST /v2/bulk/user/attributes"].get(
            "401", 0
        )

    seen = refused()
    time.sleep(3)  # a retry storm would show up as more requests in these seconds (sweep runs every 0.5 s)
    assert refused() == seen == 1
    st = pipeline.status(job)
    assert st["state"] == "paused"
    assert st["buffer"]["batches_waiting_to_send"] == 1  # kept, not lost
    assert st["last_error"] and "401" in st["last_error"]

    # Re-authorized and resumed, the kept batch goes out.
    pipeline.sandbox.add_token("revocable-key")
    pipeline.jobs.set_state(job.id, JobState.RUNNING)
    pipeline.wait_settled(job)
    assert all(pipeline.custom(f"r{i}@x.io") == {"vip": True} for i in range(5))
