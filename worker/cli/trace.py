"""``attentive-export trace JOB USER``: where one user's changes are, per audience (worker/observe/trace.py).

Readable by default, ``--json`` for scripts. An unknown job is an error (``error: no export job
...``, exit status 2), never an empty answer.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import redis

from worker.observe.trace import render, trace_user


def add_command(sub: Any, func: Callable[..., Any]) -> None:
    """Register ``trace`` on the CLI's subcommands, run by ``func`` (worker/cli/main.py: it connects
    to Redis and calls :func:`run`)."""
    tr = sub.add_parser(
        "trace",
        help="where one user's changes are, per audience: newest accepted event, open batch, held, "
        "at Attentive, delivered or dead-lettered",
        description="Show, for each audience of the job, the newest accepted event of the user and where "
        "that change is now. USER is the user key the job orders changes by: the value of its "
        "user_key_field (by default the source field of its first identifier mapping), normalised like "
        "that identifier (emails lowercased, phones in E.164); a profile without that field is keyed "
        "by another identifier, e.g. email:ada@example.com.",
    )
    tr.add_argument("job", help="export job id")
    tr.add_argument("user", help="the user key (e.g. the email address when the job is keyed by email)")
    tr.add_argument("--json", action="store_true", help="print the trace as JSON (times in epoch ms and ISO)")
    tr.set_defaults(func=func)


def run(args: argparse.Namespace, client: redis.Redis) -> None:
    """Print the trace; raises ``JobNotFound`` (one ``error:`` line, exit 2) for an unknown job."""
    trace = trace_user(client, args.job, args.user)
    if args.json:
        print(json.dumps(trace.as_dict(), indent=2, default=str))
    else:
        print(render(trace))
