"""Check one batch's Attentive jobs once, and settle the batch once all have finished.

COMPLETED: read the results file, dead-letter records Attentive refused, complete the batch (its
data leaves Redis and its users' next changes move on). FAILED/CANCELLED/lost (404): send the batch
again, a bounded number of times, then dead-letter it. Anything else (IN_PROGRESS, PENDING,
NEEDS_REVIEW, unknown): set when the next check is due (:func:`next_check_in`). Which batch is
checked when, and with which request budget, is the key's poller's business (worker/pipeline/poller.py).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import redis

from worker.clients.attentive import AttentiveError, Forbidden, NotFound, RateLimited, Unauthorized
from worker.pipeline import deadletters, deliveries
from worker.pipeline.attentive_calls import block_for_key, hold_off_after_429, pause_for_auth_error
from worker.pipeline.buffer import JobBuffer, now_ms
from worker.runtime import KEY_UNREADABLE, Runtime
from worker.settings import Settings
from worker.setup.jobs import ExportJob
from worker.store import keys
from worker.store.joberrors import note_error
from worker.store.ratelimit import RateLimiter
from worker.store.replies import decode_hash

log = logging.getLogger(__name__)

#: Sends of one batch before a FAILED/CANCELLED/lost Attentive job dead-letters it.
MAX_SEND_ATTEMPTS = 3
#: How many refused records per batch are logged to status as a sample.
FAILURE_SAMPLE = 5
#: Spread of the wait between two checks of a batch: ±20 %, so batches sent together do not come
#: due together.
POLL_JITTER = (0.8, 1.2)
#: A batch is checked again after a quarter of its age (between the first-check delay and the cap):
#: about 25 checks over a 4-hour Attentive job before the cap takes over.
AGE_FACTOR = 0.25
#: Attentive parks some jobs for a person to review (NEEDS_REVIEW): check those at most this often.
NEEDS_REVIEW_CHECK_SECONDS = 900.0
#: With nothing waiting to be sent, status checks are spread as if they had this share of the key.
SPARE_SHARE = 0.5


@dataclass
class Check:
    """What one check of a batch came to."""

    #: The batch is settled (completed, sent again, dead-lettered) or no longer ours to check.
    done: bool
    #: Statuses Attentive reported for the batch's jobs.
    statuses: tuple[str, ...] = ()
    #: Set when the poller must stop for this long (no token soon, a 429 hold, a paused job's key).
    stop_for: float | None = None
    #: It stopped before asking Attentive anything: no token was due.
    no_token: bool = False
    #: The job's API key could not be read: the job is blocked, the poller skips it.
    blocked: bool = False


#: Takes a rate-limit token for one status request: 0.0 when taken, else seconds until one is due.
TakeToken = Callable[[], float]


def check_floor_in(settings: Settings, age_s: float, status: str = "") -> float:
    """Seconds until a batch at Attentive for ``age_s`` is worth checking again, however many
    batches are out: a quarter of its age, between ``ATTENTIVE_FIRST_POLL_SECONDS`` and
    ``ATTENTIVE_POLL_CAP_SECONDS``, and at least :data:`NEEDS_REVIEW_CHECK_SECONDS` for a job
    parked for review. No jitter: the floor a check may be brought forward to."""
    wait = min(max(age_s * AGE_FACTOR, settings.first_poll_seconds), settings.poll_cap_seconds)
    if status == "NEEDS_REVIEW":
        wait = max(wait, NEEDS_REVIEW_CHECK_SECONDS)
    return wait


def next_check_in(
    settings: Settings, age_s: float, at_attentive: int, sends_waiting: bool, status: str = ""
) -> float:
    """Seconds until a batch at Attentive for ``age_s`` is checked again.

    Its :func:`check_floor_in`, but never sooner than spreading all ``at_attentive`` batches of the
    key over its poll share allows: total status traffic stays inside the share however many
    batches are outstanding (at the default 9 checks/s, 39,000 batches are each checked about every
    72 minutes). With nothing waiting to be sent the spread is over :data:`SPARE_SHARE`, and the
    poller may bring a check forward to its floor when requests are spare
    (:func:`worker.pipeline.buffer.pull_checks_forward`).
    """
    share = settings.poll_share if sends_waiting else SPARE_SHARE
    spread = at_attentive / (settings.rate_limit_per_second * share)
    wait = max(check_floor_in(settings, age_s, status), spread)
    return wait * random.uniform(*POLL_JITTER)


def check_batch(
    rt: Runtime,
    job: ExportJob,
    batch_id: int,
    take_token: TakeToken,
    limiter: RateLimiter,
    at_attentive: int,
    sends_waiting: bool,
) -> Check:
    """Check the batch's unfinished Attentive jobs once (one token each); settle the batch once all
    have finished, else set when it is checked next."""
    buffer = JobBuffer(rt.redis, job.id, job.config.batch_size)
    batch = buffer.batch(batch_id)
    if batch.get("state") != "submitted":
        buffer.schedule_check(batch_id, now_ms())  # drops it from the schedule (it is not at Attentive)
        return Check(done=True)
    status_key = keys.job_status(job.id)
    statuses: list[str] = []
    next_due: list[int] = []  # holds of "unknown:" sends still running
    fresh: dict[str, str] | None = None  # the batch as the last step's own write left it
    try:
        client = rt.client_for(job)
        for sub in _unfinished(batch):
            fresh = None
            if sub["id"].startswith(UNKNOWN_PREFIX):
                # A send whose answer never came: nothing to ask Attentive, only a hold to sit out.
                until = int(sub.get("until") or 0)
                if now_ms() >= until:
                    buffer.end_job(batch_id, sub["id"], "no answer to the send; its hold has passed")
                else:
                    next_due.append(until)
                continue
            wait = take_token()
            if wait > 0:
                buffer.schedule_check(batch_id, now_ms() + int(wait * 1000))
                return Check(done=False, statuses=tuple(statuses), stop_for=wait, no_token=not statuses)
            try:
                st = client.job_status(sub["id"])
            except NotFound:
                _job_failed(
                    rt, buffer, batch_id, job.id, sub["id"], f"Attentive has no job {sub['id']} (404): lost"
                )
                continue
            state = st.normalized_status
            statuses.append(state)
            running = state not in ("COMPLETED", "FAILED", "CANCELLED")
            # This check's writes go in one round trip (no MULTI: the streak is another slot's key).
            with rt.redis.pipeline(transaction=False) as pipe:
                limiter.note_success(pipe)
                # Every status, terminal ones too: status must not keep showing IN_PROGRESS/NEEDS_REVIEW
                # for a job whose batches have all completed since. The time shows an earlier poll
                # error as recovered (worker.store.joberrors.error_recovered).
                pipe.hset(status_key, mapping={"last_attentive_status": state, "last_poll_at": now_ms()})
                if running:
                    batch_key = keys.batch(job.id, batch_id)
                    # Still running at this moment: a lower bound on its time (_note_job_time).
                    pipe.hset(batch_key, f"{SEEN_RUNNING}{sub['id']}", now_ms())
                    if not st.is_known_status or state == "NEEDS_REVIEW":
                        pipe.hincrby(status_key, f"polls_{state.lower()[:32]}", 1)
                    pipe.hgetall(batch_key)  # the fresh read below, in this round trip
                replies = pipe.execute()
            if running:
                fresh = decode_hash(replies[-1])
            if state == "COMPLETED":
                fresh = _settle_results(rt, job, buffer, batch_id, batch, sub, client, st.url)
                _note_job_time(rt, job.id, batch, sub["id"])
            elif state in ("FAILED", "CANCELLED"):
                _job_failed(
                    rt, buffer, batch_id, job.id, sub["id"], f"Attentive job {sub['id']} ended {state}"
                )
            elif not st.is_known_status or state == "NEEDS_REVIEW":
                log.warning(
                    "job %s batch %s: Attentive job %s status %s",
                    job.id,
                    batch_id,
                    sub["id"],
                    state,
                    extra={"job_id": job.id, "batch_id": batch_id, "attentive_job_id": sub["id"]},
                )
    except KEY_UNREADABLE as exc:  # deleted or saved with another key: blocked, tried every minute
        block_for_key(rt, job, exc)
        return Check(done=False, statuses=tuple(statuses), blocked=True)
    except (Unauthorized, Forbidden) as exc:
        pause_for_auth_error(rt, job, exc)
        return Check(done=False, statuses=tuple(statuses))  # paused: the poller skips the job
    except RateLimited as exc:
        delay = hold_off_after_429(rt, limiter, job.id, exc)
        buffer.schedule_check(batch_id, now_ms() + int(delay * 1000))
        return Check(done=False, statuses=tuple(statuses), stop_for=delay)
    except AttentiveError as exc:
        note_error(rt.redis, job.id, f"poll: {type(exc).__name__}: {exc.message}")
        statuses.append("ERROR")

    # Read again: a send that outlived its lease may have recorded one more job meanwhile. The last
    # job's check read it already, after its own writes, when nothing of ours came after them.
    if fresh is None:
        fresh = buffer.batch(batch_id)
    if fresh.get("state") != "submitted":
        return Check(done=True, statuses=tuple(statuses))  # settled meanwhile
    unfinished = _unfinished(fresh)
    if unfinished or "ERROR" in statuses:
        now = now_ms()
        age_s = (now - int(fresh.get("submitted_at") or now)) / 1000
        review = "NEEDS_REVIEW" if "NEEDS_REVIEW" in statuses else ""
        due = now + int(1000 * next_check_in(rt.settings, age_s, at_attentive, sends_waiting, review))
        floor: int | None = now + int(1000 * check_floor_in(rt.settings, age_s, review) * POLL_JITTER[0])
        if next_due and len(next_due) == len(unfinished):
            due = max(next_due)  # only holds left: nothing to ask Attentive until the last one ends
            floor = None
        buffer.schedule_check(batch_id, due, floor)
        return Check(done=False, statuses=tuple(statuses))
    return _finish(rt, job, buffer, batch_id, fresh, tuple(statuses))


#: Id prefix of a recorded send whose answer never came (worker.pipeline.flush).
UNKNOWN_PREFIX = "unknown:"


def _unfinished(batch: dict[str, str]) -> list[dict[str, Any]]:
    """The batch's recorded Attentive jobs that have neither completed nor ended."""
    subs: list[dict[str, Any]] = orjson.loads(batch.get("attentive_jobs") or "[]")
    return [s for s in subs if f"done:{s['id']}" not in batch and f"ended:{s['id']}" not in batch]


def _finish(
    rt: Runtime,
    job: ExportJob,
    buffer: JobBuffer,
    batch_id: int,
    batch: dict[str, str],
    statuses: tuple[str, ...],
) -> Check:
    """Every recorded job has finished: complete the batch, or send its open users again (a job
    failed or was lost, a send's answer never came, a split stopped half way), or give them up
    after :data:`MAX_SEND_ATTEMPTS` failed jobs."""
    users: list[str] = orjson.loads(batch["users"])
    settled = set(orjson.loads(batch.get("settled") or "[]"))
    open_users = [u for i, u in enumerate(users) if i not in settled]
    if not open_users:
        # Summed over every send of the batch: a re-send carries only the users earlier sends left open.
        delivered = sum(int(v) for k, v in batch.items() if k.startswith("done:"))
        refused = sum(int(v) for k, v in batch.items() if k.startswith("failed:"))
        buffer.complete(
            batch_id, {"batches_completed": 1, "users_delivered": delivered, "record_failures": refused}
        )
        deliveries.note(rt.redis, job.id, batch_id, batch, now_ms())  # bounded, for `trace`
        return Check(done=True, statuses=statuses)
    attempts = int(batch.get("attempts") or 0)
    reason = batch.get("last_error") or "users left open by an earlier send"
    if attempts < MAX_SEND_ATTEMPTS:
        if buffer.resend(batch_id, reason):
            rt.dispatch.flush(job.id)
        return Check(done=True, statuses=statuses)
    try:
        records, stamps = buffer.records_for(batch_id, open_users)
    except LookupError:
        return Check(done=True)  # completed meanwhile by a twin poll: nothing left to give up on
    why = f"{reason}; gave up after {attempts} failed sends"
    deadletters.record(
        rt.redis,
        job.id,
        batch_id,
        ((u, why, rec) for u, rec in zip(open_users, records, strict=True)),
        stamps=stamps,
    )
    buffer.complete(batch_id, {"batches_deadlettered": 1})
    return Check(done=True, statuses=statuses)


def _job_failed(rt: Runtime, buffer: JobBuffer, batch_id: int, job_id: str, sub_id: str, reason: str) -> None:
    """An Attentive job ended without delivering (FAILED, CANCELLED, 404): counts as a failed send once."""
    if buffer.end_job(batch_id, sub_id, reason, failed=True):
        note_error(rt.redis, job_id, reason)


#: Batch hash field prefix: when a check last saw that Attentive job still running (ms).
SEEN_RUNNING = "seen_running:"


def _note_job_time(rt: Runtime, job_id: str, batch: dict[str, str], attentive_job: str) -> None:
    """Keep the longest time an Attentive job is known to have run (from its batch's submission to
    the last check that saw it running): it sizes the hold after a send whose answer never came
    (worker.pipeline.flush), with a factor of two on top.

    A lower bound, not the time the completion was seen: while sends use the budget, checks wait
    (the poll share), and measuring to the completed check made that wait look like job time,
    which doubled into the hold, which kept users held longer, which delayed checks further."""
    seen = batch.get(f"{SEEN_RUNNING}{attentive_job}")
    if seen is None:
        return  # completed at its first check: no evidence it ran long
    took = int(seen) - int(batch.get("submitted_at") or seen)
    key = keys.job_status(job_id)
    if took > int(rt.redis.hget(key, "longest_attentive_job_ms") or 0):
        rt.redis.hset(key, "longest_attentive_job_ms", took)


def _settle_results(
    rt: Runtime,
    job: ExportJob,
    buffer: JobBuffer,
    batch_id: int,
    batch: dict[str, str],
    sub: dict[str, Any],
    client: Any,
    url: str | None,
) -> dict[str, str] | None:
    """Read one finished Attentive job's results and dead-letter the records it refused (once).

    Returns the batch as it stands right after this settlement (read in the same transaction), or
    None when it settled nothing (a twin did, or the batch moved on meanwhile)."""
    idx: list[int] = sub["idx"]
    failures: dict[int, str] = {}
    unreadable = 0
    if url:
        # Lines that plainly report a 2xx (most of them) are skipped, read only as far as it takes
        # to be sure they can neither fail a record nor be unreadable.
        for line in client.iter_results(url).skipping_plain_successes():
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
            state, done, settled_json = pipe.hmget(batch_key, ["state", done_field, "settled"])
            if state not in (b"submitted", "submitted") or done is not None:
                return None
            # Records are read only to dead-letter them. A batch completing meanwhile deletes its
            # entries and changes the watched hash, so a miss here means a twin settled it.
            records, stamps = buffer.records_for(batch_id, [users[i] for i in failures])
            entries = [
                (users[i], reason, rec) for (i, reason), rec in zip(failures.items(), records, strict=True)
            ]
            settled = set(orjson.loads(settled_json or "[]")).union(idx)
            pipe.multi()
            pipe.hset(
                batch_key,
                mapping={
                    done_field: len(idx) - len(failures),
                    f"failed:{sub['id']}": len(failures),
                    "settled": orjson.dumps(sorted(settled)),
                },
            )
            deadletters.queue(pipe, job.id, batch_id, entries, stamps=stamps)
            if failures:
                sample = [f"{users[i]}: {reason}" for i, reason in list(failures.items())[:FAILURE_SAMPLE]]
                pipe.hset(keys.job_status(job.id), "last_record_failures", json.dumps(sample))
            pipe.hgetall(batch_key)  # the caller's fresh read, in the same round trip
            return decode_hash(pipe.execute()[-1])
        except (redis.WatchError, LookupError):
            return None  # the batch changed meanwhile (a twin settled it): the caller re-checks and re-polls
