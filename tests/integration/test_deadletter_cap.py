"""Dead letters stay bounded with exact counts, end to end: real Redis, real ``celery worker`` and
``celery beat`` started with ``DEADLETTER_CAP=5``, and the sandbox refusing records over HTTP.

DESIGN.md invariant 8 (dead letters are capped, counts stay exact) and invariant 1 (what will not
arrive is visible with its reason): twelve records are refused, nine by the results file of an
accepted job and three by 400s the flush isolates; the job keeps the newest five, and the counts
by reason class, ``status`` and the ``deadletters`` command still say twelve.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest
import redis

from tests.celeryproc import wait_for
from tests.conftest import TEST_REDIS_URL
from tests.integration.test_pipeline import running_pipeline
from tests.sandboxproc import SandboxProcess
from worker.observe.status import job_status
from worker.pipeline import deadletters
from worker.pipeline.buffer import Change, JobBuffer

pytestmark = pytest.mark.integration

CAP = 5


def change(user: str, at_ms: int, poisoned: bool = False) -> Change:
    """An enter for ``user``; a poisoned one carries a phone that is not E.164, which Attentive refuses
    (our mapping would never build it, so it goes into the buffer directly)."""
    ids = {"phone": "12345"} if poisoned else {"email": f"{user}@x.io"}
    return Change(
        user, "vip", at_ms, json.dumps({"identifiers": ids, "attributes": {"custom": {"vip": True}}})
    )


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REDIS_URL": TEST_REDIS_URL}
    return subprocess.run(
        [sys.executable, "-m", "worker.cli.main", *argv], env=env, capture_output=True, text=True, timeout=60
    )


def test_dead_letters_beyond_the_cap_drop_the_oldest_and_keep_exact_counts(
    real_redis: redis.Redis, sandbox: SandboxProcess
) -> None:
    with running_pipeline(real_redis, sandbox, DEADLETTER_CAP=str(CAP)) as pipeline:
        pipeline.authorize()
        job = pipeline.job(audiences=["vip"])
        buffer = JobBuffer(real_redis, job.id, job.config.batch_size)
        pipeline.procs.worker()
        pipeline.procs.beat()
        now = int(time.time() * 1000)

        # Attentive accepts the request and its results file refuses nine records.
        sandbox.set_options(validation="per_record")
        buffer.ingest([*(change(f"rec{i}", now, poisoned=True) for i in range(9)), change("good0", now)])

        def counted() -> dict[str, int]:
            return deadletters.summary(real_redis, job.id).by_reason

        wait_for(lambda: counted().get("attentive_record_400") == 9, 60, "nine refused records")

        # Now Attentive refuses whole requests (400): the flush isolates three users.
        sandbox.set_options(validation="sync")
        buffer.ingest(
            [
                *(change(f"req{i}", now, poisoned=True) for i in range(3)),
                change("good1", now),
                change("good2", now),
            ]
        )
        st = pipeline.wait_settled(job)

        assert st["deadletters"] == {
            "by_reason": {"attentive_400": 3, "attentive_record_400": 9},
            "kept": CAP,
            "dropped_by_cap": 12 - CAP,
            "purged": 0,
        }
        assert st["counters"]["deadlettered_users"] == 12
        kept = deadletters.read(real_redis, job.id, limit=0)
        assert [d["user"] for d in kept[:2]] == ["rec7", "rec8"]  # the newest of the first nine
        assert sorted(d["user"] for d in kept[2:]) == ["req0", "req1", "req2"]
        assert all(d["reason"].startswith("attentive_400: ") and "phone" in d["reason"] for d in kept[2:])
        assert all(pipeline.custom(f"good{i}@x.io") == {"vip": True} for i in range(3))

        # The operator's view: counts by class, one class listed, an unknown job refused, a purge.
        counts = cli("deadletters", "counts", job.id)
        assert counts.returncode == 0, counts.stderr
        assert json.loads(counts.stdout) == {"job": job.id, **st["deadletters"]}
        listed = cli("deadletters", job.id, "--reason", "attentive_record_400")
        assert [d["user"] for d in json.loads(listed.stdout)] == ["rec7", "rec8"]
        unknown = cli("deadletters", "no-such-job")
        assert unknown.returncode == 2 and unknown.stdout == ""
        assert unknown.stderr.startswith("error: ") and unknown.stderr.count("\n") == 1

        purged = cli("deadletters", "purge", job.id, "--reason", "attentive_400")
        assert purged.stdout == f"purged 3 dead letters of class 'attentive_400' from job {job.id}\n"
        after: dict[str, Any] = job_status(real_redis, job.id)["deadletters"]
        assert after == {
            "by_reason": {"attentive_record_400": 9},
            "kept": 2,
            "dropped_by_cap": 7,
            "purged": 3,
        }
