"""Unit tests for the shared GCRA rate limiter, on fakeredis with its Redis ``TIME`` under test control."""

from __future__ import annotations

import random
from collections.abc import Iterator

import fakeredis
import pytest
from fakeredis.commands_mixins import server_mixin
from redis.lock import Lock

from worker.store import keys, ratelimit
from worker.store.ratelimit import RateLimiter, api_key_hash

API_KEY = "sk_live_ABCDEF0123456789secret"


class FakeClock:
    """Stands in for the ``time`` module inside fakeredis (Redis ``TIME``) and inside worker.store.ratelimit."""

    def __init__(self) -> None:
        self.now_us = 1_700_000_000 * 1_000_000

    def time(self) -> float:
        return self.now_us / 1_000_000

    def monotonic(self) -> float:
        return self.now_us / 1_000_000

    def sleep(self, seconds: float) -> None:
        self.advance(seconds)

    def advance(self, seconds: float) -> None:
        self.now_us += round(seconds * 1_000_000)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeClock]:
    fake = FakeClock()
    monkeypatch.setattr(server_mixin, "time", fake)
    monkeypatch.setattr(ratelimit, "time", fake)
    yield fake


def limiter(r: fakeredis.FakeRedis, rate: float = 10.0, burst: int = 3, key: str = API_KEY) -> RateLimiter:
    return RateLimiter(r, api_key_hash(key), rate_per_second=rate, burst=burst)


# --- naming -------------------------------------------------------------------------------------------
def test_api_key_hash_is_stable_short_hex_and_not_the_key() -> None:
    h = api_key_hash(API_KEY)
    assert h == api_key_hash(API_KEY)
    assert len(h) == ratelimit.KEY_HASH_LENGTH
    int(h, 16)
    assert h != api_key_hash(API_KEY + "x")
    assert API_KEY not in keys.ratelimit(h) and API_KEY not in keys.ratelimit_backoff(h)


def test_redis_keys_never_contain_the_api_key(fake_redis: fakeredis.FakeRedis, clock: FakeClock) -> None:
    rl = limiter(fake_redis)
    rl.try_acquire()
    rl.penalize(1.0)
    names = [k.decode() if isinstance(k, bytes) else k for k in fake_redis.keys("*")]
    assert names and all(API_KEY not in name for name in names)
    assert API_KEY not in repr(rl)


def test_interval_is_rounded_up_so_the_rate_is_never_exceeded(fake_redis: fakeredis.FakeRedis) -> None:
    assert RateLimiter(fake_redis, "k", 90.0).interval_us == 11_112
    assert RateLimiter(fake_redis, "k", 3.0).interval_us == 333_334
    assert RateLimiter(fake_redis, "k", 100.0).interval_us == 10_000


@pytest.mark.parametrize(
    ("rate", "burst"), [(0.0, 1), (-1.0, 1), (float("inf"), 1), (float("nan"), 1), (10, 0)]
)
def test_invalid_rate_or_burst_is_refused(fake_redis: fakeredis.FakeRedis, rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        RateLimiter(fake_redis, "k", rate, burst)


# --- GCRA maths ---------------------------------------------------------------------------------------
def test_burst_goes_at_once_then_one_token_per_interval(
    fake_redis: fakeredis.FakeRedis, clock: FakeClock
) -> None:
    rl = limiter(fake_redis, rate=10.0, burst=3)
    assert [rl.try_acquire() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert rl.last_granted_at == clock.time()
    assert rl.try_acquire() == pytest.approx(0.1)
    clock.advance(0.04)
    assert rl.try_acquire() == pytest.approx(0.06)
    clock.advance(0.06)
    assert rl.try_acquire() == 0.0
    assert rl.try_acquire() == pytest.approx(0.1)


def test_refused_attempts_take_nothing(fake_redis: fakeredis.FakeRedis, clock: FakeClock) -> None:
    rl = limiter(fake_redis, rate=10.0, burst=1)
    assert rl.try_acquire() == 0.0
    waits = [rl.try_acquire() for _ in range(50)]
    assert waits == [pytest.approx(0.1)] * 50
    clock.advance(0.1)
    assert rl.try_acquire() == 0.0


def test_spare_only_goes_only_when_nobody_is_queueing(
    fake_redis: fakeredis.FakeRedis, clock: FakeClock
) -> None:
    rl = limiter(fake_redis, rate=10.0, burst=3)
    assert rl.try_acquire(spare_only=True) == 0.0  # idle limiter: spare capacity
    assert rl.try_acquire(spare_only=True) == 0.0  # one interval ahead still counts as spare
    assert rl.try_acquire(spare_only=True) == pytest.approx(0.1)  # two ahead: not spare
    assert rl.try_acquire() == 0.0  # ordinary requests still have the rest of the burst
    clock.advance(0.1)
    assert rl.try_acquire(spare_only=True) == pytest.approx(0.1)  # still ahead: others went first
    clock.advance(0.1)
    assert rl.try_acquire(spare_only=True) == 0.0
    # While ordinary requests take every token as it comes, spare-only ones never get through.
    clock.advance(0.5)
    while rl.try_acquire() == 0.0:
        pass
    sends = 0
    for _ in range(20):
        clock.advance(0.1)
        sends += rl.try_acquire() == 0.0
        assert rl.try_acquire(spare_only=True) > 0
    assert sends == 20


@pytest.mark.parametrize("burst", [1, 2, 5])
def test_has_spare_says_what_a_spare_only_request_would_get_and_takes_nothing(
    fake_redis: fakeredis.FakeRedis, clock: FakeClock, burst: int
) -> None:
    rl = limiter(fake_redis, rate=10.0, burst=burst)
    rng = random.Random(burst)
    for _ in range(300):
        step = rng.random()
        if step < 0.4:
            rl.try_acquire()
        elif step < 0.5:
            rl.penalize(rng.choice([0.0, 0.05, 0.3]))
        else:
            clock.advance(rng.choice([0.0, 0.01, 0.05, 0.1, 0.25]))
        spare = rl.has_spare()
        assert rl.has_spare() == spare  # asking took nothing
        assert (rl.try_acquire(spare_only=True) == 0.0) == spare


def test_idle_time_refills_only_up_to_the_burst(fake_redis: fakeredis.FakeRedis, clock: FakeClock) -> None:
    rl = limiter(fake_redis, rate=10.0, burst=3)
    rl.try_acquire()
    clock.advance(60.0)
    granted = 0
    while rl.try_acquire() == 0.0:
        granted += 1
    assert granted == 3


@pytest.mark.parametrize(("rate", "burst"), [(90.0, 5), (90.0, 10), (50.0, 5), (7.0, 2)])
def test_any_one_second_window_holds_at_most_rate_plus_burst(
    fake_redis: fakeredis.FakeRedis, clock: FakeClock, rate: float, burst: int
) -> None:
    """A greedy client polling at random small steps for 5 s; the closed-window bound b + floor(r·W)."""
    rng = random.Random(7)
    rl = limiter(fake_redis, rate=rate, burst=burst)
    grants: list[int] = []
    end = clock.now_us + 5_000_000
    while clock.now_us < end:
        if rl.try_acquire() == 0.0:
            grants.append(clock.now_us)
        else:
            clock.advance(rng.uniform(0.0, 0.004))
    most = max(sum(1 for t in grants if start <= t <= start + 1_000_000) for start in grants)
    assert most <= burst + int(rate)
    assert most >= int(rate)  # the limiter is not needlessly stingy either
    # the long-run rate is the configured one (burst amortised away)
    assert len(grants) == pytest.approx(rate * 5 + burst, abs=2)


def test_default_rate_and_burst_keep_every_second_at_or_under_100(fake_redis: fakeredis.FakeRedis) -> None:
    rl = RateLimiter(fake_redis, "k")
    assert rl.rate_per_second == 90.0
    assert rl.burst + int(rl.rate_per_second) <= 100


def test_instances_with_the_same_key_share_one_budget(
    fake_redis: fakeredis.FakeRedis, clock: FakeClock
) -> None:
    a, b = limiter(fake_redis, burst=2), limiter(fake_redis, burst=2)
    other = limiter(fake_redis, burst=2, key="another-key")
    assert a.try_acquire() == 0.0
    assert b.try_acquire() == 0.0
    assert a.try_acquire() > 0 and b.try_acquire() > 0
    assert other.try_acquire() == 0.0  # a different API key has its own budget


# --- penalize / back-off ------------------------------------------------------------------------------
def test_penalize_holds_off_every_instance_sharing_the_key(
    fake_redis: fakeredis.FakeRedis, clock: FakeClock
) -> None:
    a, b, c = (limiter(fake_redis, rate=10.0, burst=3) for _ in range(3))
    a.penalize(2.0)
    assert b.try_acquire() == pytest.approx(2.0)
    assert c.try_acquire() == pytest.approx(2.0)
    clock.advance(1.999)
    assert b.try_acquire() == pytest.approx(0.001)
    clock.advance(0.001)
    # the hold ends with one request, then the steady rate: no burst straight back into the limit
    assert b.try_acquire() == 0.0
    assert c.try_acquire() == pytest.approx(0.1)


def test_penalize_never_pulls_the_schedule_back(fake_redis: fakeredis.FakeRedis, clock: FakeClock) -> None:
    a, b = limiter(fake_redis), limiter(fake_redis)
    a.penalize(5.0)
    b.penalize(1.0)
    assert a.try_acquire() == pytest.approx(5.0)
    assert b.try_acquire() == pytest.approx(5.0)
    clock.advance(1.0)
    b.penalize(6.0)  # a longer hold does extend it
    assert a.try_acquire() == pytest.approx(6.0)


def test_penalize_zero_or_negative_delay_changes_nothing_in_force(
    fake_redis: fakeredis.FakeRedis, clock: FakeClock
) -> None:
    rl = limiter(fake_redis, rate=10.0, burst=3)
    rl.penalize(-1.0)
    rl.penalize(0.0)
    assert rl.try_acquire() == 0.0


def test_a_hold_counts_down_on_the_redis_clock(fake_redis: fakeredis.FakeRedis, clock: FakeClock) -> None:
    rl = limiter(fake_redis)
    rl.penalize(3.0)
    clock.advance(1.25)
    assert rl.try_acquire() == pytest.approx(1.75)  # nothing taken while the hold lasts
    clock.advance(1.75)
    assert rl.try_acquire() == 0.0


# --- acquire ------------------------------------------------------------------------------------------
def test_acquire_sleeps_the_waits_and_records_time_spent(
    fake_redis: fakeredis.FakeRedis, clock: FakeClock
) -> None:
    rl = limiter(fake_redis, rate=10.0, burst=1)
    assert rl.acquire(timeout=1.0)
    assert rl.last_wait == 0.0
    start = clock.now_us
    assert rl.acquire(timeout=1.0)
    assert clock.now_us - start == 100_000
    assert rl.last_wait == pytest.approx(0.1)
    assert rl.total_wait == pytest.approx(0.1)


def test_acquire_gives_up_when_the_token_is_due_after_the_deadline(
    fake_redis: fakeredis.FakeRedis, clock: FakeClock
) -> None:
    rl = limiter(fake_redis, rate=10.0, burst=1)
    rl.penalize(5.0)
    start = clock.now_us
    assert not rl.acquire(timeout=1.0)
    assert clock.now_us == start  # did not sleep out a timeout that could not succeed
    assert rl.next_wait == pytest.approx(5.0)
    assert not rl.acquire(timeout=0.0)


def test_acquire_with_zero_timeout_is_a_single_attempt(
    fake_redis: fakeredis.FakeRedis, clock: FakeClock
) -> None:
    rl = limiter(fake_redis, rate=10.0, burst=1)
    assert rl.acquire(timeout=0.0)
    assert not rl.acquire(timeout=0.0)
    assert rl.next_wait == pytest.approx(0.1)


def test_acquire_works_on_real_time_too(
    fake_redis: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the real clock, checking only what does not depend on the machine's speed.

    A busy machine may find a token already due and wait less (the former ``total_wait > 0.02``
    failed then), so what is checked is how acquire treats the waits it is handed. Bugs caught: a
    token granted before it is due (grants closer than one interval on the Redis clock), a wait not
    slept as handed (spinning, or sleeping something else), time slept but not recorded.
    """
    import time as real_time
    import types

    rl = RateLimiter(fake_redis, "k", rate_per_second=100.0, burst=1)
    handed: list[float] = []  # the waits Redis handed out
    slept: list[float] = []  # what acquire asked to sleep
    try_acquire = rl.try_acquire

    def recording_try_acquire(*, spare_only: bool = False) -> float:
        handed.append(try_acquire(spare_only=spare_only))
        return handed[-1]

    def recording_sleep(seconds: float) -> None:
        slept.append(seconds)
        real_time.sleep(seconds)

    monkeypatch.setattr(rl, "try_acquire", recording_try_acquire)
    clock = types.SimpleNamespace(monotonic=real_time.monotonic, sleep=recording_sleep)
    monkeypatch.setattr(ratelimit, "time", clock)
    grants: list[float] = []
    waits: list[float] = []
    for _ in range(5):
        assert rl.acquire(timeout=1.0)
        assert rl.last_granted_at is not None
        grants.append(rl.last_granted_at)
        waits.append(rl.last_wait)
    assert all(grants[i + 1] - grants[i] >= 0.01 - 1e-6 for i in range(len(grants) - 1)), grants
    assert slept == [w for w in handed if w > 0]
    assert rl.total_wait == pytest.approx(sum(waits)) and rl.total_wait >= sum(slept) - 1e-6


# --- the poller's token: lease renewal, poll share and the key's schedule in one call ------------------
def held_poller_lock(fake_redis: fakeredis.FakeRedis, rl: RateLimiter) -> Lock:
    """The key's poller lock, acquired, as the poller holds it while it takes tokens."""
    lock = fake_redis.lock(keys.poller_lock(rl.key_hash), timeout=60.0, blocking=False)
    assert lock.acquire()
    return lock


def test_poll_token_answers_as_the_three_calls_it_replaces(
    fake_redis: fakeredis.FakeRedis, clock: FakeClock
) -> None:
    """Two Redis side by side on one clock, the same random traffic: on one the poller renews its lock,
    looks for a share token, takes a key token, then the share token, in separate calls; on the
    other it calls ``poll_token``. Every answer is the same, and so is what senders get in between
    (a share token is taken only when the key's is, so a refusal by the key costs no share)."""
    rate, share = 50.0, 0.2
    old_redis = fakeredis.FakeRedis()
    key_hash = api_key_hash(API_KEY)
    old_main, new_main = (RateLimiter(r, key_hash, rate) for r in (old_redis, fake_redis))
    old_share = RateLimiter(old_redis, f"{key_hash}.polls", rate * share, burst=1)
    old_lock = old_redis.lock(keys.poller_lock(key_hash), timeout=60.0, blocking=False)
    new_lock = fake_redis.lock(keys.poller_lock(key_hash), timeout=60.0, blocking=False)
    assert old_lock.acquire() and new_lock.acquire()
    old_sender, new_sender = (RateLimiter(r, key_hash, rate) for r in (old_redis, fake_redis))
    rng = random.Random(14)
    answers = 0
    for _ in range(2_000):
        step = rng.random()
        if step < 0.45:
            sends_waiting = rng.random() < 0.5
            old_lock.reacquire()
            share_args = [old_share.interval_us, 1, 0, 1]  # look only
            if sends_waiting and (wait := int(old_share._acquire(keys=old_share._keys, args=share_args)[0])):
                old = wait / 1_000_000
            else:
                old = old_main.try_acquire(spare_only=not sends_waiting)
                if old == 0.0 and sends_waiting:
                    assert old_share.try_acquire() == 0.0
            new = new_main.poll_token(new_lock, rate * share if sends_waiting else None)
            assert new == old
            answers += new == 0.0
        elif step < 0.7:
            assert new_sender.try_acquire() == old_sender.try_acquire()
        elif step < 0.73:
            delay = rng.choice([0.0, 0.05, 0.3])
            old_sender.penalize(delay)
            new_sender.penalize(delay)
        else:
            clock.advance(rng.choice([0.0, 0.001, 0.01, 0.02, 0.1, 0.5]))
    assert answers > 100  # tokens were granted, not only refused


def test_poll_token_renews_the_pollers_lock(fake_redis: fakeredis.FakeRedis, clock: FakeClock) -> None:
    rl = limiter(fake_redis)
    lock = held_poller_lock(fake_redis, rl)
    fake_redis.pexpire(keys.poller_lock(rl.key_hash), 1_000)  # about to expire
    assert rl.poll_token(lock, None) == 0.0
    assert fake_redis.pttl(keys.poller_lock(rl.key_hash)) > 59_000


def test_poll_token_takes_nothing_once_another_poller_holds_the_lock(
    fake_redis: fakeredis.FakeRedis, clock: FakeClock
) -> None:
    from redis.exceptions import LockNotOwnedError

    rl = limiter(fake_redis)
    lock = held_poller_lock(fake_redis, rl)
    fake_redis.set(keys.poller_lock(rl.key_hash), "the new poller")
    for share in (None, 2.0):
        with pytest.raises(LockNotOwnedError):
            rl.poll_token(lock, share)
    assert fake_redis.get(keys.poller_lock(rl.key_hash)) == b"the new poller"
    assert not fake_redis.exists(keys.ratelimit(rl.key_hash), keys.poll_share(rl.key_hash))


def test_poll_token_keeps_to_the_share_while_sends_wait(
    fake_redis: fakeredis.FakeRedis, clock: FakeClock
) -> None:
    rl = limiter(fake_redis, rate=100.0, burst=5)
    lock = held_poller_lock(fake_redis, rl)
    assert rl.poll_token(lock, 10.0) == 0.0
    assert rl.poll_token(lock, 10.0) == pytest.approx(0.1)  # the share's burst is one
    assert rl.try_acquire() == 0.0  # sends keep the key's burst
    clock.advance(0.1)
    assert rl.poll_token(lock, 10.0) == 0.0


def test_poll_token_refused_by_the_key_costs_no_share_token(
    fake_redis: fakeredis.FakeRedis, clock: FakeClock
) -> None:
    rl = limiter(fake_redis, rate=100.0, burst=2)
    lock = held_poller_lock(fake_redis, rl)
    assert rl.try_acquire() == 0.0 and rl.try_acquire() == 0.0  # sends took the key's burst
    assert rl.poll_token(lock, 10.0, share_burst=2) == pytest.approx(0.01)  # the key refuses
    clock.advance(0.01)
    # The share's burst of two is still whole: two checks go as the key's tokens come.
    assert rl.poll_token(lock, 10.0, share_burst=2) == 0.0
    clock.advance(0.01)
    assert rl.poll_token(lock, 10.0, share_burst=2) == 0.0
    clock.advance(0.01)
    assert rl.poll_token(lock, 10.0, share_burst=2) == pytest.approx(0.08)  # the share is spent


def test_the_pollers_keys_share_one_slot_for_redis_cluster() -> None:
    from redis.crc import key_slot

    h = api_key_hash(API_KEY)
    names = [keys.ratelimit(h), keys.ratelimit_backoff(h), keys.poller_lock(h), keys.poll_share(h)]
    assert len({key_slot(n.encode()) for n in names}) == 1


def test_poll_token_books_the_keys_next_token_while_sends_queue(
    fake_redis: fakeredis.FakeRedis, clock: FakeClock
) -> None:
    rl = limiter(fake_redis, rate=100.0, burst=2)
    lock = held_poller_lock(fake_redis, rl)
    start = clock.time()
    assert rl.try_acquire() == 0.0 and rl.try_acquire() == 0.0  # sends took the key's burst
    # The key's next token is due in one interval: booked, slept for, and the check's alone.
    assert rl.poll_token(lock, 10.0, share_burst=2, book_within=0.05) == 0.0
    assert clock.time() == pytest.approx(start + 0.01) and rl.last_granted_at == pytest.approx(start + 0.01)
    assert rl.try_acquire() == pytest.approx(0.01)  # a sender asking when it is due waits for the next


def test_poll_token_books_nothing_beyond_its_horizon_or_through_a_429_hold(
    fake_redis: fakeredis.FakeRedis, clock: FakeClock
) -> None:
    rl = limiter(fake_redis, rate=100.0, burst=2)
    lock = held_poller_lock(fake_redis, rl)
    assert rl.try_acquire() == 0.0 and rl.try_acquire() == 0.0
    start = clock.time()
    # The key's next token is 10 ms away: beyond a 5 ms horizon, so refused, nothing booked or slept.
    assert rl.poll_token(lock, 10.0, share_burst=2, book_within=0.005) == pytest.approx(0.01)
    assert clock.time() == start
    # A 30 ms hold after a 429: within a 50 ms horizon, yet refused (the hold is not booked through).
    rl.penalize(0.03)
    assert rl.poll_token(lock, 10.0, share_burst=2, book_within=0.05) == pytest.approx(0.03)
    assert clock.time() == start
    # Neither refusal took a share token: 30 ms later (a share token takes 100 ms to come due) the
    # share's whole burst of two is there.
    clock.advance(0.03)
    assert rl.poll_token(lock, 10.0, share_burst=2, book_within=0.05) == 0.0
    assert rl.poll_token(lock, 10.0, share_burst=2, book_within=0.05) == 0.0
    assert rl.poll_token(lock, 10.0, share_burst=2, book_within=0.05) > 0.05


def _max_in_window(times: list[float], window: float) -> int:
    """The most of ``times`` in any closed window of ``window`` seconds."""
    import bisect

    ordered = sorted(times)
    return max(
        (bisect.bisect_right(ordered, t + window + 1e-9) - i for i, t in enumerate(ordered)), default=0
    )


def test_checks_get_their_share_from_senders_that_re_ask_the_moment_each_token_is_due(
    fake_redis: fakeredis.FakeRedis, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four senders that ask again exactly when each wait ends, as flush tasks do, and a poller that
    asks at its own pace (event simulation on one clock). Before bookings the poller took a key token
    only if it asked first at the moment one came due, and got almost none; the share is a real
    share now, and the key's limit holds on the times requests are sent."""
    import heapq
    import types

    rate, burst, share_rate, share_burst, seconds = 90.0, 5, 9.0, 4, 20.0
    monkeypatch.setattr(ratelimit, "time", types.SimpleNamespace(sleep=lambda s: None))  # use times are kept
    senders = [limiter(fake_redis, rate=rate, burst=burst) for _ in range(4)]
    poller_rl = limiter(fake_redis, rate=rate, burst=burst)
    lock = held_poller_lock(fake_redis, poller_rl)
    end = clock.now_us + int(seconds * 1e6)
    events: list[tuple[int, int, int]] = [(clock.now_us + 3_000 * i, i, i) for i in range(5)]
    sends: list[float] = []
    checks: list[float] = []
    seq = 5
    while events:
        at, _, who = heapq.heappop(events)
        if at >= end:
            continue
        clock.now_us = at
        if who < 4:
            wait = senders[who].try_acquire()
            if wait == 0.0:
                sends.append(clock.time())
                wait = 0.004  # the POST, then the sender asks for its next token
        else:
            wait = poller_rl.poll_token(lock, share_rate, share_burst=share_burst, book_within=0.05)
            if wait == 0.0:
                assert poller_rl.last_granted_at is not None
                checks.append(poller_rl.last_granted_at)
                wait = poller_rl.last_granted_at - clock.time() + 0.003  # the GET
            else:
                wait = max(wait, share_burst / share_rate)  # handed over, as the poller does
        seq += 1
        heapq.heappush(events, (clock.now_us + max(1, round(wait * 1e6)), seq, who))

    assert len(checks) >= 0.8 * share_rate * seconds, (len(checks), len(sends))
    assert len(checks) <= share_burst + share_rate * seconds
    assert len(sends) >= 0.9 * (rate - share_rate) * seconds
    for window in (0.05, 0.25, 1.0):
        assert _max_in_window(sends + checks, window) <= burst + int(window * rate), window
