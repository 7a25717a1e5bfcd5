"""One request budget per Attentive API key, shared by every worker process and pod.

Attentive allows 100 requests/s per key on the bulk and job-status endpoints (CONTRACT.md §4) and
answers 429 above that. Celery's own ``rate_limit`` is per worker, so it cannot keep the promise "all
pods together stay under the limit" (DESIGN.md invariant 4). Instead every request — bulk POSTs and
job-status polls alike — first takes a token from a GCRA schedule kept in Redis:

* The schedule is one integer per API key (the *theoretical arrival time*, TAT) updated by a Lua
  script (``lua/ratelimit_acquire.lua``) that reads Redis ``TIME``, so workers' clocks never matter and
  the check-and-take is atomic across all workers. Workers keep no state (invariant 7).
* The key is named after :func:`api_key_hash`, never the API key itself (invariant 5).
* After a 429, :meth:`RateLimiter.penalize` pushes the shared schedule forward, so every worker holds
  off, not just the one that saw it.

Burst and the one-second window
-------------------------------
With rate ``r`` (emission interval ``T = 1/r``) and burst ``b``, GCRA allows a request at time ``t``
iff ``t >= TAT - (b - 1)·T``. For such a schedule the number of grants in any closed window of length
``W`` is at most ``b + floor(W·r)`` (the classic GCRA(T, τ) bound ``1 + floor((W + τ)/T)`` with
``τ = (b - 1)·T``): ``b`` at the window's start, then one per ``T``. For the sandbox's "highest
requests in any one-second window" that is ``b + 90`` at the default 90/s, so ``b <= 10`` keeps every
sliding second ≤ 100. We use ``b = 5``: the 5 requests of slack (≈55 ms at 90/s) absorb the jitter
between the moment Redis grants a token and the moment the request reaches Attentive (a request
granted early but delayed in the network can land in the same server-side second as later ones).
``T`` is rounded *up* to whole microseconds, so the effective rate never exceeds the configured one.

A status check may *book* the key's next token (:meth:`RateLimiter.poll_token`): the schedule moves
on as for any grant, and the check goes when its token comes due. The bound above holds on the
times requests go out, since a booked request goes at its allow time as a granted one goes at or
after it (``test_checks_get_their_share_from_senders_that_re_ask_the_moment_each_token_is_due``).

Example::

    limiter = RateLimiter(redis, api_key_hash(api_key))
    if limiter.acquire(timeout=5.0):
        response = client.post_bulk(...)
    else:
        ...  # reschedule the task; limiter.next_wait says roughly when a token is due
"""

from __future__ import annotations

import hashlib
import math
import time

import redis
from redis.exceptions import LockError, LockNotOwnedError
from redis.lock import Lock

from worker.settings import DEFAULT_RATE_LIMIT_PER_SECOND
from worker.store import keys, scripts

#: Requests that may go at once after an idle spell. ``rate + burst`` must stay ≤ 100 (see module doc).
DEFAULT_BURST = 5
#: A 429 streak older than this (no 429 since) is forgotten, as if a request had succeeded.
STREAK_TTL_MS = 60_000
#: Hex characters of sha256 kept in key names: 64 bits, plenty to tell a deployment's few keys apart.
KEY_HASH_LENGTH = 16

_US = 1_000_000


def _interval_us(rate_per_second: float) -> int:
    """Emission interval in whole microseconds, rounded up so the rate is never exceeded."""
    return max(1, math.ceil(_US / rate_per_second))


def api_key_hash(api_key: str) -> str:
    """Stable, non-reversible name for an API key, used in Redis key names and status.

    Args:
        api_key: the Attentive API key (a high-entropy token, so an unsalted hash reveals nothing).

    Returns:
        The first :data:`KEY_HASH_LENGTH` hex characters of its sha256.
    """
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()[:KEY_HASH_LENGTH]


class RateLimiter:
    """GCRA token schedule in Redis for one API key; every instance with the same ``key_hash`` shares it.

    Cheap to build (no Redis round trip), so a task may build one per run. Instances also record the
    time they spent waiting, for job status: :attr:`last_wait` (the latest :meth:`acquire`) and
    :attr:`total_wait` (since construction), in seconds.
    """

    def __init__(
        self,
        redis: redis.Redis,
        key_hash: str,
        rate_per_second: float = DEFAULT_RATE_LIMIT_PER_SECOND,
        burst: int = DEFAULT_BURST,
    ) -> None:
        if not rate_per_second > 0 or math.isinf(rate_per_second):
            raise ValueError(f"rate_per_second must be a positive number, got {rate_per_second!r}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, got {burst!r}")
        self.key_hash = key_hash
        self.rate_per_second = rate_per_second
        self.burst = burst
        #: Emission interval in whole microseconds, rounded up so the rate is never exceeded.
        self.interval_us = _interval_us(rate_per_second)
        self._keys = [keys.ratelimit(key_hash), keys.ratelimit_backoff(key_hash)]
        self._streak_key = keys.ratelimit_streak(key_hash)
        self._redis = redis
        self._acquire = scripts.script(redis, "ratelimit_acquire")
        self._penalize = scripts.script(redis, "ratelimit_penalize")
        #: Redis-clock epoch seconds of the latest token this instance took (None before the first).
        self.last_granted_at: float | None = None
        #: Seconds the latest :meth:`acquire` spent sleeping for the limit (granted or not).
        self.last_wait = 0.0
        #: Seconds all :meth:`acquire` calls on this instance spent sleeping for the limit.
        self.total_wait = 0.0
        #: After a refused :meth:`acquire`: seconds until a token was due (a countdown hint), else 0.
        self.next_wait = 0.0

    def __repr__(self) -> str:
        return f"RateLimiter(key_hash={self.key_hash!r}, rate={self.rate_per_second}/s, burst={self.burst})"

    def try_acquire(self, *, spare_only: bool = False) -> float:
        """Take a token if one is due now.

        Args:
            spare_only: take it only from spare capacity: when the schedule runs at most one
                interval ahead of the clock (a request or so just went), so never while requests
                queue for tokens (they keep it a whole burst ahead). Low-priority requests use this
                to yield to the rest.

        Returns:
            0.0 if a token was taken; otherwise the seconds to wait before trying again (nothing taken).
        """
        reserve = max(0, self.burst - 2) if spare_only else 0
        wait_us, now_us, _ = self._acquire(keys=self._keys, args=[self.interval_us, self.burst, reserve])
        if int(wait_us) == 0:
            self.last_granted_at = int(now_us) / _US
            return 0.0
        return int(wait_us) / _US

    def poll_token(
        self,
        lease: Lock,
        share_per_second: float | None,
        share_burst: int = 1,
        book_within: float = 0.0,
    ) -> float:
        """A status check's token, for the key's poller, in one script call instead of three.

        Renews the poller's ``lease`` first (as ``Lock.reacquire`` does). With ``share_per_second``
        (sends are waiting) it then takes a token of the poll share's schedule (:func:`keys.poll_share`,
        burst ``share_burst``), and books this key's next token if it is due within ``book_within``
        seconds, then sleeps until it is due; without, it takes one of this key's schedule from spare
        capacity only (``try_acquire(spare_only=True)``).

        Why book: waiting senders re-ask for each token as it comes due and the first to ask wins, so
        a check that asked only when a token was due lost nearly every race while sends queued (9
        checks in 22 s against a share of 9 a second). A booked token is the check's alone.

        Returns:
            0.0 if a token was taken (from both schedules); otherwise the seconds to wait before
            trying again (nothing was taken from either).

        Raises:
            LockNotOwnedError: another poller took the lease over; nothing was taken.
        """
        if lease.local.token is None or lease.timeout is None:
            raise LockError("Cannot renew a lease that is not held with a timeout", lock_name=lease.name)
        lease_keys = [*self._keys, lease.name]
        args: list[bytes | str | int] = [
            self.interval_us,
            self.burst,
            0,
            0,
            lease.local.token,
            int(lease.timeout * 1000),
        ]
        if share_per_second is None:
            args[2] = max(0, self.burst - 2)  # spare capacity only, as try_acquire(spare_only=True)
        else:
            lease_keys.append(keys.poll_share(self.key_hash))
            args += [_interval_us(share_per_second), share_burst, max(0, math.ceil(book_within * _US))]
        wait_us, now_us, delay_us = self._acquire(keys=lease_keys, args=args)
        if int(wait_us) < 0:
            raise LockNotOwnedError("Cannot renew a lease that is no longer owned", lock_name=lease.name)
        if int(wait_us) > 0:
            return int(wait_us) / _US
        self.last_granted_at = (int(now_us) + int(delay_us)) / _US
        if int(delay_us) > 0:
            time.sleep(int(delay_us) / _US)  # the booked token's time (at most book_within)
        return 0.0

    def has_spare(self) -> bool:
        """Whether a ``spare_only`` request would get a token now; takes nothing.

        Asked of the script itself (in look-only mode), so the answer uses the same rule and the same
        clock as a grant: the Redis ``TIME`` of the node holding the schedule, whichever node of a
        Redis Cluster this client would otherwise ask.
        """
        reserve = max(0, self.burst - 2)
        wait_us, _now_us, _ = self._acquire(keys=self._keys, args=[self.interval_us, self.burst, reserve, 1])
        return int(wait_us) == 0

    def acquire(self, timeout: float, *, spare_only: bool = False) -> bool:
        """Block, sleeping the waits Redis hands out, until a token is taken or ``timeout`` seconds pass.

        Gives up early (returns False without sleeping out the rest) once the next token is due after the
        deadline; :attr:`next_wait` then says when it is due. ``timeout=0`` makes a single attempt.
        ``spare_only`` as in :meth:`try_acquire`.

        Returns:
            True if a token was taken.
        """
        deadline = time.monotonic() + max(0.0, timeout)
        slept = 0.0
        self.next_wait = 0.0
        granted = False
        # Each pass either ends the loop or sleeps a positive wait, so the loop ends by the deadline.
        while True:
            wait = self.try_acquire(spare_only=spare_only)
            if wait == 0.0:
                granted = True
                break
            if wait > deadline - time.monotonic():
                self.next_wait = wait
                break
            before = time.monotonic()
            time.sleep(wait)
            slept += time.monotonic() - before
        self.last_wait = slept
        self.total_wait += slept
        return granted

    def note_429(self) -> int:
        """Count a 429 for this key (every worker's count together); returns the 429s in a row.

        The count expires after :data:`STREAK_TTL_MS` without a new 429, and :meth:`note_success`
        resets it, so an isolated 429 among successes stays a streak of 1.
        """
        pipe = self._redis.pipeline(transaction=True)
        pipe.incr(self._streak_key)
        pipe.pexpire(self._streak_key, STREAK_TTL_MS)
        streak, _ = pipe.execute()
        return int(streak)

    def note_success(self, pipe: redis.client.Pipeline | None = None) -> None:
        """A request with this key succeeded: the 429 streak starts again from zero.

        Args:
            pipe: a non-transactional pipeline to add the write to (the caller executes it), so it
                shares a round trip with the caller's own writes.
        """
        (pipe if pipe is not None else self._redis).delete(self._streak_key)

    def penalize(self, delay: float) -> None:
        """Hold off every worker sharing this key for ``delay`` seconds (after a 429).

        Never shortens a hold already further out. The first request after the hold is allowed when it
        ends and the rest follow at the steady rate (no burst into a limit that just answered 429).
        """
        delay_us = max(0, math.ceil(delay * _US))
        self._penalize(keys=self._keys, args=[delay_us, self.interval_us, self.burst])
