"""Flush: claim a sealed batch, spend a shared rate-limit token, POST it, schedule its poll.

Failures never lose the batch: it stays in Redis and is released back to the queue (429, 5xx,
timeouts), kept while the job is paused (401/403), or split so only the users Attentive refuses
are dead-lettered (400). See DESIGN.md §4.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from worker import shutdown
from worker.backoff import backoff
from worker.clients.attentive import (
    AttentiveError,
    Forbidden,
    InvalidRequest,
    RateLimited,
    TransportError,
    Unauthorized,
)
from worker.pipeline import deadletters
from worker.pipeline.attentive_calls import (
    TOKEN_WAIT_SECONDS,
    block_for_key,
    hold_off_after_429,
    key_usable,
    pause_for_auth_error,
)
from worker.pipeline.buffer import BatchDataMissing, ClaimedBatch, JobBuffer, entry_json, entry_record, now_ms
from worker.runtime import KEY_UNREADABLE, Runtime
from worker.setup.jobs import ExportJob
from worker.store import keys
from worker.store.joberrors import note_error
from worker.store.ratelimit import RateLimiter

log = logging.getLogger(__name__)

#: One flush task keeps claiming batches this long, so a backlog drains without a task per batch.
FLUSH_BUDGET_SECONDS = 10.0
#: How long a queued flush task counts as on its way, and a running one as running (each mark is
#: refreshed when a flush starts). Past it (a lost message, a killed worker), the next seal queues
#: another; the sweep re-drives unclaimed batches regardless.
FLUSH_QUEUED_TTL_MS = 30_000
#: After a 5xx, a timeout or a dropped connection: a full-jitter wait from up to a second, doubling
#: with each failure in a row, up to a minute.
ERROR_RETRY_FIRST_SECONDS = 1.0
ERROR_RETRY_CAP_SECONDS = 60.0


class NoToken(Exception):
    """The shared rate limiter had no token within :data:`TOKEN_WAIT_SECONDS`."""

    def __init__(self, wait: float) -> None:
        super().__init__(f"rate limiter busy for {wait:.2f}s")
        self.wait = wait


@dataclass
class FlushReport:
    submitted: list[int] = field(default_factory=list)
    retry_in: float | None = None  # seconds; set when the task should run again later
    paused: str = ""  # why sending stopped: a 401/403 pause, or the key could not be read
    #: The job is blocked (its API key cannot be read): nothing was claimed; the sweep tries again.
    blocked: bool = False


def request_flush(rt: Runtime, job_id: str) -> bool:
    """Queue a flush task for newly sealed batches, unless a flush is running or queued already.

    A running flush claims batches until none is left, and stands down before its last look
    (:func:`flush_job`), so a batch sealed while it runs is either claimed by it or finds no
    running mark here and gets a task of its own. Two flushes of one job would only take turns
    sleeping on the shared rate limiter, holding two worker processes where one does the work.
    """
    if rt.redis.exists(keys.flush_running(job_id)):
        return False
    return _queue_flush(rt, job_id)


def _queue_flush(rt: Runtime, job_id: str) -> bool:
    """Dispatch a flush task unless one is queued and has not started yet."""
    if rt.redis.set(keys.flush_queued(job_id), 1, nx=True, px=FLUSH_QUEUED_TTL_MS):
        rt.dispatch.flush(job_id)
        return True
    return False


def flush_job(rt: Runtime, job_id: str, budget_seconds: float = FLUSH_BUDGET_SECONDS) -> FlushReport:
    """Submit sealed batches of one job until none is left, the budget is spent, or sending must stop."""
    report = FlushReport()
    running = keys.flush_running(job_id)
    job = rt.jobs.cached(job_id)
    if job is None or not job.sending:
        rt.redis.delete(keys.flush_queued(job_id))  # (a deleted job's keys are gone already)
        return report
    if not key_usable(rt, job):
        # Its key cannot be read (status says why): the sweep dispatches a flush when the next try
        # is due, so no task retries it every few seconds.
        rt.redis.delete(keys.flush_queued(job_id))
        report.blocked = True
        return report
    # Started: a batch sealed from now on is ours to claim, not a reason to queue another task.
    pipe = rt.redis.pipeline(transaction=False)
    pipe.delete(keys.flush_queued(job_id))
    pipe.set(running, 1, px=FLUSH_QUEUED_TTL_MS)
    pipe.execute()
    buffer = JobBuffer(rt.redis, job_id, job.config.batch_size)
    deadline = time.monotonic() + budget_seconds
    slow_send = 1.0 / rt.settings.rate_limit_per_second
    standing_down = False
    while time.monotonic() < deadline:
        if shutdown.requested():
            # This worker is stopping (worker/shutdown.py): claim nothing more; the fresh task
            # queued below goes to a worker that is not.
            log.info("job %s: worker shutting down; handing the flush over", job_id, extra={"job_id": job_id})
            break
        try:
            batch = buffer.claim(
                int(rt.settings.lease_seconds * 1000),
                hold_ms=int(rt.settings.uncertain_send_hold_seconds * 1000),
                slack_ms=int(TOKEN_WAIT_SECONDS * 1000),
            )
        except BatchDataMissing as lost:
            _drop_lost_batch(rt, job, buffer, lost)
            continue
        if batch is None:
            if standing_down:
                return report
            # Stand down, then look once more: a batch sealed after the empty claim above is either
            # claimed by that look or its seal finds no running mark and queues a task.
            rt.redis.delete(running)
            standing_down = True
            continue
        if standing_down:
            rt.redis.set(running, 1, px=FLUSH_QUEUED_TTL_MS)
            standing_down = False
        post_seconds: list[float] = []
        outcome = _flush_batch(rt, job, buffer, batch, post_seconds)
        if isinstance(outcome, float):
            report.retry_in = outcome
            return report
        if isinstance(outcome, str):
            rt.redis.delete(running)
            report.paused = outcome
            return report
        if outcome:
            report.submitted.append(batch.batch_id)
            # One sender cannot use the whole budget when a request takes longer than a token
            # interval (Attentive answering in 200 ms, say): with batches waiting, ask for another.
            if batch.queued_behind and post_seconds and max(post_seconds) > slow_send:
                _queue_flush(rt, job_id)
    report.retry_in = 0.0  # budget spent (or shutting down) with batches maybe left: a fresh task
    return report


def _drop_lost_batch(rt: Runtime, job: ExportJob, buffer: JobBuffer, lost: BatchDataMissing) -> None:
    """Dead-letter a batch whose records are gone from Redis; nothing if a twin completed it."""
    if not buffer.batch_exists(lost.batch_id):
        return
    log.error(
        "job %s batch %s: records missing in Redis; dead-lettering its users",
        job.id,
        lost.batch_id,
        extra={"job_id": job.id, "batch_id": lost.batch_id},
    )
    reason = "batch records missing in Redis (data lost or edited): the change cannot be sent"
    deadletters.record(rt.redis, job.id, lost.batch_id, ((u, reason, None) for u in lost.users))
    buffer.complete(lost.batch_id, {"batches_deadlettered": 1})


def _flush_batch(
    rt: Runtime, job: ExportJob, buffer: JobBuffer, batch: ClaimedBatch, post_seconds: list[float]
) -> bool | float | str:
    """True if submitted, a float to retry after that many seconds, a str pause reason.

    Appends how long each POST took to ``post_seconds``. Whatever Attentive accepted (or may have)
    is recorded on the batch as it happens (:meth:`JobBuffer.record_accepted`); once anything
    happened the batch goes to the poll, which follows every recorded job and sends the users still
    open again only after all of them finished (invariant 2 across Attentive's asynchronous jobs).
    Only a send that achieved nothing is released back to the queue.
    """
    status_key = keys.job_status(job.id)
    # The same users the claim recorded its pending send for (batch.pending_send): usually all.
    skip = batch.settled | batch.carried
    everyone = range(len(batch.users))
    to_send = [i for i in everyone if i not in skip] if skip else list(everyone)
    if not to_send:
        if batch.carried:  # an earlier send's jobs still carry the rest: follow them
            return _hand_to_poll(rt, job, buffer, batch, {})
        buffer.complete(batch.batch_id, {"batches_completed": 1})  # all finished in earlier sends
        return False
    try:
        client = rt.client_for(job)
        limiter = rt.limiter_for(job)
    except KEY_UNREADABLE as unreadable:  # deleted or saved with another key since this flush began
        _unclaim(buffer, batch)
        return block_for_key(rt, job, unreadable)
    except BaseException:
        _unclaim(buffer, batch)
        raise
    encoded = {i: entry_json(batch.entries[i]) for i in to_send}
    hold_ms = batch.hold_ms or _uncertain_hold_ms(rt, job.id)
    sent = _submit_isolating(
        client,
        limiter,
        encoded,
        to_send,
        post_seconds,
        record=lambda sub, replaces: buffer.record_accepted(batch.batch_id, sub, replaces),
        forget=lambda pending: buffer.forget_job(batch.batch_id, pending),
        uncertain_hold_ms=hold_ms,
        recorded=batch.pending_send,
    )
    if sent.accepted:
        pipe = rt.redis.pipeline(transaction=False)
        pipe.hincrby(status_key, "users_sent", sum(map(len, sent.accepted)))
        if sent.last_accepted:
            limiter.note_success(pipe)  # the key's 429 streak ends, in the same round trip
        pipe.execute()
    if sent.refused:
        refused = list(sent.refused)
        deadletters.record(
            rt.redis,
            job.id,
            batch.batch_id,
            (
                (batch.users[i], f"attentive_400: {msg}", entry_record(batch.entries[i]))
                for i, msg in sent.refused.items()
            ),
            stamps=buffer.stamps([batch.users[i] for i in refused], [batch.entries[i] for i in refused]),
        )
    exc = sent.error
    if exc is None:
        if not sent.accepted and not batch.carried:  # every user was refused: nothing to poll
            rt.redis.hset(status_key, mapping={"consecutive_429": 0, "consecutive_errors": 0})
            buffer.complete(batch.batch_id, {"batches_completed": 1})
            return False
        return _hand_to_poll(rt, job, buffer, batch, sent.refused)
    if sent.accepted or sent.refused:
        # A split stopped half way: what Attentive accepted is polled; the rest goes again after.
        _hand_to_poll(rt, job, buffer, batch, sent.refused)
        rt.redis.hincrby(status_key, "sends_interrupted", 1)
    else:
        buffer.release(batch)  # an "unknown:" send stays recorded: its users are held until it ends
    if sent.uncertain:
        rt.redis.hincrby(status_key, "sends_uncertain", 1)
        log.warning(
            "job %s batch %s: no answer to a send that may have reached Attentive; its %d users are "
            "held %d ms",
            job.id,
            batch.batch_id,
            len(sent.uncertain),
            hold_ms,
            extra={"job_id": job.id, "batch_id": batch.batch_id},
        )
    if isinstance(exc, Unauthorized | Forbidden):
        return pause_for_auth_error(rt, job, exc)
    if isinstance(exc, NoToken):
        return exc.wait
    if isinstance(exc, RateLimited):
        rt.redis.hincrby(status_key, "consecutive_429", 1)
        return hold_off_after_429(rt, limiter, job.id, exc)
    if isinstance(exc, AttentiveError):  # 5xx, timeouts, dropped connections, odd responses
        streak = int(rt.redis.hincrby(status_key, "consecutive_errors", 1))
        note_error(rt.redis, job.id, f"{type(exc).__name__}: {exc.message}")
        return backoff(streak - 1, first=ERROR_RETRY_FIRST_SECONDS, cap=ERROR_RETRY_CAP_SECONDS)
    raise exc


def _unclaim(buffer: JobBuffer, batch: ClaimedBatch) -> None:
    """Give a claimed batch back before anything was sent: its pending send never went out."""
    if batch.pending_send:
        buffer.forget_job(batch.batch_id, batch.pending_send)
    buffer.release(batch)


def _hand_to_poll(
    rt: Runtime, job: ExportJob, buffer: JobBuffer, batch: ClaimedBatch, refused: Mapping[int, str]
) -> bool:
    """Mark the batch submitted, its first status check due after ``ATTENTIVE_FIRST_POLL_SECONDS``
    (the key's poller takes it from there); False if the lease was lost."""
    due = now_ms() + int(rt.settings.first_poll_seconds * 1000)
    if not buffer.mark_submitted(batch, due, settled=refused):
        # Our lease ran out: the sweep re-queued the batch, or handed it to the poller if Attentive
        # had accepted part of it. Either way its recorded jobs are followed by whoever has it now.
        log.warning(
            "job %s batch %s: lease lost during submit",
            job.id,
            batch.batch_id,
            extra={"job_id": job.id, "batch_id": batch.batch_id},
        )
        return False
    return True


def _uncertain_hold_ms(rt: Runtime, job_id: str) -> int:
    """How long users of a send whose answer never came are held: the configured floor, or twice the
    longest Attentive job seen for this export job (recorded by the poll), whichever is longer."""
    longest = int(rt.redis.hget(keys.job_status(job_id), "longest_attentive_job_ms") or 0)
    return max(int(rt.settings.uncertain_send_hold_seconds * 1000), 2 * longest)


@dataclass
class _Sent:
    """What one send of a batch achieved before it ended, and the error that ended it (if any)."""

    #: User indices of each request Attentive accepted (each recorded on the batch already).
    accepted: list[list[int]] = field(default_factory=list)
    #: Users Attentive refused (400), with its message.
    refused: dict[int, str] = field(default_factory=dict)
    #: Users of a request whose answer never came (recorded as an "unknown:" job).
    uncertain: list[int] = field(default_factory=list)
    error: BaseException | None = None
    #: The send ended with a request Attentive accepted: the caller resets the key's 429 streak
    #: (:meth:`RateLimiter.note_success`) with its own writes; earlier accepted requests reset it at once.
    last_accepted: bool = False


def _submit_isolating(
    client: Any,
    limiter: RateLimiter,
    users: Mapping[int, bytes],
    indices: list[int],
    post_seconds: list[float],
    record: Callable[[dict[str, Any], str], bool],
    forget: Callable[[str], bool],
    uncertain_hold_ms: int,
    recorded: str = "",
) -> _Sent:
    """POST ``users[i] for i in indices`` (JSON records); on a 400 split in halves until refused users
    are isolated.

    Before a request goes out it is recorded (``record(entry, replaces)``) as an ``unknown:`` job held
    ``uncertain_hold_ms``; its answer replaces that entry: Attentive's job id when accepted, nothing
    (``forget``) when refused or turned away. So a request whose answer never came, or whose worker
    died before the answer was recorded, still holds its users until any job it created has surely
    finished, and nothing that happens later (a 429 in the other half, a crash) can lose an
    Attentive job id. ``recorded`` names such an entry already written for the first request (all of
    ``indices``: the claim writes it, :meth:`JobBuffer.claim`). The first other error ends the send
    and is returned, not raised.
    """
    sent = _Sent()
    pending: list[list[int]] = [indices]
    try:
        while pending:
            idx = pending.pop()
            unknown, recorded = recorded, ""
            if not limiter.acquire(TOKEN_WAIT_SECONDS):
                if unknown:
                    forget(unknown)  # it never went out
                raise NoToken(limiter.next_wait)
            if not unknown:
                unknown = f"unknown:{secrets.token_hex(8)}"
                record({"id": unknown, "idx": idx, "until": now_ms() + uncertain_hold_ms}, "")
            started = time.monotonic()
            try:
                job_id = client.submit_bulk_json([users[i] for i in idx])
            except InvalidRequest as exc:
                post_seconds.append(time.monotonic() - started)
                forget(unknown)
                if len(idx) == 1:
                    sent.refused[idx[0]] = exc.attentive_message or exc.message
                else:
                    half = len(idx) // 2
                    pending += [idx[half:], idx[:half]]
                continue
            except TransportError as exc:
                post_seconds.append(time.monotonic() - started)
                if exc.may_have_reached_server:
                    # The hold runs from now, when the request can no longer be in the network.
                    record({"id": unknown, "idx": idx, "until": now_ms() + uncertain_hold_ms}, unknown)
                    sent.uncertain += idx
                else:
                    forget(unknown)
                raise
            except Exception:
                forget(unknown)  # Attentive answered (429, 5xx, 401/403): it created no job
                raise
            post_seconds.append(time.monotonic() - started)
            record({"id": job_id, "idx": idx}, unknown)
            sent.accepted.append(idx)
            if pending:
                limiter.note_success()
            else:
                sent.last_accepted = True
    except Exception as exc:  # returned: the caller decides, knowing what was accepted before it
        sent.error = exc
    return sent
