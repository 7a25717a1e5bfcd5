"""``attentive-export trace`` against real workers and the sandbox: one user followed through every
stage (open batch, held behind an unfinished Attentive job, at Attentive, delivered, dead-lettered),
with the workers logging JSON lines (LOG_FORMAT=json) whose ids are fields."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest
import redis

from tests.celeryproc import ROOT, wait_for
from tests.integration.test_pipeline import line, running_pipeline
from tests.sandboxproc import SandboxProcess
from worker.dispatch import CeleryDispatcher
from worker.observe import trace as tr
from worker.pipeline.buffer import Change, JobBuffer

pytestmark = pytest.mark.integration


def stages(client: redis.Redis, job_id: str, user: str) -> dict[str, tr.AudienceTrace]:
    return {a.audience: a for a in tr.trace_user(client, job_id, user).audiences}


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in text.splitlines() if x.startswith("{")]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli.main", *args],
        cwd=ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.timeout(240)
def test_trace_follows_a_user_through_every_stage(real_redis: redis.Redis, sandbox: SandboxProcess) -> None:
    with running_pipeline(real_redis, sandbox, LOG_FORMAT="json") as pipeline:
        pipeline.authorize()
        # A long flush interval keeps changes in the open batch until something seals it; Attentive
        # keeps every job IN_PROGRESS until the test completes it.
        job = pipeline.job(flush_interval_seconds=300)
        sandbox.set_options(processing_delay=3600)
        pipeline.procs.worker()
        pipeline.procs.beat()
        t0 = int(time.time() * 1000) - 60_000
        t1 = t0 + 1_000
        assert {a.where for a in stages(real_redis, job.id, "ada@x.io").values()} == {tr.NONE}

        # Open batch.
        pipeline.send([line("vip", "enter", t0, email="Ada@X.io"), line("vip", "enter", t0, email="bo@x.io")])
        wait_for(lambda: stages(real_redis, job.id, "ada@x.io")["vip"].where == tr.OPEN, 30, "ada open")
        ada = stages(real_redis, job.id, "ADA@x.io")  # the key is normalised like the email identifier
        assert (ada["vip"].event, ada["vip"].last_event_ms) == ("enter", t0)
        assert ada["lapsed"].where == tr.NONE

        # Ada's exit seals the open batch (early flush) and waits behind it; bo's enter goes with it.
        pipeline.send([line("vip", "exit", t1, email="ada@x.io")])

        def at_attentive() -> tr.AudienceTrace | None:
            bo = stages(real_redis, job.id, "bo@x.io")["vip"]
            return bo if bo.where == tr.AT_ATTENTIVE else None

        bo = wait_for(at_attentive, 30, "bo's enter at Attentive")
        assert isinstance(bo, tr.AudienceTrace) and bo.attentive_job is not None
        [sandbox_job] = sandbox.jobs()
        first_job = sandbox_job["bulkJobId"]
        assert (bo.attentive_job.id, bo.attentive_job.status, bo.event) == (first_job, "unfinished", "enter")
        ada_vip = stages(real_redis, job.id, "ada@x.io")["vip"]
        assert (ada_vip.where, ada_vip.event, ada_vip.last_event_ms) == (tr.HELD, "exit", t1)
        assert ada_vip.batch_id == bo.batch_id and first_job in ada_vip.detail

        # Attentive finishes: bo is delivered, ada's exit moves on into the open batch.
        sandbox.set_job_status(first_job, "COMPLETED")
        wait_for(
            lambda: stages(real_redis, job.id, "bo@x.io")["vip"].where == tr.DELIVERED, 30, "bo delivered"
        )
        bo = stages(real_redis, job.id, "bo@x.io")["vip"]
        assert bo.attentive_job is not None and bo.attentive_job.id == first_job
        assert stages(real_redis, job.id, "ada@x.io")["vip"].where == tr.OPEN

        # A record Attentive refuses (400) is dead-lettered with Attentive's reason; ada's exit goes out.
        buffer = JobBuffer(real_redis, job.id)
        poisoned = json.dumps({"identifiers": {"phone": "12345"}, "attributes": {"custom": {"vip": True}}})
        buffer.ingest([Change("bad-user", "vip", t1, poisoned)])
        buffer.seal_now()
        CeleryDispatcher().flush(job.id)
        wait_for(
            lambda: stages(real_redis, job.id, "bad-user")["vip"].where == tr.DEADLETTERED, 30, "dead letter"
        )
        bad = stages(real_redis, job.id, "bad-user")["vip"]
        assert bad.reason is not None and bad.reason.startswith("attentive_400") and "phone" in bad.reason
        wait_for(
            lambda: stages(real_redis, job.id, "ada@x.io")["vip"].where == tr.AT_ATTENTIVE, 30, "ada sent"
        )
        second = stages(real_redis, job.id, "ada@x.io")["vip"].attentive_job
        assert second is not None and second.id != first_job
        sandbox.set_job_status(second.id, "COMPLETED")
        wait_for(
            lambda: stages(real_redis, job.id, "ada@x.io")["vip"].where == tr.DELIVERED, 30, "ada delivered"
        )
        assert pipeline.custom("ada@x.io") == {"vip": False}

        # An Attentive job parked for review: the poll's warning carries the ids as JSON fields.
        pipeline.send([line("lapsed", "enter", t1, email="rev@x.io")])
        wait_for(
            lambda: stages(real_redis, job.id, "rev@x.io")["lapsed"].where != tr.NONE, 30, "rev ingested"
        )
        buffer.seal_now()
        CeleryDispatcher().flush(job.id)

        def rev_job() -> tr.AttentiveJob | None:
            got = stages(real_redis, job.id, "rev@x.io")["lapsed"].attentive_job
            return got if got is not None and got.status == "unfinished" else None

        rev = wait_for(rev_job, 30, "rev at Attentive")
        assert isinstance(rev, tr.AttentiveJob)
        sandbox.set_job_status(rev.id, "NEEDS_REVIEW")

        def review_warning() -> dict[str, Any] | None:
            for entry in json_lines(pipeline.procs.log("w1")):
                if entry.get("attentive_job_id") == rev.id and entry["level"] == "WARNING":
                    return entry
            return None

        warning = wait_for(review_warning, 30, "the NEEDS_REVIEW warning")
        assert isinstance(warning, dict)
        assert warning["job_id"] == job.id and isinstance(warning["batch_id"], int)
        assert "NEEDS_REVIEW" in warning["message"] and warning["task"] == "export.poll_key"

        # The command line: readable, JSON, and an unknown job as one error line.
        readable = cli("trace", job.id, "ada@x.io")
        assert readable.returncode == 0, readable.stderr
        assert readable.stdout.startswith(f"user ada@x.io in job {job.id}")
        assert "delivered (nothing pending, no dead letter)" in readable.stdout
        as_json = cli("trace", job.id, "bad-user", "--json")
        assert json.loads(as_json.stdout)["audiences"][0]["where"] == tr.DEADLETTERED
        unknown = cli("trace", "no-such-job", "ada@x.io")
        assert unknown.returncode == 2 and unknown.stdout == ""
        assert (
            unknown.stderr.startswith("error: no export job 'no-such-job'")
            and unknown.stderr.count("\n") == 1
        )

        worker_log, beat_log = pipeline.procs.log("w1"), pipeline.procs.log("beat")

    # LOG_FORMAT=json: after Celery's banner (stdout), every line is one JSON object.
    lines = worker_log.splitlines()
    first = next(i for i, x in enumerate(lines) if x.startswith("{"))
    body = [x for x in lines[first:] if x.strip()]
    not_json = [x for x in body if not x.startswith("{")]
    assert not_json == [], not_json[:5]
    entries = json_lines(worker_log)
    ready = [e for e in entries if e.get("event") == "worker_ready"]
    assert len(ready) == 1 and ready[0]["level"] == "INFO" and "ingest" in ready[0]["queues"]
    flush_lines = [e for e in entries if e.get("task") == "export.flush" and e.get("job_id") == job.id]
    assert {e["logger"] for e in flush_lines} >= {
        "celery.worker.strategy",
        "celery.app.trace",
    }  # received, ran
    assert any(e.get("task") == "export.ingest" and e.get("chunk_id") for e in entries)
    assert any(e.get("event") == "beat_ready" for e in json_lines(beat_log))
    for text in (worker_log, beat_log):  # no personal data in either
        assert "ada@x.io" not in text.lower() and "bo@x.io" not in text
