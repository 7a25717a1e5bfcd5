"""``attentive-export``: the operator's command line.

Every failure a user can cause (a bad setting, a bad file, a refused key, a missing secret key, an
unknown job, Redis or the broker down) ends in one clear line on stderr starting ``error:`` and exit
status 2, never a traceback (a job file with several problems gives one such line per problem).
API keys are read from an environment variable or a prompt, never from the command line (it ends
up in shell history).

Commands that queue work check the Celery broker before they change anything
(:func:`_dispatcher`), so with the broker down they refuse and leave every state as it was.

Kubernetes probes run ``attentive-export health`` every few seconds in every pod, so this module
imports at the top only what ``health`` needs: it parses with a parser of the monitoring commands
alone (:func:`_parser`), and every other command imports its modules (Celery, the pipeline, the
backfill...) when it runs. ``tests/unit/test_health.py`` checks that ``health`` loads no Celery.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import redis

from worker.cli import monitor
from worker.settings import Settings, SettingsError, load_settings
from worker.store.connection import connect

if TYPE_CHECKING:
    from worker.backfill import steps as backfill
    from worker.dispatch import Dispatcher
    from worker.mapping.transitions import Rejected
    from worker.setup.jobconfig import JobState
    from worker.setup.jobs import ExportJob

#: Transitions per inbox chunk (one ingest task each) when ingesting a file.
INGEST_CHUNK = 1000
#: Unusable lines of an ingested file named by number in its summary (all are counted).
SHOWN_UNUSABLE_LINES = 3


class UserError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


def _redis(settings: Settings) -> redis.Redis:
    from kombu.utils.url import maybe_sanitize_url

    try:
        client = connect(settings.redis_url)
        client.ping()
    except redis.RedisError as exc:
        raise UserError(
            f"cannot reach Redis at REDIS_URL={maybe_sanitize_url(settings.redis_url)}: {exc}"
        ) from None
    return client


def _dispatcher() -> Dispatcher:
    """The Celery dispatcher, once the broker answered: called before a command changes anything,
    so with the broker down it changes nothing (one ``error:`` line, exit status 2)."""
    from worker import dispatch

    dispatcher = dispatch.CeleryDispatcher()
    check = getattr(dispatcher, "check_broker", None)  # (tests pass recording dispatchers)
    if callable(check):
        check()
    return dispatcher


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


# --- authorizations ---------------------------------------------------------------------------------
def cmd_auth_add(args: argparse.Namespace, settings: Settings) -> None:
    from worker.setup.authorizations import AuthorizationStore

    api_key = os.environ.get(args.api_key_env, "") if args.api_key_env else ""
    if not api_key:
        if not sys.stdin.isatty():
            api_key = sys.stdin.readline().strip()
        else:
            api_key = getpass.getpass("Attentive API key: ").strip()
    if not api_key:
        raise UserError(
            "no API key given: set it in the variable named by --api-key-env, or type it at the prompt"
        )
    store = AuthorizationStore(_redis(settings), settings.secret_key_value())
    auth = store.create(args.label, api_key, args.description or "")
    print(
        f"saved authorization {auth.id} ({auth.label}) for {auth.company_name or 'unknown company'} {auth.key_hint}"
    )


def cmd_auth_list(args: argparse.Namespace, settings: Settings) -> None:
    from worker.setup.authorizations import AuthorizationStore

    store = AuthorizationStore(_redis(settings), settings.secret_key_value())
    rows = store.list()
    if args.json:
        _print_json([a.model_dump(mode="json") for a in rows])
        return
    if not rows:
        print("no authorizations; add one with `attentive-export auth add --label NAME`")
    for a in rows:
        print(f"{a.id}  {a.label:<30} {a.company_name or '-':<30} {a.key_hint}")


def cmd_auth_delete(args: argparse.Namespace, settings: Settings) -> None:
    """Refused while export jobs use it (they are listed); ``--force`` pauses the sending ones first."""
    from worker.setup.authusage import delete_authorization

    done = delete_authorization(_redis(settings), settings.secret_key_value(), args.authorization, args.force)
    for job in done.paused:
        print(f"paused job {job.id} ({job.config.label}): its authorization is deleted")
    for job in done.left:
        print(f"note: job {job.id} ({job.config.label}, {job.state}) names it; it stays {job.state}")
    print(f"deleted authorization {done.record.id} ({done.record.label})")


def cmd_secret_key(_args: argparse.Namespace, _settings: Settings | None) -> None:
    from worker.setup.crypto import generate_secret_key

    print(generate_secret_key())


# --- jobs -------------------------------------------------------------------------------------------
def cmd_jobs_create(args: argparse.Namespace, settings: Settings) -> None:
    from worker.backfill import steps as backfill
    from worker.setup.authorizations import AuthorizationStore
    from worker.setup.jobconfig import JobState, load_job_config
    from worker.setup.jobs import JobStore

    config = load_job_config(args.file)
    client = _redis(settings)
    AuthorizationStore(client, settings.secret_key_value()).get(config.authorization)
    dispatcher = None if args.no_start else _dispatcher()
    store = JobStore(client)
    job = store.create(config, state=JobState.CREATED)
    if dispatcher is not None:
        backfill.start(client, store, job.id, dispatcher)
        job = store.get(job.id)
    print(f"created export job {job.id} ({config.label}), state {job.state}")
    _backfill_notes(job)


def _backfill_notes(job: ExportJob) -> None:
    """Tell the operator which audiences are backfilled from Lytics and how to load the others."""
    from worker.backfill import steps as backfill
    from worker.setup.jobconfig import JobState

    if not job.config.existing_users or job.state is JobState.CREATED:
        return
    scanned = backfill.lytics_parts(job)
    if scanned:
        print(
            f"backfilling existing members of {', '.join(scanned)} from Lytics; follow it with `status {job.id}`"
        )
    others = [a for a in job.config.audiences if a not in scanned]
    if others:
        print(
            f"note: no Lytics segment configured for {', '.join(others)} (backfill.lytics_segments); "
            f"load existing members from a file with `attentive-export backfill {job.id} --audience A FILE`"
        )


def cmd_jobs_list(args: argparse.Namespace, settings: Settings) -> None:
    from worker.setup.jobs import JobStore
    from worker.store import keys
    from worker.store.joberrors import BLOCKED_REASON
    from worker.store.replies import text as reply_text

    client = _redis(settings)
    jobs = JobStore(client).list()
    if args.json:
        _print_json([json.loads(j.to_json()) for j in jobs])
        return
    if not jobs:
        print("no export jobs; create one with `attentive-export jobs create job.yaml`")
    for j in jobs:
        reason = f"  ({j.pause_reason})" if j.pause_reason else ""
        blocked = client.hget(keys.job_status(j.id), BLOCKED_REASON)
        if blocked is not None:  # its API key cannot be read: `status` says since when, next try
            reason += f"  (BLOCKED: {reply_text(blocked)})"
        print(f"{j.id}  {j.state:<11} {j.config.label:<30} {','.join(j.config.audiences)}{reason}")


def cmd_jobs_show(args: argparse.Namespace, settings: Settings) -> None:
    from worker.setup.jobs import JobStore

    _print_json(json.loads(JobStore(_redis(settings)).get(args.job).to_json()))


def _set_state(args: argparse.Namespace, settings: Settings, state: JobState, reason: str = "") -> None:
    from worker.setup.jobs import JobStore

    client = _redis(settings)
    job = JobStore(client).set_state(args.job, state, reason)
    print(f"job {job.id} is now {job.state}")


def cmd_jobs_pause(args: argparse.Namespace, settings: Settings) -> None:
    from worker.setup.jobconfig import JobState

    _set_state(args, settings, JobState.PAUSED, "paused by an operator")


def cmd_jobs_resume(args: argparse.Namespace, settings: Settings) -> None:
    """Start a created job, or resume one: backfilling while its backfill is unfinished, else running."""
    from worker.backfill import steps as backfill
    from worker.setup.jobconfig import JobState
    from worker.setup.jobs import JobStore

    client = _redis(settings)
    store = JobStore(client)
    first_start = store.get(args.job).state is JobState.CREATED
    dispatcher = _dispatcher()  # before the state changes: with the broker down, nothing changes
    parts = backfill.resume(client, store, args.job, dispatcher)  # a stopped job: JobStateError
    job = store.get(args.job)
    print(f"job {job.id} is now {job.state}")
    if first_start:
        _backfill_notes(job)
        return
    if parts:
        print(f"the backfill of {', '.join(parts)} goes on where it was; follow it with `status {job.id}`")
    if job.sending:
        dispatcher.flush(job.id)


def cmd_jobs_delete(args: argparse.Namespace, settings: Settings) -> None:
    from worker.cli import jobs as jobs_cli

    jobs_cli.delete(_redis(settings), args.job)


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    """Readable by default, ``--json`` for scripts, ``--watch`` to refresh (worker/cli/monitor.py)."""
    return monitor.cmd_status(args, settings)


def cmd_trace(args: argparse.Namespace, settings: Settings) -> None:
    """Where one user's changes are, per audience (worker/cli/trace.py)."""
    from worker.cli import trace as trace_cli

    trace_cli.run(args, _redis(settings))


def cmd_deadletters(args: argparse.Namespace, settings: Settings) -> None:
    from worker.cli import deadletters as deadletters_cli

    try:
        deadletters_cli.run(args, _redis(settings))
    except deadletters_cli.CommandError as exc:
        raise UserError(str(exc)) from None


def cmd_preview(args: argparse.Namespace, _settings: Settings) -> None:
    """Map transitions with a job file and print what would be sent, touching nothing."""
    from worker.mapping.mapper import Mapper
    from worker.mapping.transitions import Rejected, parse_line
    from worker.setup.jobconfig import load_job_config

    config = load_job_config(args.job_file)
    mapper = Mapper(config)
    with _open_input(args.input, binary=True) as lines:  # undecodable bytes: a counted line, not a crash
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            for item in parse_line(line):
                if isinstance(item, Rejected):
                    _print_json({"line": n, "rejected": item.reason, "detail": item.detail})
                    continue
                if item.audience not in config.audiences:
                    _print_json(
                        {"line": n, "skipped": "audience not exported by this job", "audience": item.audience}
                    )
                    continue
                result = mapper.map(item.user, {item.audience: item.enter}, include_attributes=item.enter)
                _print_json(
                    {
                        "line": n,
                        "user_key": mapper.user_key(item.user),
                        "record": result.record,
                        "skipped": result.skip_reason,
                        "dropped_fields": [list(d) for d in result.dropped],
                    }
                )


class _IngestReport:
    """What ``ingest`` queued and what it left out, for its one-line summary."""

    def __init__(self) -> None:
        self.queued = 0
        self.chunks = 0
        self.unusable: dict[str, int] = {}
        self.examples: list[str] = []

    def skip(self, line_number: int, problem: Rejected) -> None:
        self.unusable[problem.reason] = self.unusable.get(problem.reason, 0) + 1
        if len(self.examples) < SHOWN_UNUSABLE_LINES:
            self.examples.append(f"line {line_number}: {problem.detail}")

    def summary(self) -> str:
        queued = f"queued {_plural(self.queued, 'line')} in {_plural(self.chunks, 'chunk')}"
        if not self.unusable:
            return f"{queued}; follow progress with `attentive-export status`"
        left_out = sum(self.unusable.values())
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(self.unusable.items()))
        return (
            f"{queued}; not queued: {_plural(left_out, 'unusable line')} ({reasons}; "
            f"{'; '.join(self.examples)}{'; ...' if left_out > len(self.examples) else ''}); "
            "follow progress with `attentive-export status`"
        )


def _plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _unusable(line: bytes) -> Rejected | None:
    """Why a line holds no usable transition (the reason ingest would count), or None."""
    from worker.mapping.transitions import Rejected, Transition, parse_line

    first: Rejected | None = None
    for item in parse_line(line):
        if isinstance(item, Transition):
            return None
        first = first or item
    return first or Rejected("no_transition", "no transition in it")


def cmd_ingest(args: argparse.Namespace, settings: Settings) -> None:
    """Queue a JSONL file of transitions: chunks go to the inbox, ingest tasks carry chunk ids.

    Each line is read as the ingest task would read it: a line without one usable transition (not
    UTF-8, not JSON, no audience...) is not queued but counted by reason in the summary, with the
    first few line numbers; a line with at least one goes whole (ingest counts the rest of it).
    """
    from worker.pipeline import inbox, ingest

    client = _redis(settings)
    dispatcher = _dispatcher()  # with the broker down: nothing is written
    report = _IngestReport()
    batch: list[bytes] = []

    def queue() -> None:
        chunk_id = inbox.put_chunk(client, batch)
        try:
            dispatcher.ingest(chunk_id)
        except Exception as exc:  # the broker went away mid-file: take this chunk back, say how far
            inbox.drop_chunk(client, chunk_id)
            raise UserError(
                f"the Celery broker stopped answering ({type(exc).__name__}: {exc}) after "
                f"{_plural(report.queued, 'line')} were queued in {_plural(report.chunks, 'chunk')}; "
                f"the rest of {args.input} was not queued"
            ) from None
        report.queued += len(batch)
        report.chunks += 1
        batch.clear()

    # Raw bytes, not text: a line that is not UTF-8 is that line's problem (counted as not_json),
    # not a crash halfway through the file.
    with _open_input(args.input, binary=True) as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            problem = _unusable(line)
            if problem is not None:
                report.skip(number, problem)
                continue
            batch.append(line)
            if len(batch) >= INGEST_CHUNK:
                queue()
    if batch:
        queue()
    # Counted where the ingest task counts the lines it refuses: `status` shows both.
    ingest.count_rejected(client, report.unusable)
    print(report.summary())


def cmd_backfill(args: argparse.Namespace, settings: Settings) -> int | None:
    """Backfill Existing Users of a started job from a JSONL file, as chunks for backfill tasks.

    Streamed (worker.backfill.steps.backfill_file): at most BACKFILL_FILE_MAX_STAGED_LINES of the
    job's lines wait in Redis, so the command waits for the backfill on a large file. Ctrl-C stops
    it: what was staged is sent, and one line says how to send the rest (exit status 130)."""
    from worker.backfill import steps as backfill
    from worker.mapping.transitions import Rejected, read_time_ms
    from worker.setup.jobconfig import JobState
    from worker.setup.jobs import JobStore

    client = _redis(settings)
    job = JobStore(client).get(args.job)
    if not job.routed:  # not started, stopping or stopped
        raise UserError(
            f"job {job.id} is {job.state}: "
            + (
                "start it first with `jobs resume`"
                if job.state is JobState.CREATED
                else "it takes no changes"
            )
        )
    if args.audience is not None and args.audience not in job.config.audiences:
        raise UserError(
            f"--audience {args.audience!r} is not exported by job {job.id} ({', '.join(job.config.audiences)})"
        )
    at_ms = int(time.time() * 1000)
    if args.at is not None:
        parsed = read_time_ms(args.at, at_ms)
        if isinstance(parsed, Rejected):
            raise UserError(f"--at: {parsed.detail}")
        at_ms = parsed
    dispatcher = _dispatcher()  # with the broker down: nothing is written
    report = backfill.FileReport()
    try:
        with _seekable_input(args.input) as (fh, start):

            def read() -> BinaryIO:
                fh.seek(start)
                return fh

            # Read through once writing nothing, then streamed under the cap (backfill_file).
            backfill.backfill_file(
                client,
                job,
                read,
                args.audience,
                at_ms,
                dispatcher,
                max_staged=settings.backfill_file_max_staged_lines,
                at_defaulted=args.at is None,
                on_wait=_StreamProgressLine(),
                report=report,
            )
    except backfill.FileBackfillError as exc:
        raise UserError(f"{args.input}: {exc}; nothing was queued") from None
    except backfill.FileStreamError as exc:
        raise UserError(f"{args.input}: {exc}{_to_send_the_rest(report, at_ms, args.at is None)}") from None
    except KeyboardInterrupt:
        print(
            f"interrupted: {_interrupted(args.input, job.id, report, at_ms, args.at is None)}",
            file=sys.stderr,
        )
        return 130
    reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(report.reasons.items()))
    skipped = f", {report.skipped} skipped ({reasons})"
    print(
        f"queued {report.profiles} profiles and {report.transitions} transitions in {report.chunks} chunks"
        f"{skipped if report.skipped else ''}; follow progress with `attentive-export status {job.id}`"
    )
    return None


#: The least time between two progress lines of a file backfill waiting for room.
PROGRESS_SECONDS = 5.0


class _StreamProgressLine:
    """Say on stderr, at most every PROGRESS_SECONDS, that a file backfill waits for room."""

    def __init__(self) -> None:
        self._said = -PROGRESS_SECONDS

    def __call__(self, p: backfill.StreamProgress) -> None:
        from worker.setup.jobconfig import JobState

        now = time.monotonic()
        if now - self._said < PROGRESS_SECONDS:
            return
        self._said = now
        of = f" of {p.total:,}" if p.total is not None else ""
        paused = "; the job is paused: `jobs resume` lets it go on" if p.job_state == JobState.PAUSED else ""
        print(
            f"staged {p.staged:,}{of} lines; waiting for the backfill to catch up "
            f"({p.waiting:,} staged, cap {p.cap:,}){paused}",
            file=sys.stderr,
            flush=True,
        )


def _to_send_the_rest(report: backfill.FileReport, at_ms: int, at_defaulted: bool) -> str:
    from worker.backfill import steps as backfill

    return f"; {backfill.rerun_hint(at_ms, at_defaulted)}" if report.staged else "; nothing was queued"


def _interrupted(
    source: str, job_id: str, report: backfill.FileReport, at_ms: int, at_defaulted: bool
) -> str:
    from worker.backfill import steps as backfill

    source = "standard input" if source == "-" else source
    if not report.staged:
        return f"nothing of {source} was queued"
    of = f" of {report.total:,}" if report.total is not None else ""
    return (
        f"staged {report.staged:,}{of} lines of {source} into job {job_id}; they will be sent; "
        f"{backfill.rerun_hint(at_ms, at_defaulted)}"
    )


@contextlib.contextmanager
def _seekable_input(path: str) -> Iterator[tuple[BinaryIO, int]]:
    """The input as a binary file that can be read twice, and where it starts. Standard input
    (``-``) or a pipe is first copied to a local temporary file: it costs local disk, never Redis."""
    with _open_input(path, binary=True) as fh:
        if fh.seekable():
            yield fh, fh.tell()
            return
        with tempfile.TemporaryFile(prefix="attentive-export-backfill-") as spool:
            try:
                shutil.copyfileobj(fh, spool)
            except OSError as exc:
                raise UserError(f"cannot copy {path} to a temporary file: {exc.strerror or exc}") from None
            yield spool, 0


class _open_input:
    """Lines of a file or of stdin (``-``): text, or raw bytes with ``binary`` (no decoding error)."""

    def __init__(self, path: str, binary: bool = False) -> None:
        self._path = path
        self._binary = binary
        self._fh: Any = None

    def __enter__(self) -> Any:
        if self._path == "-":
            return sys.stdin.buffer if self._binary else sys.stdin
        try:
            if self._binary:
                self._fh = Path(self._path).open("rb")
            else:
                self._fh = Path(self._path).open(encoding="utf-8")
        except OSError as exc:
            raise UserError(f"cannot read {self._path}: {exc.strerror}") from None
        return self._fh

    def __exit__(self, *exc: object) -> None:
        if self._fh is not None:
            self._fh.close()


def cmd_serve(args: argparse.Namespace, _settings: Settings) -> None:
    """Receive Lytics audience-trigger webhooks over HTTP (worker/webhook.py)."""
    from worker.webhook.receiver import WebhookConfigError, serve

    try:
        serve(args.host, args.port, args.insecure_no_auth, access_log=not args.no_access_log)
    except WebhookConfigError as exc:
        raise UserError(str(exc)) from None


def cmd_demo(args: argparse.Namespace, _settings: Settings) -> None:
    from worker.cli.demo import run_demo

    run_demo(users=args.users, port=args.port)


# --- parser -----------------------------------------------------------------------------------------
def _root_parser() -> tuple[argparse.ArgumentParser, Any]:
    """``attentive-export`` and its (still empty) set of commands."""
    p = argparse.ArgumentParser(
        prog="attentive-export",
        description="Export audiences to Attentive in real time. Configuration comes from the environment: "
        "REDIS_URL, CELERY_BROKER_URL, ATTENTIVE_API_URL, EXPORT_SECRET_KEY, ATTENTIVE_RATE_LIMIT.",
    )
    return p, p.add_subparsers(dest="command", required=True, metavar="COMMAND")


def build_parser() -> argparse.ArgumentParser:
    from worker.cli import deadletters as deadletters_cli
    from worker.cli import jobs as jobs_cli
    from worker.cli import trace as trace_cli

    p, sub = _root_parser()

    auth = sub.add_parser("auth", help="connect Attentive accounts (API keys)").add_subparsers(
        dest="auth_command", required=True, metavar="ACTION"
    )
    add = auth.add_parser("add", help="validate an API key with Attentive and save it encrypted")
    add.add_argument("--label", required=True, help="a name for this authorization")
    add.add_argument("--description", default="", help="optional free text")
    add.add_argument(
        "--api-key-env",
        metavar="VAR",
        help="read the key from this environment variable (otherwise from stdin or a prompt)",
    )
    add.set_defaults(func=cmd_auth_add)
    ls = auth.add_parser("list", help="list authorizations (keys masked)")
    ls.add_argument("--json", action="store_true", help="print JSON for scripts")
    ls.set_defaults(func=cmd_auth_list)
    rm = auth.add_parser(
        "delete", help="delete an authorization (refused while export jobs that are not stopped use it)"
    )
    rm.add_argument("authorization", help="id or label")
    rm.add_argument(
        "--force",
        action="store_true",
        help="delete it even though jobs use it: running and backfilling ones are paused first",
    )
    rm.set_defaults(func=cmd_auth_delete)

    sk = sub.add_parser("secret-key", help="print a new EXPORT_SECRET_KEY (Fernet key)")
    sk.set_defaults(func=cmd_secret_key)

    jobs = sub.add_parser("jobs", help="export jobs").add_subparsers(
        dest="jobs_command", required=True, metavar="ACTION"
    )
    create = jobs.add_parser("create", help="create an export job from a YAML or JSON file")
    create.add_argument("file", help="job configuration (YAML, or JSON when it ends in .json)")
    create.add_argument(
        "--no-start", action="store_true", help="create it in state 'created' without starting"
    )
    create.set_defaults(func=cmd_jobs_create)
    jl = jobs.add_parser("list", help="list export jobs")
    jl.add_argument("--json", action="store_true", help="print JSON for scripts")
    jl.set_defaults(func=cmd_jobs_list)
    for name, func, text in (
        ("show", cmd_jobs_show, "show a job's configuration and state"),
        ("pause", cmd_jobs_pause, "stop sending (transitions keep being buffered)"),
        ("resume", cmd_jobs_resume, "start a created job, or resume one (backfill first if unfinished)"),
        ("delete", cmd_jobs_delete, "remove a stopped job and all its data from Redis (frees its label)"),
    ):
        sp = jobs.add_parser(name, help=text)
        sp.add_argument("job", help="export job id (`jobs list` shows them)")
        sp.set_defaults(func=func)
    jobs_cli.add_commands(jobs, _redis)  # update, resync, stop [--teardown], backfill

    st = sub.add_parser("status", help="counters, buffers and last errors (all jobs, or one)")
    st.add_argument("job", nargs="?", help="one export job id (default: the service and every job)")
    monitor.add_status_arguments(st)
    st.set_defaults(func=cmd_status)

    dl = sub.add_parser(
        "deadletters", help="changes that will not reach Attentive: list, counts, redrive, purge"
    )
    deadletters_cli.add_arguments(dl)
    dl.set_defaults(func=cmd_deadletters)

    pv = sub.add_parser(
        "preview", help="dry run: show the Attentive records a job file makes from transitions"
    )
    pv.add_argument("job_file", help="job configuration file, as for `jobs create` (nothing is stored)")
    pv.add_argument("input", help="JSONL file of transitions, or - for stdin")
    pv.set_defaults(func=cmd_preview)

    ing = sub.add_parser(
        "ingest", help="queue a JSONL file of transitions (canonical or Lytics webhook bodies)"
    )
    ing.add_argument("input", help="JSONL file, or - for stdin")
    ing.set_defaults(func=cmd_ingest)

    bf = sub.add_parser(
        "backfill",
        help="backfill existing members of a job from a JSONL file of profiles or canonical transitions",
    )
    bf.add_argument("job", help="export job id (running, backfilling or paused)")
    bf.add_argument("input", help="JSONL file, or - for stdin")
    bf.add_argument(
        "--audience", help="the audience a file of profiles belongs to (each profile becomes an enter)"
    )
    bf.add_argument(
        "--at",
        help="when the file's membership was true (ISO-8601 or epoch; default: now). A real-time change "
        "with a later time wins over the backfill, so give the export time of an older file",
    )
    bf.set_defaults(func=cmd_backfill)

    demo = sub.add_parser("demo", help="run everything locally against the sandbox and show the result")
    demo.add_argument("--users", type=int, default=1000, help="users to send (default 1000)")
    demo.add_argument("--port", type=int, default=8787, help="port of the local sandbox (default 8787)")
    demo.set_defaults(func=cmd_demo)

    sv = sub.add_parser(
        "serve", help="receive Lytics audience-trigger webhooks on POST /v1/transitions (WEBHOOK_TOKEN)"
    )
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a container)")
    sv.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    sv.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="start without WEBHOOK_TOKEN: anyone who reaches the port can queue transitions",
    )
    sv.add_argument("--no-access-log", action="store_true", help="do not log one line per request")
    sv.set_defaults(func=cmd_serve)
    monitor.add_commands(sub)  # health, metrics
    trace_cli.add_command(sub, cmd_trace)
    return p


def _parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser for ``argv``. For ``health``, one with the monitoring commands alone: it parses
    ``health``, prints its help and its usage errors exactly as the full parser does, and imports
    none of the modules of the other commands (see the module doc)."""
    if argv[:1] != ["health"]:
        return build_parser()
    p, sub = _root_parser()
    monitor.add_commands(sub)  # health, metrics
    return p


class _JsonLogsOnFirstRecord(logging.Handler):
    """``health`` with ``LOG_FORMAT=json``: worker.logs, which loads Celery for its signal hooks, is
    imported when a record is logged, not on every probe. It then sets up the JSON lines as any
    other command does (replacing this handler) and passes them the record."""

    def emit(self, record: logging.LogRecord) -> None:
        from worker.logs import configure_cli

        configure_cli("json")
        logging.getLogger().handle(record)


def _configure_logs(args: argparse.Namespace, settings: Settings | None) -> None:
    """With ``LOG_FORMAT=json``, warnings and errors as JSON lines on stderr."""
    if settings is None or settings.log_format != "json":
        return
    if args.func is monitor.cmd_health:
        logging.getLogger().handlers = [_JsonLogsOnFirstRecord()]
        return
    from worker.logs import configure_cli

    configure_cli(settings.log_format)


def _error_lines(exc: Exception) -> list[str] | None:
    """What follows ``error:`` for a failure the user can fix (exit status 2), or None for a bug.

    The classes are imported here, once something failed: ``health`` must not load their modules."""
    from kombu.exceptions import KombuError

    from worker.dispatch import BrokerUnavailable
    from worker.setup.authorizations import AuthorizationError
    from worker.setup.crypto import SecretKeyError
    from worker.setup.jobconfig import JobConfigError
    from worker.setup.jobs import JobError

    if isinstance(exc, JobConfigError):  # every problem of a job file, each on its own line
        return [str(problem) for problem in exc.problems]
    if isinstance(
        exc, SettingsError | UserError | JobError | AuthorizationError | SecretKeyError | BrokerUnavailable
    ):
        return [str(exc)]
    if isinstance(exc, redis.RedisError):  # Redis went away mid-command (a first ping found it)
        return [f"Redis: {type(exc).__name__}: {exc}"]
    if isinstance(exc, KombuError):  # the broker went away after the command checked it
        return [
            f"the Celery broker stopped answering ({type(exc).__name__}: {exc}); "
            "run the command again once it answers"
        ]
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser(argv).parse_args(argv)
    try:
        # Every command validates the whole environment first: a bad setting is one line, exit 2.
        # Except `secret-key`, which needs none: it makes the key a bad EXPORT_SECRET_KEY lacks.
        settings = load_settings() if args.func is not cmd_secret_key else None
        _configure_logs(args, settings)
        code = args.func(args, settings)  # None, or an exit status (health: 1 when unhealthy)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        lines = _error_lines(exc)
        if lines is None:
            raise
        for line in lines:
            print(f"error: {line}", file=sys.stderr)
        return 2
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
