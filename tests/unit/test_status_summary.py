"""``attentive-export status``: readable by default, ``--json`` for scripts, ``--watch`` to refresh."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis

from tests.conftest import TEST_REDIS_URL
from worker.cli import monitor
from worker.cli.main import main
from worker.observe import heartbeat, summary
from worker.setup.jobconfig import parse_job_config
from worker.setup.jobs import JobStore
from worker.store import keys

NOW_MS = 1_796_208_000_000  # 2026-12-02T10:40:00Z


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0.42, "0.4 s"),
        (42, "42 s"),
        (185, "3 min 5 s"),
        (7500, "2 h 5 min"),
        (3 * 86400 + 4 * 3600, "3 d 4 h"),
    ],
)
def test_durations_read_naturally(seconds: float, shown: str) -> None:
    assert summary.duration(seconds) == shown


def status(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "job": "3f9a0c1d",
        "label": "VIP export",
        "state": "paused",
        "pause_reason": "Attentive rejected the API key (401 Unauthorized)",
        "audiences": ["vip", "lapsed"],
        "counters": {"received": 1200, "accepted": 1180, "stale": 12, "merged": 30, "users_delivered": 1150},
        "rate_limited_seconds": 0.0,
        "buffer": {
            "users_in_open_batch": 14,
            "batches_waiting_to_send": 2,
            "batches_at_attentive": 1,
            "oldest_at_attentive_seconds": 95.0,
            "batches_overdue_12h": 0,
        },
        "skips": {"no_identifier": 8},
        "field_drops": {"invalid_phone": 3},
        "last_error": "poll: ServerError: 503",
        "last_error_at_ms": NOW_MS - 125_000,
        "last_flush_at_ms": NOW_MS - 3_000,
        "last_ingest_at_ms": None,
        "backfill": None,
    }
    base.update(overrides)
    return base


def test_a_job_reads_with_its_state_units_and_last_error_with_its_time() -> None:
    text = summary.render([status()], NOW_MS)
    assert "job 3f9a0c1d  'VIP export'  PAUSED" in text
    assert "Attentive rejected the API key" in text
    assert "1,200 received, 1,180 accepted, 30 merged, 12 stale, 8 skipped (no_identifier 8)" in text
    assert "14 users in the open batch" in text and "1 at Attentive (oldest sent 1 min 35 s ago)" in text
    assert "last flush    2026-12-02T10:39:57Z (3.0 s ago)" in text
    assert "last ingest   never" in text
    assert "poll: ServerError: 503" in text and "at 2026-12-02T10:37:55Z (2 min 5 s ago)" in text


def test_an_error_without_a_recorded_time_says_so_and_overdue_batches_stand_out() -> None:
    text = summary.render(
        [status(last_error_at_ms=None, buffer={"batches_overdue_12h": 2, "batches_alert_24h": 1})], NOW_MS
    )
    assert "(time not recorded)" in text
    assert "OVERDUE       2 batches at Attentive for over 12 h, 1 over 24 h" in text


def test_service_lines_show_dead_processes() -> None:
    service = {
        "workers": {},
        "workers_alive": 0,
        "beat_age_seconds": 312.0,
        "sweep_age_seconds": None,
        "inbox_chunks_pending": 3,
        "inbox_oldest_chunk_age_seconds": 75.0,
        "redis_used_memory_bytes": 3 * 1024 * 1024,
        "redis_maxmemory_bytes": 0,
    }
    text = summary.render([], NOW_MS, ingest={"received": 5}, service=service)
    assert "0 alive (no heartbeat from any)" in text
    assert "beat          last beat 5 min 12 s ago" in text
    assert "sweep         no heartbeat" in text
    assert "3 chunks waiting for ingest, oldest 1 min 15 s" in text
    assert "3.0 MiB (no maxmemory)" in text
    assert "no export jobs" in text


@pytest.fixture
def cli_redis(real_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> redis.Redis:
    monkeypatch.setenv("REDIS_URL", TEST_REDIS_URL)
    config = {
        "label": "vip",
        "authorization": "acme",
        "audiences": ["vip"],
        "identifier_mappings": {"email": "email"},
    }
    job = JobStore(real_redis).create(parse_job_config(config))
    real_redis.hset(keys.job_status(job.id), mapping={"received": 3, "accepted": 3, "last_error": "boom"})
    heartbeat.worker_beat(real_redis, "w1@pod-a")
    return real_redis


def test_status_is_readable_by_default_and_json_on_request(
    cli_redis: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("attentive-export status at ")
    assert "1 alive (w1@pod-a" in text and "RUNNING" in text and "boom" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)

    assert main(["status", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["jobs"][0]["counters"]["accepted"] == 3
    assert data["service"]["workers_alive"] == 1 and "ingest" in data

    job_id = data["jobs"][0]["job"]
    assert main(["status", "--json", job_id]) == 0
    assert json.loads(capsys.readouterr().out)["job"] == job_id
    assert main(["status", "no-such-job"]) == 2


def test_watch_refreshes_until_interrupted(
    cli_redis: redis.Redis, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(monitor.time, "sleep", sleep)
    assert main(["status", "--json", "--watch", "1"]) == 130
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(json.loads(line)["jobs"] for line in lines)  # one document a line
    assert sleeps == [1.0, 1.0]
