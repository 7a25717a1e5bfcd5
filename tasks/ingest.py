"""Ingest tasks: one inbox chunk, or a drain of every pending chunk, into the job buffers."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from tasks import REDIS_DOWN
from worker import shutdown
from worker.dispatch import DRAIN_TASK, INGEST_TASK
from worker.pipeline import inbox
from worker.pipeline.flush import request_flush
from worker.pipeline.ingest import drain_inbox, ingest_chunk
from worker.runtime import Runtime, runtime


@shared_task(name=INGEST_TASK, bind=True, autoretry_for=REDIS_DOWN, retry_backoff=True, max_retries=None)
def ingest(self: Any, chunk_id: str) -> None:
    rt = runtime()
    report = ingest_chunk(rt.redis, rt.jobs, chunk_id, owner=str(self.request.id))
    _flush_sealed(rt, report.sealed)


@shared_task(name=DRAIN_TASK, bind=True, autoretry_for=REDIS_DOWN, retry_backoff=True, max_retries=None)
def drain(self: Any) -> None:
    rt = runtime()
    report = drain_inbox(
        rt.redis,
        rt.jobs,
        owner=str(self.request.id),
        on_sealed=lambda sealed: _flush_sealed(rt, sealed),
        stop=shutdown.requested,
        on_backlog=lambda: inbox.request_drain(rt.redis, rt.dispatch, countdown=0.0),
    )
    if report.more:
        inbox.request_drain(rt.redis, rt.dispatch, countdown=0.0)


def _flush_sealed(rt: Runtime, sealed: dict[str, list[int]]) -> None:
    for job_id, batches in sealed.items():
        if batches:
            request_flush(rt, job_id)
