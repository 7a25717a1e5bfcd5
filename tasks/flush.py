"""Flush task: submit a job's sealed batches; run again later when asked to wait."""

from __future__ import annotations

from celery import shared_task

from tasks import REDIS_DOWN
from worker.dispatch import FLUSH_TASK
from worker.pipeline.flush import flush_job
from worker.runtime import runtime


@shared_task(name=FLUSH_TASK, autoretry_for=REDIS_DOWN, retry_backoff=True, max_retries=None)
def flush(job_id: str) -> None:
    rt = runtime()
    report = flush_job(rt, job_id)
    if report.retry_in is not None:
        rt.dispatch.flush(job_id, countdown=report.retry_in)
