"""Where ``python -m bench`` records a run: each benchmark's section of bench/RESULTS.md, and the scale
benchmark's two sections (at Attentive's rate, and with the key's rate scaled down)."""

from __future__ import annotations

from pathlib import Path

import pytest

import bench.__main__ as bench_main
from bench import bench_scale


def test_a_scale_run_at_a_scaled_down_rate_records_its_own_section() -> None:
    assert bench_scale.section([]) == "scale"
    assert bench_scale.section(["--quick"]) == "scale"
    assert bench_scale.section(["--rate-limit", "30"]) == "scale-backlog"
    assert bench_scale.section(["--rate-limit", "30", "--quick"]) == "scale-backlog"


def test_recording_a_section_leaves_the_others_as_they_were(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text(
        "# Benchmark results\n\n<!-- bench:scale -->\nat 100/s\n<!-- /bench:scale -->\n\n"
        "<!-- bench:scale-backlog -->\nat 30/s, old\n<!-- /bench:scale-backlog -->\n"
    )
    monkeypatch.setattr(bench_main, "RESULTS", results)

    bench_main.record("scale-backlog", "at 30/s, new")

    text = results.read_text()
    assert "at 100/s" in text and "at 30/s, new" in text and "at 30/s, old" not in text
    assert text.count("<!-- bench:scale-backlog -->") == 1
