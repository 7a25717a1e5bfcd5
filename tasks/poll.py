"""Poller task: check an API key's due batches for a while, then hand over to a fresh task."""

from __future__ import annotations

from celery import shared_task

from tasks import REDIS_DOWN
from worker.dispatch import LEGACY_POLL_TASK, POLL_TASK
from worker.pipeline.poller import key_hash_of, request_poller, run_poller
from worker.runtime import runtime


@shared_task(name=POLL_TASK, autoretry_for=REDIS_DOWN, retry_backoff=True, max_retries=None)
def poll_key(key_hash: str) -> None:
    rt = runtime()
    report = run_poller(rt, key_hash)
    if report.again_in is not None:
        request_poller(rt, key_hash, countdown=report.again_in)


@shared_task(name=LEGACY_POLL_TASK, ignore_result=True)
def poll(job_id: str, *_ignored: object) -> None:
    """A per-batch poll queued before the poller existed: its batch is in the job's check
    schedule already, so only make sure the job's key has a poller."""
    rt = runtime()
    job = rt.jobs.cached(job_id)
    key_hash = key_hash_of(rt, job) if job is not None else None
    if key_hash is not None:
        request_poller(rt, key_hash)
