"""Ingest: parse raw transitions, route them to jobs, map them, push them into job buffers.

One call handles one inbox chunk. It is safe to run twice on the same chunk (a redelivered task):
the buffer drops a transition whose event time is not newer than one already accepted.

Bad input never fails a chunk: a line or transition that cannot be used is counted by reason
(``ingest`` in ``attentive-export status``) and the rest of the chunk goes on. Only infrastructure
errors (Redis unreachable) raise, so the task is retried and nothing accepted is lost.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis

from worker.mapping.mapper import compiled_mapper
from worker.mapping.reasons import MAPPING_ERROR
from worker.mapping.transitions import Rejected, Transition, parse_line
from worker.pipeline import inbox
from worker.pipeline.buffer import Change, JobBuffer, identifier_list
from worker.setup.jobs import JobStore
from worker.store import keys

log = logging.getLogger(__name__)

#: Transitions per buffer script call: keeps each atomic step short so Redis stays responsive.
SCRIPT_CHUNK = 512
#: A drain ingests this long, then hands over to a fresh task (as a flush or a poller does).
DRAIN_BUDGET_SECONDS = 10.0
#: Counted when a profile lacks the job's user key field and another identifier keys it instead.
USER_KEY_FALLBACK = "user_key_field_missing"
#: Standard identifiers in the order used for a fallback user key.
FALLBACK_KEY_ORDER = ("email", "phone", "clientUserId", "shopifyId", "klaviyoId")


@dataclass
class IngestReport:
    received: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    unroutable: int = 0
    #: job id -> ids of batches sealed while ingesting (each needs a flush)
    sealed: dict[str, list[int]] = field(default_factory=dict)


def ingest_lines(client: redis.Redis, jobs: JobStore, lines: Iterable[str | bytes]) -> IngestReport:
    """Route, map and buffer every transition in ``lines``; count what could not be used."""
    report = IngestReport()
    jobs.refresh()
    per_job: dict[str, list[Change]] = defaultdict(list)
    skips: dict[str, Counter[str]] = defaultdict(Counter)
    drops: dict[str, Counter[str]] = defaultdict(Counter)
    for line in lines:
        for item in parse_line(line):
            report.received += 1
            if isinstance(item, Rejected):
                report.rejected[item.reason] += 1
                continue
            try:
                routed = _route(jobs, item, per_job, skips, drops)
            except redis.RedisError:
                raise  # infrastructure: the task fails and the chunk is retried
            except Exception as exc:
                # Last resort (mapping has its own guard): one transition that cannot be used must
                # not fail the task, or the whole chunk would be re-driven forever and its good
                # lines never arrive (DESIGN.md invariant 6). Counted; the type only, no profile data.
                log.error("ingest: a transition could not be routed: %s", type(exc).__name__)
                report.rejected[MAPPING_ERROR] += 1
                continue
            if not routed:
                report.unroutable += 1
    _write_counters(client, report, skips, drops)
    for job_id, changes in per_job.items():
        job = jobs.cached(job_id)
        if job is None:
            continue  # deleted while this chunk was routed: nothing may recreate its keys
        buffer = JobBuffer(client, job_id, job.config.batch_size)
        client.hincrby(keys.job_status(job_id), "received", len(changes))
        sealed: list[int] = []
        for start in range(0, len(changes), SCRIPT_CHUNK):
            sealed += buffer.ingest(changes[start : start + SCRIPT_CHUNK]).sealed
        report.sealed[job_id] = sealed
    return report


def _route(
    jobs: JobStore,
    t: Transition,
    per_job: dict[str, list[Change]],
    skips: dict[str, Counter[str]],
    drops: dict[str, Counter[str]],
) -> bool:
    targets = jobs.routes(t.audience)
    for job in targets:
        mapper = compiled_mapper(job.id, job.config)
        result = mapper.map(t.user, {t.audience: t.enter}, include_attributes=t.enter)
        for _field, reason in result.dropped:
            drops[job.id][reason] += 1
        if result.record is None:
            skips[job.id][result.skip_reason or "unmappable"] += 1
            continue
        user_key = result.user_key
        if user_key is None:
            # The key field is missing but the user has another identifier: send it rather than
            # drop it, keyed by that identifier. Its order is then kept among events that carry
            # the same identifier (counted, so an operator can fix the producer or the key field).
            user_key = fallback_user_key(result.record)
            drops[job.id][USER_KEY_FALLBACK] += 1
        record, ids = result.record, identifier_list(result.record["identifiers"])
        per_job[job.id].append(Change(user_key, t.audience, t.at_ms, orjson.dumps(record), ids))
    return bool(targets)


def fallback_user_key(record: dict[str, Any]) -> str:
    """A user key from a mapped record's identifiers (every record has at least one)."""
    identifiers = record["identifiers"]
    for name in FALLBACK_KEY_ORDER:
        if name in identifiers:
            return f"{name}:{identifiers[name]}"
    return "record:" + orjson.dumps(identifiers, option=orjson.OPT_SORT_KEYS).decode()


def count_rejected(client: redis.Redis, rejected: Mapping[str, int]) -> None:
    """Count lines refused before they reached an ingest task (``attentive-export ingest`` reads
    each line first) in the same counters the task uses, so status shows every refusal."""
    if not rejected:
        return
    pipe = client.pipeline(transaction=False)
    pipe.hincrby(keys.ingest_status(), "received", sum(rejected.values()))
    for reason, n in rejected.items():
        pipe.hincrby(keys.ingest_status(), f"rejected:{reason}", n)
    pipe.execute()


def _write_counters(
    client: redis.Redis,
    report: IngestReport,
    skips: dict[str, Counter[str]],
    drops: dict[str, Counter[str]],
) -> None:
    pipe = client.pipeline(transaction=False)
    pipe.hincrby(keys.ingest_status(), "received", report.received)
    for reason, n in report.rejected.items():
        pipe.hincrby(keys.ingest_status(), f"rejected:{reason}", n)
    if report.unroutable:
        pipe.hincrby(keys.ingest_status(), "unroutable", report.unroutable)
    for job_id, counts in skips.items():
        for reason, n in counts.items():
            pipe.hincrby(keys.job_skips(job_id), reason, n)
    for job_id, counts in drops.items():
        for reason, n in counts.items():
            pipe.hincrby(keys.job_field_drops(job_id), reason, n)
    pipe.execute()


def ingest_chunk(client: redis.Redis, jobs: JobStore, chunk_id: str, owner: str) -> IngestReport:
    """Ingest one inbox chunk and delete it, as ``owner`` (the task's id); a missing chunk (already
    done) is a no-op, and so is one another task holds (a drain took it)."""
    if not inbox.claim(client, [chunk_id], owner):
        return IngestReport()
    lines = inbox.read_chunk(client, chunk_id)
    report = ingest_lines(client, jobs, lines)
    inbox.drop_chunk(client, chunk_id)
    return report


@dataclass
class DrainReport:
    chunks: int = 0
    lines: int = 0
    #: Stopped at its budget (or its worker is stopping) with chunks perhaps left: drain again.
    more: bool = False


def drain_inbox(
    client: redis.Redis,
    jobs: JobStore,
    owner: str,
    on_sealed: Callable[[dict[str, list[int]]], None],
    budget_seconds: float = DRAIN_BUDGET_SECONDS,
    stop: Callable[[], bool] = lambda: False,
    on_backlog: Callable[[], object] | None = None,
) -> DrainReport:
    """Claim pending inbox chunks as ``owner``, oldest first, and ingest them a group at a time
    (:func:`worker.pipeline.inbox.groups`) to the end of the pending set as it was when each window
    was read, unless the budget is spent or ``stop()`` says so first.

    A group is claimed just before it is ingested, so a drain holds at most one group: chunks other
    tasks hold are stepped over (a dead task's until its lease ends), and a drain that claimed a
    group with more waiting behind it calls ``on_backlog`` once, to ask for another drain that takes the next
    groups in another process (one burst of one-user webhooks then spreads over every free ingest
    process instead of queueing behind one). A chunk is dropped only once its group was ingested.
    ``on_sealed`` gets the batches each group sealed (job id -> batch ids), so they are flushed
    while the drain goes on."""
    report = DrainReport()
    inbox.drain_started(client)
    deadline = time.monotonic() + budget_seconds
    skipped = 0  # pending chunks at the front that others hold (or held when this pass looked)
    claimed_this_pass = False
    while True:
        if time.monotonic() >= deadline or stop():
            report.more = True
            return report
        # One id past the window tells whether anything waits beyond this group.
        window = inbox.pending_window(client, skipped, inbox.CLAIM_WINDOW + 1)
        group = inbox.groups(window[: inbox.CLAIM_WINDOW])[0] if window else []
        more_waiting = len(window) > len(group)
        mine = inbox.claim(client, group, owner)
        skipped += len(group) - len(mine)
        if mine and more_waiting and on_backlog is not None:
            # Busy with a group while more waits: a helper takes the next ones. A drain that only
            # steps over others' chunks moves on itself and needs none.
            on_backlog()
            on_backlog = None  # once per drain: the helper asks for the next one itself
        if mine:
            claimed_this_pass = True
            lines = inbox.read_chunks(client, mine)
            ingested = ingest_lines(client, jobs, lines)
            inbox.drop_chunks(client, mine)
            report.chunks += len(mine)
            report.lines += len(lines)
            if any(ingested.sealed.values()):
                on_sealed(ingested.sealed)
        if more_waiting:
            continue
        # The end of the pending set: what arrives from now on queued a drain of its own when it
        # came (the mark was cleared at this one's start), gathering for a moment; looking again at
        # once would take a few requests a time at a task's cost each round. But chunks this pass
        # stepped over may have moved in front of where it looked, when those holding them dropped
        # theirs: so a pass that stepped over some and took some looks once more from the front.
        if not (skipped and claimed_this_pass):
            return report
        skipped, claimed_this_pass = 0, False
