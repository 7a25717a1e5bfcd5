"""Bulk jobs: IN_PROGRESS until their due time, then COMPLETED (or FAILED), applied to the store.

Completion is driven by a sandbox clock (monotonic time plus an admin-adjustable offset) and happens in
due-time order, both from a background task (so jobs finish even if nobody polls) and lazily before
any read (so a GET never sees a stale status). With ``completion_order=random`` due times are jittered
widely, so jobs finish out of submission order.

Applying a completed job's records to the store is deferred: completion fixes the job's place in the
completion order and queues it; the queue is drained, in that order, before anything reads the store
and by the background task once it grows long (app.MAX_BACKLOG). No observer can tell the difference,
and the sandbox spends its CPU answering requests, not on work that Attentive does on its own servers. Parsed users are not kept between
validation and application (the raw body is): thousands of long-lived dicts per request made Python's
cyclic GC the bottleneck.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from sandbox.store import UserStore

STATUSES = ("PENDING", "IN_PROGRESS", "NEEDS_REVIEW", "COMPLETED", "FAILED", "CANCELLED")
#: Job records are kept two weeks (CONTRACT §2); older ones answer 404.
RETENTION_SECONDS = 14 * 24 * 3600.0


class Clock:
    """Monotonic seconds plus an offset that ``/_sandbox/clock`` can advance."""

    def __init__(self) -> None:
        self.offset = 0.0

    def now(self) -> float:
        return time.monotonic() + self.offset


@dataclass
class Job:
    """One accepted bulk request; its records are re-parsed from ``raw`` when needed."""

    id: str
    token: str
    seq: int
    submitted_at: float
    submitted_wall: float
    total: int
    due: float
    raw: bytes
    #: index -> (status code, message) for records that are not applied (400 per_record, 413).
    record_errors: dict[int, tuple[int, str]] = field(default_factory=dict)
    status: str = "IN_PROGRESS"
    #: Set by the fail-jobs fault: the job ends FAILED instead of COMPLETED.
    will_fail: bool = False
    #: Admin-pinned status: the job stays there until changed again.
    pinned: bool = False
    applied: bool = False
    completed_order: int | None = None
    #: Wall-clock time the job reached its final status: its due time when it ran its course (the
    #: completer notices that a tick later), the moment of the call when an admin set it.
    finished_wall: float | None = None
    #: Wall-clock time its results file was first downloaded: when a client confirmed it complete.
    results_fetched_wall: float | None = None

    def view(self, base_url: str) -> dict[str, Any]:
        """The BulkJobStatusResponse body: ``url`` only when COMPLETED."""
        body: dict[str, Any] = {"bulkJobId": self.id, "status": self.status, "totalRecords": self.total}
        if self.status == "COMPLETED":
            body["url"] = f"{base_url}/results/{self.id}.jsonl"
        return body

    def admin_view(self) -> dict[str, Any]:
        return {
            "bulkJobId": self.id,
            "token": self.token,
            "seq": self.seq,
            "status": self.status,
            "totalRecords": self.total,
            "pinned": self.pinned,
            "applied": self.applied,
            "completedOrder": self.completed_order,
            "submittedAt": self.submitted_wall,
            "finishedAt": self.finished_wall,
            "resultsFetchedAt": self.results_fetched_wall,
            # The processing delay this job was given (seconds from acceptance to due).
            "processingSeconds": round(self.due - self.submitted_at, 3),
            "recordErrors": {str(i): code for i, (code, _m) in self.record_errors.items()},
        }

    def result_lines(self) -> Iterator[bytes]:
        """The JSONL results file: one line per record with the request as sent and its outcome."""
        users = orjson.loads(self.raw)["users"]
        for i, user in enumerate(users):
            code, message = self.record_errors.get(i, (202, ""))
            body: dict[str, Any] = {"error": {"id": i, "message": message}} if message else {}
            line = {"index": i, "request": user, "response": {"statusCode": code, "body": body}}
            yield orjson.dumps(line) + b"\n"


class JobBoard:
    """All jobs plus a due-time heap; ``advance()`` completes everything due, in due order."""

    def __init__(self, store: UserStore, clock: Clock) -> None:
        self.store = store
        self.clock = clock
        self.jobs: dict[str, Job] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._completed = 0
        self._to_apply: deque[Job] = deque()

    def clear(self) -> None:
        self.jobs.clear()
        self._heap.clear()
        self._to_apply.clear()
        self._completed = 0

    def sync(self) -> None:
        """Bring statuses and the store up to date; call before reading either."""
        self.advance()
        self.apply_pending()

    def pending_applies(self) -> int:
        return len(self._to_apply)

    def apply_pending(self, budget: float | None = None) -> None:
        """Apply completed jobs to the store in completion order (for at most ``budget`` seconds)."""
        queue = self._to_apply
        deadline = None if budget is None else time.monotonic() + budget
        apply = self.store.apply
        while queue:
            job = queue.popleft()
            errors, order = job.record_errors, job.completed_order or 0
            for i, user in enumerate(orjson.loads(job.raw)["users"]):
                if i not in errors:
                    apply(user, job.id, order)
            job.applied = True
            if deadline is not None and time.monotonic() > deadline:
                break

    def add(self, job: Job) -> None:
        self.jobs[job.id] = job
        heapq.heappush(self._heap, (job.due, job.seq, job.id))

    def get(self, job_id: str) -> Job | None:
        """The job, or None when unknown or older than the retention period."""
        job = self.jobs.get(job_id)
        if job is None or self.clock.now() - job.submitted_at > RETENTION_SECONDS:
            return None
        return job

    def next_due(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def advance(self) -> int:
        """Complete every job whose due time has passed; returns how many finished."""
        now = self.clock.now()
        heap = self._heap
        done = 0
        while heap and heap[0][0] <= now:
            _due, _seq, job_id = heapq.heappop(heap)
            job = self.jobs.get(job_id)
            if job is None or job.pinned or job.status != "IN_PROGRESS":
                continue
            self.finish(job, "FAILED" if job.will_fail else "COMPLETED", due=job.due)
            done += 1
        return done

    def finish(self, job: Job, status: str, due: float | None = None) -> None:
        """Move a job to a final status (``due``: the sandbox-clock time it fell due, when it ran its
        course); the first COMPLETED queues its records for the store."""
        job.status = status
        now = time.time()
        job.finished_wall = now if due is None else min(now, job.submitted_wall + (due - job.submitted_at))
        if status == "COMPLETED" and job.completed_order is None:
            self._completed += 1
            job.completed_order = self._completed
            self._to_apply.append(job)

    def apply_now(self, user: dict[str, Any]) -> None:
        """Apply a single-user write (v2 user attributes, v1 custom) at once, after queued jobs."""
        self.sync()
        self._completed += 1
        self.store.apply(user, None, self._completed)

    def set_status(self, job: Job, status: str, delay: float = 0.0) -> None:
        """Admin override: pin a job at ``status`` (IN_PROGRESS unpins it, due ``delay`` s from now)."""
        if status == "IN_PROGRESS":
            job.pinned = False
            job.status = "IN_PROGRESS"
            job.due = self.clock.now() + delay
            heapq.heappush(self._heap, (job.due, job.seq, job.id))
            return
        job.pinned = True
        if status in ("COMPLETED", "FAILED", "CANCELLED"):
            self.finish(job, status)
        else:
            job.status = status
