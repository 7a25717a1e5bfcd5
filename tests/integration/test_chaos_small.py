"""The chaos run (``make chaos``, tests/chaos/) at CI size: 1,000 users, 8,000 transitions, fewer and
shorter faults, the same code and the same verdict. It starts its own redis-server (never the shared
one), the sandbox behind the recording proxy, the webhook receiver, three workers and beat; it kills
workers and Redis, runs a second beat, turns the sandbox's faults on, then off, waits and judges.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.chaos.config import ChaosConfig
from tests.chaos.run import run
from worker.cli.localredis import LocalRedisError, server_binary

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def test_small_chaos_run_keeps_every_promise(tmp_path: Path) -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("the chaos harness reads /proc (Linux)")
    try:
        server_binary()
    except LocalRedisError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI requires a Redis server binary: {exc}")
        pytest.skip(str(exc))
    result = run(ChaosConfig.small(seed=7, workdir=tmp_path / "chaos"))
    assert result.passed, f"chaos verdict (logs, evidence in {result.workdir}):\n{result.table}"
