"""Parked polls: released by the sweep only into spare request budget, at half the key's rate."""

from __future__ import annotations

from typing import Any

import pytest

from worker import keys, parked
from worker.buffer import now_ms
from worker.parked import POLL_YIELDS_MS, RELEASE_SHARE
from worker.ratelimit import RateLimiter
from worker.sweep import sweep

from .pipeline_kit import KEY_HASH, Pipeline

RATE = 20.0  # released at 10/s: at most 10 per one-second sweep, 0.1 s apart


@pytest.fixture(params=["fake", "real"])
def pipe(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Pipeline:
    client = request.getfixturevalue("fake_redis" if request.param == "fake" else "real_redis")
    pipe = Pipeline(client, monkeypatch, rate_limit_per_second=RATE, sweep_interval_seconds=1.0)
    monkeypatch.setattr(pipe.rt, "limiter_for", lambda job: RateLimiter(client, KEY_HASH, RATE))
    return pipe


def saturate(pipe: Pipeline) -> None:
    """Senders have taken every token: the schedule runs a whole burst ahead of the clock."""
    limiter = RateLimiter(pipe.redis, KEY_HASH, RATE)
    while limiter.try_acquire() == 0.0:
        pass


def park_many(pipe: Pipeline, job: Any, n: int, due: int) -> None:
    for bid in range(1, n + 1):
        parked.park(pipe.rt, job.id, bid, bid % 3, due + bid)  # later batches come due later


def test_due_polls_are_released_oldest_first_spaced_at_half_the_rate(pipe: Pipeline) -> None:
    job = pipe.create_job()
    now = now_ms()
    park_many(pipe, job, 25, now - 1_000)

    assert parked.release(pipe.rt, job, now) == 10  # ceil(20/s * 0.5 * 1 s)

    assert [(p[1], p[2]) for p in pipe.dispatch.polls] == [(b, b % 3) for b in range(1, 11)]
    assert [p[3] for p in pipe.dispatch.polls] == pytest.approx(
        [i / (RATE * RELEASE_SHARE) for i in range(10)]
    )
    assert [b for b, _ in pipe.parked(job)] == list(range(11, 26))


def test_polls_not_yet_due_stay_parked(pipe: Pipeline) -> None:
    job = pipe.create_job()
    now = now_ms()
    parked.park(pipe.rt, job.id, 1, 0, now - 1)
    parked.park(pipe.rt, job.id, 2, 0, now + 500)

    assert parked.release(pipe.rt, job, now) == 1
    assert pipe.parked(job) == [(2, 0)]


def test_nothing_is_released_while_sends_use_the_whole_budget_but_a_minute_late_goes_anyway(
    pipe: Pipeline,
) -> None:
    job = pipe.create_job()
    now = now_ms()
    parked.park(pipe.rt, job.id, 1, 0, now - POLL_YIELDS_MS)  # due a minute ago
    parked.park(pipe.rt, job.id, 2, 0, now - 1_000)
    saturate(pipe)

    assert parked.release(pipe.rt, job, now) == 1
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
    assert parked.release(pipe.rt, job, now) == 1
    assert [p[1] for p in pipe.dispatch.polls] == [2]


def test_the_sweep_releases_parked_polls_of_sending_jobs_only(pipe: Pipeline) -> None:
    job = pipe.create_job()
    parked.park(pipe.rt, job.id, 7, 2, now_ms() - 1)

    assert sweep(pipe.rt).polls_released == 1
    assert pipe.dispatch.polls == [(job.id, 7, 2, 0.0)]

    parked.park(pipe.rt, job.id, 8, 0, now_ms() - 1)
    pipe.rt.jobs.set_state(job.id, "paused", "operator")
    assert sweep(pipe.rt).polls_released == 0  # released on resume: a paused job polls nothing
    assert pipe.parked(job) == [(8, 0)]
