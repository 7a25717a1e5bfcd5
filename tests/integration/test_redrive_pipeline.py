"""Dead-letter re-drive end to end: real Redis, real ``celery worker`` and ``celery beat``, the
sandbox over HTTP, and the ``attentive-export deadletters redrive`` command in its own process.

Attentive fails every job for a while: the pipeline gives up on five users after its failed sends
and dead-letters them (DESIGN.md invariant 1). Meanwhile one of them leaves the audience, which is
delivered once Attentive recovers. The operator re-drives: the four enters still newest arrive,
the superseded one does not overwrite the exit (invariant 3), and the counts add up.
"""

from __future__ import annotations

import time

import pytest
import redis

from tests.celeryproc import wait_for
from tests.integration.test_deadletter_cap import cli
from tests.integration.test_pipeline import line, running_pipeline
from tests.sandboxproc import SandboxProcess
from worker.pipeline import deadletters

pytestmark = pytest.mark.integration

USERS = [f"r{i}@x.io" for i in range(5)]


def test_dead_letters_are_redriven_after_a_fix_and_never_over_a_newer_change(
    real_redis: redis.Redis, sandbox: SandboxProcess
) -> None:
    with running_pipeline(real_redis, sandbox) as pipeline:
        pipeline.authorize()
        job = pipeline.job(audiences=["vip"])
        pipeline.procs.worker()
        pipeline.procs.beat()
        sandbox.set_options(fail_jobs=1.0)  # every Attentive job ends FAILED: the outage
        t0 = int(time.time() * 1000)
        pipeline.send([line("vip", "enter", t0, email=u) for u in USERS])

        def gave_up() -> int:
            return deadletters.summary(real_redis, job.id).by_reason.get(deadletters.GAVE_UP, 0)

        wait_for(lambda: gave_up() == len(USERS), 90, "five users dead-lettered after failed sends")
        assert all(not pipeline.custom(u) for u in USERS)
        letters = deadletters.read(real_redis, job.id, limit=0)
        assert sorted(d["user"] for d in letters) == USERS
        assert all(d[deadletters.REDRIVE] == {"vip": t0} for d in letters)

        # The outage ends; one user leaves the audience meanwhile, and that is delivered.
        sandbox.set_options(fail_jobs=0.0)
        pipeline.send([line("vip", "exit", t0 + 1000, email=USERS[0])])
        wait_for(lambda: pipeline.custom(USERS[0]) == {"vip": False}, 60, "the newer exit delivered")

        redriven = cli("deadletters", "redrive", job.id)
        assert redriven.returncode == 0, redriven.stderr
        assert redriven.stdout == (
            f"re-drove 5 dead letters of job {job.id}: 4 changes back in the buffer (sent with the next "
            "batch), 1 superseded by newer changes and not sent\n"
        )
        st = pipeline.wait_settled(job)
        assert all(pipeline.custom(u) == {"vip": True} for u in USERS[1:])
        assert pipeline.custom(USERS[0]) == {"vip": False}  # the old enter never overwrote the exit
        assert st["deadletters"]["by_reason"] == {} and st["deadletters"]["kept"] == 0
        assert st["counters"]["redriven"] == 4 and st["counters"]["redrive_superseded"] == 1
        assert st["counters"][deadletters.REDRIVEN] == 5

        again = cli("deadletters", "redrive", job.id)
        assert again.stdout == f"no dead letters to re-drive in job {job.id} (classes: none)\n"
