"""Sweep (time-based seals, expired leases, starting pollers, orphaned chunks) and ingest routing/counting."""

from __future__ import annotations

import json

import pytest
import redis

from worker.observe.status import ingest_status
from worker.pipeline import inbox
from worker.pipeline.buffer import now_ms
from worker.pipeline.flush import flush_job
from worker.pipeline.ingest import USER_KEY_FALLBACK, drain_inbox, ingest_chunk, ingest_lines
from worker.pipeline.sweep import IDLE_FLUSH_MS, sweep
from worker.setup.jobconfig import JobState
from worker.store import keys
from worker.store.replies import decode_hash

from .pipeline_kit import KEY_HASH, Pipeline, emails_of, enter, exit_, users


class Clock:
    """Milliseconds the pipeline reads as "now", moved by hand."""

    def __init__(self) -> None:
        self.ms = now_ms()

    def __call__(self) -> int:
        return self.ms

    def advance(self, ms: int) -> None:
        self.ms += ms


@pytest.fixture
def pipe(any_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> Pipeline:
    return Pipeline(any_redis, monkeypatch)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    for module in (
        "worker.pipeline.buffer",
        "worker.pipeline.sweep",
        "worker.pipeline.flush",
        "worker.pipeline.poll",
    ):
        monkeypatch.setattr(f"{module}.now_ms", clock)
    return clock


# --- sweep ----------------------------------------------------------------------------------------


def test_sweep_seals_the_open_buffer_only_after_the_flush_interval(pipe: Pipeline, clock: Clock) -> None:
    job = pipe.create_job(flush_interval_seconds=1)
    pipe.ingest(enter("a@x.io"), enter("b@x.io"))
    clock.advance(500)
    pipe.ingest(enter("c@x.io"))  # a newer arrival does not restart the oldest one's clock

    clock.advance(499)
    early = sweep(pipe.rt)
    assert early.sealed == {} and pipe.dispatch.flushes == []
    assert pipe.buffer(job).open_size() == 3 and pipe.buffer(job).sealed_count() == 0

    clock.advance(1)
    due = sweep(pipe.rt)
    assert due.sealed == {job.id: [1]} and due.flushes == 1
    assert pipe.dispatch.flushes == [(job.id, 0.0)]
    assert pipe.buffer(job).open_size() == 0 and pipe.buffer(job).sealed_count() == 1

    # Nothing new: the next sweep seals nothing and (a claim being recent) dispatches nothing.
    flush_job(pipe.rt, job.id)
    clock.advance(1000)
    assert sweep(pipe.rt).flushes == 0 and len(pipe.dispatch.flushes) == 1


def test_expired_lease_puts_the_batch_back_and_dispatches_a_flush(pipe: Pipeline, clock: Clock) -> None:
    job = pipe.create_job()
    bid = pipe.sealed_batch(job, users(2))
    buffer = pipe.buffer(job)
    crashed = buffer.claim(lease_ms=1_000)  # a flush that then dies
    assert crashed is not None and buffer.sealed_count() == 0

    clock.advance(999)
    assert sweep(pipe.rt).requeued == 0 and pipe.dispatch.flushes == []

    clock.advance(2)
    report = sweep(pipe.rt)
    assert report.requeued == 1 and report.flushes == 1
    assert pipe.dispatch.flushes == [(job.id, 0.0)]
    assert buffer.batch(bid)["state"] == "sealed" and buffer.sealed_count() == 1
    assert pipe.status(job)["leases_expired"] == "1"
    # The dead owner cannot complete its submit any more; the dispatched flush sends the batch.
    assert not buffer.mark_submitted(crashed, clock.ms + 10_000)
    assert flush_job(pipe.rt, job.id).submitted == [bid]
    assert emails_of(pipe.attentive.bulk_bodies[0]) == users(2)


def test_sweep_queues_one_poller_per_key_once_a_check_is_due(pipe: Pipeline, clock: Clock) -> None:
    job = pipe.create_job()
    other = pipe.create_job(label="second job, same key")
    bid = pipe.sealed_batch(job, users(1))
    pipe.sealed_batch(other, users(1, prefix="o"))
    assert flush_job(pipe.rt, job.id).submitted == [bid]
    flush_job(pipe.rt, other.id)
    due = clock.ms + int(pipe.rt.settings.first_poll_seconds * 1000)

    clock.ms = due - 1
    assert sweep(pipe.rt).pollers == 0 and pipe.dispatch.pollers == []

    clock.ms = due + 1
    assert sweep(pipe.rt).pollers == 1  # two jobs, one key: one poller
    assert pipe.dispatch.pollers == [(KEY_HASH, 0.0)]
    assert sweep(pipe.rt).pollers == 0  # queued already: not again
    pipe.redis.delete(keys.poller_queued(KEY_HASH))  # its message was lost (the mark expires)
    assert sweep(pipe.rt).pollers == 1
    pipe.redis.delete(keys.poller_queued(KEY_HASH))
    pipe.redis.set(keys.poller_lock(KEY_HASH), "someone")  # a poller is running
    assert sweep(pipe.rt).pollers == 0


def test_sweep_dispatches_a_flush_for_sealed_batches_nobody_claims(pipe: Pipeline, clock: Clock) -> None:
    job = pipe.create_job()
    pipe.sealed_batch(job, users(1))  # its flush task was lost
    assert sweep(pipe.rt).flushes == 1  # never claimed at all
    pipe.dispatch.flushes.clear()
    pipe.redis.hset(keys.job_status(job.id), "last_claim_at", clock.ms)
    clock.advance(IDLE_FLUSH_MS)
    assert sweep(pipe.rt).flushes == 0
    clock.advance(1)
    assert sweep(pipe.rt).flushes == 1 and pipe.dispatch.flushes == [(job.id, 0.0)]


def test_sweep_of_a_paused_job_seals_but_dispatches_nothing(pipe: Pipeline, clock: Clock) -> None:
    job = pipe.create_job(flush_interval_seconds=1)
    pipe.ingest(enter("a@x.io"))
    pipe.rt.jobs.set_state(job.id, JobState.PAUSED, "operator")
    clock.advance(10_000)
    report = sweep(pipe.rt)
    assert report.sealed == {job.id: [1]}
    assert pipe.dispatch.flushes == [] and pipe.dispatch.pollers == []


def test_orphaned_inbox_chunks_are_redriven_by_one_drain(pipe: Pipeline, clock: Clock) -> None:
    chunks = [inbox.put_chunk(pipe.redis, [json.dumps(enter(e))]) for e in ("a@x.io", "b@x.io")]
    assert sweep(pipe.rt).chunks_redriven == 0
    clock.advance(inbox.ORPHAN_AFTER_MS + 1_000)
    report = sweep(pipe.rt)
    assert report.chunks_redriven == 2 and pipe.dispatch.drains == [0.0] and pipe.dispatch.ingests == []
    assert sweep(pipe.rt).chunks_redriven == 0  # pushed forward, not re-driven every second
    # Once ingested the chunks are gone for good.
    pipe.create_job()
    drain_inbox(pipe.redis, pipe.rt.jobs, owner="drain-1", on_sealed=lambda _sealed: None)
    clock.advance(10 * inbox.ORPHAN_AFTER_MS)
    assert sweep(pipe.rt).chunks_redriven == 0 and pipe.dispatch.drains == [0.0]
    assert all(pipe.redis.exists(keys.inbox_chunk(c)) == 0 for c in chunks)


def test_ingest_counts_rejected_lines_by_reason_and_unroutable_audiences(pipe: Pipeline) -> None:
    pipe.create_job(audiences=("vip",))
    lines = [
        "{not json",
        "[1, 2]",
        json.dumps({"event": "enter", "at": "2026-11-26T17:00:00Z", "user": {"email": "a@x.io"}}),
        json.dumps({**enter("a@x.io"), "event": "joined"}),
        json.dumps({**enter("a@x.io"), "at": "yesterday"}),
        json.dumps({**enter("a@x.io"), "user": {}}),
        json.dumps(enter("a@x.io", "nobody_exports_this")),
        json.dumps(enter("b@x.io", "vip")),
    ]

    report = ingest_lines(pipe.redis, pipe.rt.jobs, lines)

    assert report.received == 9  # "[1, 2]" is a list of two payloads
    assert dict(report.rejected) == {
        "not_json": 1,
        "not_an_object": 2,
        "missing_audience": 1,
        "bad_event": 1,
        "bad_timestamp": 1,
        "missing_user": 1,
    }
    assert report.unroutable == 1
    assert ingest_status(pipe.redis) == {
        "received": 9,
        "rejected:not_json": 1,
        "rejected:not_an_object": 2,
        "rejected:missing_audience": 1,
        "rejected:bad_event": 1,
        "rejected:bad_timestamp": 1,
        "rejected:missing_user": 1,
        "unroutable": 1,
    }


def test_a_profile_without_the_key_field_is_keyed_by_another_identifier_and_counted(pipe: Pipeline) -> None:
    by_email = pipe.create_job(audiences=("vip",))
    by_phone = pipe.create_job(audiences=("vip",), identifier_mappings={"phone": "phone", "email": "email"})
    pipe.ingest(enter("a@x.io"), enter("b@x.io", phone="+14155550100"))

    assert pipe.buffer(by_email).open_size() == 2
    assert pipe.buffer(by_phone).open_size() == 2
    users = sorted(pipe.buffer(by_phone).open_users())
    assert users == ["+14155550100", "email:a@x.io"]
    drops = decode_hash(pipe.redis.hgetall(keys.job_field_drops(by_phone.id)))
    assert drops == {USER_KEY_FALLBACK: "1"}
    assert pipe.redis.exists(keys.job_skips(by_phone.id)) == 0
    assert pipe.redis.exists(keys.job_field_drops(by_email.id)) == 0


def test_one_transition_is_routed_to_every_job_exporting_its_audience(pipe: Pipeline) -> None:
    first = pipe.create_job(audiences=("vip",))
    second = pipe.create_job(audiences=("lapsed", "vip"))
    other = pipe.create_job(audiences=("lapsed",))
    stopped = pipe.create_job(audiences=("vip",))
    pipe.rt.jobs.set_state(stopped.id, JobState.STOPPED)

    report = ingest_lines(pipe.redis, pipe.rt.jobs, [json.dumps(enter("a@x.io"))])

    assert report.unroutable == 0
    assert [pipe.buffer(j).open_size() for j in (first, second, other, stopped)] == [1, 1, 0, 0]
    for job in (first, second):
        assert pipe.status(job)["accepted"] == "1"


def test_redelivered_chunk_changes_nothing(pipe: Pipeline) -> None:
    job = pipe.create_job(batch_size=2)
    lines = [json.dumps(t) for t in (enter("a@x.io"), enter("b@x.io"), enter("c@x.io"), exit_("a@x.io"))]
    ingest_lines(pipe.redis, pipe.rt.jobs, lines)
    buffer = pipe.buffer(job)
    before = {
        "open": pipe.redis.hgetall(keys.open_entries(job.id)),
        "waiting": pipe.redis.hgetall(keys.waiting(job.id)),
        "sealed": pipe.redis.lrange(keys.sealed(job.id), 0, -1),
        "batch": buffer.batch(1),
    }
    accepted = pipe.status(job)["accepted"]

    again = ingest_lines(pipe.redis, pipe.rt.jobs, lines)

    assert again.sealed == {job.id: []}
    assert pipe.status(job)["stale"] == "4" and pipe.status(job)["accepted"] == accepted
    after = {
        "open": pipe.redis.hgetall(keys.open_entries(job.id)),
        "waiting": pipe.redis.hgetall(keys.waiting(job.id)),
        "sealed": pipe.redis.lrange(keys.sealed(job.id), 0, -1),
        "batch": buffer.batch(1),
    }
    assert after == before


def test_ingest_chunk_deletes_the_chunk_and_a_second_run_is_a_no_op(pipe: Pipeline) -> None:
    job = pipe.create_job()
    chunk = inbox.put_chunk(pipe.redis, [json.dumps(enter("a@x.io"))])
    assert ingest_chunk(pipe.redis, pipe.rt.jobs, chunk, owner="task-1").received == 1
    assert pipe.redis.exists(keys.inbox_chunk(chunk)) == 0
    assert pipe.redis.zscore(keys.inbox_pending(), chunk) is None
    assert ingest_chunk(pipe.redis, pipe.rt.jobs, chunk, owner="task-2").received == 0
    assert pipe.buffer(job).open_size() == 1
