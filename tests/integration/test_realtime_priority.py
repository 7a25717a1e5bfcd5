"""A live change during a large backfill waits behind a bounded backlog, not behind the backfill.

Real Redis, workers, beat and the sandbox: a 20,000-profile file backfill at a key rate of 20
requests/s (so the backfill, which reads far faster than it can send, would queue hundreds of batches
ahead of any live change) with ``BACKFILL_MAX_QUEUED_USERS=500``. A live enter sent mid-backfill
must reach Attentive after at most the backlog's worth of backfill requests.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import redis

from tests.celeryproc import wait_for
from tests.sandboxproc import SandboxProcess
from worker.cli.main import main

from .test_pipeline import line, running_pipeline

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

BATCH, CAP, PROFILES = 50, 500, 20_000


def test_a_live_change_overtakes_a_large_backfill(
    real_redis: redis.Redis, sandbox: SandboxProcess, tmp_path: Path
) -> None:
    with running_pipeline(
        real_redis, sandbox, ATTENTIVE_RATE_LIMIT="20", BACKFILL_MAX_QUEUED_USERS=str(CAP)
    ) as pipeline:
        pipeline.authorize()
        job = pipeline.job(batch_size=BATCH, flush_interval_seconds=1)
        data = tmp_path / "members.jsonl"
        data.write_text("\n".join(json.dumps({"email": f"b{i}@x.io"}) for i in range(PROFILES)) + "\n")
        pipeline.procs.worker("w1", concurrency=2)
        pipeline.procs.beat()
        assert main(["backfill", job.id, "--audience", "lapsed", str(data)]) == 0

        wait_for(lambda: len(sandbox.requests()) >= 20, 90, "the backfill to be sending")
        before = len(sandbox.requests())
        pipeline.send([line("vip", "enter", int(time.time() * 1000), email="live@x.io")])

        def live_request() -> int | None:
            for i, r in enumerate(sandbox.requests()):
                if any(ids and ids.get("email") == "live@x.io" for ids in r["identifiers"]):
                    return i
            return None

        at = wait_for(live_request, 90, "the live change to reach Attentive")
        st = pipeline.status(job)

    assert isinstance(at, int)
    ahead = at - before
    # Behind it at most: the batches sealed up to the cap plus one page (a step checks the cap
    # before each 1,000-line page), and the requests already on their way. Without the cap a step
    # reads five pages at once and the backfill runs hundreds of batches ahead.
    assert ahead <= (CAP + 1000) // BATCH + 8, (ahead, st["counters"])
    assert st["counters"]["backfill_waits_for_backlog"] > 0  # the cap did hold the backfill back
    remaining = PROFILES - (at + 1) * BATCH
    assert remaining > PROFILES // 2, remaining  # ... while most of the backfill was still to go
