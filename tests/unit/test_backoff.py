"""The one back-off rule (``worker.backoff``): exponential from a first delay, capped, jittered, and a
server's Retry-After first."""

from __future__ import annotations

import random

from worker.backoff import backoff


def test_full_jitter_spreads_over_the_whole_exponential_bound() -> None:
    random.seed(1)
    for attempt in range(12):
        bound = min(30.0, 0.5 * 2**attempt)
        samples = [backoff(attempt, first=0.5, cap=30.0) for _ in range(200)]
        assert all(0.0 <= s <= bound for s in samples)
        assert max(samples) > bound * 0.8  # spread over the whole range, not a fixed value
        assert min(samples) < bound * 0.2


def test_a_narrow_jitter_stays_around_the_capped_delay() -> None:
    random.seed(2)
    for attempt, delay in ((0, 2.0), (3, 16.0), (40, 60.0)):
        samples = [backoff(attempt, first=2.0, cap=60.0, jitter=(0.8, 1.2)) for _ in range(200)]
        assert all(delay * 0.8 <= s <= delay * 1.2 for s in samples)
        assert max(samples) > delay * 1.1 and min(samples) < delay * 0.9


def test_capped_and_survives_huge_or_negative_attempts() -> None:
    assert all(0.0 <= backoff(10_000, first=0.5, cap=7.0) <= 7.0 for _ in range(100))
    assert all(0.0 <= backoff(-3, first=0.5, cap=30.0) <= 0.5 for _ in range(100))


def test_retry_after_wins_over_the_jitter_and_the_cap() -> None:
    assert backoff(0, first=0.5, cap=30.0, retry_after=12.5) == 12.5
    assert backoff(9, first=0.5, cap=30.0, retry_after=0.0) == 0.0
    assert backoff(2, first=0.5, cap=30.0, retry_after=-4.0) == 0.0
    assert backoff(0, first=0.5, cap=30.0, retry_after=120.0) == 120.0  # the server knows best
