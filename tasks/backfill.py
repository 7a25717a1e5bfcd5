"""Backfill task: advance one part of a job's Existing Users backfill, then schedule the next step."""

from __future__ import annotations

from celery import shared_task

from tasks import REDIS_DOWN
from worker.backfill.steps import run_step
from worker.dispatch import BACKFILL_TASK
from worker.pipeline.flush import request_flush
from worker.runtime import runtime


@shared_task(name=BACKFILL_TASK, autoretry_for=REDIS_DOWN, retry_backoff=True, max_retries=None)
def backfill(job_id: str, part: str) -> None:
    rt = runtime()
    report = run_step(rt.redis, job_id, part, max_queued_users=rt.settings.backfill_max_queued_users)
    if report.sealed:
        request_flush(rt, job_id)
    if report.next_in is not None:
        rt.dispatch.backfill(job_id, part, countdown=report.next_in)
