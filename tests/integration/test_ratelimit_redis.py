"""The shared rate limiter across real OS processes on a real Redis (DESIGN.md invariant 4).

Grant times are the Redis ``TIME`` at which each token was taken (``RateLimiter.last_granted_at``), so
the bounds are checked on the limiter's own clock, free of process scheduling noise.

Only what GCRA guarantees whatever the machine's speed is asserted: upper bounds (never more grants
than the schedule allows, in any window or over the whole run) and the absence of grants during a
hold. How fast the processes manage to take tokens is not: the hammers take a fixed number of tokens
(counted, not timed), and the parent waits for events (every process holding a token, tokens after
the hold) instead of sleeping, so a busy machine only makes these tests slower. That the limiter is
not needlessly stingy (the lower bound on the rate) is checked on a controlled clock, in
tests/unit/test_ratelimit.py::test_any_one_second_window_holds_at_most_rate_plus_burst.
"""

from __future__ import annotations

import math
import multiprocessing
import time
from collections.abc import Callable
from multiprocessing.sharedctypes import SynchronizedArray
from multiprocessing.synchronize import Barrier, Event

import pytest
import redis

from tests.conftest import TEST_REDIS_URL
from worker.store.ratelimit import RateLimiter, api_key_hash

pytestmark = pytest.mark.integration

PROCESSES = 4
#: Tokens the processes take together: about this many seconds of the tested rate.
RUN_SECONDS = 2.5
#: Generous deadline for anything the parent waits for (a busy machine is slow, not stuck).
WAIT_SECONDS = 60.0
KEY_HASH = api_key_hash("integration-test-key")


def _hammer(
    url: str,
    rate: float,
    burst: int,
    tokens: int,
    barrier: Barrier,
    stop: Event,
    taken: SynchronizedArray[int],
    index: int,
    out: multiprocessing.Queue[object],
) -> None:
    """Child process: take ``tokens`` tokens (or until ``stop``) as fast as the shared limiter allows.

    Publishes how many it holds in ``taken[index]`` and reports its grant times at the end.
    """
    client = redis.Redis.from_url(url)
    limiter = RateLimiter(client, KEY_HASH, rate_per_second=rate, burst=burst)
    barrier.wait(timeout=WAIT_SECONDS)
    grants: list[float] = []
    while len(grants) < tokens and not stop.is_set():
        # A long timeout: the wait for a token (or out of a hold) is slept, not spun on.
        if limiter.acquire(timeout=2.0):
            assert limiter.last_granted_at is not None
            grants.append(limiter.last_granted_at)
            taken[index] = len(grants)
    out.put(grants)
    client.close()


def _run_hammers(
    rate: float,
    burst: int,
    tokens: int,
    during: Callable[[redis.Redis, SynchronizedArray[int]], object] | None = None,
) -> tuple[list[list[float]], object]:
    """Run PROCESSES hammers together, each taking up to ``tokens`` tokens.

    ``during(client, taken)``, if given, runs in this process once all hammers have started; the
    hammers stop when it returns. Returns each process's grant times and what ``during`` returned.
    """
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES + 1)
    stop = ctx.Event()
    taken = ctx.Array("i", PROCESSES)
    out: multiprocessing.Queue[object] = ctx.Queue()
    procs = [
        ctx.Process(target=_hammer, args=(TEST_REDIS_URL, rate, burst, tokens, barrier, stop, taken, i, out))
        for i in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    result = None
    try:
        barrier.wait(timeout=WAIT_SECONDS)
        if during is not None:
            client = redis.Redis.from_url(TEST_REDIS_URL)
            try:
                result = during(client, taken)
            finally:
                stop.set()
                client.close()
        results = [out.get(timeout=WAIT_SECONDS + tokens / rate * PROCESSES) for _ in procs]
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs)
    return [list(r) for r in results if isinstance(r, list)], result


def _redis_now(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return seconds + micros / 1_000_000


def _wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def _max_in_any_window(times: list[float], width: float = 1.0) -> int:
    times = sorted(times)
    most, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] < t - width:
            lo += 1
        most = max(most, hi - lo + 1)
    return most


@pytest.mark.parametrize(("rate", "burst"), [(50.0, 5), (90.0, 5)])
def test_processes_together_stay_within_the_rate_in_every_second(
    real_redis: redis.Redis, rate: float, burst: int
) -> None:
    """Bug caught: a limit kept per process (or not atomic across them): four processes would take
    about four times the rate, breaking both bounds below."""
    tokens = math.ceil((rate * RUN_SECONDS + burst) / PROCESSES)
    per_process, _ = _run_hammers(rate, burst, tokens)
    assert [len(g) for g in per_process] == [tokens] * PROCESSES, "every process got its tokens"
    grants = sorted(t for g in per_process for t in g)

    # Any closed one-second window holds at most b + floor(r) grants (ratelimit.py's docstring).
    assert _max_in_any_window(grants) <= rate + burst
    # Over the whole run, on the Redis clock in whole microseconds: GCRA grants n tokens no faster
    # than the burst plus one per emission interval, so (n - b) * T <= span. A slow machine only
    # makes the span longer.
    interval_us = RateLimiter(real_redis, KEY_HASH, rate_per_second=rate, burst=burst).interval_us
    span_us = round(grants[-1] * 1_000_000) - round(grants[0] * 1_000_000)
    assert (len(grants) - burst) * interval_us <= span_us


def test_penalize_from_one_process_stops_grants_in_all_processes(real_redis: redis.Redis) -> None:
    """Bugs caught: a hold that only the penalizing process respects (grants during it), and a hold
    that ends with a burst straight back into the limit (grants after it faster than the rate)."""
    rate, burst, delay = 50.0, 5, 1.0
    limiter = RateLimiter(real_redis, KEY_HASH, rate_per_second=rate, burst=burst)
    resumed_to_see = 20  # tokens to wait for after the hold: enough to see how grants resume

    def penalize_mid_run(client: redis.Redis, taken: SynchronizedArray[int]) -> tuple[float, float]:
        # Every process holds a token before the penalty (an event, not a sleep): all are competing.
        _wait_until(lambda: all(n >= 1 for n in taken[:]), "every process to take a token")
        before = _redis_now(client)
        RateLimiter(client, KEY_HASH, rate_per_second=rate, burst=burst).penalize(delay)
        after = _redis_now(client)
        _wait_until(lambda: _redis_now(client) >= before + delay, "the hold to end")
        so_far = sum(taken[:])
        _wait_until(lambda: sum(taken[:]) >= so_far + resumed_to_see, "grants after the hold")
        return before, after

    per_process, bounds = _run_hammers(rate, burst, tokens=10_000, during=penalize_mid_run)
    assert isinstance(bounds, tuple)
    before, after = bounds
    grants = sorted(t for g in per_process for t in g)
    # Redis ran the penalize somewhere in [before, after]: nothing may be granted from then until the
    # hold ends, in any process.
    assert not [t for t in grants if after <= t < before + delay]
    assert sum(1 for g in per_process if any(t < before for t in g)) == PROCESSES
    resumed = [t for t in grants if t >= before + delay]
    assert len(resumed) >= resumed_to_see, "grants resume after the hold"
    # After the hold: one request, then the steady rate, however late the processes come back. The
    # penalty pushes the schedule to hold_end + (b - 1) * T, so the i-th grant after the hold is no
    # earlier than hold_end + i * T, and hold_end >= before + delay.
    interval = limiter.interval_us / 1_000_000
    early = [(i, t) for i, t in enumerate(resumed) if t < before + delay + i * interval - 1e-6]
    assert not early, f"grants after the hold came faster than the rate: {early[:5]}"
