"""Poll: follow a batch's Attentive jobs until they finish, then settle the batch.

COMPLETED: read the results file, dead-letter records Attentive refused, complete the batch (its
data leaves Redis and its users' next changes move on). FAILED/CANCELLED/lost (404): send the batch
again, a bounded number of times, then dead-letter it. Anything else (IN_PROGRESS, PENDING,
NEEDS_REVIEW, unknown): poll again later with a jittered exponential countdown.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import orjson
import redis

from worker.backoff import backoff
from worker.clients.attentive import AttentiveError, Forbidden, NotFound, RateLimited, Unauthorized
from worker.pipeline import deadletters
from worker.pipeline.attentive_calls import (
    POLL_GRACE_MS,
    TOKEN_WAIT_SECONDS,
    hold_off_after_429,
    pause_for_auth_error,
)
from worker.pipeline.buffer import JobBuffer, now_ms
from worker.pipeline.parked import POLL_YIELDS_MS, park
from worker.runtime import Runtime
from worker.setup.jobs import ExportJob
from worker.store import keys

log = logging.getLogger(__name__)

#: Sends of one batch before a FAILED/CANCELLED/lost Attentive job dead-letters it.
MAX_SEND_ATTEMPTS = 3
#: How many refused records per batch are logged to status as a sample.
FAILURE_SAMPLE = 5
#: Spread of the wait between two checks of a batch: ±20 %, so polls scheduled together do not
#: come due together.
POLL_JITTER = (0.8, 1.2)


@dataclass
class PollReport:
    done: bool
    next_in: float | None = None  # seconds until the next poll, when not done
    statuses: tuple[str, ...] = ()
    parked: bool = False  # waiting for spare budget, no request made: the sweep releases it


def poll_batch(rt: Runtime, job_id: str, batch_id: int, attempt: int) -> PollReport:
    """Check the batch's unfinished Attentive jobs once; settle the batch once all have finished."""
    job = rt.jobs.cached(job_id)
    if job is None or not job.sending:
        return PollReport(done=True)  # paused/stopped: the sweep re-drives the poll after resume
    buffer = JobBuffer(rt.redis, job_id, job.config.batch_size)
    batch = buffer.batch(batch_id)
    if batch.get("state") != "submitted":
        return PollReport(done=True)  # settled by a twin poll, or re-queued for sending
    status_key = keys.job_status(job_id)
    first, cap = rt.settings.first_poll_seconds, rt.settings.poll_cap_seconds
    statuses: list[str] = []
    try:
        client = rt.client_for(job)
        limiter = rt.limiter_for(job)
        for sub in _unfinished(batch):
            if sub["id"].startswith(UNKNOWN_PREFIX):
                # A send whose answer never came: nothing to ask Attentive, only a hold to sit out.
                if now_ms() >= int(sub.get("until") or 0):
                    buffer.end_job(batch_id, sub["id"], "no answer to the send; its hold has passed")
                continue
            age_ms = now_ms() - int(batch.get("submitted_at") or 0)
            if age_ms < POLL_YIELDS_MS:
                # Young: spare budget only, sends go first; otherwise wait parked (worker.pipeline.parked),
                # the same attempt again.
                if limiter.try_acquire(spare_only=True) > 0:
                    # Due since its first poll: released oldest first, and forced once it is no
                    # longer young, not a whole POLL_YIELDS_MS after this attempt.
                    due = int(batch.get("submitted_at") or 0) + int(first * 1000)
                    park(rt, job_id, batch_id, attempt, due)
                    buffer.expect_poll_by(batch_id, due + POLL_YIELDS_MS + POLL_GRACE_MS)
                    return PollReport(done=False, parked=True)
            elif not limiter.acquire(TOKEN_WAIT_SECONDS):
                return _again(buffer, batch_id, max(limiter.next_wait, 0.5))
            try:
                st = client.job_status(sub["id"])
            except NotFound:
                _job_failed(
                    rt, buffer, batch_id, job_id, sub["id"], f"Attentive has no job {sub['id']} (404): lost"
                )
                continue
            limiter.note_success()
            state = st.normalized_status
            statuses.append(state)
            # Every status, terminal ones too: status must not keep showing IN_PROGRESS/NEEDS_REVIEW
            # for a job whose batches have all completed since.
            rt.redis.hset(status_key, "last_attentive_status", state)
            if state == "COMPLETED":
                _settle_results(rt, job, buffer, batch_id, batch, sub, client, st.url)
                _note_job_time(rt, job_id, batch)
            elif state in ("FAILED", "CANCELLED"):
                _job_failed(
                    rt, buffer, batch_id, job_id, sub["id"], f"Attentive job {sub['id']} ended {state}"
                )
            elif not st.is_known_status or state == "NEEDS_REVIEW":
                rt.redis.hincrby(status_key, f"polls_{state.lower()[:32]}", 1)
                log.warning("job %s batch %s: Attentive job status %s", job_id, batch_id, state)
    except (Unauthorized, Forbidden) as exc:
        pause_for_auth_error(rt, job, exc)
        return PollReport(done=True)
    except RateLimited as exc:
        return _again(buffer, batch_id, hold_off_after_429(rt, rt.limiter_for(job), job_id, exc))
    except AttentiveError as exc:
        rt.redis.hset(status_key, "last_error", f"poll: {type(exc).__name__}: {exc.message}")
        return _again(buffer, batch_id, backoff(attempt, first=first, cap=cap, jitter=POLL_JITTER))

    # Read again: a send that outlived its lease may have recorded one more job meanwhile.
    fresh = buffer.batch(batch_id)
    if fresh.get("state") != "submitted":
        return PollReport(done=True, statuses=tuple(statuses))  # a twin poll settled it
    if _unfinished(fresh):
        delay = backoff(attempt, first=first, cap=cap, jitter=POLL_JITTER)
        return _again(buffer, batch_id, delay, tuple(statuses))
    return _finish(rt, job, buffer, batch_id, fresh, tuple(statuses))


#: Id prefix of a recorded send whose answer never came (worker.pipeline.flush).
UNKNOWN_PREFIX = "unknown:"


def _unfinished(batch: dict[str, str]) -> list[dict[str, Any]]:
    """The batch's recorded Attentive jobs that have neither completed nor ended."""
    subs: list[dict[str, Any]] = json.loads(batch.get("attentive_jobs") or "[]")
    return [s for s in subs if f"done:{s['id']}" not in batch and f"ended:{s['id']}" not in batch]


def _finish(
    rt: Runtime,
    job: ExportJob,
    buffer: JobBuffer,
    batch_id: int,
    batch: dict[str, str],
    statuses: tuple[str, ...],
) -> PollReport:
    """Every recorded job has finished: complete the batch, or send its open users again (a job
    failed or was lost, a send's answer never came, a split stopped half way), or give them up
    after :data:`MAX_SEND_ATTEMPTS` failed jobs."""
    users: list[str] = json.loads(batch["users"])
    settled = set(json.loads(batch.get("settled") or "[]"))
    open_users = [u for i, u in enumerate(users) if i not in settled]
    if not open_users:
        # Summed over every send of the batch: a re-send carries only the users earlier sends left open.
        delivered = sum(int(v) for k, v in batch.items() if k.startswith("done:"))
        refused = sum(int(v) for k, v in batch.items() if k.startswith("failed:"))
        buffer.complete(
            batch_id, {"batches_completed": 1, "users_delivered": delivered, "record_failures": refused}
        )
        return PollReport(done=True, statuses=statuses)
    attempts = int(batch.get("attempts") or 0)
    reason = batch.get("last_error") or "users left open by an earlier send"
    if attempts < MAX_SEND_ATTEMPTS:
        if buffer.resend(batch_id, reason):
            rt.dispatch.flush(job.id)
        return PollReport(done=True, statuses=statuses)
    try:
        records = buffer.records_for(batch_id, open_users)
    except LookupError:
        return PollReport(done=True)  # completed meanwhile by a twin poll: nothing left to give up on
    why = f"{reason}; gave up after {attempts} failed sends"
    deadletters.record(
        rt.redis, job.id, batch_id, ((u, why, rec) for u, rec in zip(open_users, records, strict=True))
    )
    buffer.complete(batch_id, {"batches_deadlettered": 1})
    return PollReport(done=True, statuses=statuses)


def _job_failed(rt: Runtime, buffer: JobBuffer, batch_id: int, job_id: str, sub_id: str, reason: str) -> None:
    """An Attentive job ended without delivering (FAILED, CANCELLED, 404): counts as a failed send once."""
    if buffer.end_job(batch_id, sub_id, reason, failed=True):
        rt.redis.hset(keys.job_status(job_id), "last_error", reason)


def _note_job_time(rt: Runtime, job_id: str, batch: dict[str, str]) -> None:
    """Keep the longest time an Attentive job took (from its batch's submission): it sizes the hold
    after a send whose answer never came (worker.pipeline.flush)."""
    took = now_ms() - int(batch.get("submitted_at") or now_ms())
    key = keys.job_status(job_id)
    if took > int(rt.redis.hget(key, "longest_attentive_job_ms") or 0):
        rt.redis.hset(key, "longest_attentive_job_ms", took)


def _again(buffer: JobBuffer, batch_id: int, delay: float, statuses: tuple[str, ...] = ()) -> PollReport:
    buffer.expect_poll_by(batch_id, now_ms() + int(delay * 1000) + POLL_GRACE_MS)
    return PollReport(done=False, next_in=delay, statuses=statuses)


def _settle_results(
    rt: Runtime,
    job: ExportJob,
    buffer: JobBuffer,
    batch_id: int,
    batch: dict[str, str],
    sub: dict[str, Any],
    client: Any,
    url: str | None,
) -> None:
    """Read one finished Attentive job's results and dead-letter the records it refused (once)."""
    idx: list[int] = sub["idx"]
    failures: dict[int, str] = {}
    unreadable = 0
    if url:
        for line in client.iter_results(url):
            if line.unparseable:
                unreadable += 1
                continue
            # The line format is undocumented: without an ``index``, a line's position is the best
            # evidence of which record it reports on (better than counting a failure as delivered).
            pos = line.index if line.index is not None else line.line_number
            if line.failed and 0 <= pos < len(idx):
                failures[idx[pos]] = f"attentive_record_{line.status_code}: {line.message or ''}".strip()
    else:
        rt.redis.hincrby(keys.job_status(job.id), "results_unavailable", 1)
    if unreadable:  # outcome unknown: counted for operators, neither delivered nor dead-lettered
        rt.redis.hincrby(keys.job_status(job.id), "results_unreadable_lines", unreadable)
    # The "done" mark and the dead letters commit together (MULTI), so a worker dying in between
    # cannot leave the job marked done with its refused records never dead-lettered. WATCH makes a
    # twin poll's second settlement a no-op, so nothing is dead-lettered twice.
    batch_key = keys.batch(job.id, batch_id)
    done_field = f"done:{sub['id']}"
    users: list[str] = orjson.loads(batch["users"]) if failures else []
    with rt.redis.pipeline(transaction=True) as pipe:
        try:
            pipe.watch(batch_key)  # type: ignore[no-untyped-call]
            if pipe.hget(batch_key, "state") not in (b"submitted", "submitted") or pipe.hexists(
                batch_key, done_field
            ):
                return
            # Records are read only to dead-letter them. A batch completing meanwhile deletes its
            # entries and changes the watched hash, so a miss here means a twin settled it.
            records = buffer.records_for(batch_id, [users[i] for i in failures])
            entries = [
                (users[i], reason, rec) for (i, reason), rec in zip(failures.items(), records, strict=True)
            ]
            settled = set(json.loads(pipe.hget(batch_key, "settled") or "[]")).union(idx)
            pipe.multi()
            pipe.hset(
                batch_key,
                mapping={
                    done_field: len(idx) - len(failures),
                    f"failed:{sub['id']}": len(failures),
                    "settled": json.dumps(sorted(settled)),
                },
            )
            deadletters.queue(pipe, job.id, batch_id, entries)
            if failures:
                sample = [f"{users[i]}: {reason}" for i, reason in list(failures.items())[:FAILURE_SAMPLE]]
                pipe.hset(keys.job_status(job.id), "last_record_failures", json.dumps(sample))
            pipe.execute()
        except (redis.WatchError, LookupError):
            return  # the batch changed meanwhile (a twin settled it): the caller re-checks and re-polls
