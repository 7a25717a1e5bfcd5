"""Parked polls: a young batch's status check waits in Redis while sends use the key's whole budget.

A poll only confirms what Attentive already accepted, so while batches queue for rate-limit tokens
a poll should not take one (DESIGN.md invariant 4 makes polls and sends share one budget). Before,
such a poll re-queued itself through the broker every second or so and each time found no spare
token: in a 60,000-user burst that was about 150 poll tasks, a sixth of the workers' time, spent on
nothing. Now the poll is *parked*: a sorted-set entry (``batch id:attempt`` -> time it is due), no
broker message. The sweep releases parked polls (:func:`release`):

* due ones, oldest first, only while the key has spare budget, spaced over one sweep interval at
  its rate, or at half of it while the job has batches waiting to be sent (they keep the rest);
* those due for :data:`POLL_YIELDS_MS` or more regardless: they then queue for tokens like sends,
  so even a key saturated for good never starves completion (nor the users waiting behind an
  unfinished batch).

A released poll that again finds no spare token parks again, due since its batch's first poll, so
the forced release still comes when the batch stops being young. The batch's lost-poll deadline
(``keys.polls``, the sweep's safety net) lies past the forced release while parked, and the sweep
refreshes it on release, so a poll is never both released and re-driven. Parking needs beat's
sweep to run, as interval flushes do. The pace is per job: jobs sharing a key each release at it,
which young polls' spare-only tokens keep harmless to sends.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import cast

from worker.pipeline.buffer import JobBuffer
from worker.runtime import REDIS_DOWN, Runtime
from worker.setup.jobs import ExportJob
from worker.store import keys

log = logging.getLogger(__name__)

#: For this long after it is due, a parked poll waits for spare budget; then it is released anyway.
POLL_YIELDS_MS = 60_000
#: Share of the key's rate at which the sweep releases parked polls while batches wait to be sent.
RELEASE_SHARE = 0.5


def park(rt: Runtime, job_id: str, batch_id: int, attempt: int, due_ms: int) -> None:
    """Hold a batch's next poll (attempt number ``attempt``) until :func:`release` lets it go."""
    pipe = rt.redis.pipeline(transaction=False)
    pipe.zadd(keys.parked_polls(job_id), {f"{batch_id}:{attempt}": due_ms})
    pipe.hincrby(keys.job_status(job_id), "polls_parked", 1)
    pipe.execute()


def release(
    rt: Runtime, job: ExportJob, buffer: JobBuffer, now_ms: int, deadline_ms: int, sends_waiting: bool
) -> list[int]:
    """Dispatch the parked polls whose turn it is (see the module doc); returns their batch ids.

    Each released batch's lost-poll deadline becomes ``deadline_ms`` before its task is sent (the
    task may run at once and set a later one). An entry is removed before its task is sent: if
    sending fails, that deadline re-drives the batch later.
    """
    key = keys.parked_polls(job.id)
    pace = rt.settings.rate_limit_per_second * (RELEASE_SHARE if sends_waiting else 1.0)
    most = max(1, math.ceil(pace * rt.settings.sweep_interval_seconds))
    due = cast(
        "list[tuple[bytes | str, float]]",
        rt.redis.zrangebyscore(key, "-inf", now_ms, start=0, num=most, withscores=True),
    )
    if not due:
        return []
    forced = [member for member, at in due if at <= now_ms - POLL_YIELDS_MS]
    all_due = len(forced) < len(due) and _has_spare(rt, job)
    chosen = [member for member, _ in due] if all_due else forced
    if not chosen:
        return []
    pipe = rt.redis.pipeline(transaction=False)
    for member in chosen:
        pipe.zrem(key, member)
    released: list[int] = []
    # Only the sweep that removed an entry dispatches it, so two overlapping sweeps never poll twice.
    for member, removed in zip(chosen, pipe.execute(), strict=True):
        if removed:
            batch_id, attempt = _parse(member)
            buffer.expect_poll_by(batch_id, deadline_ms)
            rt.dispatch.poll(job.id, batch_id, attempt, len(released) / pace)
            released.append(batch_id)
    return released


def _has_spare(rt: Runtime, job: ExportJob) -> bool:
    """Whether the job's key has spare budget; False (release only forced polls) if it cannot say."""
    try:
        return rt.limiter_for(job).has_spare()
    except REDIS_DOWN:
        raise
    except Exception as exc:  # a deleted authorization, say: the forced polls still go
        log.warning("job %s: parked polls wait, no rate limiter: %s: %s", job.id, type(exc).__name__, exc)
        return False


def forget(rt: Runtime, job_id: str, batch_ids: Iterable[int]) -> int:
    """Drop the parked polls of these batches (a re-driven poll replaces them); returns how many."""
    wanted = set(batch_ids)
    key = keys.parked_polls(job_id)
    members = [m for m in cast("list[bytes | str]", rt.redis.zrange(key, 0, -1)) if _parse(m)[0] in wanted]
    return int(rt.redis.zrem(key, *members)) if members else 0


def _parse(member: bytes | str) -> tuple[int, int]:
    batch_id, attempt = (member.decode() if isinstance(member, bytes) else member).split(":")
    return int(batch_id), int(attempt)
