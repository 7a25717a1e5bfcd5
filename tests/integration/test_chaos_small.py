"""The chaos run (``make chaos``, tests/chaos/) at CI size: 1,000 users, 8,000 transitions, fewer and
shorter faults, the same code and the same verdict. It starts its own redis-server (never the shared
one), the sandbox behind the recording proxy, the webhook receiver, three workers and beat; it kills
workers and Redis, runs a second beat, turns the sandbox's faults on, then off, waits and judges.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.config import ChaosConfig
from tests.chaos.procs import require_harness
from tests.chaos.run import run

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def test_small_chaos_run_keeps_every_promise(tmp_path: Path) -> None:
    require_harness()
    result = run(ChaosConfig.small(seed=7, workdir=tmp_path / "chaos"))
    assert result.passed, f"chaos verdict (logs, evidence in {result.workdir}):\n{result.table}"
