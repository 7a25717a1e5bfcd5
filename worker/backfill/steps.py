"""The one-time backfill of Existing Users, as small resumable steps of the ``export.backfill`` task.

A backfill is a set of *parts* per job: one per audience with a Lytics segment in the job's
``backfill`` section (scanned page by page), plus ``@file`` for members loaded from a file with
``attentive-export backfill``. Each part's progress lives in a Redis hash (scan token, pages,
members, finished, last error), so any worker can continue it (DESIGN.md invariant 7) and task
arguments stay ids: ``export.backfill(job_id, part)`` (invariant 5).

The same machinery sends an audience's current members when a job changes (``jobs update``,
``jobs resync``, ``jobs stop --teardown``, see :mod:`worker.backfill.ops`): part ``<slug>`` sends
them as enters (a backfill, or a resync), part ``teardown:<slug>`` as exits (``<slug>: false``),
from a Lytics segment scan or from a member file stored as chunks with the part (kind ``chunks``).
A part records its own audience, event, source and ``run`` (a new id each time the part is
restarted or cancelled: a step still finishing a page of the previous run saves nothing).
The work a change needs is first written into the job record (``pending_ops``) together with the
change itself, then turned into parts here (:func:`activate_pending`); the special part ``@ops`` in
the re-drive schedule finishes that if the process writing the change died, and ``@stop`` ends a
stopping job once its teardown reached Attentive.

Why it is correct to replay and to mix with real-time changes:

* Every backfilled member becomes an *enter* transition at one fixed time, the backfill's start
  (``at_ms``), and goes through the normal mapping and buffer. Last-writer-wins by event time
  (``buffer.lua``) then decides: a real-time exit after the start has a later time and wins,
  whether it arrives before or after the backfill page; a replayed page (a worker killed after
  buffering but before saving its token) ties with itself and is dropped as stale. Resyncs and
  teardowns are the same: every change they make carries the time the part started, which is
  taken after the configuration change was written, so any real-time change newer than that wins.
* A step buffers a page *then* saves the next token and counters in one MULTI, so a crash redoes
  at most that page, and counters never count it twice.
* One task at a time works on a part (a Redis lock with a timeout); a duplicate task just exits.
  A part whose task was lost is re-driven by the sweep once its ``due`` time passes without progress.

Backfilled transitions go to this job only (not to other jobs exporting the same audience): they
describe the job's start, not a change at the source. A teardown's exits reach the job although
the audience is no longer routed to it (it was removed, or the job is stopping): they are the
job's own doing, not routing.

A file (``@file``) is streamed, never staged whole (DESIGN.md invariant 8): the command reads it
through once writing nothing (a bad file changes nothing), then again writing chunks the steps take
at once, waiting while ``BACKFILL_FILE_MAX_STAGED_LINES`` of the job's lines are in Redis. Its
producer mark keeps the part from finishing meanwhile; if the command dies, the mark expires and
the part finishes with what arrived, recording how far it got (:func:`enqueue_file`).

When every part is finished, a job still in ``backfilling`` becomes ``running``. A job paused
meanwhile (for example by a refused Attentive key) keeps buffering its backfill like any other
change and stays paused until an operator resumes it (:func:`resume`): back to ``backfilling``
while a part is unfinished, else ``running``.
"""

from __future__ import annotations

import builtins
import contextlib
import datetime as dt
import os
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, cast

import orjson
import redis
from redis.exceptions import LockError, WatchError

from worker import jsonio, shutdown
from worker.clients.lytics import (
    LyticsClient,
    LyticsError,
    LyticsRateLimited,
    LyticsRetryable,
)
from worker.dispatch import Dispatcher
from worker.mapping import transitions
from worker.pipeline.buffer import JobBuffer, now_ms
from worker.pipeline.ingest import ingest_lines
from worker.setup.jobconfig import MAX_SCAN_PAGE_SIZE, JobState
from worker.setup.jobs import (
    SWEPT_STATES,
    ExportJob,
    JobNotFound,
    JobStateError,
    JobStore,
    transition_problem,
)
from worker.store import keys
from worker.store.replies import decode_hash, text

#: The part holding file backfills (not a valid audience slug, so it cannot collide with one).
FILE_PART = "@file"
#: Not parts but entries of the re-drive schedule: turn a job's pending operations into parts, and
#: stop a stopping job once its teardown is delivered.
OPS_PART = "@ops"
STOP_PART = "@stop"
#: Teardown parts are named ``teardown:<slug>`` (``:`` is never in a slug).
TEARDOWN_PREFIX = "teardown:"
#: Part kinds: a Lytics segment scan, the ``@file`` queue, a member file stored with the part.
LYTICS = "lytics"
FILE = "file"
CHUNKS = "chunks"
ENTER = "enter"
EXIT = "exit"
#: Why a part sends members (shown in status): the first backfill, a resync, a teardown.
BACKFILL_OP = "backfill"
RESYNC_OP = "resync"
TEARDOWN_OP = "teardown"
#: States in which parts make progress: routed ones, and stopping (its teardown).
STEP_STATES = SWEPT_STATES

#: A step stops after this many pages (or file chunks) or this many seconds, whichever comes first,
#: so a worker is never held for long and progress is saved often.
PAGES_PER_STEP = 5
STEP_SECONDS = 10.0
#: Lock on a part while a step runs; above the worst step (STEP_SECONDS plus a page's retries).
LOCK_SECONDS = 180
#: A part with no progress this long after its last step is re-driven by the sweep.
STALL_MS = 240_000
#: After a transient Lytics failure (5xx, 429, timeout) outlasting the client's retries.
RETRY_SECONDS = 30.0
#: After an error an operator must fix (401/403, unknown segment, missing token): retry this rarely.
HALT_RETRY_MS = 600_000
#: Lines per file-backfill chunk (one step ingests up to PAGES_PER_STEP chunks).
FILE_CHUNK_LINES = 1000
#: A file stream's producer mark lives this long unless renewed: the command renews it with every
#: chunk and every PRODUCER_RENEW_SECONDS while it waits, so a command that died lets its part
#: finish this long after.
PRODUCER_TTL_SECONDS = 30.0
PRODUCER_RENEW_SECONDS = 5.0
#: How often a command waiting for room looks whether the backfill took enough of its lines.
PRODUCER_POLL_SECONDS = 0.25
#: A step that took every staged chunk while the command still streams looks again after this.
PRODUCER_WAIT_SECONDS = 1.0
#: How often a stopping job checks whether its teardown reached Attentive.
STOP_CHECK_SECONDS = 2.0
#: A change's pending operations are turned into parts by the process that wrote it; if it died,
#: the sweep does it this long after.
OPS_GRACE_MS = 10_000
#: Entries of the pre-cluster shared re-drive schedule each sweep moves to their jobs' own.
LEGACY_DUE_STEP = 1000

LyticsFactory = Callable[[str], LyticsClient]


@dataclass
class StepReport:
    """What one step did and what should happen next."""

    pages: int = 0
    members: int = 0
    #: Batches sealed while buffering (each wants a flush).
    sealed: int = 0
    finished: bool = False
    #: Run the next step after this many seconds; None: do not (finished, locked, or halted).
    next_in: float | None = None
    #: Why the step did nothing, if it did nothing.
    skipped: str = ""
    error: str = ""


class FileBackfillError(ValueError):
    """A backfill file cannot be used as given; ``str(exc)`` names the line and the fix."""


class _PartRouter(JobStore):
    """Routes a part's transitions to its own job only: backfilled members belong to that job.

    Enters (and the ``@file`` part's lines) reach the job only while it takes changes for the
    audience, exactly like real-time ones; a teardown's exits reach it for its one audience even
    though that audience was removed or the job is stopping.
    """

    def __init__(self, client: redis.Redis, job_id: str, audience: str | None, teardown: bool) -> None:
        super().__init__(client)
        self._only = job_id
        self._audience = audience
        self._teardown = teardown

    def routes(self, audience: str) -> builtins.list[ExportJob]:
        if self._audience is not None and audience != self._audience:
            return []
        job = self._cache.get(self._only)
        if job is None:
            return []
        if self._teardown:
            return [job] if job.state in STEP_STATES else []
        return [job] if job.routed and audience in job.config.audiences else []


def teardown_part(audience: str) -> str:
    return TEARDOWN_PREFIX + audience


def part_audience(part: str, state: dict[str, str]) -> str | None:
    """The audience a part sends (None for ``@file``, whose lines name their own)."""
    if part == FILE_PART:
        return None
    return state.get("audience") or part.removeprefix(TEARDOWN_PREFIX)


def part_event(part: str, state: dict[str, str]) -> str:
    return state.get("event") or (EXIT if part.startswith(TEARDOWN_PREFIX) else ENTER)


def chunk_id(run: str, index: int) -> str:
    """The id of a member file's ``index``-th chunk, stored with the part run ``run``."""
    return f"{run}.{index}"


# --- starting -----------------------------------------------------------------------------------------
def lytics_parts(job: ExportJob) -> list[str]:
    """Audiences of the job that a Lytics scan backfills (in the job's order)."""
    cfg = job.config.backfill
    if not job.config.existing_users or cfg is None:
        return []
    return [a for a in job.config.audiences if a in cfg.lytics_segments]


def start(
    client: redis.Redis, jobs: JobStore, job_id: str, dispatcher: Dispatcher, now: int | None = None
) -> list[str]:
    """Start a created job: record a Lytics backfill run and go ``backfilling``, or go ``running``.

    Returns the parts started (empty when the job has nothing to scan, then it is simply running).
    A job whose backfill was already started keeps its run (starting twice does not rescan).
    """
    job = jobs.get(job_id)
    if client.exists(keys.backfill_parts(job_id)):
        # Recorded before (maybe by a process that died before switching the state): finish the
        # switch; the sweep re-drives the parts from their saved cursors.
        jobs.set_state_if(job_id, JobState.BACKFILLING, {JobState.CREATED})
        return []
    parts = lytics_parts(job)
    if not parts:
        jobs.set_state(job_id, JobState.RUNNING)
        return []
    at = now if now is not None else now_ms()
    cfg = job.config.backfill
    assert cfg is not None  # lytics_parts is empty otherwise
    pipe = client.pipeline(transaction=True)
    for part in parts:
        pipe.hset(
            keys.backfill_part(job_id, part),
            mapping={
                "kind": LYTICS,
                "event": ENTER,
                "op": BACKFILL_OP,
                "audience": part,
                "run": secrets.token_hex(6),
                "segment": cfg.lytics_segments[part],
                "at_ms": at,
                "started_at_ms": at,
                "updated_at_ms": at,
                "next": "",
                "pages": 0,
                "members": 0,
                "finished": 0,
            },
        )
        pipe.sadd(keys.backfill_parts(job_id), part)
        pipe.zadd(keys.backfill_due(job_id), {part: at + STALL_MS})
    pipe.execute()
    jobs.set_state(job_id, JobState.BACKFILLING)
    for part in parts:
        dispatcher.backfill(job_id, part)
    return parts


def unfinished_parts(client: redis.Redis, job_id: str) -> list[str]:
    """The job's backfill parts not finished yet (sorted)."""
    parts = sorted(text(p) for p in client.smembers(keys.backfill_parts(job_id)))
    pipe = client.pipeline(transaction=False)
    for part in parts:
        pipe.hget(keys.backfill_part(job_id, part), "finished")
    return [p for p, f in zip(parts, pipe.execute(), strict=True) if text(f or b"0") != "1"]


def resume(
    client: redis.Redis, jobs: JobStore, job_id: str, dispatcher: Dispatcher, now: int | None = None
) -> list[str]:
    """Resume a job: start it if created; else back to ``backfilling`` while its backfill is
    unfinished (its parts re-driven now, not when the sweep next finds them due), else ``running``.

    Returns the parts started or re-driven. A paused job kept buffering its backfill, but a part
    may be waiting out an error (a refused token, a missing variable) that the operator has just
    fixed, so every unfinished part gets a step at once. A stopped job raises
    :class:`~worker.setup.jobs.JobStateError` before anything is dispatched.
    """
    job = jobs.get(job_id)
    if job.state is JobState.CREATED:
        return start(client, jobs, job_id, dispatcher, now)
    if job.state is JobState.STOPPED:
        raise JobStateError(transition_problem(job.id, job.state, JobState.RUNNING) or "stopped")
    if job.stop_after_teardown:
        # Paused while stopping: back to stopping (its teardown goes on), never to running.
        jobs.set_state(job_id, JobState.STOPPING)
        return redrive(client, jobs, job_id, dispatcher, now)
    activate_pending(client, jobs, job_id, dispatcher)
    parts = unfinished_parts(client, job_id)
    jobs.set_state(job_id, JobState.BACKFILLING if parts else JobState.RUNNING)
    if not parts:
        return []
    return redrive(client, jobs, job_id, dispatcher, now)


def redrive(
    client: redis.Redis,
    jobs: JobStore,
    job_id: str,
    dispatcher: Dispatcher,
    now: int | None = None,
    errored_only: bool = False,
) -> list[str]:
    """Give every unfinished part of the job a step now (``jobs backfill --retry-now``, resume):
    a part waiting out an error an operator has just fixed tries again at once.

    Pending operations of a change are turned into parts first; a stopping job gets its stop
    check too. Returns the parts re-driven.
    """
    activate_pending(client, jobs, job_id, dispatcher)
    parts = unfinished_parts(client, job_id)
    if errored_only:  # (only those waiting out an error)
        parts = [p for p in parts if client.hexists(keys.backfill_part(job_id, p), "last_error")]
    at = now if now is not None else now_ms()
    due = {part: at + STALL_MS for part in parts}
    stopping = jobs.get(job_id).state is JobState.STOPPING
    if stopping:
        due[STOP_PART] = at + STALL_MS
    if due:
        client.zadd(keys.backfill_due(job_id), due)
    for part in parts:
        # A part that finished since it was read: its step finds it finished and moves the job on.
        dispatcher.backfill(job_id, part)
    if stopping:
        dispatcher.backfill(job_id, STOP_PART)
    return parts


# --- one step -------------------------------------------------------------------------------------------
#: While a job has more users than these queued to send (sealed batches) or held behind unfinished
#: Attentive jobs, backfill steps wait this long and look again: real-time changes keep flowing
#: (they queue behind at most the sealed cap, a few seconds of sending) and Redis holds a bounded
#: backlog however large the segment.
BACKLOG_WAIT_SECONDS = 1.0
#: Users held behind unfinished Attentive jobs above which backfill steps wait (memory bound).
MAX_HELD_USERS = 1_000_000


def run_step(
    client: redis.Redis,
    job_id: str,
    part: str,
    lytics: LyticsFactory | None = None,
    max_queued_users: int | None = None,
) -> StepReport:
    """Advance one backfill part by a few pages (or file chunks); safe to run twice at once or again.

    ``max_queued_users`` (``BACKFILL_MAX_QUEUED_USERS``): the step waits (``report.next_in``) while
    the job's sealed batches carry more users than this, or more than :data:`MAX_HELD_USERS` are
    held; None: no limit. ``part`` may also be :data:`OPS_PART` (turn the job's pending operations
    into parts) or :data:`STOP_PART` (stop a stopping job once its teardown is delivered)."""
    report = StepReport()
    jobs = JobStore(client)
    try:
        job = jobs.get(job_id)
    except JobNotFound:
        client.zrem(keys.backfill_due(job_id), part)
        report.skipped = "job deleted"
        return report
    if part == OPS_PART:
        activate_pending(client, jobs, job_id)
        report.skipped = "pending operations turned into parts"
        return report
    if part == STOP_PART:
        _stop_step(client, jobs, job, report)
        return report
    state = decode_hash(client.hgetall(keys.backfill_part(job_id, part)))
    if not state:
        client.zrem(keys.backfill_due(job_id), part)
        report.skipped = "no such backfill part"
        return report
    if state.get("finished") == "1":
        client.zrem(keys.backfill_due(job_id), part)
        report.finished = True
        report.skipped = "already finished"
        maybe_running(client, jobs, job_id)
        return report
    if job.state is JobState.STOPPED:
        _record_error(client, job_id, part, "the job was stopped; backfill abandoned", due_in_ms=None)
        report.skipped = "job stopped"
        return report
    if job.state not in STEP_STATES:
        # Not started yet: its transitions would be unroutable. The sweep tries again later.
        report.skipped = f"job is {job.state}"
        return report
    audience = part_audience(part, state)
    if part_event(part, state) == ENTER:
        reason = ""
        if job.stop_after_teardown:
            reason = "the job is stopping: only its teardown is sent"
        elif audience is not None and audience not in job.config.audiences:
            reason = f"audience {audience!r} was removed from the job"
        if reason:
            cancel_part(client, job_id, part, reason)
            report.finished = True
            report.skipped = reason
            maybe_running(client, jobs, job_id)
            return report

    def backlog_full() -> bool:
        """Checked before every page, so a step never queues more than one page past the cap."""
        if max_queued_users is None or not _backlog_full(client, job, max_queued_users):
            return False
        client.hincrby(keys.job_status(job_id), "backfill_waits_for_backlog", 1)
        report.skipped = "waiting for the job's backlog to drain"
        report.next_in = BACKLOG_WAIT_SECONDS
        return True

    if backlog_full():
        return report
    lock = client.lock(keys.backfill_lock(job_id, part), timeout=LOCK_SECONDS, blocking=False)
    if not lock.acquire():
        report.skipped = "another task is working on this part"
        return report
    try:
        # Read again under the lock: a restart or a cancel may have come since.
        state = decode_hash(client.hgetall(keys.backfill_part(job_id, part)))
        if not state or state.get("finished") == "1":
            report.skipped = "finished or restarted meanwhile"
        elif state.get("kind") == FILE:
            _file_step(client, job_id, part, report, backlog_full)
        elif state.get("kind") == CHUNKS:
            _chunks_step(client, job, part, state, report, backlog_full)
        else:
            _scan_step(client, job, part, state, report, lytics or LyticsClient, backlog_full)
    finally:
        # LockError: it expired (a very slow step); whoever holds it now carries on.
        with contextlib.suppress(LockError):
            lock.release()
    if report.finished:
        maybe_running(client, jobs, job_id)
    return report


def _handing_over(report: StepReport) -> bool:
    """This worker is stopping (worker/shutdown.py): end the step after the page in hand, with the
    part due again at once, so a worker that is not stopping takes it and the pod's grace period
    is not spent on pages it could hand over."""
    if not shutdown.requested():
        return False
    report.skipped = "worker shutting down; the part goes on in another worker"
    report.next_in = 0.0
    return True


def _scan_settings(job: ExportJob, state: dict[str, str]) -> tuple[str, int]:
    """The Lytics token variable and page size: the job's current ``backfill`` section (so an update
    fixing ``lytics_token_env`` applies to every part), else what the part recorded (a teardown of
    the job's last scanned audience outlives the section)."""
    cfg = job.config.backfill
    if cfg is not None:
        return cfg.lytics_token_env, cfg.page_size
    return state.get("token_env") or "LYTICS_API_TOKEN", int(state.get("page_size") or MAX_SCAN_PAGE_SIZE)


def _scan_step(
    client: redis.Redis,
    job: ExportJob,
    part: str,
    state: dict[str, str],
    report: StepReport,
    lytics: LyticsFactory,
    backlog_full: Callable[[], bool],
) -> None:
    audience = part_audience(part, state) or part
    cfg = job.config.backfill
    # The segment the part started with (a part of an older release recorded it too).
    segment = state.get("segment") or (cfg.lytics_segments.get(audience) if cfg is not None else None)
    if not segment:
        _halt(
            client, job.id, part, report, f"audience {audience!r} has no Lytics segment in the job's backfill"
        )
        return
    token_env, page_size = _scan_settings(job, state)
    token = os.environ.get(token_env, "").strip()
    if not token:
        _halt(
            client,
            job.id,
            part,
            report,
            f"environment variable {token_env} (the Lytics API token) is not set on the worker",
        )
        return
    at_ms = int(state["at_ms"])
    event = part_event(part, state)
    run = state.get("run", "")
    next_token = state.get("next") or None
    deadline = time.monotonic() + STEP_SECONDS
    router = _PartRouter(client, job.id, audience, teardown=event == EXIT)
    with lytics(token) as scanner:
        for _ in range(PAGES_PER_STEP):
            if report.pages and (backlog_full() or _handing_over(report)):
                return
            try:
                page = scanner.scan_page(segment, next_token, page_size)
            except LyticsRetryable as exc:
                wait = RETRY_SECONDS
                if isinstance(exc, LyticsRateLimited) and exc.retry_after is not None:
                    wait = max(wait, exc.retry_after)
                _record_error(client, job.id, part, str(exc), due_in_ms=int(wait * 1000) + STALL_MS)
                report.error, report.next_in = str(exc), wait
                return
            except LyticsError as exc:  # 401/403, unknown segment, unreadable answer
                _halt(client, job.id, part, report, str(exc))
                return
            lines = [
                orjson.dumps({"audience": audience, "event": event, "at": at_ms, "user": member})
                for member in page.members
            ]
            ingested = ingest_lines(client, router, lines)
            report.sealed += len(ingested.sealed.get(job.id, []))
            report.pages += 1
            report.members += len(lines)
            if not _save_page(
                client, job.id, part, page.next_token, len(lines), page.total, page.last, run=run
            ):
                report.skipped = "the part was restarted or cancelled meanwhile"
                return
            if page.last:
                report.finished = True
                return
            next_token = page.next_token
            if time.monotonic() > deadline:
                break
    report.next_in = 0.0


def _save_page(
    client: redis.Redis,
    job_id: str,
    part: str,
    next_token: str,
    members: int,
    total: int | None,
    last: bool,
    run: str = "",
    consumed: str | None = None,
) -> bool:
    """Record a buffered page (or member chunk): its successor and the counters, atomically, and
    clear the part's last error (it recovered). ``consumed``: a chunk key to delete with it.

    Only while the part is still the run that buffered it: False (nothing saved) when it was
    restarted or cancelled meanwhile, since its counters and cursor now belong to the new run.
    """
    key = keys.backfill_part(job_id, part)
    with client.pipeline(transaction=True) as pipe:
        try:
            pipe.watch(key)  # type: ignore[no-untyped-call]
            if text(pipe.hget(key, "run") or b"") != run:
                return False
            now = now_ms()
            pipe.multi()
            pipe.hset(key, mapping={"next": next_token, "updated_at_ms": now, "finished": int(last)})
            pipe.hdel(key, "last_error", "last_error_at_ms")
            if total is not None:
                pipe.hset(key, "total", total)
            pipe.hincrby(key, "pages", 1)
            pipe.hincrby(key, "members", members)
            if consumed is not None:
                pipe.delete(consumed)
            if last:
                pipe.hset(key, "finished_at_ms", now)
                pipe.zrem(keys.backfill_due(job_id), part)
            else:
                pipe.zadd(keys.backfill_due(job_id), {part: now + STALL_MS})
            pipe.execute()
            return True
        except WatchError:
            return False


def _chunks_step(
    client: redis.Redis,
    job: ExportJob,
    part: str,
    state: dict[str, str],
    report: StepReport,
    backlog_full: Callable[[], bool],
) -> None:
    """A member file stored with the part: each chunk's profiles become the part's enter or exit."""
    audience = part_audience(part, state) or part
    event = part_event(part, state)
    run = state.get("run", "")
    total = int(state.get("chunks") or 0)
    index = int(state.get("next") or 0)
    prefix = b'{"audience":%s,"event":%s,"at":%d,"user":' % (
        orjson.dumps(audience),
        orjson.dumps(event),
        int(state["at_ms"]),
    )
    router = _PartRouter(client, job.id, audience, teardown=event == EXIT)
    deadline = time.monotonic() + STEP_SECONDS
    for _ in range(PAGES_PER_STEP):
        if report.pages and (backlog_full() or _handing_over(report)):
            return
        last = index + 1 >= total
        if index >= total:  # an empty file
            if _save_page(client, job.id, part, str(index), 0, None, True, run=run):
                report.finished = True
            return
        chunk_key = keys.backfill_file_chunk(job.id, chunk_id(run, index))
        lines = [
            prefix + (p if isinstance(p, bytes) else str(p).encode()) + b"}"
            for p in client.lrange(chunk_key, 0, -1)
        ]
        ingested = ingest_lines(client, router, lines)
        report.sealed += len(ingested.sealed.get(job.id, []))
        report.pages += 1
        report.members += len(lines)
        if not _save_page(
            client, job.id, part, str(index + 1), len(lines), None, last, run=run, consumed=chunk_key
        ):
            report.skipped = "the part was restarted or cancelled meanwhile"
            return
        if last:
            report.finished = True
            return
        index += 1
        if time.monotonic() > deadline:
            break
    report.next_in = 0.0


def _file_step(
    client: redis.Redis, job_id: str, part: str, report: StepReport, backlog_full: Callable[[], bool]
) -> None:
    queue = keys.backfill_file_queue(job_id)
    router = _PartRouter(client, job_id, None, teardown=False)
    deadline = time.monotonic() + STEP_SECONDS
    for _ in range(PAGES_PER_STEP):
        if report.pages and (backlog_full() or _handing_over(report)):
            return
        head = client.lindex(queue, 0)
        if head is None:
            outcome = _finish_file_part(client, job_id, part)
            if outcome is _FileOutcome.FINISHED:
                report.finished = True
                return
            if outcome is _FileOutcome.PRODUCING:
                # Every staged chunk is taken but a command is still streaming the file: not finished.
                client.zadd(keys.backfill_due(job_id), {part: now_ms() + STALL_MS})
                if not report.pages:
                    report.skipped = "waiting for `attentive-export backfill` to stage more lines"
                report.next_in = PRODUCER_WAIT_SECONDS
                return
            continue  # a chunk arrived meanwhile
        chunk_id = text(head)
        chunk_key = keys.backfill_file_chunk(job_id, chunk_id)
        lines = list(client.lrange(chunk_key, 0, -1))
        ingested = ingest_lines(client, router, lines)
        report.sealed += len(ingested.sealed.get(job_id, []))
        report.pages += 1
        report.members += len(lines)
        key = keys.backfill_part(job_id, part)
        pipe = client.pipeline(transaction=True)
        pipe.lpop(queue)  # still our chunk: only this step (under the lock) pops; producers append
        pipe.delete(chunk_key)
        pipe.hincrby(key, "pages", 1)
        pipe.hincrby(key, "members", len(lines))
        pipe.hincrby(key, LINES_WAITING, -len(lines))  # room for the streaming command
        pipe.hset(key, "updated_at_ms", now_ms())
        pipe.hdel(key, "last_error", "last_error_at_ms")  # it recovered
        pipe.zadd(keys.backfill_due(job_id), {part: now_ms() + STALL_MS})
        pipe.execute()
        if time.monotonic() > deadline:
            break
    report.next_in = 0.0


class _FileOutcome(Enum):
    FINISHED = "finished"
    #: A chunk arrived meanwhile: take it.
    ARRIVED = "arrived"
    #: The queue is empty but a command still streams the file (its producer mark is live).
    PRODUCING = "producing"


def _finish_file_part(client: redis.Redis, job_id: str, part: str) -> _FileOutcome:
    """Mark the file part finished unless a chunk arrived or a command is still streaming into it
    (checked atomically). A stream that ended before staging its whole file (the command was
    interrupted, or died and its mark expired) is recorded as the part's last error."""
    queue = keys.backfill_file_queue(job_id)
    mark = keys.backfill_file_producer(job_id)
    key = keys.backfill_part(job_id, part)
    with client.pipeline(transaction=True) as pipe:
        try:
            pipe.watch(queue, mark, key)  # type: ignore[no-untyped-call]
            if pipe.llen(queue):
                return _FileOutcome.ARRIVED
            if pipe.exists(mark):
                return _FileOutcome.PRODUCING
            error = unfinished_stream(decode_hash(pipe.hgetall(key)))
            now = now_ms()
            pipe.multi()
            pipe.hset(key, mapping={"finished": 1, "finished_at_ms": now, LINES_WAITING: 0})
            if error:
                pipe.hset(key, mapping={"last_error": error, "last_error_at_ms": now})
                pipe.hincrby(key, "errors", 1)
            pipe.zrem(keys.backfill_due(job_id), part)
            pipe.execute()
            return _FileOutcome.FINISHED
        except WatchError:
            return _FileOutcome.ARRIVED


def _record_error(client: redis.Redis, job_id: str, part: str, message: str, due_in_ms: int | None) -> None:
    now = now_ms()
    pipe = client.pipeline(transaction=True)
    pipe.hset(keys.backfill_part(job_id, part), mapping={"last_error": message, "last_error_at_ms": now})
    pipe.hincrby(keys.backfill_part(job_id, part), "errors", 1)
    if due_in_ms is None:
        pipe.zrem(keys.backfill_due(job_id), part)
    else:
        pipe.zadd(keys.backfill_due(job_id), {part: now + due_in_ms})
    pipe.execute()


def _halt(client: redis.Redis, job_id: str, part: str, report: StepReport, message: str) -> None:
    """An error an operator must fix: record it, stop re-dispatching; the sweep retries rarely."""
    _record_error(client, job_id, part, message, due_in_ms=HALT_RETRY_MS)
    report.error = message


def maybe_running(client: redis.Redis, jobs: JobStore, job_id: str) -> bool:
    """Move the job from ``backfilling`` to ``running`` once every part is finished."""
    if unfinished_parts(client, job_id):
        return False
    return jobs.set_state_if(job_id, JobState.RUNNING, only_from={JobState.BACKFILLING})


# --- parts a change asks for ---------------------------------------------------------------------------
def _drop_chunks(client: redis.Redis, job_id: str, state: dict[str, str]) -> None:
    """Delete the member-file chunks a part has not consumed (it is restarted or cancelled)."""
    if state.get("kind") != CHUNKS:
        return
    run, done, total = state.get("run", ""), int(state.get("next") or 0), int(state.get("chunks") or 0)
    stale = [keys.backfill_file_chunk(job_id, chunk_id(run, i)) for i in range(done, total)]
    if stale:
        client.delete(*stale)


def cancel_part(client: redis.Redis, job_id: str, part: str, reason: str) -> bool:
    """Finish an unfinished part without sending the rest (its audience was removed, or the job is
    stopping); a step still working on it saves nothing (its run is over). True if it was running."""
    key = keys.backfill_part(job_id, part)
    state = decode_hash(client.hgetall(key))
    if not state or state.get("finished") == "1":
        return False
    now = now_ms()
    pipe = client.pipeline(transaction=True)
    pipe.hset(
        key,
        mapping={
            "finished": 1,
            "cancelled": reason,
            "finished_at_ms": now,
            "updated_at_ms": now,
            # A new run: a step finishing a page saves nothing, a streaming command stops.
            "run": secrets.token_hex(6),
        },
    )
    if part == FILE_PART:
        pipe.hset(key, LINES_WAITING, 0)  # its chunks go below
    pipe.zrem(keys.backfill_due(job_id), part)
    pipe.execute()
    _drop_chunks(client, job_id, state)
    if part == FILE_PART:
        queued = [
            keys.backfill_file_chunk(job_id, text(c))
            for c in client.lrange(keys.backfill_file_queue(job_id), 0, -1)
        ]
        client.delete(keys.backfill_file_queue(job_id), *queued)
    return True


def cancel_enter_parts(client: redis.Redis, job_id: str, reason: str) -> list[str]:
    """Cancel every unfinished part that sends enters (backfills, resyncs, the ``@file`` queue)."""
    cancelled = []
    for part in unfinished_parts(client, job_id):
        state = decode_hash(client.hgetall(keys.backfill_part(job_id, part)))
        if part_event(part, state) == ENTER and cancel_part(client, job_id, part, reason):
            cancelled.append(part)
    return cancelled


def _materialize(client: redis.Redis, job_id: str, op: dict[str, Any], now: int, due_at: int) -> str:
    """Start (or restart) the part an operation asks for; returns its name. Idempotent per operation:
    a part already running the operation's id is left as it is."""
    audience = str(op["audience"])
    event = EXIT if op["event"] == EXIT else ENTER
    part = teardown_part(audience) if event == EXIT else audience
    key = keys.backfill_part(job_id, part)
    old = decode_hash(client.hgetall(key))
    if old.get("run") == op["id"]:
        return part
    if event == EXIT:
        # Members of an audience being torn down are no longer backfilled or resynced.
        cancel_part(client, job_id, audience, f"audience {audience!r} is being torn down")
    _drop_chunks(client, job_id, old)
    fields: dict[Any, str | int] = {  # (redis-py types mapping keys invariantly)
        "kind": CHUNKS if op["source"] == CHUNKS else LYTICS,
        "event": event,
        "op": str(op["op"]),
        "audience": audience,
        "run": str(op["id"]),
        "at_ms": int(op.get("at_ms") or now),
        "started_at_ms": now,
        "updated_at_ms": now,
        "next": "" if op["source"] == LYTICS else 0,
        "pages": 0,
        "members": 0,
        "finished": 0,
    }
    if op["source"] == LYTICS:
        fields.update(
            segment=str(op["segment"]), token_env=str(op["token_env"]), page_size=int(op["page_size"])
        )
    else:
        fields["chunks"] = int(op["chunks"])
    pipe = client.pipeline(transaction=True)
    pipe.delete(key)
    pipe.hset(key, mapping=fields)
    pipe.sadd(keys.backfill_parts(job_id), part)
    pipe.zadd(keys.backfill_due(job_id), {part: due_at})
    pipe.execute()
    return part


def schedule_ops(client: redis.Redis, job_id: str) -> None:
    """Before writing a change with pending operations: the sweep turns them into parts if the
    writer dies before it does (a leftover entry with nothing pending just goes away)."""
    client.zadd(keys.backfill_due(job_id), {OPS_PART: now_ms() + OPS_GRACE_MS})


def schedule_stop_check(client: redis.Redis, job_id: str) -> None:
    """Before a job becomes stopping: the sweep checks it (:data:`STOP_PART`) even if no task does."""
    client.zadd(keys.backfill_due(job_id), {STOP_PART: now_ms() + STALL_MS})


def activate_pending(
    client: redis.Redis, jobs: JobStore, job_id: str, dispatcher: Dispatcher | None = None
) -> list[str]:
    """Turn the job's pending operations into backfill parts, in the order they were recorded, each
    starting now: its changes carry this time, after the change that asked for them was written.

    With a ``dispatcher`` each part gets a step at once; without (the ``@ops`` step), its re-drive
    is due now and the sweep dispatches it. One process at a time (a lock); safe to repeat.
    """
    lock = client.lock(keys.backfill_lock(job_id, OPS_PART), timeout=60, blocking_timeout=30)
    if not lock.acquire():
        return []
    try:
        try:
            job = jobs.get(job_id)
        except JobNotFound:
            client.zrem(keys.backfill_due(job_id), OPS_PART)
            return []
        ops = list(job.pending_ops)
        parts: list[str] = []
        if ops and job.state is not JobState.STOPPED:
            now = now_ms()
            due_at = now + STALL_MS if dispatcher is not None else now
            parts = [_materialize(client, job_id, op, now, due_at) for op in ops]
        if ops:
            done = {op.get("id") for op in ops}

            def drop(j: ExportJob) -> bool:
                left = [o for o in j.pending_ops if o.get("id") not in done]
                changed = len(left) != len(j.pending_ops)
                j.pending_ops = left
                return changed

            with contextlib.suppress(JobNotFound):
                jobs.modify(job_id, drop)
        client.zrem(keys.backfill_due(job_id), OPS_PART)
        if parts:
            jobs.set_state_if(job_id, JobState.BACKFILLING, only_from={JobState.RUNNING})
            if dispatcher is not None:
                for part in dict.fromkeys(parts):
                    dispatcher.backfill(job_id, part)
        return parts
    finally:
        with contextlib.suppress(LockError):
            lock.release()


def _stop_step(client: redis.Redis, jobs: JobStore, job: ExportJob, report: StepReport) -> None:
    """A stopping job becomes ``stopped`` once its teardown parts are finished and Attentive has
    completed every batch carrying them (nothing left open, queued, held or at Attentive)."""
    if job.state is not JobState.STOPPING:
        if job.stop_after_teardown and job.state is JobState.PAUSED:
            # Paused (say a refused key): resuming goes back to stopping and re-drives this check.
            client.zadd(keys.backfill_due(job.id), {STOP_PART: now_ms() + STALL_MS})
            report.skipped = "paused while stopping"
        else:
            client.zrem(keys.backfill_due(job.id), STOP_PART)
            report.skipped = f"job is {job.state}"
        return
    if job.pending_ops:
        activate_pending(client, jobs, job.id)
    cancel_enter_parts(client, job.id, "the job is stopping: only its teardown is sent")
    client.zadd(keys.backfill_due(job.id), {STOP_PART: now_ms() + STALL_MS})
    report.next_in = STOP_CHECK_SECONDS
    if unfinished_parts(client, job.id):
        report.skipped = "teardown in progress"
        return
    buffer = JobBuffer(client, job.id, job.config.batch_size)
    if buffer.open_size():
        report.sealed += len(buffer.seal_now())  # no need to wait out the flush interval
    if buffer.open_size() or buffer.sealed_count() or buffer.waiting_users() or buffer.outstanding_users():
        report.skipped = "waiting for the teardown to reach Attentive"
        return
    jobs.set_state_if(job.id, JobState.STOPPED, only_from={JobState.STOPPING})
    client.zrem(keys.backfill_due(job.id), STOP_PART)
    report.next_in = None
    report.finished = True


# --- the sweep's part -------------------------------------------------------------------------------------
def _backlog_full(client: redis.Redis, job: ExportJob, max_queued_users: int) -> bool:
    """Whether the job's queued (sealed) or held users are above their caps."""
    pipe = client.pipeline(transaction=False)
    pipe.llen(keys.sealed(job.id))
    pipe.hlen(keys.waiting(job.id))
    sealed, held = pipe.execute()
    return int(sealed) * job.config.batch_size > max_queued_users or int(held) > MAX_HELD_USERS


def redrive_stalled(
    client: redis.Redis, dispatcher: Dispatcher, now: int | None = None, limit: int = 100
) -> int:
    """Dispatch a step for every part past its due time (its task was lost, or it is time to retry).

    Each job keeps its parts' schedule under its own hash tag (``keys.backfill_due``), written in
    the same MULTI as the parts, so on a Redis Cluster it lives on the job's slot; this reads every
    job's in one pipeline (one round trip per node). Up to ``limit`` parts per job.
    """
    at = now if now is not None else now_ms()
    job_ids = sorted(text(j) for j in client.hkeys(keys.jobs()))
    _move_legacy_due(client, set(job_ids))
    pipe = client.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.zrangebyscore(keys.backfill_due(job_id), "-inf", at, start=0, num=limit)
    due = {j: [text(p) for p in parts] for j, parts in zip(job_ids, pipe.execute(), strict=True) if parts}
    if not due:
        return 0
    # Push them forward first so the next sweep (a second later) does not dispatch them again.
    pipe = client.pipeline(transaction=False)
    for job_id, parts in due.items():
        pipe.zadd(keys.backfill_due(job_id), dict.fromkeys(parts, at + STALL_MS), xx=True)
    pipe.execute()
    for job_id, parts in due.items():
        for part in parts:
            dispatcher.backfill(job_id, part)
    return sum(len(parts) for parts in due.values())


def _move_legacy_due(client: redis.Redis, job_ids: set[str]) -> None:
    """Move the entries of the one schedule all jobs shared before Redis Cluster support
    (``keys.legacy_backfill_due``) into their jobs' own, keeping their times (entries of jobs no
    longer in ``job_ids``, the job table, just go); added before removed, so a crash in between only
    leaves an entry to move again. A no-op once it is gone."""
    legacy = keys.legacy_backfill_due()
    entries = cast(
        "list[tuple[bytes, float]]", client.zrange(legacy, 0, LEGACY_DUE_STEP - 1, withscores=True)
    )
    if not entries:
        return
    pipe = client.pipeline(transaction=False)
    for member, score in entries:
        job_id, _, part = text(member).partition("|")
        if job_id in job_ids:
            pipe.zadd(keys.backfill_due(job_id), {part: score}, nx=True)
    pipe.execute()
    client.zrem(legacy, *(member for member, _score in entries))


# --- file backfills ---------------------------------------------------------------------------------------
#: Why a backfill file line is left out (besides the reasons of ``worker.mapping.transitions``).
AUDIENCE_NOT_EXPORTED = "audience_not_exported"

#: Fields of the ``@file`` part about the file streamed into it (:func:`enqueue_file`). Lines staged
#: in Redis and not yet taken by a step: what ``BACKFILL_FILE_MAX_STAGED_LINES`` caps.
LINES_WAITING = "lines_waiting"
#: The latest stream: lines it stages in all (blank if unknown), staged so far, its state, its time.
STREAM_TOTAL = "stream_total"
STREAM_STAGED = "stream_staged"
STREAM_STATE = "stream_state"
STREAM_AT_MS = "stream_at_ms"
STREAM_AT_DEFAULTED = "stream_at_defaulted"
#: Stream states: still ``streaming`` when the command died (its mark then expires).
STREAMING = "streaming"
STREAM_DONE = "done"
STREAM_INTERRUPTED = "interrupted"
STREAM_FAILED = "failed"


@dataclass
class FileReport:
    lines: int = 0
    profiles: int = 0
    transitions: int = 0
    chunks: int = 0
    #: Lines left out (not JSON objects, or transitions for audiences the job does not export).
    skipped: int = 0
    #: Why lines were left out: reason -> count (every skipped line has one).
    reasons: Counter[str] = field(default_factory=Counter)
    #: Lines the whole input stages (known once it was read through) and lines staged so far.
    total: int | None = None
    staged: int = 0

    def skip(self, reason: str) -> None:
        self.skipped += 1
        self.reasons[reason] += 1


class FileStreamError(RuntimeError):
    """A file could not be streamed into the job, or stopped before every line was staged;
    ``str(exc)`` says why and how far it got (what was staged is sent)."""


@dataclass(frozen=True)
class StreamProgress:
    """Where a stream waiting for room is (for the command's progress line)."""

    staged: int
    total: int | None
    #: The job's file lines in Redis not yet taken by the backfill, and their cap.
    waiting: int
    cap: int
    job_state: str


def file_lines(
    lines: Iterable[str | bytes],
    audiences: Iterable[str],
    audience: str | None,
    at_ms: int,
    report: FileReport,
) -> Iterator[bytes]:
    """Canonical transition lines from a backfill file.

    Each line is a canonical transition (kept as is, with its own time: ingest checks it and counts
    it by reason if unusable) or a profile, which becomes an *enter* of ``audience`` at ``at_ms``.
    A line that is not a JSON object (not UTF-8, not JSON, an array, empty) or a transition for an
    audience the job does not export is left out and counted in ``report.reasons``; the rest go on.
    Raises :class:`FileBackfillError` for a profile when no audience was given, since guessing
    would flag users in the wrong audience; nothing else.
    """
    exported = set(audiences)
    prefix = b'{"audience":%s,"event":"enter","at":%d,"user":' % (orjson.dumps(audience), int(at_ms))
    for n, raw in enumerate(lines, 1):
        if isinstance(raw, str):
            try:
                raw = raw.encode()
            except UnicodeEncodeError:  # lone surrogates: text that was not UTF-8
                report.lines += 1
                report.skip(transitions.NOT_JSON)
                continue
        line = raw.strip().removeprefix(b"\xef\xbb\xbf")  # a byte order mark (editors write one)
        if not line:
            continue
        report.lines += 1
        try:
            obj = jsonio.loads(line)  # as ingest reads it: NaN and long integers are read, not refused
        except (ValueError, RecursionError):  # not JSON, not UTF-8
            report.skip(transitions.NOT_JSON)
            continue
        if not isinstance(obj, dict) or not obj:
            report.skip(transitions.NOT_AN_OBJECT)
            continue
        if "event" in obj and "audience" in obj:
            slug = obj["audience"]
            if not isinstance(slug, str) or slug.strip() not in exported:
                report.skip(AUDIENCE_NOT_EXPORTED)
                continue
            report.transitions += 1
            yield line
            continue
        if audience is None:
            raise FileBackfillError(
                f"line {n} is a profile, not a transition: give --audience to say which audience "
                "the file's members belong to"
            )
        report.profiles += 1
        # The profile's own text, not a re-encoding: ingest reads exactly what the file holds (orjson
        # would refuse to write an integer beyond 64 bits or nesting over 255 levels).
        yield prefix + line + b"}"


def check_file(
    lines: Iterable[str | bytes], audiences: Iterable[str], audience: str | None, at_ms: int
) -> FileReport:
    """Read a whole backfill file as :func:`file_lines` does, writing nothing: its counts (``total``:
    the lines it would stage), or :class:`FileBackfillError`."""
    report = FileReport()
    for _ in file_lines(lines, audiences, audience, at_ms, report):
        pass
    report.total = report.profiles + report.transitions
    return report


def backfill_file(
    client: redis.Redis,
    job: ExportJob,
    read: Callable[[], Iterable[str | bytes]],
    audience: str | None,
    at_ms: int,
    dispatcher: Dispatcher,
    *,
    max_staged: int | None,
    at_defaulted: bool = False,
    chunk_lines: int = FILE_CHUNK_LINES,
    on_wait: Callable[[StreamProgress], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    report: FileReport | None = None,
) -> FileReport:
    """Backfill a job from a file: all or nothing for a bad file, then streamed under a cap.

    ``read()`` gives the file's lines from the start each time. It is read whole once writing
    nothing, so a :class:`FileBackfillError` leaves Redis as it was; then read again and streamed
    (:func:`enqueue_file`): Redis holds at most ``max_staged`` + one chunk of it at a time.
    ``report`` (returned) is filled as it goes, so a caller interrupted meanwhile sees how far it got.
    """
    report = report if report is not None else FileReport()
    checked = check_file(read(), job.config.audiences, audience, at_ms)
    if not checked.total:  # nothing to stage (every line skipped, or none): the check's counts
        for name in ("lines", "profiles", "transitions", "skipped", "reasons", "total"):
            setattr(report, name, getattr(checked, name))
        return report
    report.total = checked.total
    try:
        enqueue_file(
            client,
            job,
            file_lines(read(), job.config.audiences, audience, at_ms, report),
            report,
            dispatcher,
            chunk_lines,
            max_staged=max_staged,
            at_ms=at_ms,
            at_defaulted=at_defaulted,
            on_wait=on_wait,
            sleep=sleep,
        )
    except FileBackfillError as exc:  # it changed since it was checked
        raise FileStreamError(
            f"the input changed while it was read ({exc}) after {report.staged:,} of "
            f"{checked.total:,} lines were staged"
        ) from None
    return report


def enqueue_file(
    client: redis.Redis,
    job: ExportJob,
    lines: Iterable[bytes],
    report: FileReport,
    dispatcher: Dispatcher,
    chunk_lines: int = FILE_CHUNK_LINES,
    *,
    max_staged: int | None = None,
    at_ms: int | None = None,
    at_defaulted: bool = False,
    on_wait: Callable[[StreamProgress], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    mark_ttl: float = PRODUCER_TTL_SECONDS,
) -> None:
    """Stream lines into the job's ``@file`` part as chunks, each taken by the backfill as soon as
    it is written; the step is dispatched once, with the first chunk.

    While ``max_staged`` or more of the job's file lines wait in Redis (None: no cap), this waits
    (``sleep``, calling ``on_wait``), so Redis holds at most ``max_staged`` + one chunk of a file
    however long it is. A producer mark (one stream per job at a time) keeps the part from finishing
    while this runs; each chunk is written only while the mark is still this call's. If the process
    dies, the mark expires after ``mark_ttl`` and the part finishes with what arrived, recording how
    far the stream got (:func:`unfinished_stream`); on an exception (Ctrl-C too) the stream is marked
    ended there and the exception goes on. Lines are not validated here: what was staged before a
    bad line stays, so check the file first (:func:`backfill_file`). ``report.staged`` counts what
    was staged, read back from Redis when the stream ended early.
    """
    stream = _FileStream(client, job.id, report, max_staged, mark_ttl, on_wait, sleep)
    state = STREAM_FAILED
    batch: list[bytes] = []
    try:
        for line in lines:
            batch.append(line)
            if len(batch) >= chunk_lines:
                stream.put(batch, dispatcher, at_ms, at_defaulted)
                batch = []
        if batch:
            stream.put(batch, dispatcher, at_ms, at_defaulted)
        state = STREAM_DONE
    except KeyboardInterrupt:
        state = STREAM_INTERRUPTED
        raise
    finally:
        stream.end(state)


class _FileStream:
    """One command's stream into a job's ``@file`` part: its producer mark, the cap, the chunks."""

    def __init__(
        self,
        client: redis.Redis,
        job_id: str,
        report: FileReport,
        max_staged: int | None,
        mark_ttl: float,
        on_wait: Callable[[StreamProgress], None] | None,
        sleep: Callable[[float], None],
    ) -> None:
        self.client = client
        self.job_id = job_id
        self.report = report
        self.max_staged = max_staged
        self.ttl_ms = max(1, int(mark_ttl * 1000))
        self.on_wait = on_wait
        self.sleep = sleep
        self.jobs = JobStore(client)
        self.part_key = keys.backfill_part(job_id, FILE_PART)
        self.queue = keys.backfill_file_queue(job_id)
        self.mark = keys.backfill_file_producer(job_id)
        self.token = ""  # set once the mark is taken (the first chunk)
        self.run = ""
        self.renewed = 0.0

    def _how_far(self) -> str:
        total = f" of {self.report.total:,}" if self.report.total is not None else ""
        return f"after {self.report.staged:,}{total} lines were staged"

    def _open(self, at_ms: int | None, at_defaulted: bool) -> None:
        """Take the producer mark and (re)open the part for this stream."""
        token = secrets.token_hex(8)
        if not self.client.set(self.mark, token, nx=True, px=self.ttl_ms):
            raise FileStreamError(
                f"another `attentive-export backfill` is streaming a file into job {self.job_id}: run "
                f"this once it has ended (if it died, its mark expires within {self.ttl_ms / 1000:g} s)"
            )
        self.token, self.run, self.renewed = token, secrets.token_hex(6), time.monotonic()
        now = now_ms()
        fields: dict[Any, str | int] = {  # (redis-py types mapping keys invariantly)
            "kind": FILE,
            "finished": 0,
            "updated_at_ms": now,
            "run": self.run,  # cancel_part changes it: this stream then stops
            STREAM_TOTAL: "" if self.report.total is None else self.report.total,
            STREAM_STAGED: 0,
            STREAM_STATE: STREAMING,
            STREAM_AT_MS: "" if at_ms is None else at_ms,
            STREAM_AT_DEFAULTED: int(at_defaulted),
        }
        with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(self.queue)  # type: ignore[no-untyped-call]
                    if not pipe.llen(self.queue):
                        fields[LINES_WAITING] = 0  # nothing staged: undo any drift of the counter
                    pipe.multi()
                    pipe.hsetnx(self.part_key, "started_at_ms", now)
                    pipe.hdel(self.part_key, "cancelled", "finished_at_ms", "last_error", "last_error_at_ms")
                    pipe.hset(self.part_key, mapping=fields)
                    pipe.sadd(keys.backfill_parts(self.job_id), FILE_PART)
                    pipe.zadd(keys.backfill_due(self.job_id), {FILE_PART: now + STALL_MS})
                    pipe.execute()
                    return
                except WatchError:
                    continue

    def _check(self, pipe: Any) -> None:
        """Under WATCH: the part is still this stream's and the mark still this command's."""
        run = text(pipe.hget(self.part_key, "run") or b"")
        if run != self.run:
            reason = text(pipe.hget(self.part_key, "cancelled") or b"") or "it was restarted"
            raise FileStreamError(f"the file backfill was cancelled ({reason}) {self._how_far()}")
        if text(pipe.get(self.mark) or b"") != self.token:
            raise FileStreamError(
                f"this command lost its producer mark (paused or cut off from Redis for over "
                f"{self.ttl_ms / 1000:g} s) {self._how_far()}; the backfill finished with those"
            )

    def _checked_write(self, write: Callable[[Any], None]) -> None:
        """Queue ``write`` and renew the mark in one MULTI, after :meth:`_check` under WATCH of the
        part and the mark; retried when a step changed the part meanwhile."""
        with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(self.part_key, self.mark)  # type: ignore[no-untyped-call]
                    self._check(pipe)
                    pipe.multi()
                    write(pipe)
                    pipe.pexpire(self.mark, self.ttl_ms)
                    pipe.execute()
                    break
                except WatchError:  # a step took a chunk meanwhile
                    continue
        self.renewed = time.monotonic()

    def _renew(self) -> None:
        if time.monotonic() - self.renewed < PRODUCER_RENEW_SECONDS:
            return
        self._checked_write(lambda pipe: None)

    def _wait_for_room(self) -> None:
        """Wait while the job's staged file lines are at the cap (the backfill takes them)."""
        if self.max_staged is None:
            return
        while True:
            self._renew()
            waiting = max(0, int(self.client.hget(self.part_key, LINES_WAITING) or 0))
            if waiting < self.max_staged:
                return
            try:
                state = self.jobs.get(self.job_id).state
            except JobNotFound:
                raise FileStreamError(f"job {self.job_id} was deleted {self._how_far()}") from None
            if state in (JobState.STOPPING, JobState.STOPPED):
                raise FileStreamError(f"job {self.job_id} is {state}: it takes no changes; {self._how_far()}")
            if self.on_wait is not None:
                self.on_wait(
                    StreamProgress(
                        self.report.staged, self.report.total, waiting, self.max_staged, str(state)
                    )
                )
            self.sleep(PRODUCER_POLL_SECONDS)

    def put(self, batch: list[bytes], dispatcher: Dispatcher, at_ms: int | None, at_defaulted: bool) -> None:
        """Stage one chunk once there is room; it is in the queue (taken by steps) at once."""
        first = not self.token
        if first:
            self._open(at_ms, at_defaulted)
        self._wait_for_room()  # (before the first chunk too: an earlier stream's may still wait)
        chunk_id = f"{now_ms()}-{secrets.token_hex(4)}"

        def stage(pipe: Any) -> None:
            pipe.rpush(keys.backfill_file_chunk(self.job_id, chunk_id), *batch)
            pipe.rpush(self.queue, chunk_id)
            pipe.hincrby(self.part_key, LINES_WAITING, len(batch))
            pipe.hincrby(self.part_key, STREAM_STAGED, len(batch))
            pipe.hset(self.part_key, "updated_at_ms", now_ms())

        self._checked_write(stage)
        self.report.staged += len(batch)
        self.report.chunks += 1
        if first:
            dispatcher.backfill(self.job_id, FILE_PART)

    def end(self, state: str) -> None:
        """Record how the stream ended and drop the mark, so the part can finish at once. Best
        effort: if Redis is gone too, the mark expires and the part finishes just the same."""
        if not self.token:
            return
        with contextlib.suppress(redis.RedisError), self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(self.part_key, self.mark)  # type: ignore[no-untyped-call]
                    ours = text(pipe.hget(self.part_key, "run") or b"") == self.run
                    staged = int(pipe.hget(self.part_key, STREAM_STAGED) or 0)
                    holding = text(pipe.get(self.mark) or b"") == self.token
                    pipe.multi()
                    if ours:
                        pipe.hset(self.part_key, STREAM_STATE, state)
                    if holding:
                        pipe.delete(self.mark)
                    pipe.execute()
                    if ours:  # a chunk whose reply a Ctrl-C cut off is staged all the same
                        self.report.staged = staged
                    return
                except WatchError:
                    continue


def _iso_ms(ms: int) -> str:
    """Epoch ms as UTC ISO-8601 to the millisecond, as ``--at`` reads it back exactly."""
    return (
        dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


def rerun_hint(at_ms: int | None, at_defaulted: bool) -> str:
    """How to send the rest of a file whose stream stopped early (safe: last writer wins)."""
    at = f"--at {_iso_ms(at_ms)}" if at_ms is not None else "the same --at"
    hint = (
        f"to send the rest, run the same command again with {at} (safe: lines already accepted come "
        "again as stale duplicates, last writer wins by event time)"
    )
    if at_defaulted and at_ms is not None:
        hint += (
            "; --at was not given, so it defaulted to when that command started: give it as above, "
            "since a rerun without --at takes a new time and its enters would win over exits made since"
        )
    return hint


def unfinished_stream(state: Mapping[str, str]) -> str | None:
    """Why the ``@file`` part's latest stream ended before staging its whole file (with how to send
    the rest), or None: it staged everything (or nothing says otherwise)."""
    how = {
        STREAMING: "stopped (killed, or cut off from Redis: its mark expired)",
        STREAM_INTERRUPTED: "was interrupted",
        STREAM_FAILED: "stopped on an error",
    }.get(state.get(STREAM_STATE) or STREAM_DONE)
    total = _int(state.get(STREAM_TOTAL))
    staged = int(state.get(STREAM_STAGED) or 0)
    if how is None or (total is not None and staged >= total):
        return None
    of = f" of {total:,}" if total is not None else ""
    return (
        f"file backfill incomplete: the `attentive-export backfill` command {how} after staging "
        f"{staged:,}{of} lines (those are sent); "
        + rerun_hint(_int(state.get(STREAM_AT_MS)), state.get(STREAM_AT_DEFAULTED) == "1")
    )


# --- status -----------------------------------------------------------------------------------------------
def _int(value: str | None) -> int | None:
    return int(value) if value not in (None, "") else None


def _stream_view(client: redis.Redis, job_id: str, state: dict[str, str], finished: bool) -> dict[str, Any]:
    """The file part's latest stream: lines staged of the file's total, lines waiting in Redis for
    the backfill, whether a command is streaming now, and whether it ended before staging them all."""
    return {
        "lines_staged": _int(state.get(STREAM_STAGED)),
        "lines_total": _int(state.get(STREAM_TOTAL)),
        "lines_waiting": max(0, int(state.get(LINES_WAITING) or 0)),
        "streaming": bool(client.exists(keys.backfill_file_producer(job_id))),
        "stream_state": state.get(STREAM_STATE) or None,
        "incomplete": finished and unfinished_stream(state) is not None,
    }


def progress(client: redis.Redis, job_id: str) -> dict[str, Any] | None:
    """The backfill block of ``status``: per part (``<slug>`` sends an audience's current members as
    enters: a backfill or a resync; ``teardown:<slug>`` as exits) and for the file part: pages,
    members, finished, the last error and, while a part waits out an error, when it tries next
    (``next_try_at_ms``; ``jobs backfill JOB --retry-now`` tries at once). The file part also shows
    its stream (:func:`_stream_view`): ``lines_staged`` of ``lines_total`` while a command streams."""
    parts = sorted(text(p) for p in client.smembers(keys.backfill_parts(job_id)))
    if not parts:
        return None
    audiences: dict[str, Any] = {}
    file_part: dict[str, Any] | None = None
    pipe = client.pipeline(transaction=False)
    for part in parts:
        pipe.hgetall(keys.backfill_part(job_id, part))
        pipe.zscore(keys.backfill_due(job_id), part)
    replies = pipe.execute()
    for n, part in enumerate(parts):
        state = decode_hash(replies[2 * n])
        due = replies[2 * n + 1]
        finished = state.get("finished") == "1"
        last_error = state.get("last_error") or None
        view: dict[str, Any] = {
            "pages": int(state.get("pages", 0)),
            "members": int(state.get("members", 0)),
            "finished": finished,
            "errors": int(state.get("errors", 0)),
            "last_error": last_error,
            "last_error_at_ms": _int(state.get("last_error_at_ms")),
            "next_try_at_ms": int(due) if due is not None and last_error and not finished else None,
            "started_at_ms": _int(state.get("started_at_ms")),
            "updated_at_ms": _int(state.get("updated_at_ms")),
            "finished_at_ms": _int(state.get("finished_at_ms")),
            "cancelled": state.get("cancelled") or None,
        }
        if part == FILE_PART:
            view["chunks_waiting"] = int(client.llen(keys.backfill_file_queue(job_id)))
            view.update(_stream_view(client, job_id, state, finished))
            file_part = view
            continue
        view["op"] = state.get("op") or BACKFILL_OP
        view["audience"] = part_audience(part, state)
        view["event"] = part_event(part, state)
        view["source"] = "file" if state.get("kind") == CHUNKS else LYTICS
        view["segment"] = state.get("segment")
        view["total"] = _int(state.get("total"))
        view["members_at_ms"] = _int(state.get("at_ms"))
        if state.get("kind") == CHUNKS:
            view["total_chunks"] = int(state.get("chunks") or 0)
            view["chunks_waiting"] = 0 if finished else view["total_chunks"] - int(state.get("next") or 0)
        audiences[part] = view
    finished = all(v["finished"] for v in audiences.values()) and (file_part is None or file_part["finished"])
    return {"finished": finished, "audiences": audiences, "file": file_part}
