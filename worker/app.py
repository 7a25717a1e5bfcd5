"""The Celery application: ``celery -A worker.app worker|beat|flower``."""

from __future__ import annotations

import logging

from celery import Celery
from celery.signals import after_setup_logger, worker_init

# A worker told to stop (SIGTERM) stops claiming work in its pool processes: the flag it sets is
# mapped when worker.shutdown is imported, so here, in the main process, before the pool forks.
import worker.shutdown  # noqa: F401
from worker import redis_broker
from worker.settings import SettingsError, broker_kind, load_settings

app = Celery(
    "attentive_export",
    # worker.observe.liveness: heartbeats for `attentive-export health`, written from Celery signals;
    # worker.logs: LOG_FORMAT=json and the readiness lines, from Celery's logging signals.
    # Loaded by name like the task modules, so this module still imports nothing of the domain.
    include=[
        "tasks.ingest",
        "tasks.flush",
        "tasks.poll",
        "tasks.sweep",
        "tasks.backfill",
        "worker.observe.liveness",
        "worker.logs",
    ],
)
# Importing worker.celeryconfig validates every setting (a bad one ends the process with one line).
app.config_from_object("worker.celeryconfig")
# Workers survive a Redis restart while holding unacknowledged messages (a celery/kombu 5.7 bug);
# a workaround for the Redis transport only, left out with RabbitMQ.
if broker_kind(app.conf.broker_url) == "redis":
    redis_broker.install(app)


@worker_init.connect  # type: ignore[untyped-decorator]
def _refuse_to_start_without_secret_key(**_kwargs: object) -> None:
    """A worker refuses to start without ``EXPORT_SECRET_KEY``: every flush and poll decrypts a stored
    API key with it. Sent in the worker's main process before the pool starts; beat, flower and
    ``celery call`` never get this signal and need no key. Celery logs and swallows an exception
    from a signal handler, but lets SystemExit through: one line, exit status 1."""
    try:
        load_settings().require_secret_key()
    except SettingsError as exc:
        raise SystemExit(f"error: {exc}") from None


@after_setup_logger.connect  # type: ignore[untyped-decorator]
def _quiet_httpx(**_kwargs: object) -> None:
    """httpx logs every request URL at INFO; a results URL may carry a pre-signed signature."""
    logging.getLogger("httpx").setLevel(logging.WARNING)
