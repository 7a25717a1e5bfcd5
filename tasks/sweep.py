"""Sweep task, run by beat: time-based seals, expired leases, lost polls, chunks and backfill steps."""

from __future__ import annotations

from celery import shared_task

from worker.backfill.steps import redrive_stalled
from worker.dispatch import SWEEP_TASK
from worker.observe import heartbeat
from worker.pipeline.sweep import sweep as run_sweep
from worker.runtime import runtime


@shared_task(name=SWEEP_TASK, ignore_result=True)
def sweep() -> None:
    rt = runtime()
    run_sweep(rt, redrive_backfills=lambda now: redrive_stalled(rt.redis, rt.dispatch, now))
    heartbeat.note_sweep(rt.redis)
