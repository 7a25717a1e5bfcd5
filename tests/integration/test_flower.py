"""Flower as docker-compose runs it: behind basic auth from ``FLOWER_BASIC_AUTH``, and not drowned
by sweeps (beat runs one every second; before, 755 of 904 tasks in Flower were sweeps)."""

from __future__ import annotations

import re
import time

import httpx
import pytest
import redis

from tests.celeryproc import wait_for
from tests.integration.test_pipeline import line, running_pipeline
from tests.sandboxproc import SandboxProcess, free_port
from worker.dispatch import SWEEP_TASK, CeleryDispatcher
from worker.pipeline import inbox

pytestmark = pytest.mark.integration

AUTH = ("ops", "flower-test-password")


@pytest.mark.timeout(180)
def test_flower_needs_a_password_and_lists_no_sweeps(
    real_redis: redis.Redis, sandbox: SandboxProcess
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with running_pipeline(
        real_redis, sandbox, FLOWER_BASIC_AUTH=":".join(AUTH), SWEEP_INTERVAL_SECONDS="0.2"
    ) as pipeline:
        procs = pipeline.procs
        procs._spawn("flower", ["flower", f"--port={port}", "--address=127.0.0.1"])
        procs.worker()
        procs.beat()

        def flower_up() -> bool:
            try:
                return httpx.get(f"{url}/healthcheck", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(flower_up, 30, "Flower to answer")
        # Without the password: nothing, neither the UI nor the API.
        for path in ("/", "/tasks", "/api/tasks", "/api/workers"):
            assert httpx.get(f"{url}{path}", timeout=5).status_code == 401, path
        assert httpx.get(f"{url}/api/tasks", auth=("ops", "wrong"), timeout=5).status_code == 401

        def watching() -> bool:  # Flower receives the worker's events (its heartbeats)
            answer = httpx.get(f"{url}/api/workers", params={"status": "1"}, auth=AUTH, timeout=5)
            return answer.status_code == 200 and any(answer.json().values())

        wait_for(watching, 30, "Flower to see the worker")

        def sweeps_run() -> int:
            return len(re.findall(rf"Task {re.escape(SWEEP_TASK)}\[[^\]]+\] succeeded", procs.log("w1")))

        before = sweeps_run()
        time.sleep(2)  # about ten sweeps while Flower watches
        chunk = inbox.put_chunk(real_redis, [line("vip", "enter", int(time.time() * 1000), email="f@x.io")])
        CeleryDispatcher().ingest(chunk)

        def tasks_seen() -> dict[str, dict[str, object]] | None:
            answer = httpx.get(f"{url}/api/tasks", auth=AUTH, timeout=5)
            assert answer.status_code == 200
            tasks: dict[str, dict[str, object]] = answer.json()
            done = any(
                t.get("name") == "export.ingest" and t.get("state") == "SUCCESS" for t in tasks.values()
            )
            return tasks if done else None

        tasks = wait_for(tasks_seen, 30, "Flower to list the ingest task")
        assert isinstance(tasks, dict)
        assert sweeps_run() - before >= 5, "the sweep did not run while Flower watched"
        names = [t.get("name") for t in tasks.values()]
        assert SWEEP_TASK not in names, f"Flower lists {names.count(SWEEP_TASK)} sweeps of {len(names)} tasks"
        assert "export.ingest" in names
