"""Export jobs stored in Redis: configuration plus lifecycle state, many side by side.

A job's configuration is validated by :mod:`worker.setup.jobconfig` before it gets here. Each process
keeps a copy of the job table for routing (which jobs export an audience) and reloads it when a
version counter in Redis moves, so workers stay stateless (invariant 7), a job created a moment
ago receives the very next transition, and ingest pays one small read per chunk, not per event.
"""

from __future__ import annotations

import builtins
import datetime as dt
import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis

from worker.setup.jobconfig import ExportJobConfig, JobState, parse_job_config
from worker.store import keys

#: States whose jobs receive transitions. A paused job still buffers, so nothing is lost while an
#: operator fixes its key; it just does not send.
ROUTED_STATES = frozenset({JobState.BACKFILLING, JobState.RUNNING, JobState.PAUSED})
#: States whose jobs send batches to Attentive.
SENDING_STATES = frozenset({JobState.BACKFILLING, JobState.RUNNING})


class JobNotFound(LookupError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"no export job {job_id!r}; `attentive-export jobs list` shows the jobs")


@dataclass
class ExportJob:
    id: str
    config: ExportJobConfig
    state: JobState = JobState.CREATED
    pause_reason: str = ""
    created_at: str = ""
    updated_at: str = ""

    @property
    def sending(self) -> bool:
        return self.state in SENDING_STATES

    def to_json(self) -> str:
        return json.dumps(
            {
                "id": self.id,
                "config": self.config.model_dump(mode="json"),
                "state": self.state,
                "pause_reason": self.pause_reason,
                "created_at": self.created_at,
                "updated_at": self.updated_at,
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
        )


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class JobStore:
    """CRUD and state changes for export jobs, plus audience routing."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._cache: dict[str, ExportJob] = {}
        self._version: bytes | str | None = None

    def create(self, config: ExportJobConfig, state: JobState = JobState.RUNNING) -> ExportJob:
        job_id = secrets.token_hex(4)
        now = _now_iso()
        job = ExportJob(id=job_id, config=config, state=state, created_at=now, updated_at=now)
        self._save(job)
        return job

    def _save(self, job: ExportJob) -> None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(keys.jobs(), job.id, job.to_json())
        pipe.incr(keys.jobs_version())
        pipe.execute()

    def get(self, job_id: str) -> ExportJob:
        raw = self._redis.hget(keys.jobs(), job_id)
        if raw is None:
            raise JobNotFound(job_id)
        return ExportJob.from_json(raw)

    def list(self) -> list[ExportJob]:
        jobs = [ExportJob.from_json(v) for v in self._redis.hvals(keys.jobs())]
        return sorted(jobs, key=lambda j: (j.created_at, j.id))

    def set_state(self, job_id: str, state: JobState | str, reason: str = "") -> ExportJob:
        """Change a job's state; ``reason`` is shown to operators (kept only while paused)."""
        job = self._change_state(job_id, JobState(state), reason, None)
        assert job is not None  # no precondition, so the change always happens
        return job

    def set_state_if(
        self, job_id: str, state: JobState, only_from: Iterable[JobState], reason: str = ""
    ) -> bool:
        """Change the state only if the job is in one of ``only_from``; True if it changed.

        So a backfill finishing never overwrites a pause that a flush wrote a moment earlier, and
        a flush pausing never overwrites an operator's stop.
        """
        return self._change_state(job_id, state, reason, frozenset(only_from)) is not None

    def _change_state(
        self, job_id: str, state: JobState, reason: str, only_from: frozenset[JobState] | None
    ) -> ExportJob | None:
        """Read-modify-write of one job under WATCH, so concurrent state changes never get lost."""
        while True:
            with self._redis.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(keys.jobs())  # type: ignore[no-untyped-call]
                    raw = pipe.hget(keys.jobs(), job_id)
                    if raw is None:
                        raise JobNotFound(job_id)
                    job = ExportJob.from_json(raw)
                    if only_from is not None and job.state not in only_from:
                        return None
                    job.state = state
                    job.pause_reason = reason if state is JobState.PAUSED else ""
                    job.updated_at = _now_iso()
                    pipe.multi()
                    pipe.hset(keys.jobs(), job.id, job.to_json())
                    pipe.incr(keys.jobs_version())
                    pipe.execute()
                    return job
                except redis.WatchError:
                    continue

    # --- routing (hot path) ---------------------------------------------------------------------
    def cached(self, job_id: str) -> ExportJob | None:
        """The job as of now, from this process's copy of the job table (reloaded if it changed)."""
        self.refresh()
        return self._cache.get(job_id)

    def routes(self, audience: str) -> builtins.list[ExportJob]:
        """Jobs that receive transitions for ``audience``, as of the last :meth:`refresh`."""
        return [
            j for j in self._cache.values() if j.state in ROUTED_STATES and audience in j.config.audiences
        ]

    def active(self) -> builtins.list[ExportJob]:
        """Jobs the sweep looks after (everything but created and stopped)."""
        self.refresh()
        return [j for j in self._cache.values() if j.state in ROUTED_STATES]

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
        self._version = version
