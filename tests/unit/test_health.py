"""Heartbeats and ``attentive-export health``: what a probe sees and the exit status it gets.

Logic on fakeredis; the command itself on the real test Redis (it builds its own client from
``REDIS_URL``, as a probe inside a pod does)."""

from __future__ import annotations

import http.server
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import fakeredis
import pytest
import redis

from tests.conftest import TEST_REDIS_URL
from worker.cli import entry
from worker.cli.main import main
from worker.observe import health, heartbeat, liveness, probe
from worker.store import keys


@pytest.fixture
def r() -> Iterator[fakeredis.FakeRedis]:
    client = fakeredis.FakeRedis()
    yield client
    client.close()


def ago(seconds: float) -> int:
    return heartbeat.now_ms() - int(seconds * 1000)


# --- checks -----------------------------------------------------------------------------------------
def test_a_worker_is_healthy_only_while_its_heartbeat_is_fresh(r: fakeredis.FakeRedis) -> None:
    assert not health.check_worker(r, "w1@pod-a").ok
    heartbeat.worker_beat(r, "w1@pod-a", at_ms=ago(2))
    assert health.check_worker(r, "w1@pod-a").ok
    heartbeat.worker_beat(r, "w1@pod-a", at_ms=ago(heartbeat.WORKER_STALE_SECONDS + 5))
    stale = health.check_worker(r, "w1@pod-a")
    assert not stale.ok and "more than 30 s" in stale.detail


def test_a_worker_found_by_this_hosts_name_without_arguments(r: fakeredis.FakeRedis) -> None:
    heartbeat.worker_beat(r, "celery@pod-b", at_ms=ago(1))  # another pod's worker does not count
    assert not health.check_worker(r, host=lambda: "pod-a").ok
    heartbeat.worker_beat(r, "celery@pod-a", at_ms=ago(1))
    assert health.check_worker(r, host=lambda: "pod-a").ok
    heartbeat.worker_beat(r, "second@pod-a", at_ms=ago(60))  # the stalest worker of the host decides
    assert not health.check_worker(r, host=lambda: "pod-a").ok


def test_a_cleanly_stopped_worker_is_gone_at_once(r: fakeredis.FakeRedis) -> None:
    heartbeat.worker_beat(r, "w1@pod-a")
    heartbeat.worker_gone(r, "w1@pod-a")
    assert not health.check_worker(r, "w1@pod-a").ok
    assert heartbeat.read(r).workers == {}


def test_heartbeat_keys_expire_and_old_workers_are_pruned(r: fakeredis.FakeRedis) -> None:
    heartbeat.worker_beat(r, "old@pod-x", at_ms=ago(heartbeat.TTL_SECONDS + 60))
    heartbeat.worker_beat(r, "w1@pod-a")
    assert set(heartbeat.read(r).workers) == {"w1@pod-a"}
    assert 0 < r.ttl(keys.worker_heartbeat("w1@pod-a")) <= heartbeat.TTL_SECONDS
    heartbeat.beat(r, heartbeat.BEAT)
    assert 0 < r.ttl(keys.heartbeat(heartbeat.BEAT)) <= heartbeat.TTL_SECONDS
    heartbeat.note_sweep(r)  # never expires: gone would read as "never recorded", which passes
    assert r.ttl(keys.heartbeat(heartbeat.SWEEP)) == -1


def test_service_needs_a_live_worker_and_beat_and_a_sweep_once_one_was_recorded(
    r: fakeredis.FakeRedis,
) -> None:
    def ok() -> bool:
        return all(c.ok for c in health.run("service", r))

    assert not ok()
    heartbeat.worker_beat(r, "w1@pod-a")
    assert not ok()  # no beat yet
    heartbeat.beat(r, heartbeat.BEAT)
    assert ok()  # no sweep heartbeat ever: the sweep task may not write one yet
    heartbeat.beat(r, heartbeat.SWEEP, at_ms=ago(120))
    assert not ok()
    heartbeat.note_sweep(r)
    assert ok()


def test_beat_staleness_scales_with_the_sweep_interval(r: fakeredis.FakeRedis) -> None:
    heartbeat.beat(r, heartbeat.BEAT, at_ms=ago(45))
    assert not health.run("beat", r, sweep_interval_seconds=1)[-1].ok
    assert health.run("beat", r, sweep_interval_seconds=10)[-1].ok  # 5 intervals: 50 s
    assert not health.run("beat", r, sweep_interval_seconds=10, max_age=20)[-1].ok


def test_unreachable_redis_fails_the_check_without_hanging() -> None:
    server = fakeredis.FakeServer()
    client = fakeredis.FakeRedis(server=server)
    server.connected = False
    checks = health.run("worker", client, node="w1@pod-a")
    assert [c.name for c in checks] == ["redis"] and not checks[0].ok


# --- Celery signals ---------------------------------------------------------------------------------
@pytest.fixture
def signals_on(r: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch) -> fakeredis.FakeRedis:
    monkeypatch.setattr(liveness, "_client", r)
    monkeypatch.setattr(liveness, "_failing", False)
    return r


def test_celery_heartbeats_ready_and_shutdown_drive_the_worker_key(signals_on: fakeredis.FakeRedis) -> None:
    liveness._worker_ready(sender=SimpleNamespace(hostname="w1@pod-a"))
    assert heartbeat.worker_age(signals_on, "w1@pod-a") is not None
    signals_on.delete(keys.worker_heartbeat("w1@pod-a"))
    liveness._worker_heartbeat(sender=SimpleNamespace(eventer=SimpleNamespace(hostname="w1@pod-a")))
    assert heartbeat.worker_age(signals_on, "w1@pod-a") is not None
    liveness._worker_shutdown(sender=SimpleNamespace(hostname="w1@pod-a"))
    assert heartbeat.worker_age(signals_on, "w1@pod-a") is None


def test_only_publishing_the_sweep_is_a_beat_heartbeat(signals_on: fakeredis.FakeRedis) -> None:
    liveness._beat_published(sender="export.flush")
    assert heartbeat.read(signals_on).beat is None
    liveness._beat_published(sender="export.sweep")
    assert heartbeat.read(signals_on).beat is not None


def test_a_heartbeat_never_raises_when_redis_is_down(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    server = fakeredis.FakeServer()
    monkeypatch.setattr(liveness, "_client", fakeredis.FakeRedis(server=server))
    monkeypatch.setattr(liveness, "_failing", False)
    server.connected = False
    for _ in range(3):
        liveness._worker_heartbeat(sender=SimpleNamespace(eventer=SimpleNamespace(hostname="w1@pod-a")))
    assert sum("not written" in m for m in caplog.messages) == 1  # logged once, not every 2 s
    server.connected = True
    liveness._worker_heartbeat(sender=SimpleNamespace(eventer=SimpleNamespace(hostname="w1@pod-a")))
    assert any("written again" in m for m in caplog.messages)


# --- the command ------------------------------------------------------------------------------------
@pytest.fixture
def cli_env(real_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> redis.Redis:
    monkeypatch.setenv("REDIS_URL", TEST_REDIS_URL)
    return real_redis


def test_health_worker_exit_status_follows_the_heartbeat(
    cli_env: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["health", "worker", "--node", "w1@pod-a"]) == 1
    assert "FAIL worker w1@pod-a" in capsys.readouterr().out
    heartbeat.worker_beat(cli_env, "w1@pod-a")
    assert main(["health", "worker", "--node", "w1@pod-a"]) == 0
    assert "ok   worker w1@pod-a: last beat" in capsys.readouterr().out
    heartbeat.worker_beat(cli_env, "w1@pod-a", at_ms=ago(10))
    assert main(["health", "worker", "--node", "w1@pod-a", "--max-age", "5", "--quiet"]) == 1
    assert capsys.readouterr().out == ""


def test_health_beat_and_service_exit_status(cli_env: redis.Redis) -> None:
    assert main(["health", "beat"]) == 1
    assert main(["health"]) == 1
    heartbeat.beat(cli_env, heartbeat.BEAT)
    assert main(["health", "beat"]) == 0
    assert main(["health"]) == 1  # no worker
    heartbeat.worker_beat(cli_env, "w1@pod-a")
    assert main(["health"]) == 0


def test_health_fails_when_redis_is_unreachable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    assert main(["health", "worker"]) == 1
    assert "FAIL redis" in capsys.readouterr().out


@pytest.fixture
def web() -> Iterator[str]:
    """A server answering 200 on /healthz, 503 elsewhere; yields its base URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/healthz" else 503)
            self.end_headers()

        def log_message(self, *_args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


# entry.main answers the plain forms itself; main.main is the full command line: both must agree.
@pytest.mark.parametrize("command", [entry.main, main], ids=["entry", "full"])
def test_health_webhook_asks_the_receivers_healthz(
    web: str, command: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    assert command(["health", "webhook", "--url", f"{web}/healthz"]) == 0
    assert capsys.readouterr().out == f"ok   webhook: {web}/healthz answered 200\n"
    assert command(["health", "webhook", "--quiet", f"--url={web}/other"]) == 1
    assert capsys.readouterr().out == ""
    assert command(["health", "webhook", "--url", f"{web}/other"]) == 1
    assert capsys.readouterr().out == f"FAIL webhook: {web}/other answered 503\n"
    assert command(["health", "webhook", "-q", "--url", "http://127.0.0.1:1/healthz"]) == 1  # refused
    assert command(["health", "webhook", "--url", "ftp://127.0.0.1/healthz"]) == 1


def test_the_entry_hands_anything_but_a_plain_webhook_probe_to_the_full_command_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as help_:
        entry.main(["health", "webhook", "--help"])
    assert help_.value.code == 0
    assert "--max-age" in capsys.readouterr().out  # the full parser's help
    with pytest.raises(SystemExit) as wrong:
        entry.main(["health", "webhook", "--url"])  # no value: the full parser's usage error
    assert wrong.value.code == 2
    assert "expected one argument" in capsys.readouterr().err
    assert entry._plain_webhook_probe(["--url", "http://h/x", "-q"]) == ("http://h/x", True)
    assert entry._plain_webhook_probe([]) == (None, False)
    assert entry._plain_webhook_probe(["--node", "w1@h"]) is None
    assert entry._plain_webhook_probe(["--url=http://h/x", "--max-age", "5"]) is None


# --- what a probe costs -------------------------------------------------------------------------------
#: Modules `health` must not load: Kubernetes runs it every few seconds in every pod, and these
#: (Celery, the pipeline, the backfill; httpx for worker and beat) cost most of a CPU-second.
NOT_FOR_A_PROBE = (
    "celery",
    "kombu",
    "httpx",
    "worker.pipeline",
    "worker.backfill",
    "worker.mapping",
    "worker.logs",
)
_LOADED = f"""
import sys
from worker.cli.main import main
code = main(sys.argv[1:])
print(code, [m for m in {NOT_FOR_A_PROBE!r} if m in sys.modules])
"""


@pytest.mark.parametrize("log_format", ["text", "json"])  # json: as deploy/kubernetes/base/config.yaml
def test_health_worker_loads_no_celery_nor_the_pipeline(cli_env: redis.Redis, log_format: str) -> None:
    heartbeat.worker_beat(cli_env, "w1@pod-a")
    done = subprocess.run(
        [sys.executable, "-c", _LOADED, "health", "worker", "--node", "w1@pod-a", "--quiet"],
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "REDIS_URL": TEST_REDIS_URL, "LOG_FORMAT": log_format},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.stdout, done.stderr) == ("0 []\n", "")


#: What the webhook probe leaves out on top: it reads no settings and asks no Redis.
NOT_FOR_A_WEBHOOK_PROBE = (*NOT_FOR_A_PROBE, "redis", "pydantic", "pydantic_settings", "worker.settings")


def test_health_webhook_through_the_command_loads_only_the_standard_library(web: str) -> None:
    """The installed ``attentive-export`` runs :func:`entry.main`; its plain webhook probe must not
    load what costs a probe 0.4 CPU-seconds (the settings, redis-py, httpx)."""
    script = _LOADED.replace("from worker.cli.main import main", "from worker.cli.entry import main").replace(
        repr(NOT_FOR_A_PROBE), repr(NOT_FOR_A_WEBHOOK_PROBE)
    )
    done = subprocess.run(
        [sys.executable, "-c", script, "health", "webhook", "--quiet", "--url", f"{web}/healthz"],
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "REDIS_URL": "redis://127.0.0.1:1/0"},  # never asked
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.stdout, done.stderr) == ("0 []\n", "")


@pytest.fixture
def root_logging() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    yield root
    root.handlers, root.level = saved


def test_health_with_json_logs_still_writes_a_warning_as_a_json_line(
    cli_env: redis.Redis,
    root_logging: logging.Logger,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """worker.logs is loaded only when something logs (see main._JsonLogsOnFirstRecord), then the line
    is the JSON line any other command writes."""

    def run(*_args: object, **_kwargs: object) -> list[probe.Check]:
        logging.getLogger("redis.cluster").warning("node %s moved", "n1")
        return [probe.Check("redis", True, "answers")]

    monkeypatch.setenv("LOG_FORMAT", "json")
    monkeypatch.setattr(health, "run", run)
    assert main(["health", "worker"]) == 0
    out, err = capsys.readouterr()
    assert out == "ok   redis: answers\n"
    line = json.loads(err)
    assert (line["level"], line["logger"], line["message"]) == ("WARNING", "redis.cluster", "node n1 moved")
