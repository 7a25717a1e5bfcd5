"""Removing every trace of an export job from Redis, for ``jobs delete``.

A job's data lives in two places (``worker.store.keys``): keys under its hash tag ``{job:<id>}``
(buffers, batches, schedules, counters, dead letters, backfill progress and re-drives), and its
members of global structures (the job table; the re-drive schedule all jobs shared before Redis
Cluster support, until the sweep has moved it). The keys are found with SCAN on the hash tag, not
from a list of names, so a per-job key added later is never left behind; on a Redis Cluster the
client scans every master (they all sit on the one serving the job's slot). Every step is
idempotent: a purge interrupted half-way is finished by running it again.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from worker.store import keys

#: Keys asked for per SCAN/ZSCAN call, and deleted per UNLINK.
_SCAN_COUNT = 1000


@dataclass
class Purged:
    """What a purge removed."""

    #: Keys under the job's hash tag.
    keys: int = 0
    #: Members of global structures that named the job (the job record itself not counted).
    global_entries: int = 0

    def __iadd__(self, other: Purged) -> Purged:
        self.keys += other.keys
        self.global_entries += other.global_entries
        return self


def purge_job_data(client: redis.Redis, job_id: str) -> Purged:
    """Delete the job's keys and its members of global schedules; the job record is the store's."""
    purged = Purged()
    batch: list[bytes | str] = []
    for key in client.scan_iter(match=keys.job_keys_match(job_id), count=_SCAN_COUNT):
        batch.append(key)
        if len(batch) >= _SCAN_COUNT:
            purged.keys += int(client.unlink(*batch))
            batch.clear()
    if batch:
        purged.keys += int(client.unlink(*batch))
    legacy = keys.legacy_backfill_due()
    due = [m for m, _score in client.zscan_iter(legacy, match=keys.legacy_backfill_due_match(job_id))]
    if due:
        purged.global_entries += int(client.zrem(legacy, *due))
    return purged
