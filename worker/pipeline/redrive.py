"""Re-drive: send dead-lettered changes again once their cause is fixed, never over a newer change.

A dead letter keeps, per audience of its record, the event time of that audience's change
(``deadletters.REDRIVE``): buffer op ``stamp`` reads it while the batch still carries the user, so
every newer change of that user is held and visible (a held newer change marks its audience
superseded instead). Re-driving places each audience's change through buffer op ``redrive``,
which accepts it only while its (user, audience) has accepted nothing newer: last writer wins
(DESIGN.md invariant 3) holds across a re-drive, and a superseded change is counted, not sent.

Changes are placed first and the entries removed after: a re-drive that dies in between leaves
the entries, and running it again sends the same values once more (harmless at Attentive) rather
than losing them (invariant 1).

Each re-driven change carries the record as it was dead-lettered with only its own audience's
flag, so one audience superseded since never rides along in another's record. Its profile
attributes (name, city, ...) are those of that time too: profile fields are not ordered by event
time anywhere in this service (README, "Dead letters").
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis

from worker.pipeline import deadletters
from worker.pipeline.buffer import Change, JobBuffer, identifier_list
from worker.pipeline.ingest import SCRIPT_CHUNK
from worker.store import keys


@dataclass(slots=True)
class Redriven:
    """What one re-drive did."""

    #: Entries taken off the dead-letter list: their changes are back in the buffer, or every one
    #: of them was superseded by a newer change.
    entries: int = 0
    #: Audience changes placed in the buffer again.
    changes: int = 0
    #: Audience changes not sent because a newer change of the same user and audience was accepted
    #: (before the entry was written, or since).
    superseded: int = 0
    #: Entries left in the list because they cannot be re-driven, by why.
    kept: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "entries": self.entries,
            "changes": self.changes,
            "superseded": self.superseded,
            "kept": dict(sorted(self.kept.items())),
        }


#: Why an entry matched but stays in the list.
NO_RECORD = "no_record"  # its batch's records were lost: nothing to send
NO_TIMES = "no_event_times"  # written before re-drive existed: cannot be ordered against newer changes


def redrive(client: redis.Redis, job_id: str, batch_size: int, reason: str | None = None) -> Redriven:
    """Put a job's dead-lettered changes (all, or those of class ``reason``) back in its buffer.

    The beat's interval seal then sends them like any change.

    Raises:
        redis.WatchError: dead letters kept being written while the entries were removed (the
            changes are in the buffer already; running it again is safe).
    """
    done = Redriven()
    changes: list[Change] = []
    taken: Counter[bytes] = Counter()
    for raw in client.lrange(keys.job_deadletters(job_id), 0, -1):
        entry = json.loads(raw)
        if reason is not None and deadletters.entry_class(entry) != reason:
            continue
        stamps, record = entry.get(deadletters.REDRIVE), entry.get("record")
        if record is None:
            done.kept[NO_RECORD] += 1
            continue
        if not isinstance(stamps, dict) or not stamps:
            done.kept[NO_TIMES] += 1
            continue
        live = {aud: at for aud, at in stamps.items() if at is not None}
        done.superseded += len(stamps) - len(live)
        ids = identifier_list(record["identifiers"])
        for aud, at in live.items():
            own = _only_audience(record, aud, stamps)
            changes.append(Change(entry["user"], aud, int(at), orjson.dumps(own), ids))
        taken[raw if isinstance(raw, bytes) else raw.encode()] += 1
    buffer = JobBuffer(client, job_id, batch_size)
    for start in range(0, len(changes), SCRIPT_CHUNK):
        placed = buffer.redrive(changes[start : start + SCRIPT_CHUNK])
        done.changes += placed.accepted + placed.merged + placed.queued
        done.superseded += placed.stale
    if taken:
        done.entries = deadletters.remove(client, job_id, taken)
    return done


def _only_audience(record: dict[str, Any], audience: str, audiences: dict[str, Any]) -> dict[str, Any]:
    """``record`` without the flags of the entry's other audiences."""
    own = copy.deepcopy(record)
    custom = own.get("attributes", {}).get("custom")
    if isinstance(custom, dict):
        for other in audiences:
            if other != audience:
                custom.pop(other, None)
    return own
