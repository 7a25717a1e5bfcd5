"""The scale benchmark's harness (bench/bench_scale.py, ``make bench-scale``) at a tiny size: 2,000
users backfilled, real-time changes at 50/s, a 3 s processing delay. It starts its own redis-server
(never the shared one), the sandbox, two workers, beat and the webhook receiver, and must come back
with real figures. No timing is asserted: only that each figure was measured.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench.bench_scale import ScaleConfig, figures, measure, render
from tests.chaos.procs import require_harness

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def test_a_tiny_scale_run_produces_every_figure(tmp_path: Path) -> None:
    require_harness()
    cfg = ScaleConfig(
        users=2_000,
        realtime_rate=50.0,
        processing_delay=3.0,
        processing_spread=0.5,
        flush_interval=2,
        concurrency=1,
        warmup=3.0,
        sample=1.0,
        settle=30.0,
        minutes=3.0,
        progress=0.0,
        workdir=tmp_path / "scale",
    )
    out = measure(cfg)
    assert not out.error, f"{out.error}; logs in {out.workdir / 'logs'}"
    assert out.complete, f"{out.notes}; logs in {out.workdir / 'logs'}"
    assert out.backfill_pairs_received == cfg.pairs
    assert out.backfill_started is not None and out.backfill_confirmed is not None
    assert out.backfill_confirmed > out.backfill_started

    f = figures(out)
    assert sum(v[0] for v in out.seconds.values()) >= cfg.users // 256  # bulk POSTs answered 202
    assert sum(v[2] for v in out.seconds.values()) > 0  # job-status GETs
    assert 0 < out.realtime_received <= out.realtime_sent
    assert f.latency_n == out.realtime_received
    assert all(math.isfinite(x) and x > 0 for _t, x in out.latencies)
    assert out.memory_baseline > 0 and out.memory_end > 0 and out.memory_peak_info >= out.memory_end
    assert math.isfinite(f.bytes_per_pair)
    assert f.rss_peak and all(v > 0 for v in f.rss_peak.values())
    assert len(out.samples) >= 3
    assert out.processing_seconds and len(set(out.processing_seconds)) > 1  # the spread was applied
    assert (out.workdir / "samples.json").exists() and (out.workdir / "status.json").exists()

    text = render(out)
    assert "| sends/s while batches wait" in text
    assert "| real-time latency p50 / p99 / max" in text
    assert "| 0 |" in text  # the first row of the per-minute table
