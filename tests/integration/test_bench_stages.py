"""The stage benchmark (bench/bench_stages.py, part of ``make bench``) at a small size, against the
test Redis and the sandbox: every figure it reports must have been measured, and the Redis settings
and environment it changes for the run must be put back, also when the run fails. No timing is
asserted."""

from __future__ import annotations

import math
import os
from typing import Any

import pytest
import redis

from bench import bench_stages
from bench.bench_stages import measure, report
from tests.conftest import TEST_REDIS_URL

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

SETTINGS = ("slowlog-log-slower-than", "slowlog-max-len")
ENV = ("REDIS_URL", "ATTENTIVE_API_URL", "EXPORT_SECRET_KEY", "ATTENTIVE_FIRST_POLL_SECONDS")


def _state(client: redis.Redis) -> tuple[dict[str, Any], dict[str, str | None]]:
    return {k: client.config_get(k)[k] for k in SETTINGS}, {k: os.environ.get(k) for k in ENV}


def test_a_small_stage_run_measures_every_stage_script_and_request(real_redis: redis.Redis) -> None:
    before = _state(real_redis)

    m = measure(users=1_100, data_url=TEST_REDIS_URL)

    assert m["users"] == 1_024 and m["batches"] == 4  # whole batches only
    for stage in ("ingest", "flush", "poll"):
        assert m["stages"][stage]["python_s"] > 0
        assert m["stages"][stage]["round_trips"] > 0
    assert m["scripts"]["buffer ingest"][0] >= 2  # 1,024 changes in calls of at most 512
    assert m["scripts"]["buffer complete"][0] == 4
    assert m["http_calls"] == {"bulk POST": 4, "status GET": 4, "results GET": 4}
    assert all(cpu > 0 for cpu in m["http"].values())
    assert all(math.isfinite(us) for us in m["ingest_parts"].values())
    assert m["ingest_parts"]["map the profile"] > 0
    assert _state(real_redis) == before
    text = report(m)
    assert "| poll |" in text and "| buffer complete | 4 |" in text and "| status GET | 4 |" in text


def test_a_failing_run_still_puts_the_settings_and_environment_back(
    real_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = _state(real_redis)
    real_run = bench_stages._run_stages
    runs: list[int] = []

    def second_run_fails(*args: Any) -> Any:
        runs.append(1)
        if len(runs) == 2:  # the one with every command in the SLOWLOG
            raise RuntimeError("boom")
        return real_run(*args)

    monkeypatch.setattr(bench_stages, "_run_stages", second_run_fails)

    with pytest.raises(RuntimeError, match="boom"):
        measure(users=256, data_url=TEST_REDIS_URL)
    assert _state(real_redis) == before


def test_fewer_users_than_a_batch_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one batch"):
        measure(users=100, data_url=TEST_REDIS_URL)
