"""Changing a running job: ``jobs update``, ``jobs resync``, ``jobs stop --teardown``, retries.

:mod:`worker.setup.changes` works out what a change sends (:class:`MemberSend`: an audience's
current members as enters or exits, from its Lytics segment or a member file); this module carries
it out with the backfill's machinery (:mod:`worker.backfill.steps`), in an order that loses
nothing if the process dies at any point:

1. member files are stored first, as chunks named after the operation's id (a change refused
   afterwards deletes them);
2. the re-drive schedule gets an ``@ops`` entry, so the sweep finishes step 4 if this process dies;
3. the change and its operations are written in one transaction on the job record (the new
   configuration, ``pending_ops``, the new state); processes reload their job table, so the next
   transition is routed and mapped by the new configuration (and the compiled mapping is rebuilt:
   :func:`worker.mapping.mapper.compiled_mapper` compares configurations);
4. each operation becomes a backfill part starting *now*: its changes carry this time, later than
   the change, so a real-time transition newer than it wins (last writer wins) and an older one,
   including one mapped by the old configuration just before, loses.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from worker import jsonio
from worker.backfill import steps
from worker.dispatch import Dispatcher
from worker.mapping import transitions
from worker.setup.changes import MemberSend, UpdatePlan
from worker.setup.jobconfig import ExportJobConfig, JobState
from worker.setup.jobs import ExportJob, JobStateError, JobStore, transition_problem
from worker.store import keys

#: Why a member-file line is left out (besides not_json / not_an_object).
TRANSITION_NOT_PROFILE = "transition_not_profile"


#: What reading one member file found: profiles stored, lines left out by reason (the file
#: backfill's report; its transition counts stay 0 here, member files hold profiles only).
MemberFileReport = steps.FileReport


@dataclass
class Applied:
    """What a change started: parts (``<slug>`` or ``teardown:<slug>``), member files read."""

    job: ExportJob
    parts: list[str] = field(default_factory=list)
    files: dict[str, MemberFileReport] = field(default_factory=dict)


def member_profiles(lines: Iterable[str | bytes], report: MemberFileReport) -> Iterable[bytes]:
    """The profiles of a member file, one JSON object a line, as their own bytes. A line that is not
    a JSON object, or is a transition rather than a profile, is left out and counted."""
    for raw in lines:
        data = raw.encode(errors="surrogateescape") if isinstance(raw, str) else raw
        line = data.strip().removeprefix(b"\xef\xbb\xbf")
        if not line:
            continue
        try:
            obj = jsonio.loads(line)
        except (ValueError, RecursionError):
            report.skip(transitions.NOT_JSON)
            continue
        if not isinstance(obj, dict) or not obj:
            report.skip(transitions.NOT_AN_OBJECT)
            continue
        if "event" in obj and "audience" in obj and "user" in obj:
            report.skip(TRANSITION_NOT_PROFILE)
            continue
        report.profiles += 1
        yield line


def _store_member_file(
    client: redis.Redis,
    job_id: str,
    run: str,
    lines: Iterable[str | bytes],
    report: MemberFileReport,
    written: list[str],
    chunk_lines: int,
) -> int:
    batch: list[bytes] = []

    def put() -> None:
        key = keys.backfill_file_chunk(job_id, steps.chunk_id(run, report.chunks))
        written.append(key)
        client.rpush(key, *batch)
        report.chunks += 1
        batch.clear()

    for profile in member_profiles(lines, report):
        batch.append(profile)
        if len(batch) >= chunk_lines:
            put()
    if batch:
        put()
    return report.chunks


def _operations(
    client: redis.Redis,
    job_id: str,
    sends: Sequence[MemberSend],
    member_files: Mapping[str, Iterable[str | bytes]],
    at_ms: int | None,
    reports: dict[str, MemberFileReport],
    written: list[str],
    chunk_lines: int,
) -> list[dict[str, Any]]:
    """The job-record form of each send (``pending_ops``), storing member files' chunks on the way."""
    ops: list[dict[str, Any]] = []
    for send in sends:
        run = secrets.token_hex(6)
        op: dict[str, Any] = {"id": run, "audience": send.audience, "event": send.event, "op": send.why}
        if send.segment is not None:
            op.update(
                source=steps.LYTICS, segment=send.segment, token_env=send.token_env, page_size=send.page_size
            )
        else:
            report = reports.setdefault(send.audience, MemberFileReport())
            lines = member_files[send.audience]
            op.update(
                source=steps.CHUNKS,
                chunks=_store_member_file(client, job_id, run, lines, report, written, chunk_lines),
            )
            if at_ms is not None and send.event == steps.ENTER:
                # An older file: its enters carry its export time, so later real-time exits win.
                op["at_ms"] = at_ms
        ops.append(op)
    return ops


def _write(
    client: redis.Redis,
    job_id: str,
    sends: Sequence[MemberSend],
    member_files: Mapping[str, Iterable[str | bytes]],
    at_ms: int | None,
    chunk_lines: int,
    commit: Callable[[list[dict[str, Any]]], ExportJob],
) -> tuple[ExportJob, dict[str, MemberFileReport]]:
    """Steps 1-3 of the module docstring; ``commit(ops)`` writes the change (or raises)."""
    reports: dict[str, MemberFileReport] = {}
    written: list[str] = []
    try:
        ops = _operations(client, job_id, sends, member_files, at_ms, reports, written, chunk_lines)
        if ops:
            steps.schedule_ops(client, job_id)
        job = commit(ops)
    except BaseException:
        if written:
            client.delete(*written)
        raise
    return job, reports


def apply_update(
    client: redis.Redis,
    jobs: JobStore,
    job: ExportJob,
    config: ExportJobConfig,
    plan: UpdatePlan,
    dispatcher: Dispatcher,
    member_files: Mapping[str, Iterable[str | bytes]] | None = None,
    at_ms: int | None = None,
    chunk_lines: int = steps.FILE_CHUNK_LINES,
) -> Applied:
    """Carry out ``jobs update``: ``job`` as it was read when ``plan`` was made from it and ``config``.

    Refused (:class:`~worker.setup.jobs.JobError`) when the job changed meanwhile, its state no
    longer allows it or the new label is taken; nothing is written then.
    """
    if plan.problems:
        raise ValueError("a plan with problems cannot be applied")
    sends = plan.sends if plan.started else []

    def commit(ops: list[dict[str, Any]]) -> ExportJob:
        state = JobState.BACKFILLING if ops and job.state is JobState.RUNNING else None
        return jobs.update_config(job.id, config, expected=job.config, ops=ops, state=state)

    updated, reports = _write(client, job.id, sends, member_files or {}, at_ms, chunk_lines, commit)
    applied = Applied(updated, files=reports)
    applied.parts = steps.activate_pending(client, jobs, job.id, dispatcher)
    for audience in plan.change.removed:  # (kept ones too: their members are no longer backfilled)
        steps.cancel_part(client, job.id, audience, f"audience {audience!r} was removed from the job")
    if plan.change.removed:
        steps.maybe_running(client, jobs, job.id)
    if any(item.field == "backfill" for item in plan.change.other) and updated.state is not JobState.CREATED:
        # A part waiting out an error (say a wrong lytics_token_env) tries the fixed settings now.
        steps.redrive(client, jobs, job.id, dispatcher, errored_only=True)
    applied.job = jobs.get(job.id)
    return applied


def _check_takes_changes(job: ExportJob, what: str) -> None:
    if job.state is JobState.STOPPED or job.stop_after_teardown:
        raise JobStateError(
            f"job {job.id} is {'stopping' if job.state is not JobState.STOPPED else 'stopped'}: "
            f"it cannot {what}"
        )
    if job.state is JobState.CREATED:
        raise JobStateError(
            f"job {job.id} has not started: `jobs resume {job.id}` starts it, and its backfill sends "
            "the current members"
        )


def resync(
    client: redis.Redis,
    jobs: JobStore,
    job_id: str,
    sends: Sequence[MemberSend],
    dispatcher: Dispatcher,
    member_files: Mapping[str, Iterable[str | bytes]] | None = None,
    at_ms: int | None = None,
    chunk_lines: int = steps.FILE_CHUNK_LINES,
) -> Applied:
    """``jobs resync``: send current members again as enters (a part under way restarts)."""
    _check_takes_changes(jobs.get(job_id), "be resynced")

    def commit(ops: list[dict[str, Any]]) -> ExportJob:
        def change(job: ExportJob) -> bool:
            _check_takes_changes(job, "be resynced")
            job.pending_ops = [*job.pending_ops, *ops]
            if job.state is JobState.RUNNING:
                job.state = JobState.BACKFILLING
            return True

        return jobs.modify(job_id, change)

    updated, reports = _write(client, job_id, sends, member_files or {}, at_ms, chunk_lines, commit)
    applied = Applied(updated, files=reports)
    applied.parts = steps.activate_pending(client, jobs, job_id, dispatcher)
    applied.job = jobs.get(job_id)
    return applied


def stop_with_teardown(
    client: redis.Redis,
    jobs: JobStore,
    job_id: str,
    sends: Sequence[MemberSend],
    dispatcher: Dispatcher,
    member_files: Mapping[str, Iterable[str | bytes]] | None = None,
    chunk_lines: int = steps.FILE_CHUNK_LINES,
) -> Applied:
    """``jobs stop --teardown``: the job takes no more changes, sends every current member of each
    audience ``<slug>: false``, and becomes ``stopped`` once Attentive has all of it.

    A job that never started is just stopped (nothing was sent); a stopping one carries on.
    """
    job = jobs.get(job_id)
    if job.state is JobState.CREATED:
        return Applied(jobs.set_state(job_id, JobState.STOPPED))
    if job.state is JobState.STOPPED:
        raise JobStateError(f"job {job_id} is stopped already; nothing can be sent for it any more")
    if job.stop_after_teardown:
        steps.redrive(client, jobs, job_id, dispatcher)
        return Applied(jobs.get(job_id))

    def commit(ops: list[dict[str, Any]]) -> ExportJob:
        steps.schedule_stop_check(client, job_id)

        def change(j: ExportJob) -> bool:
            if j.stop_after_teardown:
                return False  # another stop --teardown got there first
            j.stop_after_teardown = True
            problem = transition_problem(j.id, j.state, JobState.STOPPING, True)
            if problem is not None:
                raise JobStateError(problem)
            j.state = JobState.STOPPING
            j.pause_reason = ""
            j.pending_ops = [*j.pending_ops, *ops]
            return True

        return jobs.modify(job_id, change)

    updated, reports = _write(client, job_id, sends, member_files or {}, None, chunk_lines, commit)
    applied = Applied(updated, files=reports)
    applied.parts = steps.activate_pending(client, jobs, job_id, dispatcher)
    steps.cancel_enter_parts(client, job_id, "the job is stopping: only its teardown is sent")
    dispatcher.backfill(job_id, steps.STOP_PART)
    dispatcher.flush(job_id)  # a paused job's buffered changes go out (before its teardown)
    applied.job = jobs.get(job_id)
    return applied


def retry_now(client: redis.Redis, jobs: JobStore, job_id: str, dispatcher: Dispatcher) -> list[str]:
    """``jobs backfill JOB --retry-now``: every unfinished part tries again at once (a part waiting
    out an error the operator has fixed); returns them."""
    job = jobs.get(job_id)
    if job.state is JobState.STOPPED:
        raise JobStateError(f"job {job_id} is stopped: its backfill was abandoned")
    if job.state is JobState.CREATED:
        raise JobStateError(f"job {job_id} has not started: `jobs resume {job_id}` starts it")
    return steps.redrive(client, jobs, job_id, dispatcher)
