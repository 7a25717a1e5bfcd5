"""The Celery application: ``celery -A worker.app worker|beat|flower``."""

from __future__ import annotations

import logging

from celery import Celery

app = Celery("attentive_export", include=["tasks.ingest", "tasks.flush", "tasks.poll", "tasks.sweep"])
app.config_from_object("celeryconfig")

# httpx logs every request URL at INFO; a results URL may carry a pre-signed signature.
logging.getLogger("httpx").setLevel(logging.WARNING)
