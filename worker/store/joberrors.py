"""A job's ``last_error`` in its status hash, always with the time it happened.

Status shows the error with that time, and the observe layer treats an error older than the job's
latest success as recovered; an error without a time could only ever look current.
"""

from __future__ import annotations

import time
from typing import Any

from worker.store import keys


def note_error(client: Any, job_id: str, message: str) -> None:
    """Record ``message`` as the job's latest error, now (``client`` may be a pipeline)."""
    client.hset(
        keys.job_status(job_id), mapping={"last_error": message, "last_error_at_ms": int(time.time() * 1000)}
    )
