"""Lytics audience-trigger webhooks end to end: ``attentive-export serve`` as a real uvicorn process,
real Redis, real ``celery worker`` and ``celery beat``, and the Attentive sandbox over HTTP."""

from __future__ import annotations

import contextlib
import datetime as dt
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.celeryproc import ROOT, wait_for
from tests.integration.test_pipeline import TEST_BROKER_URL, Pipeline, pipeline  # noqa: F401
from tests.sandboxproc import free_port
from worker.observe.status import ingest_status
from worker.store import keys

pytestmark = pytest.mark.integration

TOKEN = "integration-webhook-token-5f2c9a"


class ReceiverProcess:
    """``attentive-export serve`` in its own process, logging to a file."""

    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = Path(tempfile.mkstemp(prefix="aex-webhook-", suffix=".log")[1])
        with self._log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "worker.cli.main",
                    "serve",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                ],
                cwd=ROOT,
                env={**env, "PYTHONUNBUFFERED": "1"},
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        return self._log.read_text(errors="replace") if self._log.exists() else ""

    def healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"receiver exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.unlink(missing_ok=True)


@contextlib.contextmanager
def receiver(pipe: Pipeline) -> Iterator[ReceiverProcess]:
    proc = ReceiverProcess({**pipe.procs.env, "WEBHOOK_TOKEN": TOKEN})
    try:
        wait_for(proc.healthy, 20, "the receiver to answer /healthz")
        yield proc
    finally:
        proc.stop()


def lytics_time(ms: int) -> str:
    """Lytics' format: nanoseconds and a UTC offset (shared/lytics/INPUTS.md)."""
    local = dt.datetime.fromtimestamp(ms / 1000, dt.timezone(dt.timedelta(hours=-7)))
    return local.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}374949-07:00"


def trigger(email: str, event: str, at_ms: int, **fields: Any) -> dict[str, Any]:
    return {
        "id": f"lytics-{email}",
        "data": {
            "email": email,
            **fields,
            "segment_events": [
                {"id": "42976a269a5e6b9d", "event": event, "slug": "vip", event: lytics_time(at_ms)}
            ],
        },
        "meta": {},
    }


def nothing_queued(pipe: Pipeline) -> None:
    assert pipe.redis.keys(f"{keys.PREFIX}:inbox:*") == []
    broker = redis.Redis.from_url(TEST_BROKER_URL)
    # kombu keeps a queue's messages in lists named after it ("ingest", plus priority suffixes).
    assert [k for k in broker.keys("ingest*") if broker.type(k) == b"list"] == []


def test_lytics_triggers_over_http_reach_attentive_and_unauthenticated_posts_are_refused(
    pipeline: Pipeline,  # noqa: F811
) -> None:
    pipeline.authorize()
    job = pipeline.job()
    with receiver(pipeline) as rx:
        url = f"{rx.url}/v1/transitions"
        now = int(time.time() * 1000)

        # Without (or with a wrong) token: 401, and nothing reaches the inbox or the broker.
        assert httpx.post(url, json=trigger("ada@x.io", "enter", now)).status_code == 401
        wrong = httpx.post(
            url, params={"token": "not-the-token-at-all"}, json=trigger("ada@x.io", "enter", now)
        )
        assert wrong.status_code == 401
        nothing_queued(pipeline)

        pipeline.procs.worker()
        pipeline.procs.beat()

        # A batched Lytics delivery (JSON array), bearer token.
        enters = [
            trigger("ada@x.io", "enter", now - 60_000, first_name="Ada"),
            trigger("bo@x.io", "enter", now - 60_000, first_name="Bo"),
            trigger("cy@x.io", "enter", now - 60_000),
        ]
        response = httpx.post(url, json=enters, headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 202, response.text
        assert response.json()["transitions"] == 3
        wait_for(
            lambda: all(pipeline.custom(f"{u}@x.io").get("vip") is True for u in ("ada", "bo", "cy")),
            30,
            "the three enters to reach Attentive",
        )

        # Ada exits later; this delivery uses Lytics' static query parameter.
        exit_ = httpx.post(url, params={"token": TOKEN}, json=trigger("ada@x.io", "exit", now))
        assert exit_.status_code == 202, exit_.text
        wait_for(lambda: pipeline.custom("ada@x.io").get("vip") is False, 30, "ada's exit to reach Attentive")
        assert pipeline.custom("bo@x.io")["vip"] is True
        assert pipeline.custom("cy@x.io")["vip"] is True
        ada = pipeline.sandbox.user(email="ada@x.io")
        assert ada is not None and ada["attributes"]["firstName"] == "Ada"

        st = pipeline.wait_settled(job)
        assert st["counters"]["received"] == 4
        counted = ingest_status(pipeline.redis)
        assert counted["received"] == 4
        assert [k for k in counted if k.startswith("rejected") or k == "unroutable"] == []
        log = rx.log()
        assert "POST /v1/transitions?token=*** HTTP/1.1" in log  # the access log is on, and redacted
        assert TOKEN not in log
