"""What an operator reads: job and ingest status, its readable summary, metrics, health and heartbeats.

A face: reads Redis through ``worker.pipeline``, ``worker.backfill`` and ``worker.setup``. The only
writes are heartbeats (:mod:`worker.observe.heartbeat`), from Celery signals in the worker and beat
processes (:mod:`worker.observe.liveness`) and from the sweep task.
"""
