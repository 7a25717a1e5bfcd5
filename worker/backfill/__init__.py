"""Existing Users: a job's current members from a Lytics segment scan or a file, as chunked resumable steps.

May import: ``worker.pipeline`` (members go through ingest and the buffer like any change) and below.
"""
