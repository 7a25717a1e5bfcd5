"""The Celery application: ``celery -A worker.app worker|beat|flower``."""

from __future__ import annotations

import logging

from celery import Celery
from celery.signals import after_setup_logger

app = Celery(
    "attentive_export", include=["tasks.ingest", "tasks.flush", "tasks.poll", "tasks.sweep", "tasks.backfill"]
)
app.config_from_object("worker.celeryconfig")


@after_setup_logger.connect  # type: ignore[untyped-decorator]
def _quiet_httpx(**_kwargs: object) -> None:
    """httpx logs every request URL at INFO; a results URL may carry a pre-signed signature."""
    logging.getLogger("httpx").setLevel(logging.WARNING)
