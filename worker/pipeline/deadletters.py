"""Dead letters: changes that will never reach Attentive, each with the reason, for operators.

Invariant 1 says a transition either reaches Attentive or ends here. Entries hold the record we
would have sent (personal data stays in Redis, never in broker messages or logs).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

import redis

from worker.store import keys


def record(client: redis.Redis, job_id: str, batch_id: int, entries: Iterable[tuple[str, str, Any]]) -> int:
    """Append ``(user key, reason, record)`` entries; returns how many were written."""
    pipe = client.pipeline(transaction=True)
    written = queue(pipe, job_id, batch_id, entries)
    if written:
        pipe.execute()
    return written


def queue(pipe: Any, job_id: str, batch_id: int, entries: Iterable[tuple[str, str, Any]]) -> int:
    """Add the writes of :func:`record` to a caller's MULTI pipeline (to commit them with other writes)."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    rows = [
        json.dumps({"at": now, "batch": batch_id, "user": user, "reason": reason, "record": rec})
        for user, reason, rec in entries
    ]
    if rows:
        pipe.rpush(keys.job_deadletters(job_id), *rows)
        pipe.hincrby(keys.job_status(job_id), "deadlettered_users", len(rows))
    return len(rows)


def read(client: redis.Redis, job_id: str, limit: int = 100) -> list[dict[str, Any]]:
    """The newest ``limit`` dead letters, oldest first."""
    return [json.loads(r) for r in client.lrange(keys.job_deadletters(job_id), -limit, -1)]
