"""LOG_FORMAT=json: one JSON object per line, ids as fields, nothing but known fields (worker/logs.py)."""

from __future__ import annotations

import io
import json
import logging
import logging.config
import sys
from collections.abc import Iterator

import pytest

from worker import logs
from worker.dispatch import BACKFILL_TASK, FLUSH_TASK, INGEST_TASK, POLL_TASK, SWEEP_TASK
from worker.settings import SettingsError, load_settings


@pytest.fixture
def capture() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("test.logs.capture")
    logger.handlers, logger.propagate = [handler], False
    logger.setLevel(logging.DEBUG)
    yield logger, stream
    logger.handlers = []


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    text = stream.getvalue()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_settings_accept_text_and_json_only() -> None:
    assert load_settings({}).log_format == "text"
    assert load_settings({"LOG_FORMAT": " JSON "}).log_format == "json"
    with pytest.raises(SettingsError, match=r"^LOG_FORMAT: must be one of text, json \(got 'xml'\)$"):
        load_settings({"LOG_FORMAT": "xml"})


def test_one_object_per_line_with_ids_as_fields(capture: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = capture
    logger.warning(
        "job %s batch %s: status %s\nsecond line",
        "j1",
        7,
        "NEEDS_REVIEW",
        extra={"job_id": "j1", "batch_id": 7, "attentive_job_id": "aj-3", "chunk_id": "c9"},
    )
    [line] = lines(stream)
    assert line["message"] == "job j1 batch 7: status NEEDS_REVIEW\nsecond line"
    assert (line["level"], line["logger"]) == ("WARNING", "test.logs.capture")
    assert (line["job_id"], line["batch_id"], line["attentive_job_id"], line["chunk_id"]) == (
        "j1",
        7,
        "aj-3",
        "c9",
    )
    assert str(line["time"]).endswith("Z") and "T" in str(line["time"])


def test_unknown_extra_fields_never_reach_the_output(capture: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = capture
    logger.error("refused", extra={"record": {"email": "ada@x.io"}, "api_key": "sk_live", "job_id": "j1"})
    [line] = lines(stream)
    assert "ada@x.io" not in stream.getvalue() and "sk_live" not in stream.getvalue()
    assert line["job_id"] == "j1" and "record" not in line and "api_key" not in line


def test_exceptions_stay_on_one_line(capture: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = capture
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("sweep: job %s failed", "j1", extra={"job_id": "j1"})
    [line] = lines(stream)
    assert line["exc_type"] == "ValueError" and "Traceback" in str(line["exc"]) and "boom" in str(line["exc"])


def test_task_arguments_become_id_fields(capture: tuple[logging.Logger, io.StringIO]) -> None:
    assert logs.task_fields(INGEST_TASK, "t1", ["c42"]) == {
        "task": INGEST_TASK,
        "task_id": "t1",
        "chunk_id": "c42",
    }
    assert logs.task_fields(FLUSH_TASK, "t2", ("j1",))["job_id"] == "j1"
    assert logs.task_fields(BACKFILL_TASK, "t3", ["j1", "vip"]) | {} == {
        "task": BACKFILL_TASK,
        "task_id": "t3",
        "job_id": "j1",
        "part": "vip",
    }
    assert logs.task_fields(POLL_TASK, "t4", ["kh"])["key_hash"] == "kh"
    assert logs.task_fields(SWEEP_TASK, "t5", []) == {"task": SWEEP_TASK, "task_id": "t5"}

    # While a task runs (task_prerun .. task_postrun), its lines carry them.
    logger, stream = capture

    class Task:
        name = FLUSH_TASK

    logs._task_started(sender=Task(), task_id="t9", args=["j7"])
    logger.warning("inside", extra={"batch_id": 3})
    logs._task_ended()
    logger.warning("outside")
    inside, outside = lines(stream)
    assert (inside["job_id"], inside["batch_id"], inside["task"], inside["task_id"]) == (
        "j7",
        3,
        FLUSH_TASK,
        "t9",
    )
    assert "job_id" not in outside and "task" not in outside


def test_celery_handlers_get_the_json_formatter_only_with_json(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.Logger("celery-root-stand-in")
    handler = logging.StreamHandler(io.StringIO())
    text_formatter = logging.Formatter("[%(levelname)s] %(message)s")
    handler.setFormatter(text_formatter)
    root.addHandler(handler)
    monkeypatch.delenv("LOG_FORMAT", raising=False)
    logs._celery_root_logger(logger=root)
    assert handler.formatter is text_formatter
    monkeypatch.setenv("LOG_FORMAT", "json")
    logs._celery_root_logger(logger=root)
    assert isinstance(handler.formatter, logs.JsonFormatter)
    task_handler = logging.StreamHandler(io.StringIO())
    task_logger = logging.Logger("celery.task-stand-in")
    task_logger.addHandler(task_handler)
    logs._celery_task_logger(logger=task_logger)
    assert isinstance(task_handler.formatter, logs.JsonFormatter)


def test_worker_readiness_line_is_info_and_shown_at_warning_level() -> None:
    class Queue:
        def __init__(self, name: str) -> None:
            self.name = name

    class Consumer:
        hostname = "w1@host"
        task_consumer = type("TC", (), {"queues": [Queue("ingest"), Queue("flush")]})()
        controller = type("C", (), {"concurrency": 4})()

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)  # as Celery's: no level of its own
    handler.setFormatter(logs.JsonFormatter())
    try:
        root.handlers = [handler]
        root.setLevel(logging.WARNING)  # Celery's default -l
        logging.getLogger("celery.apps.worker").info("celery's own ready line: hidden at WARNING")
        logs._worker_ready(sender=Consumer())
    finally:
        root.handlers, root.level = saved
    [line] = lines(stream)
    assert line["level"] == "INFO" and line["logger"] == logs.READY_LOGGER
    assert line["message"] == "worker w1@host ready: consuming flush,ingest with 4 processes"
    assert (line["event"], line["node"], line["queues"], line["concurrency"]) == (
        "worker_ready",
        "w1@host",
        ["flush", "ingest"],
        4,
    )


def test_cli_logs_json_to_stderr_only_with_json(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        logs.configure_cli("text")
        assert root.handlers == saved[0]
        stderr = io.StringIO()
        monkeypatch.setattr(sys, "stderr", stderr)
        logs.configure_cli("json")
        logging.getLogger("worker.cli.something").warning("careful", extra={"job_id": "j1"})
        logging.getLogger("worker.cli.something").info("not shown")
        [line] = [json.loads(x) for x in stderr.getvalue().splitlines()]
        assert (line["message"], line["job_id"], line["level"]) == ("careful", "j1", "WARNING")
    finally:
        root.handlers, root.level = saved[0], saved[1]


def test_uvicorn_log_config_is_valid_and_json(monkeypatch: pytest.MonkeyPatch) -> None:
    assert logs.uvicorn_log_config("text") is None  # uvicorn's own readable configuration
    config = logs.uvicorn_log_config("json")
    assert config is not None
    root = logging.getLogger()
    saved = {
        name: (logging.getLogger(name).handlers[:], logging.getLogger(name).propagate)
        for name in logs.UVICORN_LOGGERS
    }
    saved_root = (root.handlers[:], root.level)
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    try:
        logging.config.dictConfig(config)
        logging.getLogger("uvicorn.access").info(
            '%s - "%s %s HTTP/%s" %d', "1.2.3.4:5", "POST", "/v1/transitions", "1.1", 202
        )
        logging.getLogger("uvicorn.error").info("Application startup complete.")
        access, startup = (json.loads(x) for x in stderr.getvalue().splitlines())
        assert access["message"] == '1.2.3.4:5 - "POST /v1/transitions HTTP/1.1" 202'
        assert (startup["logger"], startup["level"]) == ("uvicorn.error", "INFO")
    finally:
        for name, (handlers, propagate) in saved.items():
            logging.getLogger(name).handlers, logging.getLogger(name).propagate = handlers, propagate
        root.handlers, root.level = saved_root


def test_celerys_own_task_lines_carry_the_ids(capture: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = capture
    context = {"id": "t1", "name": FLUSH_TASK, "args": "['j1']", "kwargs": "{}", "eta": None}
    logger.info("Task %(name)s[%(id)s] received", context, extra={"data": context})
    odd = {"id": "t2", "name": INGEST_TASK, "args": "not a repr(", "kwargs": "{}"}
    logger.info("Task %(name)s[%(id)s] received", odd, extra={"data": odd})
    received, unparsable = lines(stream)
    assert received["message"] == f"Task {FLUSH_TASK}[t1] received"
    assert (received["job_id"], received["task"], received["task_id"]) == ("j1", FLUSH_TASK, "t1")
    assert (unparsable["task"], "chunk_id" in unparsable) == (INGEST_TASK, False)
