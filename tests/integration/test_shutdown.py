"""Graceful shutdown with real processes: a worker sent SIGTERM in the middle of its flushes and
polls finishes the requests in flight, hands back everything else at once, and exits with status 0;
another worker delivers the rest within seconds, long before any lease would have run out, and no
batch is sent twice (worker/shutdown.py). On each broker the service supports."""

from __future__ import annotations

import time
from collections import Counter

from tests.celeryproc import wait_for
from tests.integration.test_pipeline import Pipeline, line, on_both_brokers, pipeline  # noqa: F401
from worker.setup.authorizations import AuthorizationStore
from worker.store import keys

#: Long enough that only a lease running out (or a poller lock: 60 s) could explain a slow finish.
LEASE_SECONDS = 60
#: Every Attentive request takes this long while the first worker stops, so SIGTERM lands mid-request.
LATENCY_MS = 1000
USERS, BATCH = 100, 5


@on_both_brokers
def test_sigterm_mid_flush_hands_everything_over_and_nothing_is_sent_twice(
    pipeline: Pipeline,  # noqa: F811
) -> None:
    # (running_pipeline's short test lease is replaced by a realistic one.)
    pipeline.procs.env["FLUSH_LEASE_SECONDS"] = str(LEASE_SECONDS)
    pipeline.sandbox.set_options(latency_ms=LATENCY_MS)
    pipeline.authorize()
    job = pipeline.job(batch_size=BATCH, flush_interval_seconds=1)
    # Three pool processes: flushes (a slow send asks for a second one) and the key's poller.
    pipeline.procs.worker("w1", concurrency=3)
    pipeline.procs.beat()
    now = int(time.time() * 1000)
    emails = [f"t{i}@x.io" for i in range(USERS)]
    pipeline.send([line("vip", "enter", now, email=e) for e in emails])
    # Sending has begun and 20 batches of 1 s requests are more than one flush's 10 s budget.
    wait_for(lambda: pipeline.sandbox.requests(), 30, "the first accepted request")
    wait_for(lambda: pipeline.redis.zcard(keys.leases(job.id)), 10, "a flush holding a batch")

    stopping = time.monotonic()
    status = pipeline.procs.terminate("w1")
    stopped_in = time.monotonic() - stopping
    log = pipeline.procs.log("w1")

    assert status == 0, log[-3000:]
    # Without the shutdown flag the flush goes on claiming for the rest of its 10 s budget.
    assert stopped_in < 5, f"w1 took {stopped_in:.1f}s to stop\n{log[-3000:]}"
    assert "handing the flush over" in log
    assert not pipeline.redis.zcard(keys.leases(job.id)), "a claimed batch was left to its lease"
    assert not pipeline.redis.exists(keys.poller_lock(_key_hash(pipeline))), "the poller kept its lock"

    pipeline.sandbox.set_options(latency_ms=0)
    taking_over = time.monotonic()
    pipeline.procs.worker("w2", concurrency=2)
    st = pipeline.wait_settled(job, timeout=LEASE_SECONDS / 2)
    assert time.monotonic() - taking_over < LEASE_SECONDS / 2

    assert st["counters"]["users_delivered"] == USERS
    assert st["counters"]["leases_expired"] == 0
    assert all(pipeline.custom(e) == {"vip": True} for e in emails)
    # One POST per batch: no user was sent twice (a batch re-sent after a lost lease would be).
    sent = Counter(ident["email"] for req in pipeline.sandbox.requests() for ident in req["identifiers"])
    assert sent == Counter(emails), {e: n for e, n in sent.items() if n != 1}
    assert len(pipeline.sandbox.requests()) == USERS // BATCH


def _key_hash(running: Pipeline) -> str:
    return AuthorizationStore(running.redis, running.secret).get("sandbox").key_hash


def test_sigterm_mid_poll_releases_the_pollers_lock_and_another_worker_polls_at_once(
    pipeline: Pipeline,  # noqa: F811
) -> None:
    # Attentive takes 8 s per job, so every batch is checked several times while the worker stops.
    pipeline.sandbox.set_options(processing_delay=8)
    pipeline.authorize()
    job = pipeline.job(batch_size=1, flush_interval_seconds=1)
    pipeline.procs.worker("w1", concurrency=2)
    pipeline.procs.beat()
    now = int(time.time() * 1000)
    emails = [f"p{i}@x.io" for i in range(30)]
    pipeline.send([line("vip", "enter", now, email=e) for e in emails])
    wait_for(lambda: len(pipeline.sandbox.requests()) == len(emails), 30, "every batch at Attentive")
    pipeline.sandbox.set_options(latency_ms=LATENCY_MS)  # each status check now takes a second
    lock = keys.poller_lock(_key_hash(pipeline))
    wait_for(lambda: pipeline.redis.exists(lock), 30, "the key's poller at work")
    time.sleep(1.5)  # well inside the poller's 10 s budget, mid-check

    stopping = time.monotonic()
    status = pipeline.procs.terminate("w1")
    stopped_in = time.monotonic() - stopping
    log = pipeline.procs.log("w1")

    assert status == 0, log[-3000:]
    # Without the shutdown flag the poller goes on checking for the rest of its 10 s budget.
    assert stopped_in < 5, f"w1 took {stopped_in:.1f}s to stop\n{log[-3000:]}"
    assert not pipeline.redis.exists(lock), "the poller's lock was left to expire (60 s)"

    pipeline.sandbox.set_options(latency_ms=0)
    pipeline.procs.worker("w2")
    st = pipeline.wait_settled(job, timeout=30)  # the lock's 60 s never had to run out
    assert st["counters"]["users_delivered"] == len(emails)
    assert len(pipeline.sandbox.requests()) == len(emails)  # polling never re-sent a batch
