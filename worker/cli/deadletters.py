"""``attentive-export deadletters [ACTION] JOB``: read, count, re-drive and purge a job's dead letters.

Actions: ``list`` (the default, so ``deadletters JOB`` keeps working; JSON, oldest first),
``counts`` (by reason class, exact beyond the cap, plus entries kept and dropped by the cap),
``redrive`` (after a fix: the changes go back to the buffer, never over a newer change; see
worker.pipeline.redrive) and ``purge`` (all, or one class with ``--reason``). An unknown job is an
error, not an empty list: a mistyped id must not look like a clean job.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import redis

from worker.pipeline import deadletters
from worker.pipeline.redrive import redrive
from worker.setup.jobs import JobStore

ACTIONS = ("list", "counts", "redrive", "purge")
#: Entries ``list`` shows without ``--limit``.
DEFAULT_LIMIT = 100


class CommandError(Exception):
    """A wrong combination of arguments or a purge that could not finish; one line for the operator."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's arguments, on the parser ``main`` made for it."""
    parser.add_argument(
        "action",
        nargs="?",
        choices=ACTIONS,
        default="list",
        help="list (default): the newest entries as JSON, oldest first; counts: by reason class, "
        "with entries kept and dropped by DEADLETTER_CAP; redrive: send the changes again after a "
        "fix, except those a newer change superseded; purge: remove entries and their counts",
    )
    parser.add_argument("job", help="export job id")
    parser.add_argument(
        "--reason",
        metavar="CLASS",
        help="only this reason class (the part of a reason before its first ':', e.g. attentive_400; "
        "`counts` shows them)",
    )
    parser.add_argument(
        "--limit",
        type=_non_negative,
        metavar="N",
        help=f"list: at most N entries, the newest (default {DEFAULT_LIMIT}; 0: every kept entry)",
    )


def _non_negative(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {value!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {number}")
    return number


def run(args: argparse.Namespace, client: redis.Redis) -> None:
    """Run the action; raises ``JobNotFound`` for an unknown job, :class:`CommandError` otherwise."""
    job = JobStore(client).get(args.job)
    if args.limit is not None and args.action != "list":
        raise CommandError(f"--limit applies to list, not {args.action}")
    if args.action == "list":
        limit = DEFAULT_LIMIT if args.limit is None else args.limit
        _print_json(deadletters.read(client, job.id, limit, args.reason))
    elif args.action == "counts":
        if args.reason is not None:
            raise CommandError("--reason applies to list, redrive and purge; counts shows every class")
        _print_json({"job": job.id, **deadletters.summary(client, job.id).as_dict()})
    elif args.action == "redrive":
        _redrive(client, job.id, job.config.batch_size, args.reason)
    else:
        _purge(client, job.id, args.reason)


def _redrive(client: redis.Redis, job_id: str, batch_size: int, reason: str | None) -> None:
    try:
        done = redrive(client, job_id, batch_size, reason)
    except redis.WatchError:
        raise CommandError(
            f"the changes of job {job_id}'s dead letters are back in the buffer, but dead letters are being "
            "written too fast to remove them; run redrive again (it sends nothing twice that a newer change "
            "superseded)"
        ) from None
    what = f"dead letters of class {reason!r}" if reason else "dead letters"
    kept = ", ".join(f"{n} {why}" for why, n in sorted(done.kept.items()))
    if not done.entries and not done.kept:
        known = ", ".join(sorted(deadletters.summary(client, job_id).by_reason)) or "none"
        print(f"no {what} to re-drive in job {job_id} (classes: {known})")
        return
    print(
        f"re-drove {done.entries} {what} of job {job_id}: {done.changes} changes back in the buffer "
        f"(sent with the next batch), {done.superseded} superseded by newer changes and not sent"
        + (f"; kept {sum(done.kept.values())} that cannot be re-driven ({kept})" if kept else "")
    )


def _purge(client: redis.Redis, job_id: str, reason: str | None) -> None:
    try:
        done = deadletters.purge(client, job_id, reason)
    except redis.WatchError:
        raise CommandError(
            f"dead letters of job {job_id} are being written too fast to purge; try again"
        ) from None
    what = f"dead letters of class {reason!r}" if reason else "dead letters"
    if not done.entries and not done.counted:
        known = ", ".join(sorted(deadletters.summary(client, job_id).by_reason)) or "none"
        print(f"no {what} to purge in job {job_id} (classes: {known})")
        return
    dropped = done.counted - done.entries
    extra = f"; {dropped} more counted had been dropped by the cap" if dropped > 0 else ""
    print(f"purged {done.entries} {what} from job {job_id}{extra}")


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))
