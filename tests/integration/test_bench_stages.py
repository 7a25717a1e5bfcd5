"""The stage benchmark (bench/bench_stages.py, part of ``make bench``) at a small size, against the
test Redis and the sandbox: every figure it reports must have been measured, and the Redis settings
it changes for the run must be put back. No timing is asserted."""

from __future__ import annotations

import pytest
import redis

from bench.bench_stages import measure, report
from tests.conftest import TEST_REDIS_URL

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_a_small_stage_run_measures_every_stage_script_and_request(real_redis: redis.Redis) -> None:
    before = real_redis.config_get("slowlog-log-slower-than")

    m = measure(users=1_100, data_url=TEST_REDIS_URL)

    assert m["users"] == 1_024 and m["batches"] == 4  # whole batches only
    for stage in ("ingest", "flush", "poll"):
        assert m["stages"][stage]["python_s"] > 0
        assert m["stages"][stage]["round_trips"] > 0
    assert m["scripts"]["buffer ingest"][0] >= 2  # 1,024 changes in calls of at most 512
    assert m["scripts"]["buffer complete"][0] == 4
    assert m["http_calls"] == {"bulk POST": 4, "status GET": 4, "results GET": 4}
    assert all(cpu > 0 for cpu in m["http"].values())
    assert set(m["ingest_parts"]) >= {"map the profile", "read the line (JSON, transition)"}
    assert real_redis.config_get("slowlog-log-slower-than") == before
    text = report(m)
    assert "| poll |" in text and "| buffer complete | 4 |" in text and "| status GET | 4 |" in text
