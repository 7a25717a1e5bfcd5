"""The poller: one per Attentive API key at a time, checking the key's batches as they come due.

Batches at Attentive wait in each job's check schedule (``keys.polls``: batch id -> when its next
check is due), not in broker messages. A poller task for a key holds a redis-py Lock, collects the
due checks of every job sending with that key, soonest first, and checks them
(:func:`worker.pipeline.poll.check_batch`) until its time budget is spent, then hands over to a fresh
task. So:

* two pollers never check the same batch at once (the lock is per key and renewed before every
  check; a poller whose lock was taken over stops), and a worker killed mid-check leaves nothing to
  re-drive: its lock expires and the sweep starts another poller;
* status checks share the key's request budget with sends (DESIGN.md invariant 4): while batches
  wait to be sent, checks take at most ``ATTENTIVE_POLL_SHARE`` of the key's rate (a second GCRA
  schedule caps them); with nothing waiting they take spare tokens only, so a send arriving first
  still goes first. Each batch's next check moves out as it ages and as more batches are at
  Attentive (:func:`worker.pipeline.poll.next_check_in`), so the schedule fits inside that share;
  once nothing waits to be sent, checks put far out that way are brought forward into the spare
  requests, never sooner than their batch's age allows (:func:`_pull_forward`);
* a poller never sleeps long, for a token or for the next check: it stops and its successor is
  queued with that countdown. (It used to sleep up to a quarter second per token; at the poll
  share's 9 tokens/s that held a prefork process for the whole budget, and the pipeline benchmark
  fell from 12,437 to about 3,000 transitions/s with one process, 22,259 to 11,393 with two.)
  On spare tokens it waits out a token due within :data:`SHORT_TOKEN_WAIT_SECONDS`. While sends
  wait it books the key's next token instead (``RateLimiter.poll_token``): the sends re-ask for
  each token as it comes due and the first to ask wins, so a check that only asked when its token
  was due lost almost every race, and the share was not real (9 checks in 22 s of sending against
  9 a second). It takes up to :data:`POLL_SHARE_BURST` share tokens in a row, then hands over
  until that many are due again: handing over after every check cost a Celery task per batch (one
  ``poll_key`` task per check in the CPU benchmark, about a fifth of the CPU per transition).

The sweep (:func:`request_pollers`) queues a poller for every key with a check due, or one it can
bring forward, and none running; a poller also queues its own successor when it stops with work left.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from redis.exceptions import LockError
from redis.lock import Lock

from worker import shutdown
from worker.pipeline.attentive_calls import (
    TOKEN_WAIT_SECONDS,
    block_for_key,
    key_usable_after,
    waiting_out_block,
)
from worker.pipeline.buffer import (
    CheckSchedule,
    check_schedules,
    jobs_needing_a_poller,
    now_ms,
    pull_checks_forward,
)
from worker.pipeline.poll import SPARE_SHARE, TakeToken, check_batch
from worker.runtime import KEY_UNREADABLE, REDIS_DOWN, Runtime
from worker.setup.jobs import ExportJob
from worker.store import keys
from worker.store.joberrors import blocked_retry_times
from worker.store.ratelimit import RateLimiter

log = logging.getLogger(__name__)

#: One poller task checks batches this long, then hands over to a fresh task.
POLLER_BUDGET_SECONDS = 10.0
#: A poller's lock outlives one check (a status request's timeouts, a results file) with margin;
#: it is renewed before every check. A poller killed with SIGKILL holds its key this long at most.
POLLER_LOCK_SECONDS = 60.0
#: A token due within this long is waited for in the process (a check takes a few ms; the key's
#: tokens come every 11 ms at 90/s): handing over instead costs a whole task per check.
SHORT_TOKEN_WAIT_SECONDS = 0.05
#: Short waits in a row for one token before the poller hands over instead.
SHORT_WAITS_PER_TOKEN = 2
#: The most a poller sleeps for one token.
MAX_TOKEN_SLEEP_SECONDS = SHORT_TOKEN_WAIT_SECONDS * SHORT_WAITS_PER_TOKEN
#: Share tokens a poller may take back to back while sends wait (the share schedule's GCRA burst:
#: in any window of W seconds at most this many plus W x the share's rate). A poller refused one
#: hands over until this many are due again, so one task makes several checks, not one.
POLL_SHARE_BURST = 4
#: A check due within this long is handed to a successor queued with that countdown; a later one
#: is left to the sweep, which queues a poller when it comes due.
HANDOVER_WITHIN_SECONDS = 1.0
#: A queued poller task counts as on its way this long (a lost message is replaced after it).
POLLER_QUEUED_TTL_MS = 30_000
#: Due checks read per job and round.
DUE_PAGE = 64
#: Checks per round on spare tokens: then the round ends and whether sends wait is asked again (a
#: poller that kept taking spare tokens for a whole page went past the share once sends queued).
SPARE_ROUND_CHECKS = 8


@dataclass
class PollerReport:
    checked: int = 0
    settled: int = 0
    statuses: list[str] = field(default_factory=list)
    #: Another poller holds the key: this one did nothing.
    skipped: bool = False
    #: Set when work is left: queue a successor after this many seconds.
    again_in: float | None = None
    #: Checks were brought forward into spare requests (:func:`_pull_forward`).
    pulled_forward: bool = False


def key_hash_of(rt: Runtime, job: ExportJob) -> str | None:
    """The API key hash a job sends with, or None if it cannot be read (a deleted authorization:
    the job is blocked, see :func:`worker.pipeline.attentive_calls.block_for_key`)."""
    try:
        return rt.limiter_for(job).key_hash
    except REDIS_DOWN:
        raise
    except KEY_UNREADABLE as exc:
        block_for_key(rt, job, exc)
        return None
    except Exception as exc:
        log.warning("job %s: no API key to poll with: %s: %s", job.id, type(exc).__name__, exc)
        return None


def request_poller(rt: Runtime, key_hash: str, countdown: float = 0.0) -> bool:
    """Queue a poller task for the key unless one is running or queued already."""
    if rt.redis.exists(keys.poller_lock(key_hash)):
        return False
    if rt.redis.set(
        keys.poller_queued(key_hash), 1, nx=True, px=POLLER_QUEUED_TTL_MS + int(countdown * 1000)
    ):
        rt.dispatch.poll_key(key_hash, countdown)
        return True
    return False


def request_pollers(rt: Runtime, jobs: Iterable[ExportJob], now: int) -> int:
    """Queue a poller for every key with a check due or one to bring forward (the sweep calls
    this); returns how many."""
    sending = [job for job in jobs if job.sending]
    with_checks = jobs_needing_a_poller(rt.redis, [job.id for job in sending], now)
    candidates = [job for job in sending if job.id in with_checks]
    retries = blocked_retry_times(rt.redis, [job.id for job in candidates])
    due_keys: set[str] = set()
    for job in candidates:
        if waiting_out_block(retries[job.id]):
            continue  # its key cannot be read: a poller is queued when the next try is due
        key_hash = key_hash_of(rt, job)
        if key_hash is not None:
            due_keys.add(key_hash)
    return sum(request_poller(rt, key_hash) for key_hash in sorted(due_keys))


def run_poller(rt: Runtime, key_hash: str, budget_seconds: float = POLLER_BUDGET_SECONDS) -> PollerReport:
    """Check the key's due batches, soonest first, until the budget is spent or none is due."""
    report = PollerReport()
    rt.redis.delete(keys.poller_queued(key_hash))
    lock = rt.redis.lock(keys.poller_lock(key_hash), timeout=POLLER_LOCK_SECONDS, blocking=False)
    if not lock.acquire():
        report.skipped = True
        return report
    try:
        _run(rt, key_hash, lock, time.monotonic() + budget_seconds, report)
    except LockError:
        log.warning("poller for key %s lost its lock; stopping", key_hash)
        report.again_in = None  # whoever holds the lock now carries on
    finally:
        with contextlib.suppress(LockError):
            lock.release()
    return report


def _pull_forward(
    rt: Runtime, jobs: list[ExportJob], schedules: dict[str, CheckSchedule], rate: float, now: int
) -> int:
    """With nothing due and nothing waiting to be sent, bring each job's earliest checks forward into
    the spare requests (:data:`worker.pipeline.poll.SPARE_SHARE` of the key's rate), no earlier than
    each one's floor; returns how many moved. Checks already due soon keep their slots, so this only
    fills gaps in the schedule (a steady real-time flow keeps some check due every few seconds:
    waiting for a gap of a whole second first left the far checks where they were).

    A check put far out while sends waited (spread over the poll share) would otherwise keep that
    spread after the sends stop, and the users its batch holds back would wait for it (a change
    behind an unfinished batch is held until the batch is confirmed complete).
    """
    interval_ms = 1000.0 / (rate * SPARE_SHARE)
    at_attentive = [job.id for job in jobs if schedules[job.id].at_attentive]
    return pull_checks_forward(rt.redis, at_attentive, now, interval_ms, DUE_PAGE)


class _Tokens:
    """Tokens for status checks: the key's shared limiter, capped at the poll share while sends wait."""

    def __init__(self, rt: Runtime, key_hash: str) -> None:
        self.rate = rate = rt.settings.rate_limit_per_second
        self.main = RateLimiter(rt.redis, key_hash, rate)
        self.share_rate = rate * rt.settings.poll_share
        # While sends queue, the key's next token is at most one interval away: book that far (a
        # shorter horizon lost the races again below 20 requests/s), never further than a flush
        # would sleep for a token.
        self.book_within = min(max(SHORT_TOKEN_WAIT_SECONDS, self.main.interval_us / 1e6), TOKEN_WAIT_SECONDS)

    def taker(self, sends_waiting: bool, lock: Lock, deadline: float) -> TakeToken:
        share = self.share_rate if sends_waiting else None

        def take() -> float:
            # Renews the lock and takes the share's and the key's tokens in one script call; raises
            # LockError (LockNotOwnedError) once another poller took over. While sends wait, the key's
            # token is booked (and slept for) if due within book_within, so a refusal is the share's
            # or a 429 hold's (or the key's below 2 requests/s): handed over, never slept (a process
            # sleeping between share tokens is one fewer for ingest and flushes). On spare tokens, a
            # short wait is slept.
            sleeps = 0
            while True:
                wait = self.main.poll_token(
                    lock, share, share_burst=POLL_SHARE_BURST, book_within=self.book_within
                )
                if wait == 0.0 or share is not None or wait > SHORT_TOKEN_WAIT_SECONDS:
                    return wait
                if sleeps == SHORT_WAITS_PER_TOKEN or time.monotonic() + wait >= deadline:
                    return wait
                time.sleep(wait)
                sleeps += 1

        return take

    def handover_in(self, wait: float, sends_waiting: bool) -> float:
        """When a successor should start after a refused token: while sends wait, once the share's
        whole burst is due again, so it makes :data:`POLL_SHARE_BURST` checks, not one."""
        if sends_waiting:
            return max(wait, POLL_SHARE_BURST / self.share_rate)
        return wait


def _run(rt: Runtime, key_hash: str, lock: Lock, deadline: float, report: PollerReport) -> None:
    tokens = _Tokens(rt, key_hash)
    blocked: set[str] = set()  # jobs whose key could not be read during this run
    while time.monotonic() < deadline and not shutdown.requested():  # stopping: worker/shutdown.py
        sending = [j for j in rt.jobs.active() if j.sending and j.id not in blocked]
        # Every job's block in one round trip, however many jobs. Read at the round's start: a block
        # another worker sets meanwhile is seen next round (this process's cached client is unaffected).
        retries = blocked_retry_times(rt.redis, [j.id for j in sending])
        jobs = [
            j
            for j in sending
            if not waiting_out_block(retries[j.id])
            and key_hash_of(rt, j) == key_hash
            and key_usable_after(rt, j, retries[j.id])
        ]
        now = now_ms()
        schedules = check_schedules(rt.redis, [j.id for j in jobs], now, DUE_PAGE)
        due = sorted((at, job_id, bid) for job_id, s in schedules.items() for at, bid in s.due)[:DUE_PAGE]
        sends_waiting = any(s.sealed > 0 for s in schedules.values())
        if not due:
            if not sends_waiting and _pull_forward(rt, jobs, schedules, tokens.rate, now):
                report.pulled_forward = True
                continue  # the first check brought forward is due now (or at its floor)
            soon = [s.next_at for s in schedules.values() if s.next_at is not None]
            if not soon:
                return  # nothing at Attentive
            wait = max((min(soon) - now) / 1000, 0.0)
            if wait <= HANDOVER_WITHIN_SECONDS:
                report.again_in = wait
            return
        if not sends_waiting:
            due = due[:SPARE_ROUND_CHECKS]
        at_attentive = sum(s.at_attentive for s in schedules.values())
        take = tokens.taker(sends_waiting, lock, deadline)
        by_id = {j.id: j for j in jobs}
        for _, job_id, bid in due:
            if time.monotonic() >= deadline or shutdown.requested():
                break
            job = rt.jobs.cached(job_id)
            if job is None or not job.sending or job_id in blocked:
                continue  # paused, stopped or blocked meanwhile: its checks wait in the schedule
            check = check_batch(rt, by_id[job_id], bid, take, tokens.main, at_attentive, sends_waiting)
            if check.blocked:
                blocked.add(job_id)
            report.checked += int(not check.no_token)
            report.settled += int(check.done)
            report.statuses.extend(check.statuses)
            if check.stop_for is not None:
                report.again_in = tokens.handover_in(check.stop_for, sends_waiting)
                return
    report.again_in = 0.0  # budget spent (or this worker is stopping): a fresh task carries on
