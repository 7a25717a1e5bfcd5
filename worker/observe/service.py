"""The deployment as a whole, for ``status``: workers, beat, the sweep, the inbox backlog, Redis memory.

Job status (:mod:`worker.observe.status`) says what happened to each job's transitions; this says
whether the processes that move them are there at all.
"""

from __future__ import annotations

from typing import Any

import redis

from worker.observe import heartbeat
from worker.store import keys
from worker.store.connection import memory_info


def service_status(
    client: redis.Redis, now_ms: int | None = None, sweep_interval_seconds: float = 1.0
) -> dict[str, Any]:
    """Heartbeat ages (seconds, None: never seen), workers alive, inbox backlog, Redis memory.

    ``schedule_stale_seconds``: beat and the sweep count as down when their heartbeat is older
    (the limit ``health beat`` uses, from ``SWEEP_INTERVAL_SECONDS``).
    """
    now = now_ms if now_ms is not None else heartbeat.now_ms()
    beats = heartbeat.read(client, now)
    pending = client.zrange(keys.inbox_pending(), 0, 0, withscores=True)
    try:
        memory = memory_info(client)
    except redis.ResponseError:  # INFO disabled (some managed Redis)
        memory = {}
    return {
        "at_ms": now,
        "workers": {node: round(age, 1) for node, age in sorted(beats.workers.items())},
        "workers_alive": len(beats.workers_alive()),
        "beat_age_seconds": None if beats.beat is None else round(beats.beat, 1),
        "sweep_age_seconds": None if beats.sweep is None else round(beats.sweep, 1),
        "schedule_stale_seconds": heartbeat.schedule_stale_seconds(sweep_interval_seconds),
        "inbox_chunks_pending": int(client.zcard(keys.inbox_pending())),
        "inbox_oldest_chunk_age_seconds": round(max(0.0, (now - float(pending[0][1])) / 1000), 1)
        if pending
        else None,
        "redis_used_memory_bytes": int(memory["used_memory"]) if "used_memory" in memory else None,
        "redis_maxmemory_bytes": int(memory["maxmemory"]) if "maxmemory" in memory else None,
    }
