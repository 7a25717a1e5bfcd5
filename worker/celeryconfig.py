"""Celery settings (settings only; the app is worker/app.py). See DESIGN.md §4 for the reasons."""

from __future__ import annotations

from kombu.entity import Exchange, Queue

from worker.settings import SettingsError, broker_kind, load_settings

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

# "redis" or "amqp" (RabbitMQ): the two brokers the service is tested on (README, "Which broker").
_broker = broker_kind(broker_url)

# A worker holds a countdown task unacknowledged until it runs. The longest countdowns: a flush or
# poller waiting out a 429 hold or a 5xx back-off (60 s at most), a task retrying while Redis is
# down (Celery's retry_backoff_max, 600 s). Both brokers take an unacknowledged message back after
# a while, and must not do so before these ran, or a countdown task runs twice:
# - Redis: the transport's visibility timeout, set here well above them (an hour);
# - RabbitMQ: the server's consumer_timeout (30 minutes by default) closes the channel of a consumer
#   that holds a message longer, so leave it at its default or above (never under 15 minutes).
# Crash recovery waits for neither: leases, the poller lock and the sweep re-drive work within a
# minute (worker/pipeline/sweep.py), and every task is recoverable from Redis, so the broker is never
# the only copy of anything.
if _broker == "redis":
    broker_transport_options = {
        "visibility_timeout": 3600,
        # No publish or command waits forever on a half-open connection (kombu's own health check
        # covers the consumer's BRPOP); a lost connection is retried like any broker outage.
        "socket_connect_timeout": 10,
        "socket_timeout": 30,
        "socket_keepalive": True,
    }
# RabbitMQ needs no transport options: AMQP heartbeats (Celery's broker_heartbeat, negotiated with
# the server) close a half-open connection, and the queues below are durable (survive a broker
# restart) with persistent messages (Celery's default delivery mode).
broker_connection_retry_on_startup = True

# Every long step of a task has its own bound (a flush or poller works 10 s, then hands over; an HTTP
# request to Attentive times out: connect 5 s with 3 attempts, write and read 30 s each; Lytics 20 s),
# so these hard limits are a backstop: a pool process stuck past them (a hung call) is ended and
# replaced, and its work is taken up as after a crash (leases, the poller lock, the sweep). No soft
# limit: SoftTimeLimitExceeded is raised at whatever instruction runs, where a guard written for
# other errors would misread it (a transition counted unmappable, a request in flight taken as
# answered); ending the process is a case every step is built for (DESIGN.md invariant 1).
# A worker's warm shutdown (SIGTERM) waits for its running tasks: a grace period above the longest
# limit here (docker-compose.yml gives 180 s) never cuts one short. It normally takes one request,
# as a flush or poller stops at its next step (worker/shutdown.py).
task_time_limit = 120
# A backfill step (10 s of pages, each retried up to 3 times) is bounded below its part's lock
# (180 s, worker/backfill/steps.py), so two steps of one part never overlap.
task_annotations = {"export.backfill": {"time_limit": 170}}

# Each queue on a direct exchange of its own, bound by its own name (left unset, Celery binds all
# five to one "ingest" exchange with one key, so a message sent there would be copied to each), and
# durable: on RabbitMQ it survives a broker restart (messages are persistent, Celery's default).
task_queues = tuple(
    Queue(name, Exchange(name, type="direct"), routing_key=name, durable=True)  # type: ignore[no-untyped-call]
    for name in ("ingest", "flush", "poll", "backfill", "sweep")
)
task_default_queue = "ingest"
task_routes = {
    "export.ingest": {"queue": "ingest"},
    "export.drain": {"queue": "ingest"},
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
