"""The shared rate limiter across real OS processes on a real Redis (DESIGN.md invariant 4).

Grant times are the Redis ``TIME`` at which each token was taken (``RateLimiter.last_granted_at``), so
the window bound is checked on the limiter's own clock, free of process scheduling noise.
"""

from __future__ import annotations

import multiprocessing
import time
from multiprocessing.synchronize import Barrier

import pytest
import redis

from tests.conftest import TEST_REDIS_URL
from worker.store.ratelimit import RateLimiter, api_key_hash

pytestmark = pytest.mark.integration

PROCESSES = 4
RUN_SECONDS = 3.0
KEY_HASH = api_key_hash("integration-test-key")


def _hammer(
    url: str, rate: float, burst: int, seconds: float, barrier: Barrier, out: multiprocessing.Queue[object]
) -> None:
    """Child process: take tokens as fast as the shared limiter allows, report grant times."""
    client = redis.Redis.from_url(url)
    limiter = RateLimiter(client, KEY_HASH, rate_per_second=rate, burst=burst)
    barrier.wait(timeout=30)
    grants: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if limiter.acquire(timeout=min(0.25, max(0.0, deadline - time.monotonic()))):
            assert limiter.last_granted_at is not None
            grants.append(limiter.last_granted_at)
    out.put(grants)
    client.close()


def _run_hammers(
    rate: float, burst: int, during: object = None
) -> tuple[list[list[float]], tuple[float, float] | None]:
    """Run PROCESSES hammers together; optionally call ``during()`` from this process mid-run.

    Returns each process's grant times and, if ``during`` ran, the Redis-time bounds around the call.
    """
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES + 1)
    out: multiprocessing.Queue[object] = ctx.Queue()
    procs = [
        ctx.Process(target=_hammer, args=(TEST_REDIS_URL, rate, burst, RUN_SECONDS, barrier, out))
        for _ in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    bounds = None
    try:
        barrier.wait(timeout=60)
        if callable(during):
            time.sleep(RUN_SECONDS / 3)
            client = redis.Redis.from_url(TEST_REDIS_URL)
            before = _redis_now(client)
            during(client)
            bounds = (before, _redis_now(client))
            client.close()
        results = [out.get(timeout=RUN_SECONDS + 30) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs)
    return [list(r) for r in results if isinstance(r, list)], bounds


def _redis_now(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return seconds + micros / 1_000_000


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
    per_process, _ = _run_hammers(rate, burst)
    assert len(per_process) == PROCESSES
    assert all(per_process), "every process got tokens"
    grants = sorted(t for g in per_process for t in g)

    assert _max_in_any_window(grants) <= rate + burst
    span = grants[-1] - grants[0]
    assert span > RUN_SECONDS * 0.8
    # steady rate after the initial burst, measured over the whole run
    overall = (len(grants) - burst) / span
    assert overall == pytest.approx(rate, rel=0.10)


def test_penalize_from_one_process_stops_grants_in_all_processes(real_redis: redis.Redis) -> None:
    rate, burst, delay = 50.0, 5, 1.0

    def penalize(client: redis.Redis) -> None:
        RateLimiter(client, KEY_HASH, rate_per_second=rate, burst=burst).penalize(delay)

    per_process, bounds = _run_hammers(rate, burst, during=penalize)
    assert bounds is not None
    before, after = bounds
    grants = sorted(t for g in per_process for t in g)
    # Redis ran the penalize somewhere in [before, after]: nothing may be granted from then until the
    # hold ends, in any process.
    assert not [t for t in grants if after <= t < before + delay]
    assert [t for t in grants if t < before], "grants before the penalty"
    resumed = [t for t in grants if t >= before + delay]
    assert resumed, "grants resume after the hold"
    # after the hold: one request, then the steady rate — no burst back into the limit
    assert _max_in_any_window(resumed, width=0.1) <= int(rate * 0.1) + 1
    assert sum(1 for g in per_process if any(t < before for t in g)) == PROCESSES
