"""What flush and poll share when they call Attentive: how long a send may wait for a rate-limit
token, holding every worker off after a 429, pausing a job whose key Attentive refuses, and
blocking a job whose key cannot be read here. One module, so neither stage reaches into the
other's internals.
"""

from __future__ import annotations

import logging
import socket
import time

from worker.backoff import backoff
from worker.clients.attentive import AttentiveError, RateLimited, Unauthorized
from worker.runtime import KEY_UNREADABLE, Runtime
from worker.setup.authorizations import AuthorizationNotFound
from worker.setup.jobconfig import JobState
from worker.setup.jobs import SENDING_STATES, ExportJob
from worker.store import keys
from worker.store.joberrors import blocked_retry_at, clear_blocked, note_blocked, note_error
from worker.store.ratelimit import RateLimiter

log = logging.getLogger(__name__)

#: Longest a flush sleeps for a rate-limit token before giving its batch back and running again
#: when the token is due: a worker process never sits on a prefork slot waiting for the limit.
TOKEN_WAIT_SECONDS = 0.5
#: After a 429 without Retry-After, by the key's 429s in a row across all workers (reset by any
#: success): the first is taken as noise (Attentive or a proxy shedding one request; no hold, the
#: request just goes again with its own token), the second holds every worker off up to 0.1 s
#: (full jitter), each further one doubles that, up to 30 s. A hold of half a second per 429 froze the
#: key for good under 20-30% random 429s; a genuine limit answers 429 to a run of requests and still
#: reaches the 30 s hold after about ten.
RATE_LIMITED_FIRST_SECONDS = 0.1
RATE_LIMITED_CAP_SECONDS = 30.0
#: A blocked job (its API key cannot be read) is tried again this often, by whichever flush or
#: poller comes first: often enough to recover within a minute of the fix, rarely enough that the
#: log shows one line a minute, not a traceback every few seconds.
BLOCKED_RETRY_SECONDS = 60.0


def hold_off_after_429(rt: Runtime, limiter: RateLimiter, job_id: str, exc: RateLimited) -> float:
    """Count a 429 for the key and hold every worker sharing it off as its streak says (invariant 4).

    Returns the seconds until the refused request may go again: Attentive's Retry-After when given,
    else the hold for the key's streak (at least one token interval).
    """
    streak = limiter.note_429()
    if exc.retry_after is not None or streak > 1:
        delay = backoff(
            max(0, streak - 2),
            first=RATE_LIMITED_FIRST_SECONDS,
            cap=RATE_LIMITED_CAP_SECONDS,
            retry_after=exc.retry_after,
        )
        limiter.penalize(delay)
    else:
        delay = 0.0
    status_key = keys.job_status(job_id)
    rt.redis.hincrby(status_key, "responses_429", 1)
    rt.redis.hincrbyfloat(status_key, "rate_limited_seconds", delay)
    return max(delay, 1.0 / limiter.rate_per_second)


def pause_for_auth_error(rt: Runtime, job: ExportJob, exc: AttentiveError) -> str:
    """Pause the job after a 401/403 (retrying would only storm Attentive); returns the reason."""
    reason = _pause_reason(exc)
    paused = rt.jobs.set_state_if(job.id, JobState.PAUSED, SENDING_STATES, reason)
    rt.forget_client(job)
    if paused or rt.redis.hexists(keys.jobs(), job.id):  # a deleted job gets no keys back
        note_error(rt.redis, job.id, reason)
    log.warning("job %s paused: %s", job.id, reason, extra={"job_id": job.id})
    return reason


def _pause_reason(exc: AttentiveError) -> str:
    if isinstance(exc, Unauthorized):
        return (
            "Attentive rejected the API key (401 Unauthorized): it is unknown or revoked. "
            "Save a valid key in the authorization, then resume the job."
        )
    return (
        "Attentive refused the write (403 Forbidden): the key lacks Custom Attributes and Subscribers "
        "write permission. Fix the app's permissions, then resume the job."
    )


def block_for_key(rt: Runtime, job: ExportJob, exc: Exception) -> str:
    """Block the job: its API key cannot be read (see :data:`worker.runtime.KEY_UNREADABLE`).

    Nothing is lost: its batches stay queued or scheduled and its changes keep buffering; flush,
    poller and sweep leave it alone for :data:`BLOCKED_RETRY_SECONDS`, then try once more, and the
    first try that reads the key lifts the block (:func:`key_usable`). Returns the reason, which
    status shows with the time it started and when the next try is due.
    """
    reason = _block_reason(job, exc)
    if rt.redis.hexists(keys.jobs(), job.id):  # a deleted job gets no keys back
        note_blocked(rt.redis, job.id, reason, int(BLOCKED_RETRY_SECONDS * 1000))
    log.warning(
        "job %s blocked, trying again in %.0f s: %s",
        job.id,
        BLOCKED_RETRY_SECONDS,
        reason,
        extra={"job_id": job.id},
    )
    return reason


def waiting_out_block(retry_at: int | None) -> bool:
    """True while a block's next try (:func:`blocked_retry_times`, epoch ms) is not due yet."""
    return retry_at is not None and time.time() * 1000 < retry_at


def key_usable(rt: Runtime, job: ExportJob) -> bool:
    """Whether the job's API key can be used now: False while it is blocked (no try before its
    next one is due) or when reading the key fails (which blocks it); a block is lifted once the
    key reads again."""
    return key_usable_after(rt, job, blocked_retry_at(rt.redis, job.id))


def key_usable_after(rt: Runtime, job: ExportJob, retry_at: int | None) -> bool:
    """:func:`key_usable` with the job's block read already
    (:func:`worker.store.joberrors.blocked_retry_times` reads many jobs' at once)."""
    if waiting_out_block(retry_at):
        return False
    try:
        rt.client_for(job)
        rt.limiter_for(job)
    except KEY_UNREADABLE as exc:
        block_for_key(rt, job, exc)
        return False
    if retry_at is not None and clear_blocked(rt.redis, job.id):
        log.warning("job %s unblocked: its API key can be read again", job.id, extra={"job_id": job.id})
    return True


def _block_reason(job: ExportJob, exc: Exception) -> str:
    auth = job.config.authorization
    if isinstance(exc, AuthorizationNotFound):
        if auth.startswith("au_"):
            fix = "stop this job and create a new one naming a saved authorization"
        else:
            fix = f"save it again (`attentive-export auth add --label {auth}`) or stop this job"
        return (
            f"the job's authorization {auth!r} no longer exists: {fix}. Changes keep buffering; "
            "nothing is sent until then"
        )
    return f"on worker host {socket.gethostname()}: {exc}. Changes keep buffering; nothing is sent until then"
