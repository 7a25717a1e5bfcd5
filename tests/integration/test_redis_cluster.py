"""The pipeline end to end on a Redis Cluster (README, "Redis Cluster"): a local cluster of three
masters (tests/rediscluster.py), real ``celery worker`` and ``celery beat`` processes with
``REDIS_URL=redis+cluster://...``, the sandbox over HTTP. The Celery broker stays the test's plain
Redis (``TEST_BROKER_URL``): Celery's Redis transport does not support a cluster.

Jobs are placed so that each master serves one; every transition, script call and transaction then
runs on the master of its job's slot, and one that mixed slots would fail with CROSSSLOT (or, for a
script, be caught by the audit of the keys it touched).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
import redis
from redis.cluster import key_slot

from tests.celeryproc import wait_for
from tests.integration.test_pipeline import Pipeline, base_config, line, running_pipeline
from tests.rediscluster import LocalCluster, ScriptAudit, local_cluster
from tests.sandboxproc import SandboxProcess
from worker.cli.localredis import LocalRedisError
from worker.cli.main import main as cli
from worker.dispatch import CeleryDispatcher
from worker.pipeline import inbox
from worker.setup import jobs as jobs_module
from worker.setup.jobconfig import parse_job_config
from worker.setup.jobs import ExportJob
from worker.setup.purge import purge_job_data
from worker.store import keys
from worker.store.connection import is_cluster, memory_info

pytestmark = pytest.mark.integration

#: Users per job that enter its first audience; the first third also enter its second audience,
#: and the first sixth then exit the first one.
USERS = 300


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """Three masters for this module. Without a server binary: skipped locally, a failure in CI."""
    with contextlib.ExitStack() as stack:
        try:
            running = stack.enter_context(local_cluster(masters=3))
        except LocalRedisError as exc:
            if os.environ.get("CI"):
                pytest.fail(f"CI runs the Redis Cluster test: {exc}")
            pytest.skip(f"no server to start a Redis Cluster with: {exc}")
        yield running


@pytest.fixture
def cluster_client(cluster: LocalCluster) -> Iterator[redis.Redis]:
    client = cluster.client()
    client.flushall()  # every master
    yield client
    client.close()


def job_on(cluster: LocalCluster, port: int, taken: set[str]) -> str:
    """A fresh job id whose keys live on the master at ``port``."""
    while True:
        job_id = secrets.token_hex(4)
        if job_id not in taken and cluster.port_of(keys.job_status(job_id)) == port:
            taken.add(job_id)
            return job_id


def create_job(pipeline: Pipeline, job_id: str, **overrides: Any) -> ExportJob:
    """``JobStore.create`` with the id chosen (it draws ids at random)."""
    with mock.patch.object(jobs_module, "secrets", SimpleNamespace(token_hex=lambda _n: job_id)):
        return pipeline.jobs.create(parse_job_config(base_config(**overrides)))


def email(job: int, user: int) -> str:
    return f"j{job}u{user}@x.io"


def test_the_pipeline_runs_end_to_end_on_a_three_master_cluster(
    cluster: LocalCluster, cluster_client: redis.Redis, sandbox: SandboxProcess, tmp_path: Path
) -> None:
    assert is_cluster(cluster_client)
    with (
        running_pipeline(cluster_client, sandbox, REDIS_URL=cluster.url) as pipeline,
        ScriptAudit(cluster) as audit,
    ):
        pipeline.authorize()
        taken: set[str] = set()
        # One job per master, each with audiences of its own; a fourth shares job 0's first audience,
        # so one chunk's transition goes to two jobs, on two slots.
        jobs = [
            create_job(pipeline, job_on(cluster, port, taken), label=f"job {i}", audiences=[f"a{i}", f"b{i}"])
            for i, port in enumerate(cluster.ports)
        ]
        jobs.append(
            create_job(pipeline, job_on(cluster, cluster.ports[0], taken), label="job 3", audiences=["a0"])
        )
        assert {cluster.port_of(keys.job_status(j.id)) for j in jobs[:3]} == set(cluster.ports)
        assert len({key_slot(keys.job_status(j.id).encode()) for j in jobs}) == 4

        pipeline.procs.worker(concurrency=2)
        pipeline.procs.beat()
        now = int(time.time() * 1000)
        enters = [
            line(f"a{j}", "enter", now, email=email(j, u), first_name=f"U{u}")
            for j in range(3)
            for u in range(USERS)
        ]
        enters += [
            line(f"b{j}", "enter", now, email=email(j, u)) for j in range(3) for u in range(USERS // 3)
        ]
        pipeline.send(enters, chunk=250)
        exits = [
            line(f"a{j}", "exit", now + 1000, email=email(j, u)) for j in range(3) for u in range(USERS // 6)
        ]
        # The exits arrive as the webhook receiver stores them, a few users a request, and are taken
        # by drains: chunks and their claims spread over the masters, the pending set on one.
        dispatcher = CeleryDispatcher()
        for start in range(0, len(exits), 7):
            _chunk, send = inbox.put_chunk_for_drain(cluster_client, exits[start : start + 7], 0.1)
            if send:
                inbox.send_drain(cluster_client, dispatcher, 0.1)

        # A file backfill through the CLI (REDIS_URL is the cluster): its parts, chunks and re-drive
        # schedule are written in the job's MULTIs.
        members = tmp_path / "members.jsonl"
        members.write_text("".join(json.dumps({"email": f"f{u}@x.io"}) + "\n" for u in range(40)))
        assert cli(["backfill", jobs[1].id, str(members), "--audience", "b1"]) == 0

        for job in jobs:
            pipeline.wait_settled(job, timeout=90)
        wait_for(lambda: pipeline.status(jobs[1])["backfill"]["finished"], 30, "the file backfill to finish")
        pipeline.wait_settled(jobs[1], timeout=30)
        worker_log = pipeline.procs.log("w1")  # no task failed and was retried (a CROSSSLOT, say)
        assert "Traceback" not in worker_log and ": ERROR/" not in worker_log, worker_log[-5000:]

    # Every user reached Attentive with the right attributes.
    for j in range(3):
        for u in range(USERS):
            user = sandbox.user(email=email(j, u))
            assert user is not None, email(j, u)
            want: dict[str, Any] = {f"a{j}": u >= USERS // 6}
            if u < USERS // 3:
                want[f"b{j}"] = True
            assert user["custom"] == want, (email(j, u), user)
            assert user["attributes"]["firstName"] == f"U{u}"
    assert all(pipeline.custom(f"f{u}@x.io") == {"b1": True} for u in range(40))

    # Status agrees: every transition accepted, none stale, nothing left anywhere, nothing failed.
    sent = {
        0: USERS + USERS // 3 + USERS // 6,
        1: USERS + USERS // 3 + USERS // 6 + 40,
        2: USERS + USERS // 3 + USERS // 6,
        3: USERS + USERS // 6,
    }
    for i, job in enumerate(jobs):
        st = pipeline.status(job)
        c = st["counters"]
        assert (c["accepted"], c["stale"]) == (sent[i], 0), (job.id, c)
        assert c["batches_sealed"] == c["batches_completed"] > 0, c
        assert c["users_sent"] == c["users_delivered"] > 0, c
        assert st["deadletters"]["by_reason"] == {} and st["last_error"] is None, st
        assert not any(st["buffer"].values()), st["buffer"]
    received = int(cluster_client.hget(keys.ingest_status(), "received") or 0)
    assert received == len(enters) + len(exits) + 40
    # Memory figures (status, metrics) add up every master, not one picked at random.
    each = [cluster.node(port).info("memory")["used_memory"] for port in cluster.ports]
    assert memory_info(cluster_client)["used_memory"] > max(each)

    # Every key each script call touched is in its declared keys' slot, undeclared ones included.
    assert audit.calls and audit.problems() == []
    assert any(b":batch:" in k for k in audit.undeclared()) and any(b":lww:" in k for k in audit.undeclared())

    # Deleting a job's data finds its keys on its master (SCAN of every node) and leaves the rest.
    others = {j.id: _job_keys(cluster, j.id) for j in jobs[1:]}
    assert _job_keys(cluster, jobs[0].id)
    purged = purge_job_data(cluster_client, jobs[0].id)
    assert purged.keys > 0 and _job_keys(cluster, jobs[0].id) == []
    assert {j.id: _job_keys(cluster, j.id) for j in jobs[1:]} == others


def _job_keys(cluster: LocalCluster, job_id: str) -> list[bytes]:
    """The job's keys, looked up node by node: each must be on the master serving its slot."""
    found: list[bytes] = []
    for port in cluster.ports:
        with cluster.node(port) as node:
            mine = sorted(node.scan_iter(match=keys.job_keys_match(job_id)))
        assert all(cluster.port_of(k) == port for k in mine)
        found += mine
    return sorted(found)


def test_the_audit_catches_a_script_touching_another_slot_on_its_node(cluster: LocalCluster) -> None:
    """The check above can fail: a script that writes a key of another slot its node also serves
    (which Redis allows a script without a shebang) is reported."""
    port = cluster.ports[0]
    here = f"aex:{{job:{job_on(cluster, port, set())}}}:status"
    elsewhere = f"aex:{{job:{job_on(cluster, port, {here})}}}:status"
    assert key_slot(here.encode()) != key_slot(elsewhere.encode())
    client = cluster.client()
    with ScriptAudit(cluster) as audit:
        client.eval(
            "redis.call('HSET', KEYS[1], 'a', 1); redis.call('HSET', ARGV[1], 'a', 1)", 1, here, elsewhere
        )
    problems = audit.problems()
    assert len(problems) == 1 and elsewhere in problems[0]
    client.delete(here, elsewhere)
