"""A job whose API key cannot be read, with real workers, beat and the sandbox: blocked loudly in
``status`` (no traceback every few seconds), back by itself once a worker can read the key; and
``auth delete`` refusing to pull the key from under a running job."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import redis

from tests.celeryproc import ROOT, CeleryProcesses, wait_for
from tests.integration.test_pipeline import Pipeline, line, running_pipeline
from tests.sandboxproc import SandboxProcess
from worker.setup.crypto import generate_secret_key
from worker.setup.jobconfig import JobState
from worker.store import keys
from worker.store.joberrors import BLOCKED_RETRY_AT

pytestmark = pytest.mark.integration


@pytest.fixture
def pipeline(real_redis: redis.Redis, sandbox: SandboxProcess) -> Iterator[Pipeline]:
    with running_pipeline(real_redis, sandbox) as running:
        yield running


def cli(pipeline: Pipeline, *argv: str) -> subprocess.CompletedProcess[str]:
    """``attentive-export`` as an operator runs it, with the deployment's environment."""
    return subprocess.run(
        [sys.executable, "-m", "worker.cli.main", *argv],
        cwd=ROOT,
        env={**os.environ, **pipeline.procs.env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_worker_with_the_wrong_secret_key_blocks_the_job_visibly_until_a_worker_can_read_it(
    pipeline: Pipeline,
) -> None:
    pipeline.authorize()
    job = pipeline.job()
    wrong = CeleryProcesses({**pipeline.procs.env, "EXPORT_SECRET_KEY": generate_secret_key()})
    try:
        wrong.worker("wrongkey")
        pipeline.procs.beat()
        now = int(time.time() * 1000)
        pipeline.send([line("vip", "enter", now, email=f"u{i}@x.io") for i in range(20)])
        wait_for(lambda: pipeline.status(job)["blocked"], 60, "the job to be blocked")

        st = pipeline.status(job)
        assert st["state"] == "running" and st["counters"]["accepted"] == 20
        assert f"on worker host {socket.gethostname()}" in st["blocked"]["reason"]
        assert "EXPORT_SECRET_KEY is not the key it was saved with" in st["blocked"]["reason"]
        assert st["last_error_at_ms"] and st["last_error_recovered"] is False
        shown = cli(pipeline, "status", job.id)
        assert shown.returncode == 0, shown.stderr
        assert "RUNNING, BLOCKED" in shown.stdout and "next try" in shown.stdout
        assert pipeline.sandbox.requests() == []

        time.sleep(6)  # a dozen sweeps: none of them retries the key, and nothing raises
        log = wrong.log("wrongkey")
        assert "Traceback" not in log
        # Tried once (twice if two tasks raced to the first try), not every few seconds.
        assert 1 <= log.count(f"job {job.id} blocked") <= 2, log[-3000:]
        assert pipeline.status(job)["blocked"]["since_ms"] == st["blocked"]["since_ms"]
    finally:
        wrong.stop()

    # A worker with the right key comes up; at the block's next try (a minute later, brought
    # forward here) it reads the key, lifts the block and delivers everything.
    pipeline.procs.worker()
    pipeline.redis.hset(keys.job_status(job.id), BLOCKED_RETRY_AT, int(time.time() * 1000))
    wait_for(lambda: pipeline.status(job)["counters"]["users_delivered"] == 20, 60, "delivery")
    st = pipeline.wait_settled(job)
    assert st["blocked"] is None
    assert st["last_error_recovered"] is True
    assert "(recovered)" in cli(pipeline, "status", job.id).stdout


def test_auth_delete_refuses_while_a_job_runs_and_force_pauses_it(pipeline: Pipeline) -> None:
    pipeline.authorize()
    job = pipeline.job()
    refused = cli(pipeline, "auth", "delete", "sandbox")
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: authorization 'sandbox' (au_")
    assert f"{job.id} (running, 'pipeline test')" in refused.stderr
    assert refused.stderr.count("\n") == 1

    forced = cli(pipeline, "auth", "delete", "sandbox", "--force")
    assert forced.returncode == 0, forced.stderr
    assert f"paused job {job.id} (pipeline test): its authorization is deleted" in forced.stdout
    paused = pipeline.jobs.get(job.id)
    assert paused.state is JobState.PAUSED and "was deleted with --force" in paused.pause_reason
    listed = json.loads(cli(pipeline, "auth", "list", "--json").stdout)
    assert listed == []
