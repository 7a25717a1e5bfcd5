"""Celery settings per broker (Redis, RabbitMQ) and the time limits (worker/celeryconfig.py)."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from worker.backfill.steps import LOCK_SECONDS, PAGES_PER_STEP, STEP_SECONDS
from worker.clients.attentive.client import DEFAULT_MAX_ATTEMPTS, DEFAULT_TIMEOUT
from worker.clients.lytics import ATTEMPTS as LYTICS_ATTEMPTS
from worker.clients.lytics import MAX_WAIT_SECONDS as LYTICS_MAX_WAIT
from worker.pipeline.attentive_calls import RATE_LIMITED_CAP_SECONDS
from worker.pipeline.flush import ERROR_RETRY_CAP_SECONDS, FLUSH_BUDGET_SECONDS
from worker.pipeline.poller import POLLER_BUDGET_SECONDS
from worker.settings import broker_kind

ROOT = Path(__file__).resolve().parents[2]
REDIS = "redis://127.0.0.1:6379/12"
AMQP = "amqp://guest:guest@127.0.0.1:5672//"
#: The longest countdown a worker holds unacknowledged: a task retrying while Redis is down
#: (autoretry_for with retry_backoff: retry_backoff_max, 600 s by default), or a 5xx / 429 back-off.
LONGEST_COUNTDOWN = max(600, ERROR_RETRY_CAP_SECONDS, RATE_LIMITED_CAP_SECONDS)
#: One Attentive request at its worst: every connect attempt timing out (with about a second of
#: waits between), then the whole write and read timeouts.
WORST_ATTENTIVE_REQUEST = (
    DEFAULT_MAX_ATTEMPTS * (DEFAULT_TIMEOUT.connect or 0)
    + 1
    + (DEFAULT_TIMEOUT.write or 0)
    + (DEFAULT_TIMEOUT.read or 0)
)


def config(monkeypatch: pytest.MonkeyPatch, broker: str) -> dict[str, Any]:
    """worker/celeryconfig.py's settings as a process with ``CELERY_BROKER_URL=broker`` reads them."""
    monkeypatch.setenv("CELERY_BROKER_URL", broker)
    return runpy.run_path(str(ROOT / "worker" / "celeryconfig.py"))


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("redis://h:6379/0", "redis"),
        ("rediss://:pw@h:6380/1", "redis"),
        ("sentinel://h:26379;sentinel://h2:26379", "redis"),
        ("amqp://u:p@h:5672//", "amqp"),
        ("AMQPS://h//", "amqp"),
        ("pyamqp://h;amqp://h2", "amqp"),
        ("sqs://", "sqs"),
    ],
)
def test_broker_kind(url: str, kind: str) -> None:
    assert broker_kind(url) == kind


def test_redis_broker_holds_countdowns_well_past_the_longest_and_never_waits_forever(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    conf = config(monkeypatch, REDIS)
    options = conf["broker_transport_options"]
    assert options["visibility_timeout"] >= 2 * LONGEST_COUNTDOWN
    assert (
        options["socket_connect_timeout"] > 0
        and options["socket_timeout"] > 0
        and options["socket_keepalive"]
    )


def test_rabbitmq_gets_no_redis_transport_options_and_durable_queues(monkeypatch: pytest.MonkeyPatch) -> None:
    conf = config(monkeypatch, AMQP)
    assert conf["broker_url"] == AMQP
    assert "broker_transport_options" not in conf
    assert {q.name for q in conf["task_queues"]} == {"ingest", "flush", "poll", "backfill", "sweep"}
    assert all(q.durable and not q.auto_delete for q in conf["task_queues"])
    # One binding per queue: a message sent to a queue's exchange reaches that queue only.
    assert all(q.exchange.name == q.routing_key == q.name for q in conf["task_queues"])
    # RabbitMQ's consumer_timeout (30 min by default) is above every countdown held unacknowledged.
    assert LONGEST_COUNTDOWN < 30 * 60
    for name in ("task_acks_late", "task_reject_on_worker_lost"):
        assert conf[name] is True


def test_time_limits_are_hard_only_above_each_tasks_own_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    conf = config(monkeypatch, REDIS)
    assert "task_soft_time_limit" not in conf  # a soft limit's exception could be misread (see there)
    hard = conf["task_time_limit"]
    # A flush or poller works its budget, then finishes the request it started.
    assert hard > max(FLUSH_BUDGET_SECONDS, POLLER_BUDGET_SECONDS) + WORST_ATTENTIVE_REQUEST
    backfill = conf["task_annotations"]["export.backfill"]["time_limit"]
    worst_page = (
        LYTICS_ATTEMPTS * 20.0 + (LYTICS_ATTEMPTS - 1) * LYTICS_MAX_WAIT
    )  # 20 s: the client's timeout
    assert STEP_SECONDS + worst_page < backfill < LOCK_SECONDS  # two steps of one part never overlap
    assert PAGES_PER_STEP >= 1


def _app_in(broker: str) -> dict[str, Any]:
    """What ``worker.app`` installs in a fresh process whose broker is ``broker``."""
    probe = (
        "import json\n"
        "from kombu.transport import redis as r\n"
        "from worker.app import app\n"
        "app.loader.import_default_modules()\n"
        "print(json.dumps({'qos': r.Channel.QoS.__name__,\n"
        " 'steps': sorted(s.__name__ for s in app.steps['consumer']),\n"
        " 'flush_limit': app.tasks['export.flush'].time_limit,\n"
        " 'backfill_limit': app.tasks['export.backfill'].time_limit}))\n"
    )
    env = {**os.environ, "CELERY_BROKER_URL": broker}
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_the_redis_transport_workaround_applies_to_redis_brokers_only() -> None:
    on_redis, on_rabbitmq = _app_in(REDIS), _app_in(AMQP)
    assert on_redis["qos"] == "RecoveringQoS" and "RestoreUnackedAfterReconnect" in on_redis["steps"]
    assert on_rabbitmq["qos"] == "QoS" and "RestoreUnackedAfterReconnect" not in on_rabbitmq["steps"]
    for conf in (on_redis, on_rabbitmq):
        assert conf["flush_limit"] == 120  # task_time_limit
        assert conf["backfill_limit"] == 170
