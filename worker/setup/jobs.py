"""Export jobs stored in Redis: configuration plus lifecycle state, many side by side.

A job's configuration is validated by :mod:`worker.setup.jobconfig` before it gets here. Each process
keeps a copy of the job table for routing (which jobs export an audience) and reloads it when a
version counter in Redis moves, so workers stay stateless (invariant 7), a job created a moment
ago receives the very next transition, and ingest pays one small read per chunk, not per event.

The lifecycle rules live here, not in the CLI, so no code path can break them:

* ``stopped`` is final. A stopped job's buffers and schedules are abandoned as they were; resuming
  would send a half-finished state long after the fact. A new job starts clean.
* A ``created`` job has not started, so it cannot be paused: a pause would later resume it as
  ``running`` and skip its backfill.
* Labels are unique (case-insensitively) among the jobs that exist, so an operator can tell jobs
  apart; a deleted job frees its label. Checked under WATCH on the job table, so two concurrent
  creates cannot both take one label.
* Only a stopped job can be deleted, and only once tasks that saw it before its stop are done
  (:data:`DELETE_GRACE_SECONDS`); deleting removes every key of the job (:mod:`worker.setup.purge`).
* ``stopping`` (``jobs stop --teardown``) takes no more changes but still sends: it becomes
  ``stopped`` once its teardown reached Attentive. Paused meanwhile (a refused key), it remembers
  the stop (``stop_after_teardown``): resuming it goes back to ``stopping``, never to ``running``.

A configuration change (``jobs update``) and the work it needs (a backfill of an added audience, a
teardown of a removed one, a resync) are written in one transaction: the work goes into the job
record as ``pending_ops`` (opaque to this module) with the new configuration, so a process dying
right after the change cannot lose it; :mod:`worker.backfill` then turns each into a backfill part.
"""

from __future__ import annotations

import builtins
import datetime as dt
import json
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis

from worker.setup.jobconfig import ExportJobConfig, JobState, parse_job_config
from worker.setup.purge import Purged, purge_job_data
from worker.store import keys
from worker.store.replies import text

#: States whose jobs receive transitions. A paused job still buffers, so nothing is lost while an
#: operator fixes its key; it just does not send.
ROUTED_STATES = frozenset({JobState.BACKFILLING, JobState.RUNNING, JobState.PAUSED})
#: States whose jobs send batches to Attentive (a stopping job sends its teardown).
SENDING_STATES = frozenset({JobState.BACKFILLING, JobState.RUNNING, JobState.STOPPING})
#: States whose jobs the sweep looks after (seals, leases, polls): routed or still sending.
SWEPT_STATES = ROUTED_STATES | {JobState.STOPPING}
#: How long after its stop a job can be deleted. A task that read the job before the stop may
#: still write for a while: a flush keeps its 10 s budget and then waits out one POST (connect
#: retries and 30 s read/write timeouts), a backfill step finishes its page. Deleting earlier could
#: let such a task recreate a key after the purge.
DELETE_GRACE_SECONDS = 120.0
#: Optimistic-transaction retries before giving up (writers are operators and rare state changes).
_MAX_TRANSACTION_ATTEMPTS = 50
_T = TypeVar("_T")


class JobError(Exception):
    """Base of the errors the job store raises; ``str(exc)`` is one line for an operator."""


class JobNotFound(JobError, LookupError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"no export job {job_id!r}; `attentive-export jobs list` shows the jobs")


class JobStateError(JobError, ValueError):
    """A state change or an action the job's current state does not allow."""


class LabelTaken(JobError, ValueError):
    """Another existing job already has this label."""


class JobBusy(JobStateError):
    """A stopped job that tasks may still be writing to; ``wait_seconds`` until it can be deleted."""

    def __init__(self, message: str, wait_seconds: float) -> None:
        super().__init__(message)
        self.wait_seconds = wait_seconds


def transition_problem(
    job_id: str, current: JobState, target: JobState, stop_after_teardown: bool = False
) -> str | None:
    """Why ``current`` may not become ``target``, or None when it may (the lifecycle rules above)."""
    if current is JobState.STOPPED and target is not JobState.STOPPED:
        verb = "paused" if target is JobState.PAUSED else "resumed"
        return (
            f"job {job_id} is stopped, and a stop is final: it cannot be {verb}; create a new job "
            f"instead (`jobs show {job_id}` prints this one's configuration, `jobs delete {job_id}` "
            "frees its label)"
        )
    if current is JobState.CREATED and target is JobState.PAUSED:
        return (
            f"job {job_id} has not started, so there is nothing to pause: start it with "
            f"`jobs resume {job_id}`, or `jobs stop {job_id}` it"
        )
    if stop_after_teardown and target in (JobState.CREATED, JobState.BACKFILLING, JobState.RUNNING):
        return (
            f"job {job_id} is stopping (`jobs stop --teardown`): it sends its teardown and then stops, "
            f"so it cannot be resumed; `jobs stop {job_id}` stops it at once, without the rest of the "
            "teardown"
        )
    if target is JobState.STOPPING and not stop_after_teardown:
        return f"job {job_id}: only `jobs stop --teardown` makes a job stopping"
    return None


def _label_key(label: str) -> str:
    return label.strip().casefold()


@dataclass
class ExportJob:
    id: str
    config: ExportJobConfig
    state: JobState = JobState.CREATED
    pause_reason: str = ""
    created_at: str = ""
    updated_at: str = ""
    #: ``jobs stop --teardown`` was asked: the job takes no more changes and ends ``stopped``.
    stop_after_teardown: bool = False
    #: Work recorded with a change and not yet handed to the backfill (:mod:`worker.backfill.ops`).
    pending_ops: builtins.list[dict[str, Any]] = field(default_factory=builtins.list)

    @property
    def sending(self) -> bool:
        return self.state in SENDING_STATES

    @property
    def routed(self) -> bool:
        """Whether transitions reach the job (a job stopping after its teardown takes none)."""
        return self.state in ROUTED_STATES and not self.stop_after_teardown

    def to_json(self) -> str:
        return json.dumps(
            {
                "id": self.id,
                "config": self.config.model_dump(mode="json"),
                "state": self.state,
                "pause_reason": self.pause_reason,
                "created_at": self.created_at,
                "updated_at": self.updated_at,
                "stop_after_teardown": self.stop_after_teardown,
                "pending_ops": self.pending_ops,
            }
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> ExportJob:
        data: dict[str, Any] = json.loads(raw)
        return cls(
            id=data["id"],
            config=parse_job_config(data["config"]),
            state=JobState(data["state"]),
            pause_reason=data.get("pause_reason", ""),
            created_at=data.get("created_at", ""),
            updated_at=data.get("updated_at", ""),
            stop_after_teardown=bool(data.get("stop_after_teardown", False)),
            pending_ops=list(data.get("pending_ops") or []),
        )


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _refuse_taken_label(pipe: redis.client.Pipeline, job: ExportJob, advice: str) -> None:
    """:class:`LabelTaken` if another job already has ``job``'s label (case-insensitive); read
    through the caller's watched pipeline, so two writers cannot both take one label."""
    wanted = _label_key(job.config.label)
    for raw in pipe.hvals(keys.jobs()):
        other = ExportJob.from_json(raw)
        if other.id != job.id and _label_key(other.config.label) == wanted:
            raise LabelTaken(
                f"export job {other.id} ({other.state}) is already labelled {other.config.label!r}: {advice}"
            )


def _seconds_since(iso: str) -> float:
    """Seconds since an ISO time written by :func:`_now_iso` (a missing or unreadable one: long ago)."""
    try:
        then = dt.datetime.fromisoformat(iso)
    except ValueError:
        return float("inf")
    if then.tzinfo is None:
        then = then.replace(tzinfo=dt.UTC)
    return (dt.datetime.now(dt.UTC) - then).total_seconds()


@dataclass
class DeletedJob:
    """A job ``jobs delete`` removed, and what went with it."""

    job: ExportJob
    purged: Purged


class JobStore:
    """CRUD and state changes for export jobs, plus audience routing."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._cache: dict[str, ExportJob] = {}
        #: audience -> :meth:`routes`, for the job table in ``_cache``
        self._routes: dict[str, builtins.list[ExportJob]] = {}
        self._version: bytes | str | None = None

    def create(self, config: ExportJobConfig, state: JobState = JobState.RUNNING) -> ExportJob:
        """Store a new job; :class:`LabelTaken` if an existing job has the label (case-insensitive)."""
        now = _now_iso()
        job = ExportJob(id=secrets.token_hex(4), config=config, state=state, created_at=now, updated_at=now)

        def insert(pipe: redis.client.Pipeline) -> None:
            _refuse_taken_label(pipe, job, "choose another label, or stop and delete that job first")
            pipe.multi()
            pipe.hset(keys.jobs(), job.id, job.to_json())
            pipe.incr(keys.jobs_version())

        self._transaction(insert)
        return job

    def get(self, job_id: str) -> ExportJob:
        raw = self._redis.hget(keys.jobs(), job_id)
        if raw is None:
            raise JobNotFound(job_id)
        return ExportJob.from_json(raw)

    def list(self) -> builtins.list[ExportJob]:
        jobs = [ExportJob.from_json(v) for v in self._redis.hvals(keys.jobs())]
        return sorted(jobs, key=lambda j: (j.created_at, j.id))

    def set_state(self, job_id: str, state: JobState | str, reason: str = "") -> ExportJob:
        """Change a job's state; ``reason`` is shown to operators (kept only while paused).

        Raises :class:`JobStateError` for a change the lifecycle forbids (leaving ``stopped``).
        """
        job = self._change_state(job_id, JobState(state), reason, None)
        assert job is not None  # no precondition, so the change always happens
        return job

    def set_state_if(
        self, job_id: str, state: JobState, only_from: Iterable[JobState], reason: str = ""
    ) -> bool:
        """Change the state only if the job is in one of ``only_from``; True if it changed.

        So a backfill finishing never overwrites a pause that a flush wrote a moment earlier, and
        a flush pausing never overwrites an operator's stop. A job deleted meanwhile, or a change
        the lifecycle forbids, is no change (False): workers racing an operator just carry on.
        """
        try:
            return self._change_state(job_id, state, reason, frozenset(only_from)) is not None
        except JobNotFound:
            return False

    def _change_state(
        self, job_id: str, state: JobState, reason: str, only_from: frozenset[JobState] | None
    ) -> ExportJob | None:
        """Read-modify-write of one job under WATCH, so concurrent state changes never get lost.
        None when ``only_from`` excludes the job's state or the lifecycle forbids the change."""
        accepted = False

        def change(_pipe: redis.client.Pipeline, job: ExportJob) -> bool:
            nonlocal accepted
            accepted = False  # (again on every WATCH retry)
            if only_from is not None and job.state not in only_from:
                return False
            problem = transition_problem(job.id, job.state, state, job.stop_after_teardown)
            if problem is not None:
                if only_from is not None:
                    return False
                raise JobStateError(problem)
            accepted = True
            if job.state is JobState.STOPPED:
                return False  # stopping twice: keep the first stop's time (the delete grace counts from it)
            job.state = state
            job.pause_reason = reason if state is JobState.PAUSED else ""
            return True

        job = self._modify(job_id, change)
        return job if accepted else None

    def modify(self, job_id: str, change: Callable[[ExportJob], bool]) -> ExportJob:
        """Read-modify-write of one job under WATCH: ``change`` edits the job it is given (or raises
        to refuse) and returns whether anything changed; then the job is written and processes
        reload their job table. Returns the job as stored."""
        return self._modify(job_id, lambda _pipe, job: change(job))

    def _modify(self, job_id: str, change: Callable[[redis.client.Pipeline, ExportJob], bool]) -> ExportJob:
        """:meth:`modify`, with the watched pipeline given to ``change`` for reads of its own."""

        def body(pipe: redis.client.Pipeline) -> ExportJob:
            raw = pipe.hget(keys.jobs(), job_id)
            if raw is None:
                raise JobNotFound(job_id)
            job = ExportJob.from_json(raw)
            if not change(pipe, job):
                return job
            job.updated_at = _now_iso()
            pipe.multi()
            pipe.hset(keys.jobs(), job.id, job.to_json())
            pipe.incr(keys.jobs_version())
            return job

        return self._transaction(body)

    def update_config(
        self,
        job_id: str,
        config: ExportJobConfig,
        expected: ExportJobConfig,
        ops: Iterable[dict[str, Any]] = (),
        state: JobState | None = None,
    ) -> ExportJob:
        """Replace the job's configuration (``jobs update``), with the work it needs, atomically.

        ``expected`` is the configuration the change was worked out from: if another update got
        there first, nothing is written (:class:`JobError`; run the update again). ``ops`` are added
        to the job's ``pending_ops``; ``state``, when given, is the job's new state (e.g.
        ``backfilling`` while an added audience is backfilled). A stopped or stopping job, or a
        label another job has, is refused.
        """

        def change(pipe: redis.client.Pipeline, job: ExportJob) -> bool:
            if job.state in (JobState.STOPPED, JobState.STOPPING) or job.stop_after_teardown:
                raise JobStateError(
                    f"job {job.id} is {'stopping' if job.stop_after_teardown else job.state}: "
                    "its configuration can no longer change"
                )
            if job.config != expected:
                raise JobError(
                    f"job {job.id} was changed by someone else meanwhile; nothing was written: "
                    "run the update again to see the difference from its new configuration"
                )
            job.config = config
            _refuse_taken_label(pipe, job, "choose another label")
            job.pending_ops = [*job.pending_ops, *ops]
            if state is not None and state is not job.state:
                problem = transition_problem(job.id, job.state, state, job.stop_after_teardown)
                if problem is not None:
                    raise JobStateError(problem)
                job.state = state
            return True

        return self._modify(job_id, change)

    def delete(self, job_id: str) -> DeletedJob:
        """Remove a stopped job and every Redis key it has; workers drop it at their next read.

        Raises :class:`JobStateError` unless the job is stopped, :class:`JobBusy` while tasks that
        saw it before its stop may still write (they would recreate keys after the purge).
        The keys go first and the record last, so a delete cut short is finished by running it
        again; a last purge after the record is gone catches anything written meanwhile.
        """
        job = self.get(job_id)
        if job.state is not JobState.STOPPED:
            raise JobStateError(
                f"job {job.id} is {job.state}: only a stopped job can be deleted; stop it first with "
                f"`attentive-export jobs stop {job.id}` (a stop is final)"
            )
        busy = self._busy(job)
        if busy is not None:
            raise busy
        purged = purge_job_data(self._redis, job.id)

        def remove(pipe: redis.client.Pipeline) -> None:
            if pipe.hexists(keys.jobs(), job.id):
                pipe.multi()
                pipe.hdel(keys.jobs(), job.id)
                pipe.incr(keys.jobs_version())

        self._transaction(remove)
        purged += purge_job_data(self._redis, job.id)
        return DeletedJob(job, purged)

    def _busy(self, job: ExportJob) -> JobBusy | None:
        """Why a stopped job cannot be deleted yet (tasks may still write to it), or None."""
        stopped_for = _seconds_since(job.updated_at)
        if stopped_for < DELETE_GRACE_SECONDS:
            wait = DELETE_GRACE_SECONDS - stopped_for
            return JobBusy(
                f"job {job.id} was stopped {stopped_for:.0f} s ago; tasks that started before the stop "
                f"may still write to it for {wait:.0f} s more",
                wait,
            )
        parts = [text(p) for p in self._redis.smembers(keys.backfill_parts(job.id))]
        held = [p for p in parts if self._redis.exists(keys.backfill_lock(job.id, p))]
        if held:
            return JobBusy(f"job {job.id}: a backfill step is still running ({', '.join(sorted(held))})", 5.0)
        if self._redis.exists(keys.flush_running(job.id)):
            return JobBusy(f"job {job.id}: a flush task is still running", 5.0)
        return None

    def _transaction(self, body: Callable[[redis.client.Pipeline], _T]) -> _T:
        """Run ``body`` under WATCH on the job table and EXEC what it queued; retry if another writer won."""
        with self._redis.pipeline(transaction=True) as pipe:
            for _ in range(_MAX_TRANSACTION_ATTEMPTS):
                try:
                    pipe.watch(keys.jobs())  # type: ignore[no-untyped-call]
                    result = body(pipe)
                    if len(pipe):  # body queued writes after MULTI (on a cluster pipeline too)
                        pipe.execute()
                    return result
                except redis.WatchError:
                    continue
                finally:
                    pipe.reset()
        raise JobError("export jobs are being changed concurrently; try again")

    # --- routing (hot path) ---------------------------------------------------------------------
    def cached(self, job_id: str) -> ExportJob | None:
        """The job as of now, from this process's copy of the job table (reloaded if it changed)."""
        self.refresh()
        return self._cache.get(job_id)

    def routes(self, audience: str) -> builtins.list[ExportJob]:
        """Jobs that receive transitions for ``audience``, as of the last :meth:`refresh`."""
        # Per transition on the hot path: worked out once per audience and job table.
        hit = self._routes.get(audience)
        if hit is None:
            hit = [j for j in self._cache.values() if j.routed and audience in j.config.audiences]
            self._routes[audience] = hit
        return hit

    def active(self) -> builtins.list[ExportJob]:
        """Jobs the sweep looks after (everything but created and stopped)."""
        self.refresh()
        return [j for j in self._cache.values() if j.state in SWEPT_STATES]

    def refresh(self) -> None:
        """Reload the job table if any job changed since the last load (one GET otherwise)."""
        version = self._redis.get(keys.jobs_version()) or b"0"
        if version == self._version:
            return
        fresh: dict[str, ExportJob] = {}
        for raw in self._redis.hvals(keys.jobs()):
            job = ExportJob.from_json(raw)
            old = self._cache.get(job.id)
            if old is not None and old.config == job.config:
                job.config = old.config  # the same object, so its compiled mapping is found at once
            fresh[job.id] = job
        self._cache = fresh
        self._routes = {}
        self._version = version
