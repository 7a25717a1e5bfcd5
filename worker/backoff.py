"""How long to wait before trying again: one rule for every back-off outside a tenacity loop.

The delay grows exponentially from a first delay, is capped, and is spread by a random factor (the
jitter) so that workers that failed together do not come back together (Attentive asks for
"randomness" in back-off, CONTRACT.md §4). A server's Retry-After hint, when there is one, is the
wait instead.

A leaf module: the standard library only, so every layer may use it. (The HTTP clients' in-process
retries are tenacity loops and use tenacity's own wait strategies.)
"""

from __future__ import annotations

import random

#: "Full jitter": anywhere between no wait and the whole exponential delay.
FULL_JITTER = (0.0, 1.0)


def backoff(
    attempt: int,
    *,
    first: float,
    cap: float,
    jitter: tuple[float, float] = FULL_JITTER,
    retry_after: float | None = None,
) -> float:
    """Seconds to wait before retry number ``attempt`` (0-based).

    ``min(cap, first * 2**attempt)`` times a factor drawn uniformly from ``jitter``: ``(0, 1)``
    (the default) is full jitter, ``(0.8, 1.2)`` is ±20 % around the delay.

    Args:
        attempt: retries so far; negative counts as 0, huge values as the cap.
        first: the delay before the first retry, before jitter.
        cap: the longest delay, before jitter.
        jitter: the range of the random factor.
        retry_after: the server's hint in seconds (e.g. a parsed ``Retry-After`` header). When given
            it is the wait, as is: neither capped nor jittered, and never negative.
    """
    if retry_after is not None:
        return max(0.0, retry_after)
    exponent = min(max(attempt, 0), 60)  # 2**60 is past any cap and far from a float overflow
    low, high = jitter
    return min(cap, first * 2.0**exponent) * random.uniform(low, high)  # jitter, not cryptography
