"""``attentive-export jobs delete``: remove a stopped job and every Redis key it has.

The rules (only a stopped job, not while tasks may still write to it) are the job store's; this
is the operator's side. Right after a stop, tasks that read the job before it may still be
writing, so the command waits that out with a note rather than failing: ``jobs stop X && jobs
delete X`` works in a script.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import redis

from worker.setup.jobs import JobBusy, JobStore

#: Longest single sleep between two attempts, so a wait ends soon after the job becomes free.
_MAX_SLEEP_SECONDS = 5.0


def delete(client: redis.Redis, job_id: str, sleep: Callable[[float], None] = time.sleep) -> None:
    """Delete the job (waiting while it is busy) and print what was removed."""
    store = JobStore(client)
    announced = False
    while True:
        try:
            deleted = store.delete(job_id)
            break
        except JobBusy as busy:
            if not announced:
                print(f"note: {busy}; waiting before deleting (Ctrl-C to cancel; nothing is deleted yet)")
                announced = True
            sleep(min(max(busy.wait_seconds, 0.1), _MAX_SLEEP_SECONDS))
    job, purged = deleted.job, deleted.purged
    extra = f" and {purged.global_entries} backfill schedule entries" if purged.global_entries else ""
    print(f"deleted export job {job.id} ({job.config.label}): removed {purged.keys} Redis keys{extra}")
