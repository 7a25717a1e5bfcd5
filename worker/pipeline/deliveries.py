"""A short history of a job's delivered batches, so ``attentive-export trace`` can say when a user's
changes reached Attentive.

Nothing else keeps per-user delivery history: a completed batch's data leaves Redis (DESIGN.md
invariant 8 says memory follows users, never changes or time). So this history is bounded: one
stream entry per completed batch (its users, the Attentive jobs that delivered them, when), and
only the newest :data:`HISTORY_BATCHES` are kept, trimmed in the same command that adds one. A few
kilobytes per entry: at most a few megabytes per job, however long it runs. A user whose last
delivery is older than that shows as "delivered or not pending".

The entry is written after the batch completed and is not part of that step: a worker dying in
between leaves one batch out (the trace then says "delivered or not pending"), a twin poll may
write one twice. It is a read aid for operators, not state anything depends on.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

import orjson
import redis

from worker.store import keys

#: Completed batches kept per job (Redis trims whole stream nodes, so a few dozen more may stay).
HISTORY_BATCHES = 500
#: Entries read per XREVRANGE when searching.
_PAGE = 50


def note(client: redis.Redis, job_id: str, batch_id: int, batch: Mapping[str, str], at_ms: int) -> None:
    """Record that ``batch`` (its hash as read before completing it) completed at ``at_ms``."""
    jobs = [
        {"id": j["id"], "idx": j.get("idx", [])}
        for j in orjson.loads(batch.get("attentive_jobs") or "[]")
        if f"done:{j['id']}" in batch
    ]
    client.xadd(
        keys.job_deliveries(job_id),
        {"batch": batch_id, "at": at_ms, "users": batch.get("users") or "[]", "jobs": orjson.dumps(jobs)},
        maxlen=HISTORY_BATCHES,
        approximate=True,
    )


@dataclass(frozen=True, slots=True)
class Delivery:
    """One user's delivery in a completed batch."""

    batch_id: int
    #: When the batch completed (ms).
    at_ms: int
    #: The Attentive job that carried the user to completion, when known.
    attentive_job_id: str | None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _before(entry_id: str) -> str | None:
    """The greatest stream id below ``entry_id`` (exclusive ranges need Redis 6.2; this works on all)."""
    millis, _, seq = entry_id.partition("-")
    if int(seq) > 0:
        return f"{millis}-{int(seq) - 1}"
    return f"{int(millis) - 1}-18446744073709551615" if int(millis) > 0 else None


def _entries(client: redis.Redis, key: str) -> Iterator[dict[str, str]]:
    """The stream's entries, newest first."""
    end: str | None = "+"
    while end is not None:
        page = cast("list[tuple[Any, dict[Any, Any]]]", client.xrevrange(key, max=end, min="-", count=_PAGE))
        for _id, fields in page:
            yield {_text(k): _text(v) for k, v in fields.items()}
        end = _before(_text(page[-1][0])) if len(page) == _PAGE else None


def last_delivery(client: redis.Redis, job_id: str, user: str) -> Delivery | None:
    """The newest recorded delivery of ``user`` (as the buffer keys it), or None if the history has none.

    Reads the history newest first until it finds the user: at most :data:`HISTORY_BATCHES` entries.
    """
    for entry in _entries(client, keys.job_deliveries(job_id)):
        users: list[str] = orjson.loads(entry.get("users") or "[]")
        if user not in users:
            continue
        index = users.index(user)
        attentive = None
        for job in orjson.loads(entry.get("jobs") or "[]"):
            if index in job.get("idx", []):
                attentive = str(job["id"])
        return Delivery(int(entry["batch"]), int(entry["at"]), attentive)
    return None
