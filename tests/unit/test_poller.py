"""The per-key poller: due checks soonest first across the key's jobs, one poller per key, status
checks inside their share of the key's rate while sends wait, no long sleeps for tokens."""

from __future__ import annotations

import time

import pytest
import redis

from worker.pipeline import poller
from worker.pipeline.buffer import CheckSchedule, check_schedules, jobs_needing_a_poller, pull_checks_forward
from worker.pipeline.flush import flush_job
from worker.pipeline.poll import check_batch
from worker.pipeline.poller import run_poller
from worker.setup.jobconfig import JobState
from worker.store import keys

from .pipeline_kit import KEY_HASH, Pipeline, users


@pytest.fixture
def pipe(any_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> Pipeline:
    return Pipeline(any_redis, monkeypatch)


def at_attentive(pipe: Pipeline, job: object, n: int, prefix: str, due_ms: int = 0) -> list[int]:
    """``n`` one-user batches flushed to Attentive, their checks due at ``due_ms``."""
    bids = [pipe.sealed_batch(job, users(1, prefix=f"{prefix}{i}-")) for i in range(n)]  # type: ignore[arg-type]
    assert flush_job(pipe.rt, job.id).submitted == bids  # type: ignore[attr-defined]
    pipe.redis.zadd(keys.polls(job.id), {str(b): due_ms for b in bids})  # type: ignore[attr-defined]
    return bids


def test_the_poller_checks_every_due_batch_of_the_keys_jobs_soonest_first(pipe: Pipeline) -> None:
    one, two = pipe.create_job(), pipe.create_job(label="same key")
    at_attentive(pipe, one, 2, "a", due_ms=3)
    at_attentive(pipe, two, 1, "b", due_ms=1)
    later = at_attentive(pipe, two, 1, "c", due_ms=10**15)  # not due

    report = run_poller(pipe.rt, KEY_HASH, budget_seconds=5.0)

    assert (report.checked, report.settled) == (3, 3)
    gets = [r.url.path.rsplit("/", 1)[1] for r in pipe.attentive.status_gets()]
    assert gets == ["aj-3", "aj-1", "aj-2"]  # two's batch was due first
    assert pipe.polled(one) == [] and pipe.polled(two) == later
    assert not pipe.redis.exists(keys.poller_lock(KEY_HASH))  # released for the next one


def test_only_one_poller_per_key_at_a_time(pipe: Pipeline) -> None:
    job = pipe.create_job()
    at_attentive(pipe, job, 1, "a")
    pipe.redis.set(keys.poller_lock(KEY_HASH), "another poller")

    report = run_poller(pipe.rt, KEY_HASH, budget_seconds=5.0)

    assert report.skipped and report.checked == 0 and pipe.attentive.status_gets() == []


def test_a_poller_whose_lock_was_taken_over_stops_before_its_next_check(
    pipe: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = pipe.create_job()
    at_attentive(pipe, job, 3, "a")
    original = pipe.http.job_status

    def status_then_lose_the_lock(job_id: str) -> object:
        # The lock expired (a stalled process) and another poller took it.
        pipe.redis.set(keys.poller_lock(KEY_HASH), "the new poller")
        return original(job_id)

    monkeypatch.setattr(pipe.http, "job_status", status_then_lose_the_lock)
    report = run_poller(pipe.rt, KEY_HASH, budget_seconds=5.0)

    assert report.checked == 1 and len(pipe.attentive.status_gets()) == 1
    assert pipe.redis.get(keys.poller_lock(KEY_HASH)) == b"the new poller"  # not released by the old one


def test_while_sends_wait_checks_stay_within_their_share(
    pipe: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    rate, share = 200.0, 0.1  # 20 checks/s while sends wait
    pipe = Pipeline(pipe.redis, monkeypatch, rate_limit_per_second=rate, poll_share=share)
    monkeypatch.setattr(pipe, "limiter", lambda: poller.RateLimiter(pipe.redis, KEY_HASH, rate))
    job = pipe.create_job()
    at_attentive(pipe, job, 60, "a")
    pipe.sealed_batch(job, ["waiting@x.io"])  # a batch waits to be sent

    # Pollers one after the other for a second, as each queues its successor when out of tokens.
    started, checked = time.monotonic(), 0
    while time.monotonic() - started < 1.0:
        run_started = time.monotonic()
        report = run_poller(pipe.rt, KEY_HASH, budget_seconds=1.0)
        run_seconds = time.monotonic() - run_started
        checked += report.checked
        # Checks left: a successor is queued for when the share's burst is due again, never later.
        assert report.again_in is not None
        assert report.again_in <= poller.POLL_SHARE_BURST / (rate * share) + 0.01
        # Then it hands over: the burst, plus what the share refilled while this run lasted (a
        # slow machine makes checks slow enough for a token to come due during the run).
        assert report.checked <= poller.POLL_SHARE_BURST + rate * share * run_seconds
    elapsed = time.monotonic() - started

    assert checked >= 1 and checked == len(pipe.attentive.status_gets())
    # The share's burst, then one per 50 ms at most.
    assert checked <= poller.POLL_SHARE_BURST + rate * share * elapsed


def test_with_nothing_to_send_one_poller_task_checks_on_spare_tokens_without_handing_over(
    pipe: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A spare token every 20 ms: each check (a few ms) finds the next one a short wait away. At
    # 200/s (5 ms) a slow machine's checks outlasted the interval and never waited (CI, a26c312).
    rate = 50.0
    pipe = Pipeline(pipe.redis, monkeypatch, rate_limit_per_second=rate)
    monkeypatch.setattr(pipe, "limiter", lambda: poller.RateLimiter(pipe.redis, KEY_HASH, rate))
    job = pipe.create_job()
    at_attentive(pipe, job, 30, "a")
    pipe.redis.delete(keys.ratelimit(KEY_HASH))  # type: ignore[attr-defined]  # the sends spent tokens: start fresh
    slept: list[float] = []
    real_sleep = time.sleep
    monkeypatch.setattr(poller.time, "sleep", lambda s: (slept.append(s), real_sleep(s)))

    report = run_poller(pipe.rt, KEY_HASH, budget_seconds=5.0)

    # One task, not one per check: short waits for a token are waited out in the process.
    assert (report.checked, report.settled) == (30, 30) and report.again_in is None
    assert slept and max(slept) <= poller.SHORT_TOKEN_WAIT_SECONDS


def test_no_long_sleep_for_a_token_the_poller_hands_over_with_a_countdown(
    pipe: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = pipe.create_job()
    (bid,) = at_attentive(pipe, job, 1, "a")
    pipe.limiter().penalize(5.0)  # a 429 holds the key off for 5 s
    slept: list[float] = []
    monkeypatch.setattr(poller.time, "sleep", slept.append)

    report = run_poller(pipe.rt, KEY_HASH, budget_seconds=5.0)

    assert (
        report.checked == 0 and report.settled == 0 and pipe.attentive.status_gets() == []
    )  # no token: nothing asked
    assert report.again_in is not None and 4.0 < report.again_in <= 5.0
    assert sum(slept) <= poller.MAX_TOKEN_SLEEP_SECONDS
    due = pipe.redis.zscore(keys.polls(job.id), bid)
    assert due is not None and due > time.time() * 1000 + 4_000  # checked again after the hold


def test_a_paused_jobs_checks_wait_in_the_schedule(pipe: Pipeline) -> None:
    job = pipe.create_job()
    bids = at_attentive(pipe, job, 2, "a")
    pipe.rt.jobs.set_state(job.id, JobState.PAUSED, "operator")

    report = run_poller(pipe.rt, KEY_HASH, budget_seconds=1.0)

    assert report.checked == 0 and pipe.attentive.status_gets() == [] and pipe.polled(job) == bids
    pipe.rt.jobs.set_state(job.id, JobState.RUNNING)
    assert run_poller(pipe.rt, KEY_HASH, budget_seconds=5.0).settled == 2


def test_a_poller_on_spare_tokens_turns_to_the_share_soon_after_sends_start_waiting(
    pipe: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    rate = 200.0
    pipe = Pipeline(pipe.redis, monkeypatch, rate_limit_per_second=rate)
    monkeypatch.setattr(pipe, "limiter", lambda: poller.RateLimiter(pipe.redis, KEY_HASH, rate))
    job = pipe.create_job()
    at_attentive(pipe, job, 30, "a")
    original, asked, waiting_since = pipe.http.job_status, [], []

    def status_then_a_batch_waits(job_id: str) -> object:
        asked.append(job_id)
        if len(asked) == 2:
            pipe.sealed_batch(job, ["waiting@x.io"])  # from now on a send waits for the key
            waiting_since.append(time.monotonic())
        return original(job_id)

    monkeypatch.setattr(pipe.http, "job_status", status_then_a_batch_waits)
    report = run_poller(pipe.rt, KEY_HASH, budget_seconds=5.0)
    share_seconds = time.monotonic() - waiting_since[0]

    # The spare round ends within SPARE_ROUND_CHECKS checks; the next round sees the waiting send
    # and takes share tokens only: its burst (plus those that came due meanwhile, on a slow
    # machine), then it hands over until they are due again.
    share_tokens = poller.POLL_SHARE_BURST + int(share_seconds * rate * pipe.rt.settings.poll_share)
    assert report.checked <= poller.SPARE_ROUND_CHECKS + share_tokens, (report, share_seconds)
    # It handed over with checks left (a poller that slept for share tokens would check all 30).
    assert report.checked < 30 and report.again_in is not None and report.again_in > 0


def test_while_sends_queue_a_slow_keys_next_token_is_booked_for_a_check(
    pipe: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At 10 requests/s the key's next token is 100 ms away while sends queue, twice the short
    wait: the check books it rather than handing over to race the sends again."""
    rate = 10.0
    pipe = Pipeline(pipe.redis, monkeypatch, rate_limit_per_second=rate)
    monkeypatch.setattr(pipe, "limiter", lambda: poller.RateLimiter(pipe.redis, KEY_HASH, rate))
    job = pipe.create_job()
    at_attentive(pipe, job, 3, "a")
    pipe.sealed_batch(job, ["waiting@x.io"])  # a send waits for the key
    sender = pipe.limiter()
    while sender.try_acquire() == 0.0:
        pass  # the sends took the key's whole burst

    report = run_poller(pipe.rt, KEY_HASH, budget_seconds=5.0)

    assert report.checked >= 1, report


def test_one_read_gives_each_jobs_due_checks_earliest_check_waiting_sends_and_batches_out(
    pipe: Pipeline,
) -> None:
    busy, idle, empty = pipe.create_job(), pipe.create_job(label="b"), pipe.create_job(label="c")
    at_attentive(pipe, busy, 3, "a", due_ms=5)
    pipe.redis.zadd(keys.polls(busy.id), {"99": 7})  # type: ignore[attr-defined]
    far = at_attentive(pipe, idle, 1, "b", due_ms=10**15)
    pipe.sealed_batch(idle, users(2, prefix="w"))  # waiting to be sent

    got = check_schedules(pipe.redis, [busy.id, idle.id, empty.id], now_ms=6, limit=2)  # type: ignore[attr-defined]

    assert got[busy.id].due == [(5, b) for b in sorted(pipe.polled(busy))[:2]]  # due by 6, two asked for
    assert (got[busy.id].next_at, got[busy.id].sealed, got[busy.id].at_attentive) == (5, 0, 4)
    assert (got[idle.id].due, got[idle.id].next_at, got[idle.id].sealed) == ([], 10**15, 1)
    assert got[idle.id].at_attentive == len(far) == 1
    assert got[empty.id] == CheckSchedule(due=[], next_at=None, sealed=0, at_attentive=0)
    assert check_schedules(pipe.redis, [], now_ms=6, limit=2) == {}


def _scheduled(pipe: Pipeline, job: object) -> dict[int, int]:
    got = pipe.redis.zrange(keys.polls(job.id), 0, -1, withscores=True)  # type: ignore[attr-defined]
    return {int(b): int(at) for b, at in got}


def _floors(pipe: Pipeline, job: object) -> dict[int, int]:
    got = pipe.redis.zrange(keys.check_floors(job.id), 0, -1, withscores=True)  # type: ignore[attr-defined]
    return {int(b): int(at) for b, at in got}


def test_checks_move_forward_into_free_spare_slots_longest_past_their_floor_first(pipe: Pipeline) -> None:
    job = pipe.create_job()
    passed, ahead, no_floor, near, later = at_attentive(pipe, job, 5, "a")
    buffer = pipe.buffer(job)
    now = 1_000_000
    buffer.schedule_check(passed, now + 900_000, floor_ms=now - 5)  # spread far out, floor passed
    buffer.schedule_check(ahead, now + 950_000, floor_ms=now + 250)  # floor still ahead, within reach
    buffer.schedule_check(no_floor, now + 10)  # put where it must stay (a 429 hold, a token wait)
    buffer.schedule_check(near, now + 20_000, floor_ms=now - 1)
    buffer.schedule_check(later, now + 990_000, floor_ms=now + 40_000)  # floor beyond 64 slots

    assert buffer.pull_checks_forward(now, interval_ms=100.0, limit=64) == 3

    # no_floor holds slot 0; passed (its floor the oldest) and near take slots 1 and 2; ahead goes
    # to the first slot at or after its floor; later waits until its floor comes within reach.
    assert _scheduled(pipe, job) == {
        no_floor: now + 10,
        passed: now + 100,
        near: now + 200,
        ahead: now + 300,
        later: now + 990_000,
    }
    assert buffer.pull_checks_forward(now, interval_ms=100.0, limit=64) == 0  # nothing left to gain
    assert buffer.pull_checks_forward(now + 39_990, interval_ms=100.0, limit=64) == 1
    assert _scheduled(pipe, job)[later] == now + 40_090  # its floor rounded up to a slot
    buffer.schedule_check(passed, now + 500_000)  # rescheduled without a floor: stays put
    assert buffer.pull_checks_forward(now + 50_000, interval_ms=100.0, limit=64) == 0
    assert _scheduled(pipe, job)[passed] == now + 500_000


def test_a_far_check_behind_more_than_a_page_of_near_ones_is_still_pulled(pipe: Pipeline) -> None:
    # The 1 M-user run's case: 14 backfill checks far out behind ~100 real-time ones; reading only
    # the schedule's first page never reached them.
    job = pipe.create_job()
    *near, far = at_attentive(pipe, job, 101, "a")
    buffer = pipe.buffer(job)
    now = 1_000_000
    for n, bid in enumerate(near):
        buffer.schedule_check(bid, now + 10_000 + 100 * n, floor_ms=now + 8_000)  # beyond 64 slots
    buffer.schedule_check(far, now + 500_000, floor_ms=now - 1_150_000)

    assert buffer.pull_checks_forward(now, interval_ms=100.0, limit=64) == 1
    assert _scheduled(pipe, job)[far] == now


def test_several_jobs_checks_are_pulled_in_one_call_each_into_its_own_free_slots(
    pipe: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    one, two, idle = pipe.create_job(), pipe.create_job(label="same key"), pipe.create_job(label="idle")
    now = 1_000_000
    [a], [b, held] = at_attentive(pipe, one, 1, "a"), at_attentive(pipe, two, 2, "b")
    [c] = at_attentive(pipe, idle, 1, "c")
    pipe.buffer(one).schedule_check(a, now + 900_000, floor_ms=now - 5)
    pipe.buffer(two).schedule_check(held, now + 10)  # holds slot 0 of its own job
    pipe.buffer(two).schedule_check(b, now + 900_000, floor_ms=now - 5)
    pipe.buffer(idle).schedule_check(c, now + 900_000)  # no floor: stays

    sent = _round_trips(pipe.redis, monkeypatch)  # type: ignore[arg-type]
    moved = pull_checks_forward(pipe.redis, [one.id, two.id, idle.id], now, interval_ms=100.0, limit=64)  # type: ignore[arg-type]

    assert moved == 2
    assert sent == ["pipeline"] * 3  # the schedules and floors, the dues, the moves: for all jobs
    assert _scheduled(pipe, one) == {a: now}
    assert _scheduled(pipe, two) == {held: now + 10, b: now + 100}
    assert _scheduled(pipe, idle) == {c: now + 900_000}


def test_a_floor_is_kept_only_while_earlier_than_its_check_and_a_send_or_completion_drops_it(
    pipe: Pipeline,
) -> None:
    job = pipe.create_job()
    bid, other = at_attentive(pipe, job, 2, "a")
    buffer = pipe.buffer(job)
    buffer.schedule_check(bid, 5_000, floor_ms=9_000)
    assert _floors(pipe, job) == {}  # a floor at the due time gains nothing
    buffer.schedule_check(bid, 5_000, floor_ms=1_000)
    buffer.schedule_check(other, 5_000, floor_ms=2_000)
    assert _floors(pipe, job) == {bid: 1_000, other: 2_000}
    buffer.schedule_check(bid, 6_000)
    assert _floors(pipe, job) == {other: 2_000}
    buffer.complete(other)
    assert _floors(pipe, job) == {}
    buffer.schedule_check(bid, 5_000, floor_ms=1_000)
    assert buffer.resend(bid, "lost")
    assert _floors(pipe, job) == {}
    assert not buffer.schedule_check(bid, 5_000, floor_ms=1_000)  # no longer at Attentive
    assert _floors(pipe, job) == {}


def test_with_nothing_to_send_the_poller_brings_far_checks_forward_and_makes_them(pipe: Pipeline) -> None:
    job = pipe.create_job()
    far, stays = at_attentive(pipe, job, 2, "a")
    now = int(time.time() * 1000)
    pipe.buffer(job).schedule_check(far, now + 3_600_000, floor_ms=now - 1_000)  # spread while sends waited
    pipe.buffer(job).schedule_check(stays, now + 3_600_000)  # no floor: not brought forward

    report = run_poller(pipe.rt, KEY_HASH, budget_seconds=5.0)

    assert report.pulled_forward and (report.checked, report.settled) == (1, 1)
    assert pipe.polled(job) == [stays]


def test_while_sends_wait_far_checks_stay_where_the_share_put_them(pipe: Pipeline) -> None:
    job = pipe.create_job()
    (far,) = at_attentive(pipe, job, 1, "a")
    now = int(time.time() * 1000)
    pipe.buffer(job).schedule_check(far, now + 3_600_000, floor_ms=now - 1_000)
    pipe.sealed_batch(job, users(1, prefix="waiting"))  # a batch waits to be sent

    report = run_poller(pipe.rt, KEY_HASH, budget_seconds=5.0)

    assert not report.pulled_forward and report.checked == 0
    assert _scheduled(pipe, job)[far] == now + 3_600_000


def test_a_check_of_a_running_job_leaves_its_age_floor_beside_the_spread_due_time(pipe: Pipeline) -> None:
    job = pipe.create_job()
    (bid,) = at_attentive(pipe, job, 1, "a")
    pipe.attentive.statuses["aj-1"] = ["IN_PROGRESS"]
    before = int(time.time() * 1000)

    check = check_batch(pipe.rt, job, bid, lambda: 0.0, pipe.limiter(), 39_000, True)

    assert not check.done and check.statuses == ("IN_PROGRESS",)
    due, floor = _scheduled(pipe, job)[bid], _floors(pipe, job)[bid]
    first = pipe.rt.settings.first_poll_seconds
    assert before + 0.8 * first * 1000 <= floor <= int(time.time() * 1000) + first * 1000
    assert due >= before + 0.8 * 39_000 / (pipe.rt.settings.rate_limit_per_second * 0.1) * 1000 > floor


def test_a_check_due_soon_does_not_keep_far_checks_from_filling_the_gap_before_it(pipe: Pipeline) -> None:
    job = pipe.create_job()
    soon, far = at_attentive(pipe, job, 2, "a")
    now = int(time.time() * 1000)
    pipe.buffer(job).schedule_check(soon, now + 800)  # a real-time batch's next check, under a second away
    pipe.buffer(job).schedule_check(far, now + 3_600_000, floor_ms=now - 1_000)

    report = run_poller(pipe.rt, KEY_HASH, budget_seconds=0.5)

    assert report.pulled_forward and report.checked >= 1
    assert far not in pipe.polled(job)  # checked (and completed) in the gap


def test_the_sweep_queues_a_poller_for_a_check_it_can_bring_forward_once_nothing_waits(
    pipe: Pipeline,
) -> None:
    # Traffic stopped: no check due, so no poller runs, yet a far check's floor has passed.
    job = pipe.create_job()
    far, plain = at_attentive(pipe, job, 2, "a")
    now = int(time.time() * 1000)
    pipe.buffer(job).schedule_check(plain, now + 3_600_000)  # no floor: nothing to bring forward
    pipe.buffer(job).schedule_check(far, now + 3_600_000, floor_ms=now + 60_000)
    assert poller.request_pollers(pipe.rt, [job], now) == 0  # its floor is still ahead

    assert poller.request_pollers(pipe.rt, [job], now + 60_000) == 1
    assert pipe.dispatch.pollers == [(KEY_HASH, 0.0)]

    pipe.redis.delete(keys.poller_queued(KEY_HASH))  # type: ignore[attr-defined]
    pipe.sealed_batch(job, users(1, prefix="waiting"))  # sends wait: the poller would not pull
    assert poller.request_pollers(pipe.rt, [job], now + 60_000) == 0


def test_which_jobs_need_a_poller_is_read_in_one_round_trip_for_all_of_them(
    pipe: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = int(time.time() * 1000)
    due, pullable, blocked_by_sends, idle = (pipe.create_job() for _ in range(4))
    [b] = at_attentive(pipe, due, 1, "due")
    pipe.buffer(due).schedule_check(b, now - 1)
    for job, prefix in ((pullable, "pull"), (blocked_by_sends, "sends")):
        [b] = at_attentive(pipe, job, 1, prefix)
        pipe.buffer(job).schedule_check(b, now + 3_600_000, floor_ms=now - 1)
    pipe.sealed_batch(blocked_by_sends, users(1, prefix="waiting"))  # it would not pull
    [b] = at_attentive(pipe, idle, 1, "idle")
    pipe.buffer(idle).schedule_check(b, now + 3_600_000)  # no floor, not due
    sent = _round_trips(pipe.redis, monkeypatch)  # type: ignore[arg-type]

    found = jobs_needing_a_poller(pipe.redis, [j.id for j in (due, pullable, blocked_by_sends, idle)], now)

    assert found == {due.id, pullable.id}
    assert sent == ["pipeline"]
    assert jobs_needing_a_poller(pipe.redis, [], now) == set()


def _round_trips(client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records each command or pipeline the client sends from now on (a round trip each)."""
    sent: list[str] = []
    command, pipeline = client.execute_command, client.pipeline

    def counted_command(*args: object, **kwargs: object) -> object:
        sent.append(str(args[0]))
        return command(*args, **kwargs)

    def counted_pipeline(*args: object, **kwargs: object) -> object:
        pipe = pipeline(*args, **kwargs)
        execute = pipe.execute
        monkeypatch.setattr(pipe, "execute", lambda *a, **k: sent.append("pipeline") or execute(*a, **k))
        return pipe

    monkeypatch.setattr(client, "execute_command", counted_command)
    monkeypatch.setattr(client, "pipeline", counted_pipeline)
    return sent


def test_a_poller_round_costs_the_same_round_trips_however_many_jobs_share_the_key(
    pipe: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each round reads every sending job's block: one pipeline, not one read per job.
    at_attentive(pipe, pipe.create_job(), 1, "a", due_ms=10**15)  # at Attentive, not due

    def one_round() -> list[str]:
        with monkeypatch.context() as m:
            sent = _round_trips(pipe.redis, m)  # type: ignore[arg-type]
            report = run_poller(pipe.rt, KEY_HASH, budget_seconds=5.0)
        assert report.checked == 0
        return sent

    one_round()  # loads the lock's scripts
    alone = one_round()
    assert alone.count("pipeline") == 3  # the jobs' blocks, their schedules, the checks to pull
    for n in range(5):
        at_attentive(pipe, pipe.create_job(label=f"same key {n}"), 1, f"b{n}", due_ms=10**15)
    assert one_round() == alone
