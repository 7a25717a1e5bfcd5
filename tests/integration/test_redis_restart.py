"""Workers survive a Redis restart (DESIGN.md §2, invariants 1 and 7).

A real ``celery worker`` (two pool processes) against a private ``redis-server`` with the
append-only file on. The worker holds a countdown task unacknowledged, as it always does in
production (polls are scheduled with ``countdown=`` and ``task_acks_late``), and runs an ordinary
task. Redis is killed with SIGKILL and started again from its append-only file, on the same port.
The worker must stay up and keep working, the countdown task must still run, once, after the
restart, and nothing may be left unacknowledged in Redis to come back an hour later.

With celery/kombu 5.7.0 alone the worker exited at the kill with ``Unrecoverable error:
AttributeError("'NoneType' object has no attribute 'hostname'")`` (and, when that was avoided, when
the running task ended: ``... no attribute 'client'``), and the countdown task came back only after
the visibility timeout (an hour). worker/redis_broker.py has the details.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery, shared_task

from tests.celeryproc import ALL_QUEUES, CeleryProcesses, wait_for
from worker.dispatch import LEGACY_POLL_TASK as POLL_TASK
from worker.dispatch import SWEEP_TASK
from worker.setup.crypto import generate_secret_key

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

#: Long enough that the task is still waiting in the worker, unacknowledged, when Redis dies and
#: when it is back; short enough to keep the test short.
COUNTDOWN_SECONDS = 20
#: The ordinary task is still running when Redis dies, and ends while the worker is reconnected.
SLEEP_SECONDS = 6
SLEEP_TASK = "tests.redis_restart.sleep"


@shared_task(name=SLEEP_TASK)
def sleep_task(seconds: float) -> None:
    """An ordinary task that takes a while; the worker imports this module for it (``-I``)."""
    time.sleep(seconds)


class AofRedis:
    """A private redis-server with the append-only file on: killed and restarted on the same port
    from the same directory, so it comes back with everything it had acknowledged writing."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.dir = Path(tempfile.mkdtemp(prefix="aex-redis-restart-"))
        self.port = _free_port()
        assert self.port != 6379  # never the shared Redis
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, timeout: float = 15.0) -> None:
        self.starts += 1
        options = {
            "bind": "127.0.0.1",
            "port": str(self.port),
            "dir": str(self.dir),
            "save": "",
            "appendonly": "yes",
            # Every write is on disk before Redis answers, so whatever the worker was told is stored
            # survives SIGKILL (the default, everysec, may lose the last second).
            "appendfsync": "always",
        }
        with (self.dir / f"redis-{self.starts}.log").open("wb") as log:
            self.proc = subprocess.Popen(
                [self.binary, *(arg for name, value in options.items() for arg in (f"--{name}", value))],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for(self._ready, timeout, f"redis-server on port {self.port} to answer (start {self.starts})")

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"redis-server exited: {self.logs()}")
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            # Answers LOADING (an error) until the append-only file is read back.
            return bool(client.ping()) and client.info("persistence")["loading"] == 0
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final save, connections reset."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def url(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int) -> redis.Redis:
        return redis.Redis(port=self.port, db=db, socket_connect_timeout=2, socket_timeout=5)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-1500:] for p in sorted(self.dir.glob("redis-*.log")))

    def remove(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def aof_redis() -> Iterator[AofRedis]:
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("CI requires redis-server on PATH (this test kills and restarts its own Redis)")
        pytest.skip("no redis-server on PATH")
    server = AofRedis(binary)
    try:
        server.start()
        yield server
    finally:
        server.remove()


#: What ``CeleryProcesses.worker(concurrency=2)`` runs, plus this module for the sleep task.
WORKER_ARGS = [
    *("worker", "-n", "w1@%h", "-Q", ALL_QUEUES, "-c", "2", "--pool", "prefork"),
    *("--without-gossip", "--without-mingle", "-l", "INFO", "-I", "tests.integration.test_redis_restart"),
]


def _sender(broker_url: str) -> Celery:
    """A producer with the workers' own settings (routes, serializer) and this test's broker."""
    app = Celery("redis-restart-test", broker=broker_url, set_as_current=False)
    app.config_from_object("worker.celeryconfig")
    return app


def _count(log: str, task: str, task_id: str, what: str) -> int:
    return len(re.findall(rf"Task {re.escape(task)}\[{re.escape(task_id)}\] {what}", log))


def test_worker_survives_redis_restart_and_keeps_its_countdown_task(aof_redis: AofRedis) -> None:
    data_url, broker_url = aof_redis.url(0), aof_redis.url(1)
    procs = CeleryProcesses(
        {"REDIS_URL": data_url, "CELERY_BROKER_URL": broker_url, "EXPORT_SECRET_KEY": generate_secret_key()}
    )
    sender = _sender(broker_url)
    broker = aof_redis.client(1)
    try:
        worker = procs._spawn("w1", WORKER_ARGS)

        def log() -> str:
            return procs.log("w1")

        def alive() -> bool:
            if worker.poll() is not None:
                text = log()
                why = [line for line in text.splitlines() if "Unrecoverable error" in line]
                raise AssertionError(
                    f"the worker exited with status {worker.returncode}: {' / '.join(why) or 'see its log'}"
                    f"\n--- worker log (end) ---\n{text[-6000:]}"
                )
            return True

        def count(task: str, task_id: str, what: str = "succeeded") -> int:
            alive()
            return _count(log(), task, task_id, what)

        wait_for(lambda: alive() and " ready." in log(), 30, "the worker to be ready")

        # A poll for an unknown job returns at once when it finally runs; until then the worker
        # holds it unacknowledged, like every scheduled poll in production.
        held = sender.send_task(POLL_TASK, args=["no-such-job", 1, 0], countdown=COUNTDOWN_SECONDS).id
        running = sender.send_task(SLEEP_TASK, args=[SLEEP_SECONDS], queue="ingest").id
        wait_for(lambda: count(POLL_TASK, held, "received"), 15, "the countdown task to arrive")
        wait_for(lambda: count(SLEEP_TASK, running, "received"), 15, "the ordinary task to arrive")
        wait_for(lambda: broker.hlen("unacked") == 2, 10, "both tasks to be held unacknowledged")
        time.sleep(0.5)  # the ordinary task is running now (a pool process was free)
        assert not count(POLL_TASK, held), "the countdown task ran before Redis was killed"
        assert not count(SLEEP_TASK, running), "the ordinary task ended before Redis was killed"

        aof_redis.kill()
        wait_for(
            lambda: "Connection to broker lost" in log() or worker.poll() is not None,
            15,
            "the worker to notice that Redis is gone",
        )
        time.sleep(1)  # the worker's cleanup, and its first reconnection attempt, meet a dead Redis
        alive()
        aof_redis.start()
        wait_for(lambda: alive() and log().count("Connected to redis://") >= 2, 40, "the worker to reconnect")

        after = sender.send_task(SWEEP_TASK).id
        wait_for(lambda: count(SWEEP_TASK, after), 30, "a task sent after the restart to run")
        # It ran on the old connection; celery runs it again from the restored message (acks_late).
        wait_for(lambda: count(SLEEP_TASK, running), 30, "the ordinary task to end")
        wait_for(
            lambda: count(POLL_TASK, held),
            COUNTDOWN_SECONDS + 30,
            "the countdown task to run after the restart",
        )
        # Everything acknowledged: nothing left to come back after the visibility timeout.
        wait_for(
            lambda: broker.hlen("unacked") == 0 and broker.zcard("unacked_index") == 0,
            2 * SLEEP_SECONDS + 15,
            "every message to be acknowledged",
        )
        time.sleep(1)
        assert count(POLL_TASK, held) == 1, "the countdown task ran more than once"
        assert count(SWEEP_TASK, after) == 1
        assert count(SLEEP_TASK, running) in (1, 2)
        assert "Unrecoverable error" not in log()
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- redis-server logs ---\n{aof_redis.logs()}") from None
    finally:
        broker.close()
        sender.close()
        procs.stop()
