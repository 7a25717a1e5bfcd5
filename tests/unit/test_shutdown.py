"""Graceful shutdown in the pipeline's loops (worker/shutdown.py): once the worker is stopping, a
flush finishes the batch it sends and claims no other, a poller finishes its check and stops, and
each asks for a fresh task so another worker carries on at once. The real-process test with SIGTERM
is tests/integration/test_shutdown.py."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator

import httpx
import pytest
import redis
from celery.signals import worker_shutting_down

from worker import shutdown
from worker.clients.attentive import AttentiveClient
from worker.pipeline.flush import flush_job
from worker.pipeline.poller import run_poller
from worker.store import keys

from .pipeline_kit import BASE_URL, KEY_HASH, Pipeline, users


@pytest.fixture
def pipe(any_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> Pipeline:
    return Pipeline(any_redis, monkeypatch)


@pytest.fixture(autouse=True)
def _not_stopping() -> Iterator[None]:
    shutdown.clear()
    yield
    shutdown.clear()


def stop_after(pipe: Pipeline, requests: int) -> None:
    """The worker begins shutting down while its ``requests``-th request to Attentive is in flight."""

    def handle(request: httpx.Request) -> httpx.Response:
        if len(pipe.attentive.requests) + 1 == requests:
            shutdown.request()
        return pipe.attentive.handler(request)

    pipe.http = AttentiveClient("test-key", BASE_URL, transport=httpx.MockTransport(handle), max_attempts=1)


def test_a_stopping_flush_sends_the_batch_it_holds_and_claims_no_other(pipe: Pipeline) -> None:
    job = pipe.create_job()
    bids = [pipe.sealed_batch(job, users(2, prefix=f"b{i}-")) for i in range(3)]
    stop_after(pipe, requests=1)

    report = flush_job(pipe.rt, job.id)

    assert report.submitted == bids[:1]  # the request in flight was finished and its batch polled
    assert len(pipe.attentive.posts()) == 1
    assert report.retry_in == 0.0  # the task queues a fresh flush for the rest
    assert pipe.buffer(job).sealed_count() == 2  # unclaimed, there for the next flush at once
    assert not pipe.redis.zcard(keys.leases(job.id))  # nothing left to a lease

    shutdown.clear()  # the fresh task, on a worker that is not stopping
    assert flush_job(pipe.rt, job.id).submitted == bids[1:]


def test_a_flush_started_while_stopping_claims_nothing(pipe: Pipeline) -> None:
    job = pipe.create_job()
    pipe.sealed_batch(job, users(2))
    shutdown.request()

    report = flush_job(pipe.rt, job.id)

    assert report.submitted == [] and report.retry_in == 0.0 and pipe.attentive.posts() == []
    assert pipe.buffer(job).sealed_count() == 1


def test_a_stopping_poller_finishes_its_check_releases_its_lock_and_hands_over(pipe: Pipeline) -> None:
    job = pipe.create_job()
    bids = [pipe.sealed_batch(job, users(1, prefix=f"p{i}-")) for i in range(3)]
    assert flush_job(pipe.rt, job.id).submitted == bids
    pipe.redis.zadd(keys.polls(job.id), dict.fromkeys(map(str, bids), 0))  # all due now
    stop_after(pipe, requests=len(bids) + 1)  # during the first status check

    report = run_poller(pipe.rt, KEY_HASH, budget_seconds=5.0)

    assert report.checked == 1 and len(pipe.attentive.status_gets()) == 1
    assert report.again_in == 0.0  # the task queues the key's next poller now
    assert not pipe.redis.exists(keys.poller_lock(KEY_HASH))  # released, not left to expire
    assert len(pipe.polled(job)) == 2


def test_celerys_shutdown_signal_sets_the_flag_seen_by_forked_processes() -> None:
    """The flag is shared memory: set in the parent (where Celery sends worker_shutting_down)
    after a child was forked, the child sees it."""
    assert isinstance(shutdown._flag, mmap.mmap)
    read_end, write_end = os.pipe()
    go_read, go_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: wait for the parent's signal, then report what it sees
        try:
            os.read(go_read, 1)
            os.write(write_end, b"1" if shutdown.requested() else b"0")
        finally:
            os._exit(0)
    try:
        assert not shutdown.requested()
        worker_shutting_down.send(sender="w1@test", sig="SIGTERM", how="Warm", exitcode=0)
        assert shutdown.requested()
        os.write(go_write, b"x")
        assert os.read(read_end, 1) == b"1"
    finally:
        os.waitpid(pid, 0)
        for fd in (read_end, write_end, go_read, go_write):
            os.close(fd)
