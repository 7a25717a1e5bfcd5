"""Sweep: the periodic safety net that makes time-based flushing and crash recovery happen.

Run by Celery beat every second or so (one beat per deployment). For every active job it seals
buffers older than the job's flush interval, gives expired flush leases back to the queue, and
dispatches flushes for batches nobody is sending; for every API key with a status check due and no
poller running it queues one (worker/pipeline/poller.py).
It also re-drives inbox chunks whose ingest task was lost and backfill parts that stopped making
progress (:func:`worker.backfill.steps.redrive_stalled`). Every step is idempotent; one sweep runs at a
time (a short redis-py lock), and a job whose step fails is logged and shown in its status without
stopping the others.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import redis
from kombu.exceptions import OperationalError
from redis.exceptions import LockError

from worker.pipeline import inbox
from worker.pipeline.buffer import JobBuffer, now_ms
from worker.pipeline.poller import request_pollers
from worker.runtime import REDIS_DOWN, Runtime
from worker.setup.jobs import ExportJob
from worker.store import keys
from worker.store.joberrors import BLOCKED_RETRY_AT, note_error

log = logging.getLogger(__name__)

#: A job with sealed batches and no claim for this long gets a flush dispatched.
IDLE_FLUSH_MS = 5_000
#: Longest a sweep holds the lock that keeps two from running at once (one normally takes milliseconds).
SWEEP_LOCK_SECONDS = 10.0


@dataclass
class SweepReport:
    sealed: dict[str, list[int]] = field(default_factory=dict)
    requeued: int = 0
    pollers: int = 0
    flushes: int = 0
    chunks_redriven: int = 0
    backfills_redriven: int = 0
    #: jobs whose step raised (logged, and shown as the job's last_error)
    failed: list[str] = field(default_factory=list)
    #: another sweep was running: this one did nothing
    skipped: bool = False


def sweep(rt: Runtime, redrive_backfills: Callable[[int], int] = lambda _now: 0) -> SweepReport:
    """One pass over every active job; skipped (``report.skipped``) while another sweep runs.

    ``redrive_backfills(now)`` runs under the same one-at-a-time lock and returns how many backfill
    steps it re-drove; the sweep task passes :func:`worker.backfill.steps.redrive_stalled` (backfill
    builds on the pipeline, so the pipeline cannot import it).
    """
    report = SweepReport()
    # Sweeps queued while the workers were busy can start together: two would both release and
    # re-drive the same polls.
    lock = rt.redis.lock(keys.sweep_lock(), timeout=SWEEP_LOCK_SECONDS, blocking=False)
    if not lock.acquire():
        report.skipped = True
        return report
    try:
        _sweep_all(rt, now_ms(), report, redrive_backfills)
    finally:
        # LockError: it expired (a very slow sweep) and another may hold it now; that one releases it.
        with contextlib.suppress(LockError):
            lock.release()
    return report


def _sweep_all(rt: Runtime, now: int, report: SweepReport, redrive_backfills: Callable[[int], int]) -> None:
    active = rt.jobs.active()
    for job in active:
        try:
            _sweep_job(rt, job, now, report)
        except (*REDIS_DOWN, OperationalError):
            raise  # Redis or the broker is down for every job: this sweep fails, beat runs the next
        except Exception as exc:  # one job's broken authorization, say, must not stall the others
            log.exception("sweep: job %s failed", job.id, extra={"job_id": job.id})
            report.failed.append(job.id)
            with contextlib.suppress(redis.exceptions.RedisError):
                note_error(rt.redis, job.id, f"sweep: {type(exc).__name__}: {exc}")
    report.pollers = request_pollers(rt, active, now)
    orphans = inbox.orphaned_chunks(rt.redis, now)
    if orphans:
        # One drain takes them all (and whatever else is pending), not a task per chunk: chunks
        # left for a minute mean ingest is behind, and a task each would only add to its work.
        inbox.request_drain(rt.redis, rt.dispatch, countdown=0.0)
        report.chunks_redriven = len(orphans)
    report.backfills_redriven = redrive_backfills(now)


def _sweep_job(rt: Runtime, job: ExportJob, now: int, report: SweepReport) -> None:
    buffer = JobBuffer(rt.redis, job.id, job.config.batch_size)
    sealed = buffer.seal_due(job.config.flush_interval_seconds * 1000, now=now)
    if sealed:
        report.sealed[job.id] = sealed
    waiting = buffer.sealed_count() if job.sending else 0
    requeued = buffer.reap(now=now)
    report.requeued += requeued
    if not job.sending:
        return
    raw_claim, raw_retry = rt.redis.hmget(keys.job_status(job.id), ["last_claim_at", BLOCKED_RETRY_AT])
    if raw_retry is not None and now < int(raw_retry):
        return  # its API key cannot be read (status says why): a flush goes when the next try is due
    last_claim = int(raw_claim or 0)
    # (Batches the reap requeued are counted by ``requeued``, not in ``waiting``.)
    if sealed or requeued or (waiting and now - last_claim > IDLE_FLUSH_MS):
        rt.dispatch.flush(job.id)
        report.flushes += 1
