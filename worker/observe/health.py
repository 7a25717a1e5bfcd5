"""Health checks for probes: is this worker, beat or webhook receiver (or the whole service) alive?

Each check is a :class:`Check` with a one-line reason; ``attentive-export health`` prints them and
exits 0 when all pass, 1 otherwise, which is what Kubernetes probes and compose healthchecks read.
Worker and beat are judged by the heartbeats they write to Redis (:mod:`worker.observe.heartbeat`),
the webhook receiver by its own ``/healthz`` (:mod:`worker.observe.probe`, which
``health webhook`` runs without this module). Every Redis and HTTP call has a short timeout: a
probe that hangs is worse than one that fails.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import redis

from worker.observe import heartbeat
from worker.observe.probe import DEFAULT_WEBHOOK_URL, TIMEOUT_SECONDS, Check, check_url
from worker.store.connection import connect

#: What ``attentive-export health`` can check, and the default (everything a deployment needs).
COMPONENTS = ("service", "worker", "beat", "webhook")


def redis_client(url: str) -> redis.Redis:
    """A client that gives up quickly: a probe has a few seconds, not a minute."""
    return connect(url, socket_connect_timeout=TIMEOUT_SECONDS, socket_timeout=TIMEOUT_SECONDS)


def check_redis(client: redis.Redis) -> Check:
    try:
        client.ping()
    except redis.RedisError as exc:
        return Check("redis", False, f"unreachable: {exc}")
    return Check("redis", True, "answers")


def _age_check(name: str, age: float | None, max_age: float, missing: str) -> Check:
    if age is None:
        return Check(name, False, missing)
    if age > max_age:
        return Check(name, False, f"last beat {age:.1f} s ago (more than {max_age:g} s)")
    return Check(name, True, f"last beat {age:.1f} s ago")


def this_host() -> str:
    return socket.gethostname()


def check_worker(
    client: redis.Redis,
    node: str | None = None,
    *,
    max_age: float = heartbeat.WORKER_STALE_SECONDS,
    host: Callable[[], str] = this_host,
) -> Check:
    """The worker ``node`` (``name@host``), or else every worker of this host, beat recently.

    A pod or container runs one worker node named ``celery@<hostname>`` by default, so a probe
    inside it needs no argument. With several nodes on the host, the stalest one decides.
    """
    if node is not None:
        return _age_check(
            f"worker {node}",
            heartbeat.worker_age(client, node),
            max_age,
            "no heartbeat (not running, or not reaching Redis)",
        )
    suffix = "@" + host()
    mine = {n: age for n, age in heartbeat.read(client).workers.items() if n.endswith(suffix)}
    if not mine:
        return Check(f"worker *{suffix}", False, "no heartbeat from a worker on this host")
    stalest = max(mine, key=lambda n: mine[n])
    return _age_check(f"worker {stalest}", mine[stalest], max_age, "no heartbeat")


def check_workers(client: redis.Redis, *, max_age: float = heartbeat.WORKER_STALE_SECONDS) -> Check:
    """At least one worker anywhere beat recently."""
    beats = heartbeat.read(client)
    alive = beats.workers_alive(max_age)
    if alive:
        return Check("workers", True, f"{len(alive)} alive ({', '.join(alive)})")
    return Check("workers", False, f"no worker beat within the last {max_age:g} s")


def check_beat(client: redis.Redis, *, max_age: float) -> Check:
    """Beat published the sweep recently (so it ticks and reaches the broker)."""
    return _age_check(
        "beat", heartbeat.read(client).beat, max_age, "no heartbeat (is `celery beat` running?)"
    )


def check_sweep(client: redis.Redis, *, max_age: float) -> Check:
    """A sweep ran to the end recently (beat plus a worker consuming the ``sweep`` queue).

    Passes with a note while no sweep ever recorded a heartbeat: a deployment whose sweep task does
    not call :func:`heartbeat.note_sweep` yet must not fail every probe for it.
    """
    age = heartbeat.read(client).sweep
    if age is None:
        return Check("sweep", True, "no heartbeat recorded yet")
    return _age_check("sweep", age, max_age, "")


def check_webhook(url: str = DEFAULT_WEBHOOK_URL, *, timeout: float = TIMEOUT_SECONDS) -> Check:
    """The receiver answers 200 on ``/healthz`` (it answers 503 while Redis is unreachable)."""
    return check_url(url, timeout=timeout)


def run(
    component: str,
    client: redis.Redis,
    *,
    sweep_interval_seconds: float = 1.0,
    node: str | None = None,
    max_age: float | None = None,
    webhook_url: str = DEFAULT_WEBHOOK_URL,
) -> list[Check]:
    """The checks of ``component`` (one of :data:`COMPONENTS`), stopping at an unreachable Redis."""
    if component == "webhook":
        return [check_webhook(webhook_url)]
    schedule_age = (
        max_age if max_age is not None else heartbeat.schedule_stale_seconds(sweep_interval_seconds)
    )
    worker_age = max_age if max_age is not None else heartbeat.WORKER_STALE_SECONDS
    checks = [check_redis(client)]
    if not checks[0].ok:
        return checks
    if component == "worker":
        checks.append(check_worker(client, node, max_age=worker_age))
    elif component == "beat":
        checks.append(check_beat(client, max_age=schedule_age))
    elif component == "service":
        checks += [
            check_workers(client, max_age=worker_age),
            check_beat(client, max_age=schedule_age),
            check_sweep(client, max_age=schedule_age),
        ]
    else:
        raise ValueError(f"unknown component {component!r}; one of {', '.join(COMPONENTS)}")
    return checks
