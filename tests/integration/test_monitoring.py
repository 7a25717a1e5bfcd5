"""Monitoring a running deployment: real ``celery worker`` and ``celery beat`` processes, the sandbox,
the standalone exporter (``attentive-export metrics``) scraped over HTTP, and ``attentive-export
health`` and ``status`` run as an operator (or a probe) would."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.celeryproc import ROOT, wait_for
from tests.integration.test_pipeline import Pipeline, line, running_pipeline
from tests.sandboxproc import SandboxProcess
from worker.cli.main import main

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def exporter(env: dict[str, str]) -> Iterator[str]:
    """``attentive-export metrics`` in its own process; yields its /metrics URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli.main", "metrics", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        wait_for(lambda: _answers(url), 20, "the exporter to listen")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def scrape(url: str) -> Samples:
    answer = httpx.get(url, timeout=10)
    assert answer.status_code == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(answer.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[("attentive_export_" + name, frozenset(labels.items()))]


def healthy(*args: str) -> bool:
    return main(["health", *args, "--quiet"]) == 0


@pytest.fixture
def pipeline(real_redis: redis.Redis, sandbox: SandboxProcess) -> Iterator[Pipeline]:
    with running_pipeline(real_redis, sandbox) as running:
        yield running


def test_metrics_health_and_status_agree_on_a_running_pipeline(
    pipeline: Pipeline, capsys: pytest.CaptureFixture[str]
) -> None:
    pipeline.authorize()
    job = pipeline.job()
    host = socket.gethostname()
    assert not healthy("worker") and not healthy("beat")  # nothing runs yet

    pipeline.procs.worker()
    pipeline.procs.beat()
    wait_for(lambda: healthy("worker"), 60, "the worker's heartbeat")
    wait_for(lambda: healthy("beat"), 60, "beat's heartbeat")
    assert healthy()  # the whole service: Redis, a live worker, beat (and the sweep if it beats)

    now = int(time.time() * 1000)
    lines = [line("vip", "enter", now, email=f"m{i}@x.io") for i in range(40)]
    lines += [line("vip", "exit", now - 5_000, email=f"m{i}@x.io") for i in range(5)]  # older: stale
    lines.append(line("vip", "enter", now, first_name="Nobody"))  # no identifier: skipped
    pipeline.send(lines)
    st = pipeline.wait_settled(job)
    wait_for(lambda: pipeline.status(job)["counters"]["users_delivered"] == 40, 30, "every delivery counted")

    assert main(["status", "--json", job.id]) == 0
    status: dict[str, Any] = json.loads(capsys.readouterr().out)
    c = status["counters"]
    assert (c["accepted"], c["stale"], status["skips"]) == (40, 5, {"no_identifier": 1})

    with exporter(pipeline.procs.env) as url:
        got = scrape(url)
    j = job.id
    assert value(got, "redis_up") == 1
    assert value(got, "transitions_total", export_job=j, outcome="accepted") == c["accepted"]
    assert value(got, "transitions_total", export_job=j, outcome="stale") == c["stale"]
    assert value(got, "transitions_total", export_job=j, outcome="skipped") == 1
    assert value(got, "transitions_received_total", export_job=j) == c["received"]
    assert value(got, "users_delivered_total", export_job=j) == c["users_delivered"] == 40
    assert value(got, "batches_total", export_job=j, event="submitted") == c["batches_submitted"] >= 1
    assert value(got, "batches_total", export_job=j, event="completed") == c["batches_completed"] >= 1
    assert value(got, "deadletters_total", export_job=j) == c["deadlettered_users"] == 0
    assert value(got, "open_batch_users", export_job=j) == st["buffer"]["users_in_open_batch"] == 0
    assert value(got, "batches_now", export_job=j, state="at_attentive") == 0
    assert value(got, "job_state", export_job=j, state="running") == 1
    assert value(got, "workers_alive") == 1
    # Seconds after they started, both still beat: every 2 s (the worker), every sweep (beat).
    assert value(got, "worker_heartbeat_age_seconds", worker=f"w1@{host}") < 5
    assert value(got, "heartbeat_age_seconds", component="beat") < 5
    assert ("attentive_export_queue_messages", frozenset({("queue", "ingest")})) in got

    assert main(["status", j]) == 0
    text = capsys.readouterr().out
    assert "RUNNING" in text and "40 delivered" in text

    # A worker killed outright stops beating: its probe fails once the heartbeat is older than allowed.
    pipeline.procs.kill("w1")
    wait_for(lambda: not healthy("worker", "--max-age", "3"), 30, "the dead worker's probe to fail")
    # One stopped cleanly is gone at once.
    pipeline.procs.worker("w2")
    wait_for(lambda: healthy("worker", "--node", f"w2@{host}"), 60, "the second worker's heartbeat")
    pipeline.procs.kill("w2", signal.SIGTERM)
    assert not healthy("worker", "--node", f"w2@{host}")
