"""Sweep task, run by beat: time-based seals, expired leases, lost polls and chunks."""

from __future__ import annotations

from celery import shared_task

from worker.dispatch import SWEEP_TASK
from worker.pipeline.sweep import sweep as run_sweep
from worker.runtime import runtime


@shared_task(name=SWEEP_TASK, ignore_result=True)
def sweep() -> None:
    run_sweep(runtime())
