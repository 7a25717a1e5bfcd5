"""Graceful shutdown: a worker told to stop finishes what it holds and hands back the rest.

On SIGTERM (every rolling update: Kubernetes and Docker signal the container's first process, the
worker's main process) Celery starts its *warm shutdown*: it stops taking messages, puts back the
ones it holds but has not started (countdown tasks among them: the broker redelivers them to another
worker at once) and waits for the tasks running in its pool processes. Left alone, those would run
their whole budget: a flush claims batch after batch for up to ten seconds, a poller checks for as
long, while the pod's grace period runs out.

So Celery's ``worker_shutting_down`` signal, sent in the main process, sets a flag here, and the
long loops look at it before taking more work (:func:`requested`):

- a flush stops claiming batches: the send in flight finishes (cutting it would leave a request
  Attentive may have accepted unaccounted for, and its users held for ``ATTENTIVE_UNCERTAIN_HOLD_SECONDS``),
  its batch goes to the poll as usual, and a fresh flush task is queued for what is left, which a
  worker that is not stopping takes at once; no batch waits for its lease (``FLUSH_LEASE_SECONDS``);
- a poller stops before its next check, releases its lock and queues its successor.

The flag lives in one byte of anonymous shared memory (``mmap(-1, 1)``: ``MAP_SHARED``) mapped when
this module is first imported. The worker's main process imports it (``worker.app``) before it
forks its pool, so every prefork child sees the byte its parent sets; a signal would not do, since
Celery sends ``worker_shutting_down`` in the main process only. With the solo or threads pool
everything is one process. Children started with another start method ("spawn") map a byte of
their own and never see the flag: they shut down as before, which is slower but loses nothing.

Send SIGTERM to the main process only (Kubernetes, ``docker stop``, ``celery multi stop``; with
systemd, ``KillMode=mixed``): a pool process that gets SIGTERM itself is ended by billiard at once,
mid-task, and its batch waits out its lease (no data is lost, as after any crash).
"""

from __future__ import annotations

import mmap
from typing import Any

from celery.signals import worker_shutting_down

_flag = mmap.mmap(-1, 1)


def requested() -> bool:
    """True once this worker (its main process, seen from any pool process) began shutting down."""
    return _flag[0] == 1


def request() -> None:
    """Mark this worker as shutting down (the signal handler below; tests)."""
    _flag[0] = 1


def clear() -> None:
    """Forget a shutdown request (tests only: a worker never comes back from one)."""
    _flag[0] = 0


@worker_shutting_down.connect  # type: ignore[untyped-decorator]
def _on_worker_shutting_down(**_kwargs: Any) -> None:
    # Runs inside Celery's signal handler in the main process: one byte written, nothing that
    # could block or take a lock (no logging, no I/O).
    request()
