"""The inbox: raw transitions parked in Redis so broker messages carry only a chunk id.

Producers (the webhook receiver, the CLI) write a chunk of raw JSON texts and ask for it to be
ingested (DESIGN.md invariant 5: no personal data in broker messages). The chunk is deleted only
after it was ingested: every transition placed in a job buffer or counted as unusable, and the
sweep re-drives chunks still pending after :data:`ORPHAN_AFTER_MS` (invariant 1).

Two ways in, one rule: a task ingests a chunk only once it holds the chunk's claim (a key naming
its Celery task id, with a lease), so two tasks never ingest one chunk side by side, and a task
that is redelivered or retried (the same id) takes back what it held.

* **One task per chunk** (``export.ingest``): the CLI's chunks of 1,000 lines, the demo, the sweep's
  re-drives. Cheap per transition when the chunk is large.
* **Drains** (``export.drain``): the webhook receiver writes one chunk per request, and Lytics'
  audience triggers send one user per request unless batching is turned on. A Celery task per
  such chunk cost about 3 ms of CPU per transition and capped two worker processes at about 450
  transitions/s; drains 0.13-0.36 ms (``python -m bench webhooks``, bench/RESULTS.md). So the receiver asks for a drain instead (:func:`request_drain`: at most one
  queued at a time, :data:`DRAIN_GATHER_SECONDS` after the request), and a drain claims pending
  chunks a group at a time (:func:`groups`), oldest first, and ingests each group together, until
  none is left. Under load a drain finds many chunks; a request that finds one queued adds nothing,
  and a drain that finds more than one group waiting asks for another drain at once, so a burst
  spreads over every free ingest process.

A chunk and the pending set are written one after the other, never in one MULTI: on a Redis
Cluster they live on different slots (chunks spread over the nodes by their ids). The order is
what makes that safe:

* a chunk is written whole (one RPUSH) before its pending entry: a drain takes any pending entry
  it sees, so an entry written first could be taken, found empty and dropped before its lines
  arrived, and they would never be ingested (a drain at 300 requests/s lost 3 of 3,000 that way);
  a producer that dies in between has not answered, so its sender sends the lines again, and the
  chunk it leaves is never read;
* a chunk is deleted before its pending entry: at worst the sweep re-drives an id whose chunk is
  gone, which ingests nothing and drops it.

Ingesting a chunk twice is harmless (the buffer drops a change not newer than one accepted).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from typing import Protocol

import redis

from worker.settings import DEFAULT_DRAIN_GATHER_SECONDS
from worker.store import keys
from worker.store.connection import is_cluster
from worker.store.replies import text

#: A chunk not ingested this long after it was written is re-driven by the sweep.
ORPHAN_AFTER_MS = 60_000
#: A claim outlives the longest a task may run (Celery's task_time_limit, 120 s): a task that is
#: still working keeps its chunks; one that died releases them after this (its redelivery, with the
#: same task id, takes them back at once).
CLAIM_LEASE_MS = 130_000
#: A drain runs this long after the request that queued it, so the webhooks arriving meanwhile are
#: ingested with it: one task for every webhook of that quarter second, at most that much later
#: (the receiver's ``WEBHOOK_DRAIN_GATHER_SECONDS``; this is its default).
DRAIN_GATHER_SECONDS = DEFAULT_DRAIN_GATHER_SECONDS
#: A queued drain counts as on its way this long (a lost message is replaced after it).
DRAIN_QUEUED_TTL_MS = 30_000
#: Pending chunks a drain looks at per claim.
CLAIM_WINDOW = 256
#: Raw bytes of chunks a drain reads and ingests at once (a larger chunk goes alone).
GROUP_BYTES = 1 << 20


class DrainDispatcher(Protocol):
    """What asks for drains (``worker.dispatch.CeleryDispatcher`` fits): the webhook receiver, the
    sweep, a drain that ran out of time."""

    def drain(self, countdown: float = 0.0) -> None: ...


def put_chunk(client: redis.Redis, lines: Sequence[str | bytes]) -> str:
    """Store raw JSON texts as one chunk and register it as pending; returns the chunk id.

    The id ends with the chunk's size in bytes (characters for text), which a drain reads to
    bound what it holds in memory without asking Redis (:func:`groups`)."""
    chunk_id, _marked = _write_chunk(client, lines, None)
    return chunk_id


def put_chunk_for_drain(
    client: redis.Redis, lines: Sequence[str | bytes], countdown: float = DRAIN_GATHER_SECONDS
) -> tuple[str, bool]:
    """:func:`put_chunk`, and mark a drain as queued unless one is: (chunk id, whether this call set
    the mark, and so must send the drain with :func:`send_drain`). The webhook receiver's write:
    one round trip on one Redis (a pipeline keeps the order of its commands), two on a Cluster."""
    return _write_chunk(client, lines, countdown)


def _write_chunk(
    client: redis.Redis, lines: Sequence[str | bytes], drain_countdown: float | None
) -> tuple[str, bool]:
    size = sum(len(line) for line in lines)
    chunk_id = f"{int(time.time() * 1000)}-{secrets.token_hex(6)}-{size}"
    pipe = client.pipeline(transaction=False)
    pipe.rpush(keys.inbox_chunk(chunk_id), *lines)  # whole, before a drain can see it (module doc)
    if is_cluster(client):
        # The pending set is on another node, and a cluster pipeline sends to nodes side by side:
        # the chunk must be stored before its entry can be seen.
        pipe.execute()
    pipe.zadd(keys.inbox_pending(), {chunk_id: time.time() * 1000})
    if drain_countdown is not None:
        pipe.set(keys.inbox_drain_queued(), 1, nx=True, px=_queued_ttl_ms(drain_countdown))
    replies = pipe.execute()
    return chunk_id, drain_countdown is not None and bool(replies[-1])


def chunk_bytes(chunk_id: str) -> int | None:
    """The size a chunk id carries, or None for an id written before ids carried one."""
    parts = chunk_id.split("-")
    return int(parts[2]) if len(parts) == 3 and parts[2].isdigit() else None


def request_drain(
    client: redis.Redis, dispatcher: DrainDispatcher, countdown: float = DRAIN_GATHER_SECONDS
) -> bool:
    """Queue a drain unless one is queued and has not started; True when this call queued it.

    A drain clears the mark when it starts (:func:`drain_started`), so a chunk written after that
    queues the next one: none waits for a drain that already looked."""
    if not client.set(keys.inbox_drain_queued(), 1, nx=True, px=_queued_ttl_ms(countdown)):
        return False
    send_drain(client, dispatcher, countdown)
    return True


def send_drain(client: redis.Redis, dispatcher: DrainDispatcher, countdown: float) -> None:
    """Send the drain whose queued mark this caller set; if the broker refuses it, clear the mark so
    the next request tries again (the sweep re-drives the chunks anyway)."""
    try:
        dispatcher.drain(countdown)
    except BaseException:
        client.delete(keys.inbox_drain_queued())
        raise


def _queued_ttl_ms(countdown: float) -> int:
    return DRAIN_QUEUED_TTL_MS + int(countdown * 1000)


def drain_started(client: redis.Redis) -> None:
    client.delete(keys.inbox_drain_queued())


def pending_window(client: redis.Redis, offset: int, limit: int = CLAIM_WINDOW) -> list[str]:
    """Pending chunk ids, oldest first, from position ``offset``."""
    return [text(i) for i in client.zrange(keys.inbox_pending(), offset, offset + limit - 1)]


def claim(
    client: redis.Redis, chunk_ids: Sequence[str], owner: str, lease_ms: int = CLAIM_LEASE_MS
) -> list[str]:
    """The chunks among ``chunk_ids`` that are ``owner``'s now: those nobody held, and those it
    held already (a redelivered or retried task has the same id), with their lease renewed.

    ``SET NX`` then, for the refused ones only, ``GET``: not ``SET NX GET`` in one command, which
    Redis accepts only from 7.0."""
    if not chunk_ids:
        return []
    pipe = client.pipeline(transaction=False)
    for chunk_id in chunk_ids:
        pipe.set(keys.inbox_claim(chunk_id), owner, nx=True, px=lease_ms)
    taken = pipe.execute()
    refused = [c for c, ok in zip(chunk_ids, taken, strict=True) if not ok]
    if not refused:
        return list(chunk_ids)
    for chunk_id in refused:
        pipe.get(keys.inbox_claim(chunk_id))
    holders = dict(zip(refused, pipe.execute(), strict=True))
    renewed = [c for c in refused if holders[c] is not None and text(holders[c]) == owner]
    for chunk_id in renewed:
        pipe.pexpire(keys.inbox_claim(chunk_id), lease_ms)
    pipe.execute()
    ours = set(renewed)
    return [c for c in chunk_ids if c not in holders or c in ours]


def groups(chunk_ids: Sequence[str], max_bytes: int | None = None) -> list[list[str]]:
    """``chunk_ids`` in order, cut into runs of at most ``max_bytes`` (by the sizes their ids
    carry; :data:`GROUP_BYTES` by default); a chunk over it, or of unknown size, forms a run of its own."""
    max_bytes = GROUP_BYTES if max_bytes is None else max_bytes
    out: list[list[str]] = []
    run: list[str] = []
    total = 0
    for chunk_id in chunk_ids:
        size = chunk_bytes(chunk_id)
        if size is None or size > max_bytes:
            if run:
                out.append(run)
                run, total = [], 0
            out.append([chunk_id])
            continue
        if run and total + size > max_bytes:
            out.append(run)
            run, total = [], 0
        run.append(chunk_id)
        total += size
    if run:
        out.append(run)
    return out


def read_chunk(client: redis.Redis, chunk_id: str) -> list[bytes | str]:
    return list(client.lrange(keys.inbox_chunk(chunk_id), 0, -1))


def read_chunks(client: redis.Redis, chunk_ids: Sequence[str]) -> list[bytes | str]:
    """Every line of ``chunk_ids``, chunk after chunk, in one round trip."""
    pipe = client.pipeline(transaction=False)
    for chunk_id in chunk_ids:
        pipe.lrange(keys.inbox_chunk(chunk_id), 0, -1)
    return [line for lines in pipe.execute() for line in lines]


def drop_chunk(client: redis.Redis, chunk_id: str) -> None:
    """Forget a chunk once every transition in it is in a buffer (or counted as rejected)."""
    drop_chunks(client, [chunk_id])


def drop_chunks(client: redis.Redis, chunk_ids: Sequence[str]) -> None:
    """Forget chunks once every transition in them is in a buffer (or counted as rejected): each
    chunk with its claim (one DEL: a claim's key is on its chunk's slot), then their pending entries
    (on a Redis Cluster the pending set is on another slot). A drain that claims an id between the
    two finds its chunk gone, ingests nothing and drops it."""
    if not chunk_ids:
        return
    pipe = client.pipeline(transaction=False)
    for chunk_id in chunk_ids:
        # The command itself: redis-py's cluster pipeline refuses delete() of several keys, even
        # keys of one slot, while Redis Cluster runs such a DEL.
        pipe.execute_command("DEL", keys.inbox_chunk(chunk_id), keys.inbox_claim(chunk_id))  # type: ignore[no-untyped-call]
    pipe.execute()
    pipe.zrem(keys.inbox_pending(), *chunk_ids)
    pipe.execute()


def orphaned_chunks(client: redis.Redis, now_ms: int | None = None, limit: int = 100) -> list[str]:
    """Chunks written long ago and still pending: their ingest task was lost or keeps failing."""
    now = now_ms if now_ms is not None else int(time.time() * 1000)
    raw = client.zrangebyscore(keys.inbox_pending(), "-inf", now - ORPHAN_AFTER_MS, start=0, num=limit)
    ids = [text(i) for i in raw]
    if ids:
        # Push them forward so one sweep does not re-drive the same chunk every second.
        client.zadd(keys.inbox_pending(), dict.fromkeys(ids, now), xx=True)
    return ids
