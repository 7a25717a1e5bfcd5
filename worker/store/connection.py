"""The one place that connects to the service's Redis: one server, or a Redis Cluster.

``REDIS_URL`` decides: ``redis://``, ``rediss://`` and ``unix://`` name one server;
``redis+cluster://host:port`` (``rediss+cluster://`` with TLS) names any node of a Redis Cluster,
and the client learns the others from it and sends each command to the node serving its key's slot.
Every process builds its state client here, so none can talk to a cluster as if it were one server.

The cluster client is typed as ``redis.Redis``. :class:`redis.cluster.RedisCluster` is no subclass
of it, but offers the commands, pipelines (``transaction=True`` on keys of one slot), scripts and
locks the service uses, with each call's keys in one slot (``worker.store.keys``);
``tests/integration/test_redis_cluster.py`` runs the whole pipeline on a local cluster to prove it.
Typing it as the one client class keeps a single client type in every signature of the service.

Celery's broker is never built here: its Redis transport does not support a cluster
(``worker.settings`` refuses a cluster ``CELERY_BROKER_URL``).
"""

from __future__ import annotations

from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException

from worker.settings import REDIS_CLUSTER_SCHEMES, is_cluster_url
from worker.store.packing import HiredisPacker

__all__ = ["connect", "is_cluster", "is_cluster_url", "memory_info"]

#: Client options a cluster client does not take: it checks its nodes' connections itself
#: (redis-py would drop these silently; dropping them here says so).
_SINGLE_SERVER_ONLY = frozenset({"health_check_interval", "db"})


def connect(url: str, **options: Any) -> redis.Redis:
    """A client for ``url``: :class:`redis.Redis`, or :class:`~redis.cluster.RedisCluster` for a
    ``redis+cluster://`` or ``rediss+cluster://`` URL (database 0, the only one a cluster has).

    ``options`` are client options (timeouts, ``decode_responses``...), given to every node's
    connections on a cluster. Connecting is lazy for one server. A cluster client asks the node for
    the cluster's layout at once: when it cannot, this raises :class:`redis.ConnectionError` (with
    redis-py's reason), the error every caller already treats as Redis being down (tasks retry it).

    One server's connections pack commands with :class:`~worker.store.packing.HiredisPacker`; a
    cluster client takes no packer option (redis-py drops it), so its nodes pack as redis-py does.
    """
    parts = urlsplit(url)
    plain = REDIS_CLUSTER_SCHEMES.get(parts.scheme.lower())
    if plain is None:
        if "command_packer" not in options:
            encoding = options.get("encoding", "utf-8"), options.get("encoding_errors", "strict")
            options = {**options, "command_packer": HiredisPacker(*encoding)}
        return redis.Redis.from_url(url, **options)
    node_url = urlunsplit(parts._replace(scheme=plain, path=""))
    kept = {k: v for k, v in options.items() if k not in _SINGLE_SERVER_ONLY}
    try:
        cluster = RedisCluster.from_url(node_url, **kept)
    except RedisClusterException as exc:
        raise redis.ConnectionError(str(exc)) from exc
    return cast(redis.Redis, cluster)


def is_cluster(client: object) -> bool:
    """Whether ``client`` talks to a Redis Cluster (built by :func:`connect` from a cluster URL)."""
    return isinstance(client, RedisCluster)


def memory_info(client: redis.Redis) -> dict[str, Any]:
    """``INFO memory`` of the one server; of a cluster, ``used_memory`` and ``maxmemory`` summed over
    its masters (each has a limit of its own; a cluster client would ask one node at random).

    Raises:
        redis.ResponseError: INFO is disabled (some managed Redis).
    """
    if not is_cluster(client):
        return dict(client.info("memory"))
    replies = client.info("memory", target_nodes=RedisCluster.PRIMARIES)
    nodes = [r for r in replies.values() if isinstance(r, dict)]
    return {
        "used_memory": sum(int(n.get("used_memory", 0)) for n in nodes),
        "maxmemory": sum(int(n.get("maxmemory", 0)) for n in nodes),
    }
