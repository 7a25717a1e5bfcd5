"""``attentive-export jobs delete|update|resync|stop|backfill``: the operator's side of a job's life.

``jobs update``, ``jobs resync`` and ``jobs stop --teardown`` work out what a change sends with
:mod:`worker.setup.changes` and carry it out with :mod:`worker.backfill.ops`; every problem is
listed at once, as for ``jobs create``. ``jobs backfill`` shows a job's backfill, resync and
teardown parts, with a part's last error and when it tries next; ``--retry-now`` tries at once.

``jobs delete`` removes a stopped job and every Redis key it has.

The rules (only a stopped job, not while tasks may still write to it) are the job store's; this
is the operator's side. Right after a stop, tasks that read the job before it may still be
writing, so the command waits that out with a note rather than failing: ``jobs stop X && jobs
delete X`` works in a script.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import redis

from worker.backfill import ops, steps
from worker.dispatch import Dispatcher
from worker.mapping.transitions import Rejected, read_time_ms
from worker.observe.summary import iso, when
from worker.settings import Settings
from worker.setup.authorizations import AuthorizationNotFound, AuthorizationStore
from worker.setup.changes import MemberSend, plan_update, render_update, resync_sends, teardown_sends
from worker.setup.jobconfig import JobConfigError, JobState, load_job_config
from worker.setup.jobs import JobBusy, JobError, JobStore

#: Longest single sleep between two attempts, so a wait ends soon after the job becomes free.
_MAX_SLEEP_SECONDS = 5.0


def delete(client: redis.Redis, job_id: str, sleep: Callable[[float], None] = time.sleep) -> None:
    """Delete the job (waiting while it is busy) and print what was removed."""
    store = JobStore(client)
    announced = False
    while True:
        try:
            deleted = store.delete(job_id)
            break
        except JobBusy as busy:
            if not announced:
                print(f"note: {busy}; waiting before deleting (Ctrl-C to cancel; nothing is deleted yet)")
                announced = True
            sleep(min(max(busy.wait_seconds, 0.1), _MAX_SLEEP_SECONDS))
    job, purged = deleted.job, deleted.purged
    extra = f" and {purged.global_entries} backfill schedule entries" if purged.global_entries else ""
    print(f"deleted export job {job.id} ({job.config.label}): removed {purged.keys} Redis keys{extra}")


# --- changing a job: update, resync, stop --teardown, backfill retries -------------------------------
class CommandError(JobError):
    """A problem with the command line itself (a bad --members or --at); one line, exit status 2."""


Connect = Callable[[Settings], redis.Redis]


def add_commands(jobs: Any, connect: Connect) -> None:
    """``jobs update``, ``jobs resync``, ``jobs stop [--teardown]`` and ``jobs backfill`` on the
    ``jobs`` subparsers; ``connect`` opens Redis as every other command does."""
    members_help = (
        "AUDIENCE=FILE: the audience's current members, one JSON profile a line, instead of its Lytics "
        "segment (repeatable)"
    )
    up = jobs.add_parser(
        "update",
        help="change a job from a file in the format of `jobs create`: added audiences are backfilled, "
        "removed ones torn down",
    )
    up.add_argument("job", help="export job id (`jobs list` shows them)")
    up.add_argument("file", help="the whole new configuration (YAML, or JSON when it ends in .json)")
    up.add_argument("--dry-run", action="store_true", help="show the difference and what would be sent")
    up.add_argument(
        "--keep-removed",
        action="store_true",
        help="leave removed audiences' flags as they are in Attentive (default: each member gets <slug>: false)",
    )
    up.add_argument(
        "--resync", action="store_true", help="send every current member again (a changed mapping)"
    )
    up.add_argument("--members", action="append", default=[], metavar="AUDIENCE=FILE", help=members_help)
    up.add_argument("--at", help="when the --members files' membership was true (default: now)")
    up.set_defaults(func=functools.partial(cmd_update, connect=connect))

    rs = jobs.add_parser("resync", help="send the current members of the job's audiences again")
    rs.add_argument("job", help="export job id (`jobs list` shows them)")
    rs.add_argument("--audience", help="only this audience")
    rs.add_argument("--members", action="append", default=[], metavar="AUDIENCE=FILE", help=members_help)
    rs.add_argument("--at", help="when the --members files' membership was true (default: now)")
    rs.set_defaults(func=functools.partial(cmd_resync, connect=connect))

    st = jobs.add_parser("stop", help="stop the job for good: transitions no longer reach it, no resume")
    st.add_argument("job", help="export job id (`jobs list` shows them)")
    st.add_argument(
        "--teardown",
        action="store_true",
        help="first set every audience flag of the job's current members to false, then stop",
    )
    st.add_argument("--members", action="append", default=[], metavar="AUDIENCE=FILE", help=members_help)
    st.set_defaults(func=functools.partial(cmd_stop, connect=connect))

    bf = jobs.add_parser(
        "backfill", help="a job's backfill, resync and teardown parts: progress, errors, next try"
    )
    bf.add_argument("job", help="export job id (`jobs list` shows them)")
    bf.add_argument("--retry-now", action="store_true", help="every unfinished part tries again now")
    bf.add_argument("--json", action="store_true", help="print JSON for scripts")
    bf.set_defaults(func=functools.partial(cmd_backfill, connect=connect))


def _member_paths(values: Sequence[str]) -> dict[str, Path]:
    paths: dict[str, Path] = {}
    for value in values:
        audience, sep, path = value.partition("=")
        if not sep or not audience.strip() or not path.strip():
            raise CommandError(f"--members {value!r}: write AUDIENCE=FILE")
        if audience.strip() in paths:
            raise CommandError(f"--members: {audience.strip()!r} is given twice")
        paths[audience.strip()] = Path(path.strip())
    return paths


def _at(value: str | None) -> int | None:
    if value is None:
        return None
    parsed = read_time_ms(value, int(time.time() * 1000))
    if isinstance(parsed, Rejected):
        raise CommandError(f"--at: {parsed.detail}")
    return parsed


@contextlib.contextmanager
def _open_members(paths: Mapping[str, Path]) -> Iterator[dict[str, Iterable[bytes]]]:
    with contextlib.ExitStack() as stack:
        files: dict[str, Iterable[bytes]] = {}
        for audience, path in paths.items():
            try:
                files[audience] = stack.enter_context(path.open("rb"))
            except OSError as exc:
                raise CommandError(f"--members {audience}: cannot read {path}: {exc.strerror}") from None
        yield files


def _dispatcher() -> Dispatcher:
    """The Celery dispatcher once the broker answered (as ``worker.cli.main``): asked for before a
    command writes anything, so with the broker down nothing changes."""
    from worker import dispatch

    dispatcher = dispatch.CeleryDispatcher()
    check = getattr(dispatcher, "check_broker", None)  # (tests pass recording dispatchers)
    if callable(check):
        check()
    return dispatcher


def _file_notes(applied: ops.Applied, paths: Mapping[str, Path]) -> None:
    for audience, report in applied.files.items():
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(report.reasons.items()))
        skipped = f", {report.skipped} lines left out ({reasons})" if report.skipped else ""
        print(f"read {paths[audience]}: {report.profiles} members of {audience}{skipped}")


def cmd_update(args: argparse.Namespace, settings: Settings, connect: Connect) -> None:
    config = load_job_config(args.file)
    paths = _member_paths(args.members)
    at_ms = _at(args.at)
    client = connect(settings)
    store = JobStore(client)
    job = store.get(args.job)
    same_auth, auth_problems = _same_authorization(client, job.config.authorization, config.authorization)
    plan = plan_update(
        job.config,
        config,
        started=job.state is not JobState.CREATED,
        keep_removed=args.keep_removed,
        resync=args.resync,
        member_files=set(paths),
        same_authorization=same_auth,
    )
    plan.problems[:0] = auth_problems
    if job.state is JobState.STOPPED or job.stop_after_teardown:
        plan.problems.insert(
            0,
            f"job {job.id} is {'stopped' if job.state is JobState.STOPPED else 'stopping'}: it cannot change",
        )
    if args.dry_run:
        for line in render_update(plan, job.id, job.state):
            print(line)
        if plan.problems:
            raise JobConfigError(plan.problems)
        print("dry run: nothing was changed")
        return
    if plan.problems:
        raise JobConfigError(plan.problems)
    dispatcher = _dispatcher()
    if plan.nothing_to_do:
        steps.activate_pending(client, store, job.id, dispatcher)  # an earlier update cut short
        print(f"job {job.id}: the file holds its configuration already; nothing changed")
        return
    with _open_members(paths) as files:
        applied = ops.apply_update(client, store, job, config, plan, dispatcher, files, at_ms)
    for line in render_update(plan, job.id, job.state)[1:]:
        print(line)
    _file_notes(applied, paths)
    print(f"updated job {job.id} ({config.label}): now {applied.job.state}")
    if applied.parts:
        print(f"sending the members of {', '.join(applied.parts)}; follow it with `jobs backfill {job.id}`")


def _same_authorization(client: redis.Redis, old: str, new: str) -> tuple[bool, list[str]]:
    if old == new:
        return True, []
    store = AuthorizationStore(client, None)
    try:
        new_id = store.get(new).id
    except AuthorizationNotFound:
        return True, [f"authorization: no authorization with id or label {new!r}"]
    try:
        old_id = store.get(old).id
    except AuthorizationNotFound:
        return True, []  # the old one was deleted: the job cannot send with it anyway
    return old_id == new_id, []


def cmd_resync(args: argparse.Namespace, settings: Settings, connect: Connect) -> None:
    paths = _member_paths(args.members)
    at_ms = _at(args.at)
    client = connect(settings)
    store = JobStore(client)
    job = store.get(args.job)
    sends, notes, problems = resync_sends(job.config, args.audience, set(paths))
    if problems:
        raise JobConfigError(problems)
    dispatcher = _dispatcher()
    with _open_members(paths) as files:
        applied = ops.resync(client, store, job.id, sends, dispatcher, files, at_ms)
    for send in sends:
        print(send.describe())
    for note in notes:
        print(f"note: {note}")
    _file_notes(applied, paths)
    print(f"job {job.id} is now {applied.job.state}; follow the resync with `jobs backfill {job.id}`")


def cmd_stop(args: argparse.Namespace, settings: Settings, connect: Connect) -> None:
    client = connect(settings)
    store = JobStore(client)
    if not args.teardown:
        if args.members:
            raise CommandError("--members goes with --teardown")
        was = store.get(args.job)
        job = store.set_state(args.job, JobState.STOPPED)
        print(f"job {job.id} is now stopped")
        if was.state is JobState.STOPPING:
            print("note: the rest of its teardown is not sent")
        return
    paths = _member_paths(args.members)
    job = store.get(args.job)
    sends: list[MemberSend] = []
    if job.state not in (JobState.CREATED, JobState.STOPPED) and not job.stop_after_teardown:
        sends, problems = teardown_sends(job.config, set(paths))
        if problems:
            raise JobConfigError(problems)
    dispatcher = _dispatcher()
    with _open_members(paths) as files:
        applied = ops.stop_with_teardown(client, store, job.id, sends, dispatcher, files)
    if applied.job.state is JobState.STOPPED:
        print(f"job {job.id} is now stopped (it had not started: nothing was sent for it)")
        return
    if not sends:
        print(f"job {job.id} is stopping already; its teardown goes on (`jobs backfill {job.id}`)")
        return
    for send in sends:
        print(send.describe())
    _file_notes(applied, paths)
    print(
        f"job {job.id} is now {applied.job.state}: it takes no more changes and becomes stopped once "
        f"Attentive has its teardown; follow it with `jobs backfill {job.id}`"
    )


def cmd_backfill(args: argparse.Namespace, settings: Settings, connect: Connect) -> None:
    client = connect(settings)
    store = JobStore(client)
    job = store.get(args.job)
    retried: list[str] = []
    if args.retry_now:
        retried = ops.retry_now(client, store, job.id, _dispatcher())
        job = store.get(job.id)
    block = steps.progress(client, job.id)
    if args.json:
        print(
            json.dumps({"job": job.id, "state": job.state, "retried": retried, "backfill": block}, indent=2)
        )
        return
    now = int(time.time() * 1000)
    print(f"job {job.id} ({job.config.label}), {job.state}")
    if args.retry_now:
        print(
            f"retrying now: {', '.join(retried)}" if retried else "nothing to retry: every part is finished"
        )
    for line in progress_lines(block, now):
        print(line)


def progress_lines(block: Mapping[str, Any] | None, now_ms: int) -> list[str]:
    """One line per part (and its error, with when it tries next), for ``jobs backfill``."""
    if not block:
        return ["  no backfill, resync or teardown"]
    parts = list((block.get("audiences") or {}).items())
    if block.get("file"):
        parts.append(("@file", {**block["file"], "op": "file backfill"}))
    lines = []
    for name, part in parts:
        total = part.get("total")
        members = f"{part.get('members', 0)}" + (f" of {total}" if total is not None else "")
        if part.get("cancelled"):
            state = f"cancelled ({part['cancelled']})"
        else:
            state = "finished" if part.get("finished") else "in progress"
        waiting = f", {part['chunks_waiting']} chunks waiting" if part.get("chunks_waiting") else ""
        if part.get("lines_total") is not None and (part.get("streaming") or part.get("incomplete")):
            waiting += f", staged {part.get('lines_staged') or 0} of {part['lines_total']} lines"
        started = part.get("members_at_ms")
        at = f", changes at {iso(started)}" if started else ""
        lines.append(
            f"  {name}: {part.get('op', 'backfill')}, {part.get('pages', 0)} pages, {members} members"
            f"{waiting}, {state}{at}"
        )
        if part.get("last_error") and (not part.get("finished") or part.get("incomplete")):
            lines.append(
                f"    last error: {part['last_error']} ({when(part.get('last_error_at_ms'), now_ms)})"
            )
            if part.get("next_try_at_ms") is not None:
                lines.append(
                    f"    next try: {when(part['next_try_at_ms'], now_ms)}; `--retry-now` tries at once"
                )
    return lines
