"""Poll task: check one batch's Attentive jobs; re-schedules itself with a growing countdown."""

from __future__ import annotations

from celery import shared_task

from tasks import REDIS_DOWN
from worker.dispatch import POLL_TASK
from worker.pipeline.poll import poll_batch
from worker.runtime import runtime


@shared_task(name=POLL_TASK, autoretry_for=REDIS_DOWN, retry_backoff=True, max_retries=None)
def poll(job_id: str, batch_id: int, attempt: int) -> None:
    rt = runtime()
    report = poll_batch(rt, job_id, batch_id, attempt)
    if not report.done and report.next_in is not None:  # None when parked (worker/pipeline/parked.py)
        rt.dispatch.poll(job_id, batch_id, attempt + 1, report.next_in)
