"""Heartbeats: when each long-running process last proved it was doing its job, kept in Redis.

Health checks, ``status`` and ``/metrics`` read them, so a probe needs no access to the process
itself and any number of workers report without coordination (DESIGN.md invariant 7):

- a **worker** beats on every Celery event heartbeat (every 2 s, from the consumer's event loop, so a
  worker whose loop is stuck or whose broker connection is gone stops beating), see
  :mod:`worker.observe.liveness`;
- **beat** beats each time it publishes the sweep (so it ticks *and* reaches the broker);
- the **sweep** beats each time it ran to the end (:func:`note_sweep`, called by the sweep task), which
  also proves that some worker consumes the ``sweep`` queue.

Worker and beat keys carry a TTL of an hour: a dead process shows a growing age long enough for
alerts to fire, then disappears, so pods that came and went do not pile up (a missing worker or beat
heartbeat means down). The sweep's one key never expires: its absence means no sweep ever recorded
one (a deployment whose sweep task does not call :func:`note_sweep`), not a sweep dead for an hour.
Times are writers' wall clocks in ms, like every other timestamp the service stores.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import redis

from worker.store import keys
from worker.store.replies import text

#: Heartbeat keys (and index entries) outlive their last beat by this much, then vanish.
TTL_SECONDS = 3600
#: Workers beat every 2 s (Celery's event heartbeat); one silent this long counts as down.
WORKER_STALE_SECONDS = 30.0
#: Beat and the sweep beat every ``SWEEP_INTERVAL_SECONDS`` (1 s by default). Silent for this long,
#: or for this many intervals when that is longer, they count as down.
SCHEDULE_STALE_SECONDS = 30.0
SCHEDULE_STALE_INTERVALS = 5
BEAT = "beat"
SWEEP = "sweep"


def now_ms() -> int:
    return int(time.time() * 1000)


def schedule_stale_seconds(sweep_interval_seconds: float) -> float:
    """How old beat's and the sweep's heartbeats may be before they count as down."""
    return max(SCHEDULE_STALE_SECONDS, SCHEDULE_STALE_INTERVALS * sweep_interval_seconds)


def beat(client: redis.Redis, component: str, at_ms: int | None = None) -> None:
    """Record that ``component`` (:data:`BEAT` or :data:`SWEEP`) is alive now."""
    at = at_ms if at_ms is not None else now_ms()
    client.set(keys.heartbeat(component), at, ex=None if component == SWEEP else TTL_SECONDS)


def note_sweep(client: redis.Redis) -> None:
    """The sweep task's one call after each sweep: beat and the sweep queue's consumers work."""
    beat(client, SWEEP)


def worker_beat(client: redis.Redis, node: str, at_ms: int | None = None) -> None:
    """Record that the Celery worker ``node`` is alive now (and forget workers silent past the TTL)."""
    at = at_ms if at_ms is not None else now_ms()
    pipe = client.pipeline(transaction=False)
    pipe.set(keys.worker_heartbeat(node), at, ex=TTL_SECONDS)
    pipe.zadd(keys.worker_heartbeats(), {node: at})
    pipe.zremrangebyscore(keys.worker_heartbeats(), "-inf", at - TTL_SECONDS * 1000)
    pipe.expire(keys.worker_heartbeats(), TTL_SECONDS)
    pipe.execute()


def worker_gone(client: redis.Redis, node: str) -> None:
    """A worker shut down cleanly: it is not down, it is no more."""
    pipe = client.pipeline(transaction=False)
    pipe.delete(keys.worker_heartbeat(node))
    pipe.zrem(keys.worker_heartbeats(), node)
    pipe.execute()


@dataclass(frozen=True)
class Heartbeats:
    """Seconds since each process last beat; None when it never did (or not within the TTL)."""

    beat: float | None
    sweep: float | None
    #: Worker node -> seconds since its last beat, for every worker seen within the TTL.
    workers: dict[str, float] = field(default_factory=dict)

    def workers_alive(self, stale_seconds: float = WORKER_STALE_SECONDS) -> list[str]:
        return sorted(node for node, age in self.workers.items() if age <= stale_seconds)


def _age(raw: object, now: int) -> float | None:
    if raw is None:
        return None
    try:
        return max(0.0, (now - int(float(text(raw)))) / 1000)
    except ValueError:
        return None


def read(client: redis.Redis, now: int | None = None) -> Heartbeats:
    """Every heartbeat, in one round trip."""
    at = now if now is not None else now_ms()
    pipe = client.pipeline(transaction=False)
    pipe.get(keys.heartbeat(BEAT))
    pipe.get(keys.heartbeat(SWEEP))
    pipe.zrange(keys.worker_heartbeats(), 0, -1, withscores=True)
    raw_beat, raw_sweep, members = pipe.execute()
    workers = {text(node): max(0.0, (at - float(score)) / 1000) for node, score in members}
    return Heartbeats(_age(raw_beat, at), _age(raw_sweep, at), workers)


def worker_age(client: redis.Redis, node: str, now: int | None = None) -> float | None:
    """Seconds since ``node`` last beat, from its own key (None: no beat within the TTL)."""
    return _age(client.get(keys.worker_heartbeat(node)), now if now is not None else now_ms())
