"""What an operator reads: job and ingest status (later metrics, health, trace).

A face: reads Redis through ``worker.pipeline``, ``worker.backfill`` and ``worker.setup``; writes nothing.
"""
