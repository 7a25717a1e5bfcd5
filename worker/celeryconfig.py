"""Celery settings (settings only; the app is worker/app.py). See DESIGN.md §4 for the reasons."""

from __future__ import annotations

from kombu.entity import Queue

from worker.settings import SettingsError, load_settings

# Every Celery process (worker, beat, flower) imports this module before it connects anywhere, so
# this is where a bad setting stops it: one line, exit status 1, no traceback (Celery lets a
# SystemExit through). The worker also needs EXPORT_SECRET_KEY: see worker_init in worker/app.py.
try:
    _settings = load_settings()
except SettingsError as exc:
    raise SystemExit(f"error: {exc}") from None

broker_url = _settings.broker_url

# Results are ignored: all state lives in Redis under our own keys.
task_ignore_result = True
result_backend = None

# A task is acknowledged after it ran, and re-queued if its worker process dies mid-way.
task_acks_late = True
task_reject_on_worker_lost = True
# One message at a time per process, so a busy process does not sit on work others could do.
worker_prefetch_multiplier = 1

# Redis transport: an unacknowledged message comes back after this long. Well above the longest
# countdown (a flush or poller waiting out a 429 hold: 30 s at most), so countdown tasks are not
# delivered twice. Crash recovery does not wait for it: leases, the poller lock and the sweep re-drive
# work within a minute (worker/pipeline/sweep.py).
broker_transport_options = {"visibility_timeout": 3600}
broker_connection_retry_on_startup = True

task_queues = tuple(Queue(name) for name in ("ingest", "flush", "poll", "backfill", "sweep"))  # type: ignore[no-untyped-call]
task_default_queue = "ingest"
task_routes = {
    "export.ingest": {"queue": "ingest"},
    "export.flush": {"queue": "flush"},
    "export.poll_key": {"queue": "poll"},
    "export.poll": {"queue": "poll"},
    "export.sweep": {"queue": "sweep"},
    "export.backfill": {"queue": "backfill"},
}

# Flower shows tasks live; arguments are ids only, so nothing secret or personal is displayed.
worker_send_task_events = True
task_send_sent_event = True

task_serializer = "json"
accept_content = ["json"]

_sweep_every = _settings.sweep_interval_seconds
beat_schedule = {
    "sweep": {"task": "export.sweep", "schedule": _sweep_every, "options": {"expires": _sweep_every * 5}},
}
