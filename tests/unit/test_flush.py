"""Flush decisions: submit, 429/5xx/transport release, 401/403 pause, 400 isolation by bisection."""

from __future__ import annotations

import json
import math
import random
from typing import Any

import httpx
import pytest
import redis

from worker.pipeline import deadletters
from worker.pipeline.attentive_calls import TOKEN_WAIT_SECONDS
from worker.pipeline.flush import FLUSH_QUEUED_TTL_MS, flush_job, request_flush
from worker.setup.jobconfig import JobState
from worker.store import keys
from worker.store.ratelimit import RateLimiter

from .pipeline_kit import KEY_HASH, RATE, Pipeline, emails_of, enter, error, exit_, users


@pytest.fixture
def pipe(any_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> Pipeline:
    return Pipeline(any_redis, monkeypatch)


@pytest.fixture
def max_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Full-jitter back-off draws the top of its range, so delays are exact."""
    monkeypatch.setattr(random, "uniform", lambda low, high: high)


def hold_elapsed(pipe: Pipeline) -> None:
    """Let the shared 429 hold run out without sleeping through it."""
    pipe.redis.delete(keys.ratelimit(KEY_HASH), keys.ratelimit_backoff(KEY_HASH))


def test_sealed_batch_is_posted_once_with_merged_records_then_marked_submitted_and_polled(
    pipe: Pipeline,
) -> None:
    job = pipe.create_job()
    pipe.ingest(enter("a@x.io", "vip"), enter("b@x.io", "vip"), exit_("a@x.io", "lapsed"))
    (bid,) = pipe.buffer(job).seal_now()

    report = flush_job(pipe.rt, job.id)

    assert report.submitted == [bid] and report.retry_in is None and report.paused == ""
    assert len(pipe.attentive.posts()) == 1
    (sent,) = pipe.attentive.bulk_bodies
    assert emails_of(sent) == ["a@x.io", "b@x.io"]
    assert sent[0]["attributes"]["custom"] == {"vip": True, "lapsed": False}
    assert sent[1]["attributes"]["custom"] == {"vip": True}
    batch = pipe.buffer(job).batch(bid)
    assert batch["state"] == "submitted"
    assert json.loads(batch["attentive_jobs"]) == [{"id": "aj-1", "idx": [0, 1]}]
    assert pipe.buffer(job).sealed_count() == 0
    due = pipe.redis.zscore(keys.polls(job.id), bid)  # first check due after the first-poll delay
    assert due is not None and due >= int(batch["submitted_at"]) + int(
        pipe.rt.settings.first_poll_seconds * 1000
    )
    assert pipe.status(job)["batches_submitted"] == "1"


def test_flush_drains_every_sealed_batch_in_fifo_order(pipe: Pipeline) -> None:
    job = pipe.create_job(batch_size=2)
    pipe.ingest(*(enter(e) for e in users(5)))  # seals [u0,u1] and [u2,u3]; u4 stays open
    pipe.buffer(job).seal_now()

    report = flush_job(pipe.rt, job.id)

    assert report.submitted == [1, 2, 3]
    assert [emails_of(b) for b in pipe.attentive.bulk_bodies] == [users(5)[0:2], users(5)[2:4], ["u4@x.io"]]
    assert pipe.polled(job) == [1, 2, 3]


def test_a_request_never_carries_the_same_user_twice(pipe: Pipeline) -> None:
    job = pipe.create_job()
    # a@x.io enters then exits vip: the exit may not ride in the same request as the enter.
    pipe.ingest(enter("a@x.io"), enter("b@x.io"), exit_("a@x.io"), enter("c@x.io"))
    pipe.buffer(job).seal_now()

    flush_job(pipe.rt, job.id)
    for body in pipe.attentive.bulk_bodies:
        assert len(set(emails_of(body))) == len(body)
    assert [emails_of(b) for b in pipe.attentive.bulk_bodies] == [["a@x.io", "b@x.io"], ["c@x.io"]]

    # The exit waits for a's first Attentive job to finish, then goes in a later request.
    assert pipe.polled(job) == [1, 2]
    assert pipe.check(job, 1).done
    pipe.buffer(job).seal_now()
    flush_job(pipe.rt, job.id)
    last = pipe.attentive.bulk_bodies[-1]
    assert emails_of(last) == ["a@x.io"] and last[0]["attributes"]["custom"] == {"vip": False}


def test_429_releases_batch_penalizes_shared_limiter_and_counts(pipe: Pipeline, max_jitter: None) -> None:
    job = pipe.create_job()
    bid = pipe.sealed_batch(job, users(3))
    pipe.attentive.bulk = lambda users: error(429, "Too many requests")

    # A first 429 is taken as noise: no hold for anyone, the batch just goes again next interval.
    report = flush_job(pipe.rt, job.id)
    assert report.submitted == [] and report.retry_in == pytest.approx(1.0 / RATE)
    assert pipe.buffer(job).sealed_count() == 1
    assert pipe.buffer(job).batch(bid)["state"] == "sealed"
    assert pipe.buffer(job).outstanding_users() == 3  # nothing was lost or freed
    assert pipe.redis.get(keys.ratelimit_backoff(KEY_HASH)) is None
    assert pipe.status(job)["responses_429"] == "1"
    assert pipe.polled(job) == []
    # Its own retry is on the way: a seal meanwhile queues no second sender.
    assert pipe.redis.exists(keys.flush_running(job.id)) and not request_flush(pipe.rt, job.id)

    # A second 429 in a row for the key holds every worker off; a third doubles the hold.
    report = flush_job(pipe.rt, job.id)
    assert report.retry_in == 0.1  # top of the range
    assert 0 < RateLimiter(pipe.redis, KEY_HASH, RATE).try_acquire() <= 0.1  # seen by any worker
    hold_elapsed(pipe)
    assert flush_job(pipe.rt, job.id).retry_in == 0.2
    assert pipe.status(job)["responses_429"] == "3"
    assert float(pipe.status(job)["rate_limited_seconds"]) == pytest.approx(0.3)
    assert len(pipe.attentive.posts()) == 3

    # Success resets the key's streak, and the very same batch goes out.
    hold_elapsed(pipe)
    pipe.attentive.bulk = pipe.attentive.accept
    assert flush_job(pipe.rt, job.id).submitted == [bid]
    assert pipe.status(job)["consecutive_429"] == "0"
    assert pipe.redis.get(keys.ratelimit_streak(KEY_HASH)) is None


def test_scattered_429s_never_freeze_the_key(pipe: Pipeline) -> None:
    """Under 20-30% random 429s (Attentive shedding load) the key keeps its rate: a 429 between
    successes places no hold. Bug caught: every 429 freezing every worker, which collapsed the
    throughput to about one request a second."""
    job = pipe.create_job(batch_size=1)
    emails = users(12)
    pipe.ingest(*(enter(e) for e in emails))
    answers = iter([429, 202, 202, 202, 429, 202, 202, 429, 202, 202, 202, 429] + [202] * 20)

    def bulk(users: list[dict[str, Any]]) -> Any:
        return error(429, "Too many requests") if next(answers) == 429 else pipe.attentive.accept(users)

    pipe.attentive.bulk = bulk
    for _ in range(20):
        if flush_job(pipe.rt, job.id).submitted == [] and pipe.buffer(job).sealed_count() == 0:
            break
    assert pipe.redis.get(keys.ratelimit_backoff(KEY_HASH)) is None  # never held off
    assert sorted(e for b in pipe.attentive.accepted.values() for e in emails_of(b)) == sorted(emails)


def test_retry_after_seconds_is_the_delay_and_holds_every_worker_off(pipe: Pipeline) -> None:
    job = pipe.create_job()
    pipe.sealed_batch(job, users(2))
    pipe.attentive.bulk = lambda users: error(429, "slow down", headers={"Retry-After": "7"})

    report = flush_job(pipe.rt, job.id)

    assert report.retry_in == 7.0
    assert 6.0 < RateLimiter(pipe.redis, KEY_HASH, RATE).try_acquire() <= 7.0
    assert float(pipe.status(job)["rate_limited_seconds"]) == 7.0

    # Any flush during the hold sends nothing: no token before the hold ends, batch kept.
    pipe.attentive.bulk = pipe.attentive.accept
    report = flush_job(pipe.rt, job.id)
    assert report.submitted == [] and report.retry_in is not None and 6.0 < report.retry_in <= 7.0
    assert len(pipe.attentive.posts()) == 1
    assert pipe.buffer(job).sealed_count() == 1


@pytest.mark.parametrize(
    "failure",
    [error(503, "Service Unavailable"), httpx.ConnectError("connection refused")],
    ids=["503", "transport"],
)
def test_server_or_transport_error_releases_batch_with_backoff_and_records_last_error(
    pipe: Pipeline, failure: Any
) -> None:
    job = pipe.create_job()
    bid = pipe.sealed_batch(job, users(2))
    pipe.attentive.bulk = lambda users: failure

    report = flush_job(pipe.rt, job.id)

    assert report.submitted == [] and report.retry_in is not None and 0.0 <= report.retry_in <= 1.0
    assert pipe.buffer(job).sealed_count() == 1 and pipe.buffer(job).batch(bid)["state"] == "sealed"
    status = pipe.status(job)
    expected = "ServerError" if isinstance(failure, httpx.Response) else "TransportError"
    assert status["last_error"].startswith(expected)
    assert status["consecutive_errors"] == "1"
    assert "responses_429" not in status
    assert pipe.polled(job) == []


@pytest.mark.parametrize("code", [401, 403])
def test_auth_error_pauses_job_releases_batch_and_stops_sending(pipe: Pipeline, code: int) -> None:
    job = pipe.create_job()
    bid = pipe.sealed_batch(job, users(3))
    pipe.attentive.bulk = lambda users: error(code, "nope")

    report = flush_job(pipe.rt, job.id)

    assert str(code) in report.paused
    stored = pipe.rt.jobs.get(job.id)
    assert stored.state is JobState.PAUSED
    assert str(code) in stored.pause_reason
    assert pipe.status(job)["last_error"] == stored.pause_reason
    assert pipe.buffer(job).sealed_count() == 1 and pipe.buffer(job).batch(bid)["state"] == "sealed"
    assert len(pipe.attentive.requests) == 1
    assert not pipe.redis.exists(keys.flush_running(job.id))  # after a resume, a seal queues a flush

    # Not retried in a loop: the next flush sends nothing while the job is paused.
    again = flush_job(pipe.rt, job.id)
    assert again.submitted == [] and again.retry_in is None
    assert len(pipe.attentive.requests) == 1
    assert pipe.buffer(job).sealed_count() == 1


def test_400_isolates_the_poisoned_user_by_bisection_and_delivers_the_rest(pipe: Pipeline) -> None:
    n = 16
    job = pipe.create_job()
    emails = users(n)
    bid = pipe.sealed_batch(job, emails)
    pipe.attentive.refuse_containing("u11@x.io")

    report = flush_job(pipe.rt, job.id)

    assert report.submitted == [bid]
    posts = len(pipe.attentive.posts())
    assert posts <= 2 * math.log2(n) + 1
    accepted = [e for body in pipe.attentive.accepted.values() for e in emails_of(body)]
    assert sorted(accepted) == sorted(set(emails) - {"u11@x.io"})
    (dead,) = deadletters.read(pipe.redis, job.id)
    assert dead["user"] == "u11@x.io" and dead["batch"] == bid
    assert dead["reason"] == "attentive_400: Invalid email address: u11@x.io"
    assert dead["record"]["identifiers"]["email"] == "u11@x.io"
    batch = pipe.buffer(job).batch(bid)
    poisoned = json.loads(batch["users"]).index("u11@x.io")
    sub_jobs = json.loads(batch["attentive_jobs"])
    assert sorted(i for sub in sub_jobs for i in sub["idx"]) == [i for i in range(n) if i != poisoned]
    assert pipe.polled(job) == [bid]


@pytest.mark.parametrize("poisoned", ["u0@x.io", "u1@x.io"])
def test_a_split_ends_the_keys_429_streak_whichever_request_was_accepted(
    pipe: Pipeline, poisoned: str
) -> None:
    """An accepted request resets the key's 429 streak: at once when more of the split follows, with
    the send's own counters when it was the last request (one round trip fewer per batch)."""
    job = pipe.create_job()
    pipe.sealed_batch(job, users(2))
    pipe.redis.set(keys.ratelimit_streak(KEY_HASH), 3)
    pipe.attentive.refuse_containing(poisoned)

    flush_job(pipe.rt, job.id)

    assert len(pipe.attentive.posts()) == 3  # the pair, then each user alone
    assert pipe.redis.get(keys.ratelimit_streak(KEY_HASH)) is None
    assert pipe.status(job)["users_sent"] == "1"


def test_batch_refused_entirely_completes_with_every_user_deadlettered(pipe: Pipeline) -> None:
    job = pipe.create_job()
    emails = users(4)
    bid = pipe.sealed_batch(job, emails)
    pipe.attentive.refuse_containing(*emails)

    report = flush_job(pipe.rt, job.id)

    assert report.submitted == [] and report.retry_in is None
    assert len(pipe.attentive.posts()) == 2 * len(emails) - 1  # full bisection tree
    dead = deadletters.read(pipe.redis, job.id)
    assert sorted(d["user"] for d in dead) == emails
    assert all(d["reason"].startswith("attentive_400: Invalid email address") for d in dead)
    assert pipe.buffer(job).batch(bid) == {}
    assert pipe.buffer(job).outstanding_users() == 0
    assert pipe.polled(job) == []
    status = pipe.status(job)
    assert status["batches_completed"] == "1" and status["deadlettered_users"] == "4"


@pytest.mark.parametrize("state", [JobState.PAUSED, JobState.STOPPED, JobState.CREATED])
def test_flush_of_a_job_that_is_not_sending_does_nothing(pipe: Pipeline, state: JobState) -> None:
    job = pipe.create_job()
    bid = pipe.sealed_batch(job, users(2))
    pipe.rt.jobs.set_state(job.id, state, "operator")

    report = flush_job(pipe.rt, job.id)

    assert report.submitted == [] and report.retry_in is None and report.paused == ""
    assert pipe.attentive.requests == []
    assert pipe.buffer(job).sealed_count() == 1 and pipe.buffer(job).batch(bid)["state"] == "sealed"
    assert not pipe.redis.exists(keys.flush_running(job.id))


def test_flush_of_an_unknown_job_does_nothing(pipe: Pipeline) -> None:
    report = flush_job(pipe.rt, "no-such-job")
    assert report.submitted == [] and report.retry_in is None
    assert pipe.attentive.requests == []


def test_one_flush_task_is_queued_until_it_starts(pipe: Pipeline) -> None:
    job = pipe.create_job()
    assert request_flush(pipe.rt, job.id) and not request_flush(pipe.rt, job.id)
    assert pipe.dispatch.flushes == [(job.id, 0.0)]
    flush_job(pipe.rt, job.id)  # the queued task starts: batches sealed from now on need a new one
    assert request_flush(pipe.rt, job.id)
    assert pipe.dispatch.flushes == [(job.id, 0.0), (job.id, 0.0)]
    ttl = pipe.redis.pttl(keys.flush_queued(job.id))
    assert 0 < ttl <= FLUSH_QUEUED_TTL_MS  # a lost message does not block flushing for good


def test_no_flush_task_is_queued_while_one_is_claiming_batches(pipe: Pipeline) -> None:
    """Two flushes of one job only take turns on the rate limiter, holding two worker processes."""
    job = pipe.create_job(batch_size=2)
    pipe.ingest(*(enter(e) for e in users(2)))
    queued_during: list[bool] = []

    def accept_and_seal_more(sent: list[dict[str, Any]]) -> Any:
        if not queued_during:
            pipe.ingest(*(enter(e) for e in users(4)[2:]))  # seals a batch while the flush runs
            queued_during.append(request_flush(pipe.rt, job.id))
        return pipe.attentive.accept(sent)

    pipe.attentive.bulk = accept_and_seal_more
    assert flush_job(pipe.rt, job.id).submitted == [1, 2]  # the running flush took the new batch too
    assert queued_during == [False] and pipe.dispatch.flushes == []
    assert not pipe.redis.exists(keys.flush_running(job.id))  # stood down: the next seal queues a task
    assert request_flush(pipe.rt, job.id)


@pytest.mark.parametrize("sealed_before_standing_down", [True, False])
def test_a_batch_sealed_as_the_flush_stands_down_is_never_stranded(
    pipe: Pipeline, monkeypatch: pytest.MonkeyPatch, sealed_before_standing_down: bool
) -> None:
    """Ingest seals (and asks for a flush) right after the flush found nothing to claim."""
    job = pipe.create_job(batch_size=2)
    buffer_cls = type(pipe.buffer(job))
    claim = buffer_cls.claim
    empty_claims: list[int] = []
    delete = pipe.redis.delete

    def race() -> None:
        pipe.ingest(*(enter(e) for e in users(2)))
        request_flush(pipe.rt, job.id)

    def claim_then_race(self: Any, lease_ms: int, now: int | None = None, **hold: Any) -> Any:
        got = claim(self, lease_ms, now, **hold)
        if got is None and not empty_claims:
            empty_claims.append(1)
            if sealed_before_standing_down:
                race()
        return got

    def delete_then_race(*names: Any) -> Any:
        n = delete(*names)
        if not sealed_before_standing_down and empty_claims == [1] and keys.flush_running(job.id) in names:
            empty_claims.append(2)
            race()
        return n

    monkeypatch.setattr(buffer_cls, "claim", claim_then_race)
    monkeypatch.setattr(pipe.redis, "delete", delete_then_race)
    report = flush_job(pipe.rt, job.id)
    assert report.submitted == [1]  # either way the flush's last look finds the batch
    assert pipe.dispatch.flushes == ([] if sealed_before_standing_down else [(job.id, 0.0)])


def test_a_flush_never_sleeps_long_for_a_token_it_gives_the_batch_back_with_a_countdown(
    pipe: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prefork process that sleeps seconds on the limiter starves ingest and the sweep: a flush
    waits at most TOKEN_WAIT_SECONDS, then runs again when its token is due."""
    from worker.store import ratelimit

    job = pipe.create_job()
    bid = pipe.sealed_batch(job, users(2))
    interval = 4.0  # one token every 4 s
    busy = RateLimiter(pipe.redis, KEY_HASH, 1 / interval)
    monkeypatch.setattr(pipe.rt, "limiter_for", lambda job: busy)
    while busy.try_acquire() == 0.0:  # other senders took the burst: the next token is ~4 s away
        pass
    slept: list[float] = []
    monkeypatch.setattr(ratelimit.time, "sleep", slept.append)

    report = flush_job(pipe.rt, job.id)

    assert report.submitted == [] and report.retry_in is not None and report.retry_in > TOKEN_WAIT_SECONDS
    assert sum(slept) <= TOKEN_WAIT_SECONDS
    assert pipe.attentive.posts() == [] and pipe.buffer(job).batch(bid)["state"] == "sealed"


@pytest.mark.parametrize("rate, more", [(1e9, True), (1e-3, False)])
def test_a_slow_attentive_gets_another_sender_while_batches_wait(
    pipe: Pipeline, monkeypatch: pytest.MonkeyPatch, rate: float, more: bool
) -> None:
    """A POST slower than a token interval means one sender cannot use the budget."""
    pipe = Pipeline(pipe.redis, monkeypatch, rate_limit_per_second=rate)
    job = pipe.create_job(batch_size=1)
    pipe.ingest(*(enter(e) for e in users(3)))
    flush_job(pipe.rt, job.id)
    assert (pipe.dispatch.flushes == [(job.id, 0.0)]) is more


def test_a_batch_whose_records_are_lost_is_deadlettered_and_the_rest_flow(pipe: Pipeline) -> None:
    job = pipe.create_job(batch_size=2)
    pipe.ingest(*(enter(e) for e in users(4)))
    pipe.redis.delete(keys.batch_entries(job.id, 1))

    report = flush_job(pipe.rt, job.id)

    assert report.submitted == [2]
    dead = deadletters.read(pipe.redis, job.id)
    assert [d["user"] for d in dead] == users(4)[:2] and "missing" in dead[0]["reason"]
    assert pipe.redis.exists(keys.batch(job.id, 1)) == 0
