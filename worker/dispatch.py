"""How domain code asks for the next step without importing Celery tasks.

Task arguments are ids only (invariant 5). Domain functions return what should happen next and
the thin tasks in ``tasks/`` call a :class:`Dispatcher`; tests pass a recording one.
"""

from __future__ import annotations

from typing import Protocol

# Task names, shared by tasks/ (which defines them) and the Celery dispatcher (which sends them).
INGEST_TASK = "export.ingest"
#: Ingests every pending inbox chunk it can claim (worker.pipeline.inbox: the receiver's small chunks).
DRAIN_TASK = "export.drain"
FLUSH_TASK = "export.flush"
POLL_TASK = "export.poll_key"
#: Per-batch polls of earlier versions; still accepted so messages queued before an upgrade do no harm.
LEGACY_POLL_TASK = "export.poll"
SWEEP_TASK = "export.sweep"
BACKFILL_TASK = "export.backfill"


#: Longest a command waits for the broker to answer before saying it cannot reach it.
BROKER_CHECK_SECONDS = 5.0


class BrokerUnavailable(Exception):
    """The Celery broker does not answer; ``str(exc)`` is one line (the URL's password masked)."""


class Dispatcher(Protocol):
    def ingest(self, chunk_id: str) -> None: ...
    def drain(self, countdown: float = 0.0) -> None: ...
    def flush(self, job_id: str, countdown: float = 0.0) -> None: ...
    def poll_key(self, key_hash: str, countdown: float = 0.0) -> None: ...
    def backfill(self, job_id: str, part: str, countdown: float = 0.0) -> None: ...


class CeleryDispatcher:
    """Sends tasks by name to their queues (see celeryconfig.task_routes)."""

    def __init__(self) -> None:
        from worker.app import app

        self._app = app

    def check_broker(self) -> None:
        """Connect to the broker once, so a command that must queue work can refuse before it
        changes anything (``jobs resume`` with the broker down must not leave a resumed job whose
        flush was never queued).

        Raises:
            BrokerUnavailable: it did not answer within :data:`BROKER_CHECK_SECONDS`.
        """
        from kombu.utils.url import maybe_sanitize_url

        try:
            with self._app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=BROKER_CHECK_SECONDS)
        except Exception as exc:  # kombu's OperationalError, socket errors, a refused login
            url = maybe_sanitize_url(str(self._app.conf.broker_url))
            raise BrokerUnavailable(
                f"cannot reach the Celery broker at CELERY_BROKER_URL={url}: {exc}"
            ) from None

    def ingest(self, chunk_id: str) -> None:
        self._app.send_task(INGEST_TASK, args=[chunk_id])

    def drain(self, countdown: float = 0.0) -> None:
        self._app.send_task(DRAIN_TASK, countdown=countdown or None)

    def flush(self, job_id: str, countdown: float = 0.0) -> None:
        self._app.send_task(FLUSH_TASK, args=[job_id], countdown=countdown or None)

    def poll_key(self, key_hash: str, countdown: float = 0.0) -> None:
        self._app.send_task(POLL_TASK, args=[key_hash], countdown=countdown or None)

    def backfill(self, job_id: str, part: str, countdown: float = 0.0) -> None:
        self._app.send_task(BACKFILL_TASK, args=[job_id, part], countdown=countdown or None)
