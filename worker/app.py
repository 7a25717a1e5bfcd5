"""The Celery application: ``celery -A worker.app worker|beat|flower``."""

from __future__ import annotations

from celery import Celery

app = Celery("attentive_export", include=["tasks.ingest", "tasks.flush", "tasks.poll", "tasks.sweep"])
app.config_from_object("celeryconfig")
