"""Parked polls: released by the sweep only into spare request budget, at half the key's rate."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import redis

from worker.pipeline import parked
from worker.pipeline.buffer import now_ms
from worker.pipeline.flush import flush_job
from worker.pipeline.ingest import ingest_lines
from worker.pipeline.parked import POLL_YIELDS_MS, RELEASE_SHARE
from worker.pipeline.sweep import SweepReport, sweep
from worker.runtime import Runtime
from worker.settings import Settings
from worker.setup.authorizations import AuthorizationStore
from worker.setup.crypto import generate_secret_key
from worker.setup.jobconfig import JobState, parse_job_config
from worker.store import keys
from worker.store.ratelimit import RateLimiter, api_key_hash
from worker.store.replies import decode_hash

from .pipeline_kit import KEY_HASH, Pipeline, RecordingDispatcher, enter, users

RATE = 20.0  # released at 20/s, or 10/s while sends wait: at most 20 or 10 per one-second sweep


@pytest.fixture
def pipe(any_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> Pipeline:
    pipe = Pipeline(any_redis, monkeypatch, rate_limit_per_second=RATE, sweep_interval_seconds=1.0)
    monkeypatch.setattr(pipe.rt, "limiter_for", lambda job: RateLimiter(any_redis, KEY_HASH, RATE))
    return pipe


def release(pipe: Pipeline, job: Any, now: int, sends_waiting: bool = False) -> list[int]:
    return parked.release(pipe.rt, job, pipe.buffer(job), now, now + 1_000, sends_waiting)


def saturate(pipe: Pipeline) -> None:
    """Senders have taken every token: the schedule runs a whole burst ahead of the clock."""
    limiter = RateLimiter(pipe.redis, KEY_HASH, RATE)
    while limiter.try_acquire() == 0.0:
        pass


def park_many(pipe: Pipeline, job: Any, n: int, due: int) -> None:
    for bid in range(1, n + 1):
        parked.park(pipe.rt, job.id, bid, bid % 3, due + bid)  # later batches come due later


@pytest.mark.parametrize("sends_waiting, share", [(True, RELEASE_SHARE), (False, 1.0)])
def test_due_polls_are_released_oldest_first_spaced_at_the_rate_or_half_while_sends_wait(
    pipe: Pipeline, sends_waiting: bool, share: float
) -> None:
    job = pipe.create_job()
    now = now_ms()
    park_many(pipe, job, 25, now - 1_000)
    n = math.ceil(RATE * share * 1.0)  # one one-second sweep interval

    assert release(pipe, job, now, sends_waiting) == list(range(1, n + 1))

    assert [(p[1], p[2]) for p in pipe.dispatch.polls] == [(b, b % 3) for b in range(1, n + 1)]
    assert [p[3] for p in pipe.dispatch.polls] == pytest.approx([i / (RATE * share) for i in range(n)])
    assert [b for b, _ in pipe.parked(job)] == list(range(n + 1, 26))


def test_polls_not_yet_due_stay_parked(pipe: Pipeline) -> None:
    job = pipe.create_job()
    now = now_ms()
    parked.park(pipe.rt, job.id, 1, 0, now - 1)
    parked.park(pipe.rt, job.id, 2, 0, now + 500)

    assert release(pipe, job, now) == [1]
    assert pipe.parked(job) == [(2, 0)]


def test_nothing_is_released_while_sends_use_the_whole_budget_but_a_minute_late_goes_anyway(
    pipe: Pipeline,
) -> None:
    job = pipe.create_job()
    now = now_ms()
    parked.park(pipe.rt, job.id, 1, 0, now - POLL_YIELDS_MS)  # due a minute ago
    parked.park(pipe.rt, job.id, 2, 0, now - 1_000)
    saturate(pipe)

    assert release(pipe, job, now) == [1]
    assert [p[1] for p in pipe.dispatch.polls] == [1] and pipe.parked(job) == [(2, 0)]


def test_an_entry_another_sweep_took_meanwhile_is_not_dispatched_twice(
    pipe: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = pipe.create_job()
    now = now_ms()
    park_many(pipe, job, 2, now - 1_000)
    zrange = pipe.redis.zrangebyscore

    def then_a_twin_takes_batch_1(*args: Any, **kwargs: Any) -> Any:
        got = zrange(*args, **kwargs)
        pipe.redis.zrem(keys.parked_polls(job.id), "1:1")
        return got

    monkeypatch.setattr(pipe.redis, "zrangebyscore", then_a_twin_takes_batch_1)
    assert release(pipe, job, now) == [2]
    assert [p[1] for p in pipe.dispatch.polls] == [2]


def test_the_sweep_releases_parked_polls_of_sending_jobs_only(pipe: Pipeline) -> None:
    job = pipe.create_job()
    parked.park(pipe.rt, job.id, 7, 2, now_ms() - 1)

    assert sweep(pipe.rt).polls_released == 1
    assert pipe.dispatch.polls == [(job.id, 7, 2, 0.0)]

    parked.park(pipe.rt, job.id, 8, 0, now_ms() - 1)
    pipe.rt.jobs.set_state(job.id, JobState.PAUSED, "operator")
    assert sweep(pipe.rt).polls_released == 0  # a paused job polls nothing
    assert pipe.parked(job) == [(8, 0)]
    pipe.rt.jobs.set_state(job.id, JobState.RUNNING, "operator")
    assert sweep(pipe.rt).polls_released == 1  # resumed: its parked poll goes
    assert pipe.dispatch.polls[-1] == (job.id, 8, 0, 0.0)


def test_after_beat_was_down_a_parked_poll_is_dispatched_once_not_also_re_driven(pipe: Pipeline) -> None:
    job = pipe.create_job(batch_size=2)
    pipe.ingest(*(enter(e) for e in users(4)))  # two full batches
    saturate(pipe)  # the flush waits for tokens: both polls are parked
    assert flush_job(pipe.rt, job.id).submitted == [1, 2]
    assert pipe.parked(job) == [(1, 0), (2, 0)] and pipe.dispatch.polls == []
    four_minutes_later = now_ms() + 240_000  # past the forced release and the lost-poll deadline
    pipe.redis.delete(keys.ratelimit(KEY_HASH))

    report = sweep_at(pipe, four_minutes_later)

    assert sorted(p[1] for p in pipe.dispatch.polls) == [1, 2]  # once each
    assert report.polls_released + report.polls_redriven == 2 and pipe.parked(job) == []


def test_a_job_whose_key_cannot_be_read_keeps_its_polls_parked_and_the_sweep_goes_on(
    fake_redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = Runtime(Settings(secret_key=generate_secret_key()), fake_redis, RecordingDispatcher())
    broken = rt.jobs.create(parse_job_config(job_config("deleted-auth", flush_interval_seconds=1)))
    parked.park(rt, broken.id, 1, 0, now_ms() - 1)  # releasing it needs the key's limiter
    ingest_lines(fake_redis, rt.jobs, [json.dumps(enter("a@x.io"))])

    report = sweep_at_runtime(rt, now_ms() + 2_000)

    assert report.failed == [] and report.polls_released == 0
    assert report.sealed == {broken.id: [1]}  # its own interval seal still happened
    assert rt.redis.zcard(keys.parked_polls(broken.id)) == 1


def test_a_job_whose_sweep_step_fails_does_not_stall_the_others(
    fake_redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = Runtime(Settings(secret_key=generate_secret_key()), fake_redis, RecordingDispatcher())
    broken = rt.jobs.create(parse_job_config(job_config("auth")))
    healthy = rt.jobs.create(parse_job_config(job_config("auth", flush_interval_seconds=1)))
    ingest_lines(fake_redis, rt.jobs, [json.dumps(enter("a@x.io"))])
    real_release = parked.release

    def release_failing_for_broken(rt: Runtime, job: Any, *args: Any, **kwargs: Any) -> list[int]:
        if job.id == broken.id:
            raise ValueError("corrupt parked entry 'x'")
        return real_release(rt, job, *args, **kwargs)

    monkeypatch.setattr(parked, "release", release_failing_for_broken)
    report = sweep_at_runtime(rt, now_ms() + 2_000)

    assert report.failed == [broken.id]
    assert report.sealed[healthy.id] == [1]  # the other job's interval seal still happened
    status = decode_hash(fake_redis.hgetall(keys.job_status(broken.id)))
    assert status["last_error"] == "sweep: ValueError: corrupt parked entry 'x'"


def test_parked_polls_are_released_without_decrypting_the_key(
    fake_redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The limiter is named by the key's stored hash: a sweep with the wrong secret key still paces."""
    monkeypatch.setattr(AuthorizationStore, "_validate_with_attentive", lambda self, key: "Acme")
    AuthorizationStore(fake_redis, generate_secret_key()).create("acme", "sk_test_0123456789abcdef")
    rt = Runtime(Settings(secret_key=generate_secret_key()), fake_redis, RecordingDispatcher())
    job = rt.jobs.create(parse_job_config(job_config("acme")))
    parked.park(rt, job.id, 1, 0, now_ms() - 1)

    assert rt.limiter_for(job).key_hash == api_key_hash("sk_test_0123456789abcdef")
    assert sweep(rt).polls_released == 1


def job_config(authorization: str, **extra: Any) -> dict[str, Any]:
    return {
        "label": "job",
        "authorization": authorization,
        "audiences": ["vip"],
        "identifier_mappings": {"email": "email"},
        **extra,
    }


def sweep_at(pipe: Pipeline, ms: int) -> SweepReport:
    return sweep_at_runtime(pipe.rt, ms)


def sweep_at_runtime(rt: Runtime, ms: int) -> SweepReport:
    with pytest.MonkeyPatch.context() as mp:
        for module in ("worker.pipeline.buffer", "worker.pipeline.sweep"):
            mp.setattr(f"{module}.now_ms", lambda: ms)
        return sweep(rt)


def test_the_sweep_halves_the_release_pace_while_the_job_has_batches_to_send(pipe: Pipeline) -> None:
    job = pipe.create_job()
    park_many(pipe, job, 25, now_ms() - 1_000)
    pipe.sealed_batch(job, users(2))
    assert sweep(pipe.rt).polls_released == 10
    pipe.buffer(job).claim(60_000)  # now being sent: nothing waits
    assert sweep(pipe.rt).polls_released == 15  # the other 15, at the full pace of 20


def test_after_beat_was_down_polls_beyond_one_release_are_re_driven_once(
    fake_redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More forced polls than one sweep releases: the rest are re-driven, and their entries dropped."""
    pipe = Pipeline(fake_redis, monkeypatch, rate_limit_per_second=1.0, sweep_interval_seconds=1.0)
    monkeypatch.setattr(pipe.rt, "limiter_for", lambda job: RateLimiter(fake_redis, KEY_HASH, RATE))
    job = pipe.create_job(batch_size=2)
    pipe.ingest(*(enter(e) for e in users(6)))  # three full batches
    saturate(pipe)
    assert flush_job(pipe.rt, job.id).submitted == [1, 2, 3] and len(pipe.parked(job)) == 3

    report = sweep_at(pipe, now_ms() + 240_000)

    assert (report.polls_released, report.polls_redriven) == (1, 2)
    assert sorted(p[1] for p in pipe.dispatch.polls) == [1, 2, 3] and pipe.parked(job) == []
    assert sweep_at(pipe, now_ms() + 241_000).polls_redriven == 0  # deadlines are fresh for all three


def test_a_job_without_a_rate_limiter_still_releases_its_forced_polls(
    pipe: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = pipe.create_job()
    now = now_ms()
    parked.park(pipe.rt, job.id, 1, 0, now - POLL_YIELDS_MS)
    parked.park(pipe.rt, job.id, 2, 0, now - 1)

    def deleted(job: Any) -> RateLimiter:
        raise LookupError("no authorization with id or label 'auth-1'")

    monkeypatch.setattr(pipe.rt, "limiter_for", deleted)
    assert release(pipe, job, now) == [1] and pipe.parked(job) == [(2, 0)]


def test_a_sweep_does_nothing_while_another_runs(pipe: Pipeline) -> None:
    job = pipe.create_job()
    parked.park(pipe.rt, job.id, 1, 0, now_ms() - 1)
    pipe.redis.set(keys.sweep_lock(), "other", px=10_000)
    assert sweep(pipe.rt).skipped and pipe.dispatch.polls == []
    pipe.redis.delete(keys.sweep_lock())
    report = sweep(pipe.rt)
    assert not report.skipped and report.polls_released == 1
    assert not pipe.redis.exists(keys.sweep_lock())  # let go when done


def test_no_poll_deadline_for_a_batch_no_longer_at_attentive(pipe: Pipeline) -> None:
    """A released poll may run at once and send its batch again; a late deadline must not revive it."""
    job = pipe.create_job()
    bid = pipe.sealed_batch(job, users(2))
    pipe.buffer(job).expect_poll_by(bid, now_ms() + 1_000)  # sealed, not sent: nothing to poll
    assert pipe.redis.zscore(keys.polls(job.id), bid) is None
