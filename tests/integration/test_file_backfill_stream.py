"""A file backfill larger than its staging cap, end to end (DESIGN.md invariant 8): the real
``attentive-export backfill`` command reading standard input, real Redis, a real ``celery worker``
and ``celery beat``, the sandbox over HTTP. Every user arrives, and Redis never held more of the
file than the cap plus one chunk, sampled atomically while the command ran.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tests.celeryproc import ROOT, wait_for
from tests.integration.test_pipeline import Pipeline, running_pipeline
from tests.sandboxproc import SandboxProcess
from worker.backfill.steps import FILE_CHUNK_LINES
from worker.store import keys

pytestmark = pytest.mark.integration

USERS = 30_000
CAP = 5_000

#: The lines of every chunk queued for the job's file part, read in one atomic step (the chunk
#: keys are derived in the script: fine on the single test server, not a pattern for the service).
STAGED_LINES = """
local n = 0
for _, id in ipairs(redis.call('lrange', KEYS[1], 0, -1)) do
  n = n + redis.call('llen', ARGV[1] .. id)
end
return n
"""


@pytest.fixture
def pipeline(real_redis: redis.Redis, sandbox: SandboxProcess) -> Iterator[Pipeline]:
    """The pipeline with the file staging cap set low; the command run below inherits it too."""
    with running_pipeline(real_redis, sandbox, BACKFILL_FILE_MAX_STAGED_LINES=str(CAP)) as running:
        running.authorize()
        yield running


class Sampler(threading.Thread):
    """Samples the job's staged file lines in Redis until stopped."""

    def __init__(self, client: redis.Redis, job_id: str) -> None:
        super().__init__(daemon=True)
        self.client, self.job_id = client, job_id
        self.samples: list[int] = []
        self.done = threading.Event()

    def run(self) -> None:
        queue, prefix = keys.backfill_file_queue(self.job_id), keys.backfill_file_chunk(self.job_id, "")
        while not self.done.is_set():
            self.samples.append(int(self.client.eval(STAGED_LINES, 1, queue, prefix)))  # type: ignore[arg-type]
            self.done.wait(0.02)


@pytest.mark.timeout(300)
def test_a_file_larger_than_the_cap_is_streamed_through_the_real_command(pipeline: Pipeline) -> None:
    job = pipeline.job(audiences=["vip"])
    pipeline.procs.worker(concurrency=2)
    pipeline.procs.beat()
    data = "".join(json.dumps({"email": f"s{i}@x.io", "first_name": f"S{i}"}) + "\n" for i in range(USERS))

    sampler = Sampler(pipeline.redis, job.id)
    sampler.start()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "worker.cli.main", "backfill", job.id, "--audience", "vip", "-"],
            cwd=ROOT,
            input=data,  # a pipe: the command copies it to a temporary file to read it twice
            capture_output=True,
            text=True,
            timeout=240,
        )
    finally:
        sampler.done.set()
        sampler.join()
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(
        f"queued {USERS} profiles and 0 transitions in {USERS // FILE_CHUNK_LINES} chunks;"
    )
    # It reached the cap and waited there for the backfill, saying so.
    assert "; waiting for the backfill to catch up (" in done.stderr and f"cap {CAP:,})" in done.stderr
    assert "Traceback" not in done.stderr
    assert len(sampler.samples) > 20
    assert max(sampler.samples) <= CAP + FILE_CHUNK_LINES, max(sampler.samples)
    assert max(sampler.samples) > CAP - FILE_CHUNK_LINES  # the sampling saw the stream at its cap

    def delivered() -> dict[str, Any] | None:
        st = pipeline.status(job)
        if (st["backfill"] or {}).get("finished") and st["counters"]["users_delivered"] >= USERS:
            return st if not any(st["buffer"].values()) else None
        return None

    try:
        st = wait_for(delivered, 200, "every backfilled user to be delivered", interval=0.5)
    except AssertionError:
        print(json.dumps(pipeline.status(job), indent=2))
        print(pipeline.procs.log("w1")[-5000:])
        raise
    assert isinstance(st, dict)
    file_part = st["backfill"]["file"]
    assert (file_part["members"], file_part["lines_staged"], file_part["lines_total"]) == (
        USERS,
        USERS,
        USERS,
    )
    assert (file_part["last_error"], file_part["incomplete"], file_part["streaming"]) == (None, False, False)
    stored = {u["identifiers"]["email"]: u for u in pipeline.sandbox.users()}
    assert set(stored) == {f"s{i}@x.io" for i in range(USERS)}
    assert all(u["custom"] == {"vip": True} for u in stored.values())
    assert stored["s29999@x.io"]["attributes"]["firstName"] == "S29999"
