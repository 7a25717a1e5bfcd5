"""A job's ``last_error`` in its status hash, always with the time it happened, and its *block*.

Status shows the error with that time, and the observe layer treats an error older than the job's
latest success as recovered (:func:`error_recovered`); an error without a time could only ever look
current.

A job is *blocked* while its API key cannot be read (its authorization was deleted, a worker's
``EXPORT_SECRET_KEY`` is wrong): retrying every few seconds cannot help, so the flush, the poller and
the sweep leave it alone until :data:`BLOCKED_RETRY_AT`, then try once (the policy is in
``worker/pipeline/attentive_calls.py``). Three fields of the status hash say so: the reason, since
when (the first failure of the run, kept while it goes on) and when the next try is due. Clearing
them is the only way out, done by the first try that reads the key.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from worker.store import keys

BLOCKED_REASON = "blocked_reason"
BLOCKED_SINCE = "blocked_since_ms"
BLOCKED_RETRY_AT = "blocked_retry_at_ms"
BLOCK_FIELDS = (BLOCKED_REASON, BLOCKED_SINCE, BLOCKED_RETRY_AT)


def _now_ms() -> int:
    return int(time.time() * 1000)


def note_error(client: Any, job_id: str, message: str) -> None:
    """Record ``message`` as the job's latest error, now (``client`` may be a pipeline)."""
    client.hset(keys.job_status(job_id), mapping={"last_error": message, "last_error_at_ms": _now_ms()})


def note_blocked(client: Any, job_id: str, reason: str, retry_in_ms: int) -> None:
    """Block the job: ``reason`` is also its last error; the next try is due in ``retry_in_ms``."""
    now = _now_ms()
    key = keys.job_status(job_id)
    pipe = client.pipeline(transaction=True)
    pipe.hsetnx(key, BLOCKED_SINCE, now)
    pipe.hset(
        key,
        mapping={
            BLOCKED_REASON: reason,
            BLOCKED_RETRY_AT: now + retry_in_ms,
            "last_error": reason,
            "last_error_at_ms": now,
        },
    )
    pipe.execute()


def clear_blocked(client: Any, job_id: str) -> bool:
    """Lift the job's block; True if it was blocked."""
    return bool(client.hdel(keys.job_status(job_id), *BLOCK_FIELDS))


def _int(value: Any) -> int:
    try:
        return int(value.decode() if isinstance(value, bytes) else value)
    except (TypeError, ValueError):
        return 0


def blocked_retry_at(client: Any, job_id: str) -> int | None:
    """When the blocked job's next try is due (epoch ms), or None when it is not blocked."""
    raw = client.hget(keys.job_status(job_id), BLOCKED_RETRY_AT)
    return None if raw is None else _int(raw)


def blocked_retry_times(client: Any, job_ids: Sequence[str]) -> dict[str, int | None]:
    """:func:`blocked_retry_at` of every job, in one round trip (the poller asks for all each round)."""
    pipe = client.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.hget(keys.job_status(job_id), BLOCKED_RETRY_AT)
    replies = pipe.execute() if job_ids else []
    return {job_id: None if raw is None else _int(raw) for job_id, raw in zip(job_ids, replies, strict=True)}


def error_recovered(status: Mapping[str, str]) -> bool | None:
    """Whether the job's ``last_error`` (in its decoded status hash) is behind it; None: no error.

    Recovered means: not blocked, no send failing now (``consecutive_errors``), and a send Attentive
    accepted (``last_flush_at``) or a status check it answered (``last_poll_at``) after the error.
    An error without a time (written by older code) counts as recovered once anything succeeded.
    """
    if not status.get("last_error"):
        return None
    if status.get(BLOCKED_REASON) or _int(status.get("consecutive_errors")) > 0:
        return False
    success = max(_int(status.get("last_flush_at")), _int(status.get("last_poll_at")))
    return success > 0 and success > _int(status.get("last_error_at_ms"))
