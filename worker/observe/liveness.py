"""Celery signals that write the worker's and beat's heartbeats (:mod:`worker.observe.heartbeat`).

Loaded by every Celery process through the app's ``include`` list (``worker/app.py``), like the task
modules: the app module itself imports nothing of the domain. What each signal proves:

- ``heartbeat_sent``: the worker's consumer loop sent its event heartbeat (every 2 s). It runs in that
  loop, so a hung loop or a lost broker connection stops the beats; Celery sends it only while task
  events are on (``worker_send_task_events``, which the service needs for Flower anyway) and not
  with ``--without-heartbeat``;
- ``worker_ready`` / ``worker_shutdown``: first beat at once, and a clean stop removes the worker;
- ``after_task_publish`` of the sweep: beat's scheduler ticked and reached the broker.

A beat that cannot reach Redis is logged once when it starts failing and once when it recovers,
never raised: a heartbeat must not take down the process it reports on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import redis
from celery.signals import after_task_publish, heartbeat_sent, worker_ready, worker_shutdown

from worker.dispatch import SWEEP_TASK
from worker.observe import heartbeat
from worker.settings import load_settings
from worker.store.connection import connect

log = logging.getLogger(__name__)

#: Seconds a heartbeat may wait for Redis: the worker's beat runs in its consumer loop.
REDIS_TIMEOUT_SECONDS = 1.0

_client: redis.Redis | None = None
_lock = threading.Lock()
_failing = False


def _redis() -> redis.Redis:
    global _client
    with _lock:
        if _client is None:
            _client = connect(
                load_settings().redis_url,
                socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
                socket_timeout=REDIS_TIMEOUT_SECONDS,
            )
        return _client


def _guarded(what: str, write: Callable[..., None], *args: Any) -> None:
    """Run one heartbeat write; log a change between working and failing, never raise."""
    global _failing
    try:
        write(_redis(), *args)
    except redis.RedisError as exc:
        if not _failing:
            log.warning("%s heartbeat not written (Redis: %s); health checks will report it", what, exc)
        _failing = True
        return
    if _failing:
        log.warning("%s heartbeat written again", what)
    _failing = False


def _node(obj: Any) -> str | None:
    name = getattr(obj, "hostname", None)
    return name if isinstance(name, str) and name else None


@heartbeat_sent.connect  # type: ignore[untyped-decorator]
def _worker_heartbeat(sender: Any = None, **_kwargs: object) -> None:
    node = _node(getattr(sender, "eventer", None))
    if node is not None:
        _guarded("worker", heartbeat.worker_beat, node)


@worker_ready.connect  # type: ignore[untyped-decorator]
def _worker_ready(sender: Any = None, **_kwargs: object) -> None:
    node = _node(sender)
    if node is not None:
        _guarded("worker", heartbeat.worker_beat, node)


@worker_shutdown.connect  # type: ignore[untyped-decorator]
def _worker_shutdown(sender: Any = None, **_kwargs: object) -> None:
    node = _node(sender)
    if node is not None:
        _guarded("worker", heartbeat.worker_gone, node)


@after_task_publish.connect  # type: ignore[untyped-decorator]
def _beat_published(sender: Any = None, **_kwargs: object) -> None:
    if sender == SWEEP_TASK:
        _guarded("beat", heartbeat.beat, heartbeat.BEAT)
