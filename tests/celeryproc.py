"""Real ``celery worker`` and ``celery beat`` processes for integration tests.

Tests keep their data in the test Redis database (``TEST_REDIS_URL``, flushed per test) and the
Celery broker in another database (``TEST_BROKER_URL``), so flushing data between tests never
breaks the broker's bindings.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from celery import Celery

from worker.settings import broker_kind

ROOT = Path(__file__).resolve().parents[1]
ALL_QUEUES = "ingest,flush,poll,sweep,backfill"


class CeleryProcesses:
    """Starts and stops worker and beat processes sharing one environment."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self._dir = Path(tempfile.mkdtemp(prefix="aex-celery-"))
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = (self._dir / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.app", *args],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

    def worker(
        self, name: str = "w1", concurrency: int = 1, queues: str = ALL_QUEUES
    ) -> subprocess.Popen[bytes]:
        return self._spawn(
            name,
            [
                "worker",
                "-n",
                f"{name}@%h",
                "-Q",
                queues,
                "-c",
                str(concurrency),
                "--pool",
                "prefork",
                "--without-gossip",
                "--without-mingle",
                "-l",
                "INFO",
            ],
        )

    def beat(self) -> subprocess.Popen[bytes]:
        return self._spawn("beat", ["beat", "-s", str(self._dir / "beat-schedule"), "-l", "INFO"])

    def terminate(self, name: str, timeout: float = 60) -> int:
        """SIGTERM to the main process only, as Kubernetes and ``docker stop`` do (a warm shutdown:
        worker/shutdown.py); wait for it to exit and return its exit status."""
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            raise AssertionError(f"{name} did not exit within {timeout}s of SIGTERM") from None

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kill a process and its pool children (the whole process group)."""
        proc = self.procs.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        proc.wait(timeout=30)

    def log(self, name: str) -> str:
        path = self._dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """Stop every process (TERM, then KILL) and remove the logs and beat schedule."""
        self._stop_all()
        shutil.rmtree(self._dir, ignore_errors=True)

    def _stop_all(self) -> None:
        for name in list(self.procs):
            proc = self.procs[name]
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                self.kill(name)
            else:
                self.procs.pop(name, None)


def sender_app(broker_url: str) -> Celery:
    """A Celery app that sends the service's tasks to ``broker_url`` (its queues and routes), whatever
    broker the test process's own ``worker.app`` was configured with; ``close()`` it after use."""
    app = Celery("test-sender", set_as_current=False)
    app.config_from_object("worker.celeryconfig")
    app.conf.broker_url = broker_url
    if broker_kind(broker_url) != "redis":
        app.conf.broker_transport_options = {}
    return app


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.1) -> object:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
