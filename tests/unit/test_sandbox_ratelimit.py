"""The sandbox's token buckets (100 requests/s per token and endpoint, CONTRACT §4) on a clock the
test controls, so the counts are exact; tests/integration/test_sandbox_http.py checks the same
limiter over real HTTP with bounds that hold however busy the machine is.
"""

from __future__ import annotations

import types
from collections import Counter

import pytest

from sandbox import ratelimit
from sandbox.ratelimit import RateLimiter

LIMIT = 100
STEP = 1 / 256  # seconds between offered requests: exact in binary, so the token sums are exact


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """Stands in for ``time`` inside sandbox.ratelimit; tests move ``clock.now`` (seconds)."""
    fake = types.SimpleNamespace(now=0.0)
    fake.monotonic = lambda: fake.now
    monkeypatch.setattr(ratelimit, "time", fake)
    return fake


def test_a_full_bucket_then_100_a_second_while_offered_more(clock: types.SimpleNamespace) -> None:
    """Offered 150 at once, then 256 a second for 3 s: 100 at once, then exactly 100 in each second.

    Bugs caught: a wrong burst, a wrong refill rate (90 or 110 a second), refused requests that
    still take a token.
    """
    limiter = RateLimiter()
    granted_at: list[float] = []
    answers = [limiter.take("test-key", "job", LIMIT) for _ in range(150)]
    assert answers == [(True, LIMIT - 1 - i) for i in range(100)] + [(False, 0)] * 50
    granted_at += [0.0] * 100
    for j in range(1, 3 * 256):
        clock.now = j * STEP
        allowed, remaining = limiter.take("test-key", "job", LIMIT)
        assert remaining == 0  # the bucket never refills while more is offered than it allows
        if allowed:
            granted_at.append(clock.now)
    per_second = Counter(int(t) for t in granted_at)
    assert per_second == {0: 100 + 99, 1: 100, 2: 100}


def test_an_idle_bucket_refills_only_up_to_the_limit(clock: types.SimpleNamespace) -> None:
    limiter = RateLimiter()
    assert all(limiter.take("test-key", "job", LIMIT)[0] for _ in range(LIMIT))
    clock.now = 60.0
    answers = [limiter.take("test-key", "job", LIMIT)[0] for _ in range(LIMIT + 1)]
    assert answers == [True] * LIMIT + [False]


def test_buckets_are_per_token_and_endpoint_and_a_limit_of_0_is_off(clock: types.SimpleNamespace) -> None:
    limiter = RateLimiter()
    assert all(limiter.take("test-key", "job", LIMIT)[0] for _ in range(LIMIT))
    assert limiter.take("test-key", "job", LIMIT) == (False, 0)
    assert limiter.take("test-key", "bulk", LIMIT) == (True, LIMIT - 1)
    assert limiter.take("other-key", "job", LIMIT) == (True, LIMIT - 1)
    assert all(limiter.take("test-key", "job", 0) == (True, 0) for _ in range(1000))
