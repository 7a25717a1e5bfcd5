"""Ingest task: one inbox chunk of raw transitions into the job buffers."""

from __future__ import annotations

from celery import shared_task

from tasks import REDIS_DOWN
from worker.dispatch import INGEST_TASK
from worker.pipeline.flush import request_flush
from worker.pipeline.ingest import ingest_chunk
from worker.runtime import runtime


@shared_task(name=INGEST_TASK, autoretry_for=REDIS_DOWN, retry_backoff=True, max_retries=None)
def ingest(chunk_id: str) -> None:
    rt = runtime()
    report = ingest_chunk(rt.redis, rt.jobs, chunk_id)
    for job_id, sealed in report.sealed.items():
        if sealed:
            request_flush(rt, job_id)
