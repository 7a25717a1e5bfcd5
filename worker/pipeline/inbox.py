"""The inbox: raw transitions parked in Redis so broker messages carry only a chunk id.

Producers (the webhook receiver, the CLI, backfill) write a chunk of raw JSON texts and enqueue an
ingest task with the chunk's id (DESIGN.md invariant 5: no personal data in broker messages). The
chunk is deleted only after the ingest task has placed every transition in a job buffer, and the
sweep re-drives chunks whose task was lost (invariant 1).

A chunk and the pending set are written one after the other, never in one MULTI: on a Redis
Cluster they live on different slots (chunks spread over the nodes by their ids). The order keeps
what a crash in between leaves harmless: a pending entry comes before its chunk and goes after it,
so at worst the sweep re-drives an id whose chunk is missing, which ingests nothing and drops it.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence

import redis

from worker.store import keys
from worker.store.replies import text

#: A chunk not ingested this long after it was written is re-driven by the sweep.
ORPHAN_AFTER_MS = 60_000


def put_chunk(client: redis.Redis, lines: Sequence[str | bytes]) -> str:
    """Store raw JSON texts as one chunk and register it as pending; returns the chunk id."""
    chunk_id = f"{int(time.time() * 1000)}-{secrets.token_hex(6)}"
    client.zadd(keys.inbox_pending(), {chunk_id: time.time() * 1000})
    client.rpush(keys.inbox_chunk(chunk_id), *lines)
    return chunk_id


def read_chunk(client: redis.Redis, chunk_id: str) -> list[bytes | str]:
    return list(client.lrange(keys.inbox_chunk(chunk_id), 0, -1))


def drop_chunk(client: redis.Redis, chunk_id: str) -> None:
    """Forget a chunk once every transition in it is in a buffer (or counted as rejected)."""
    client.delete(keys.inbox_chunk(chunk_id))
    client.zrem(keys.inbox_pending(), chunk_id)


def orphaned_chunks(client: redis.Redis, now_ms: int | None = None, limit: int = 100) -> list[str]:
    """Chunks written long ago and still pending: their ingest task was lost or keeps failing."""
    now = now_ms if now_ms is not None else int(time.time() * 1000)
    raw = client.zrangebyscore(keys.inbox_pending(), "-inf", now - ORPHAN_AFTER_MS, start=0, num=limit)
    ids = [text(i) for i in raw]
    if ids:
        # Push them forward so one sweep does not re-drive the same chunk every second.
        client.zadd(keys.inbox_pending(), dict.fromkeys(ids, now), xx=True)
    return ids
