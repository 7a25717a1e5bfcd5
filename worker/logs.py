"""Log output of every process: readable text (the default) or one JSON object per line.

``LOG_FORMAT=json`` (``worker/settings.py``) turns every log line of a Celery worker or beat, the
webhook receiver (``attentive-export serve`` or ``uvicorn worker.webhook.receiver:app``) and the
``attentive-export`` commands into one JSON object: ``time``, ``level``, ``logger``, ``message``,
and the ids the line is about as fields of their own: ``job_id``, ``batch_id``,
``attentive_job_id``, ``chunk_id`` (and ``key_hash``, ``part``, ``task``, ``task_id``, ``node``,
``event`` where they apply), so a log store can filter on them instead of parsing messages.

Where the ids come from:

- a log call passes them: ``log.warning("...", job.id, extra={"job_id": job.id, "batch_id": 7})``;
- inside a Celery task, from the task's arguments, which are ids only (DESIGN.md invariant 5):
  ``export.flush`` gives ``job_id``, ``export.ingest`` ``chunk_id``, ``export.backfill`` ``job_id``
  and ``part``, ``export.poll_key`` ``key_hash`` (set at ``task_prerun``, cleared at ``task_postrun``).

Only the fields named in :data:`FIELDS` are written: an ``extra`` key that is not one of them never
reaches the output, so a careless ``extra={"record": ...}`` cannot put a profile into a log.

Celery configures logging itself; this module adjusts what it built, from Celery's signals (it is
loaded by name through the app's ``include`` list, like ``worker.observe.liveness``, so
``worker/app.py`` still imports nothing of the domain): ``after_setup_logger`` and
``after_setup_task_logger`` give Celery's handlers the JSON formatter (same streams, files and
levels as before), and ``worker_ready`` / ``beat_init`` write one readiness line at INFO, shown
whatever ``-l`` says. Celery's startup banner is printed on stdout, not logged; log lines go to
stderr (``--quiet`` drops the banner).
"""

from __future__ import annotations

import ast
import contextvars
import datetime as dt
import json
import logging
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    beat_init,
    task_postrun,
    task_prerun,
    worker_ready,
)

from worker.dispatch import BACKFILL_TASK, FLUSH_TASK, INGEST_TASK, LEGACY_POLL_TASK, POLL_TASK
from worker.settings import SettingsError, load_settings

TEXT = "text"
JSON = "json"
#: Values of ``LOG_FORMAT``.
FORMATS = (TEXT, JSON)

#: The ids a line can carry as fields (the issue's four first).
ID_FIELDS = ("job_id", "batch_id", "attentive_job_id", "chunk_id")
#: Every field a JSON line may carry besides time, level, logger and message. Nothing else passed
#: in ``extra`` is written.
FIELDS = (*ID_FIELDS, "key_hash", "part", "task", "task_id", "node", "event", "queues", "concurrency")

#: Logger of the readiness lines: set to INFO, so they show even at Celery's default WARNING level.
READY_LOGGER = "worker.ready"

#: Which task argument is which id (task arguments are ids only: DESIGN.md invariant 5).
TASK_ARGUMENTS: dict[str, tuple[str, ...]] = {
    INGEST_TASK: ("chunk_id",),
    FLUSH_TASK: ("job_id",),
    POLL_TASK: ("key_hash",),
    LEGACY_POLL_TASK: ("job_id",),
    BACKFILL_TASK: ("job_id", "part"),
}

#: Fields of the task running in this context (empty outside tasks).
_task_fields: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar(
    "aex_log_fields", default=None
)

_ready_log = logging.getLogger(READY_LOGGER)
_ready_log.setLevel(logging.INFO)


def log_format() -> str:
    """``LOG_FORMAT`` of this process; ``text`` when the environment is invalid (a process that
    validated its settings at start never gets there, and logging must not fail over them)."""
    try:
        return load_settings().log_format
    except SettingsError:
        return TEXT


def _value(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple | set | frozenset):
        return [_value(v) for v in value]
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in a message or traceback are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds")[:-6]
            + "Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        context = _task_fields.get() or _celery_line_fields(record)
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is None:
                value = context.get(name)
            if value is not None:
                out[name] = _value(value)
        out["process"] = record.process
        if record.exc_info:
            out["exc_type"] = record.exc_info[0].__name__ if record.exc_info[0] else None
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def _celery_line_fields(record: logging.LogRecord) -> Mapping[str, Any]:
    """Celery's own task lines ("Task export.flush[...] received", logged outside the task) carry the
    task's name, id and argument repr in ``record.data``: the same fields as inside the task."""
    data = getattr(record, "data", None)
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return {}
    args: Any = data.get("args")
    if isinstance(args, str):  # the repr Celery logs, e.g. "['j1']" (ids only: invariant 5)
        try:
            args = ast.literal_eval(args)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            args = ()
    task_id = data.get("id")
    return task_fields(data["name"], task_id if isinstance(task_id, str) else None, args)


def use_json(handlers: Iterable[logging.Handler]) -> None:
    """Give ``handlers`` the JSON formatter (their streams, files, levels and filters stay)."""
    for handler in handlers:
        handler.setFormatter(JsonFormatter())


def use_json_on(*loggers: str) -> None:
    """The JSON formatter on the handlers of the named loggers (``""``: the root logger)."""
    for name in loggers:
        use_json(logging.getLogger(name).handlers)


def configure_cli(fmt: str) -> None:
    """``attentive-export``: with ``json``, warnings and errors as JSON lines on stderr. With ``text``
    nothing changes (Python's default: the message alone, warnings and up)."""
    if fmt != JSON:
        return
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.handlers = [handler]
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)


#: uvicorn's loggers (they have handlers of their own, and do not all propagate).
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


def uvicorn_log_config(fmt: str) -> dict[str, Any] | None:
    """``log_config`` for ``uvicorn.run``: None (uvicorn's own, readable) for text; for json,
    uvicorn's loggers as JSON lines on stderr, access lines included."""
    if fmt != JSON:
        return None
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": f"{__name__}.JsonFormatter"}},
        "handlers": {
            "json": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
        },
        "loggers": {
            "uvicorn": {"handlers": ["json"], "level": "INFO", "propagate": False},
            "uvicorn.error": {"level": "INFO"},
            "uvicorn.access": {"handlers": ["json"], "level": "INFO", "propagate": False},
        },
        # The receiver's own loggers (worker.webhook...) propagate to the root.
        "root": {"handlers": ["json"], "level": "INFO"},
    }


def use_json_under_uvicorn() -> None:
    """``uvicorn worker.webhook.receiver:app`` configured uvicorn's readable logging before the app
    was loaded: turn it into JSON lines (called while the app is built, so every line but uvicorn's
    first few is JSON), and let the receiver's own loggers reach a JSON handler too."""
    use_json_on(*UVICORN_LOGGERS)
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        root.addHandler(handler)
        if root.level == logging.NOTSET or root.level > logging.INFO:
            root.setLevel(logging.INFO)
    use_json(root.handlers)


# --- Celery ------------------------------------------------------------------------------------------
@after_setup_logger.connect  # type: ignore[untyped-decorator]
def _celery_root_logger(logger: logging.Logger | None = None, **_kwargs: object) -> None:
    if logger is not None and log_format() == JSON:
        use_json(logger.handlers)


@after_setup_task_logger.connect  # type: ignore[untyped-decorator]
def _celery_task_logger(logger: logging.Logger | None = None, **_kwargs: object) -> None:
    # Celery's task logger has its own handler (TaskFormatter: task name and id in the text); the
    # JSON lines carry them as ``task`` and ``task_id`` instead.
    if logger is not None and log_format() == JSON:
        use_json(logger.handlers)


def task_fields(name: str | None, task_id: str | None, args: Any) -> dict[str, Any]:
    """The log fields of one task run: its name and id, and its arguments named (ids only)."""
    fields: dict[str, Any] = {}
    if name:
        fields["task"] = name
    if task_id:
        fields["task_id"] = task_id
    names = TASK_ARGUMENTS.get(name or "", ())
    if isinstance(args, list | tuple):
        for field, value in zip(names, args, strict=False):
            if isinstance(value, str | int):
                fields[field] = value
    return fields


@task_prerun.connect  # type: ignore[untyped-decorator]
def _task_started(
    sender: Any = None, task_id: str | None = None, args: Any = None, **_kwargs: object
) -> None:
    _task_fields.set(task_fields(getattr(sender, "name", None), task_id, args))


@task_postrun.connect  # type: ignore[untyped-decorator]
def _task_ended(**_kwargs: object) -> None:
    _task_fields.set(None)


@worker_ready.connect  # type: ignore[untyped-decorator]
def _worker_ready(sender: Any = None, **_kwargs: object) -> None:
    """One line at INFO once the worker consumes: its node, queues and pool size (no URLs, which
    may carry a password)."""
    node = getattr(sender, "hostname", None)
    queues: list[str] = []
    try:
        queues = sorted(q.name for q in sender.task_consumer.queues)
    except Exception:  # a consumer without a task consumer (not expected): the line still goes out
        queues = []
    concurrency = getattr(getattr(sender, "controller", None), "concurrency", None)
    _ready_log.info(
        "worker %s ready: consuming %s with %s processes",
        node,
        ",".join(queues) or "?",
        concurrency if concurrency is not None else "?",
        extra={"event": "worker_ready", "node": node, "queues": queues, "concurrency": concurrency},
    )


@beat_init.connect  # type: ignore[untyped-decorator]
def _beat_ready(sender: Any = None, **_kwargs: object) -> None:
    schedule = sorted(getattr(getattr(sender, "app", None), "conf", {}).get("beat_schedule", {}) or {})
    _ready_log.info(
        "beat ready: scheduling %s", ", ".join(schedule) or "nothing", extra={"event": "beat_ready"}
    )
