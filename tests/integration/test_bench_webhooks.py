"""The one-user-per-webhook benchmark (bench/bench_webhooks.py) at a small size with real workers:
both ways in deliver every transition, and a drain takes many requests in one task where the
per-request way runs a task each. Counts, not timings, are asserted."""

from __future__ import annotations

import os

import pytest
import redis

from bench.bench_webhooks import measure_once
from tests.conftest import TEST_BROKER_URL, TEST_REDIS_URL

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.mark.parametrize("pace", ["burst", "400"])
def test_drains_ingest_one_line_requests_in_a_few_tasks(
    real_redis: redis.Redis, pace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("REDIS_URL", "CELERY_BROKER_URL", "ATTENTIVE_API_URL", "EXPORT_SECRET_KEY"):
        monkeypatch.setenv(name, os.environ.get(name, ""))  # measure_once sets them: put back after
    drained = measure_once("drain", pace, 512, TEST_REDIS_URL, TEST_BROKER_URL)
    per_request = measure_once("task", pace, 512, TEST_REDIS_URL, TEST_BROKER_URL)
    assert per_request["tasks"] == 512  # (measure_once waits until all 512 were received)
    # Burst: all 512 are pending when the first drain starts. Paced (1.3 s of requests): about one
    # drain per quarter second, while the requests come.
    assert 1 <= drained["tasks"] <= (3 if pace == "burst" else 12), drained
    for result in (drained, per_request):
        assert result["tps"] > 0 and result["us_per_t"]["ours"] > 0
