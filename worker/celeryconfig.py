"""Celery settings (settings only; the app is worker/app.py). See DESIGN.md §4 for the reasons."""

from __future__ import annotations

import os

from kombu.entity import Queue

_redis_url = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
broker_url = os.environ.get("CELERY_BROKER_URL") or _redis_url

# Results are ignored: all state lives in Redis under our own keys.
task_ignore_result = True
result_backend = None

# A task is acknowledged after it ran, and re-queued if its worker process dies mid-way.
task_acks_late = True
task_reject_on_worker_lost = True
# One message at a time per process, so a busy process does not sit on work others could do.
worker_prefetch_multiplier = 1

# Redis transport: an unacknowledged message comes back after this long. Well above the longest
# countdown (polls cap at about 72 s), so countdown tasks are not delivered twice. Crash recovery
# does not wait for it: leases and the sweep re-drive batches within a minute (worker/sweep.py).
broker_transport_options = {"visibility_timeout": 3600}
broker_connection_retry_on_startup = True

task_queues = tuple(Queue(name) for name in ("ingest", "flush", "poll", "backfill", "sweep"))  # type: ignore[no-untyped-call]
task_default_queue = "ingest"
task_routes = {
    "export.ingest": {"queue": "ingest"},
    "export.flush": {"queue": "flush"},
    "export.poll": {"queue": "poll"},
    "export.sweep": {"queue": "sweep"},
    "export.backfill": {"queue": "backfill"},
}

# Flower shows tasks live; arguments are ids only, so nothing secret or personal is displayed.
worker_send_task_events = True
task_send_sent_event = True

task_serializer = "json"
accept_content = ["json"]

_sweep_every = float(os.environ.get("SWEEP_INTERVAL_SECONDS") or 1.0)
beat_schedule = {
    "sweep": {"task": "export.sweep", "schedule": _sweep_every, "options": {"expires": _sweep_every * 5}},
}
