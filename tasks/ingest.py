"""Ingest task: one inbox chunk of raw transitions into the job buffers."""

from __future__ import annotations

from celery import shared_task

from tasks import REDIS_DOWN
from worker.dispatch import INGEST_TASK
from worker.ingest import ingest_chunk
from worker.runtime import runtime

#: Most flush tasks one ingest chunk dispatches for a job.
FLUSHES_PER_CHUNK = 4


@shared_task(name=INGEST_TASK, autoretry_for=REDIS_DOWN, retry_backoff=True, max_retries=None)
def ingest(chunk_id: str) -> None:
    rt = runtime()
    report = ingest_chunk(rt.redis, rt.jobs, chunk_id)
    for job_id, sealed in report.sealed.items():
        # Each flush task keeps claiming batches until none is left, so a few per chunk keep every
        # free worker busy without a task (and its broker round trips) per batch.
        for _ in range(min(len(sealed), FLUSHES_PER_CHUNK)):
            rt.dispatch.flush(job_id)
