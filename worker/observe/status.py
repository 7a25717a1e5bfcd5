"""Job status: what happened to every transition, readable from Python, Redis and the CLI.

Counters are written by the buffer script and the flush/poll steps; live figures (users buffered,
batches waiting or in flight, dead letters kept) are read from their own keys, so they cannot drift.
"""

from __future__ import annotations

from typing import Any, cast

import redis

from worker.backfill import steps as backfill
from worker.pipeline import deadletters
from worker.pipeline.buffer import JobBuffer
from worker.setup.jobs import JobStore
from worker.store import keys
from worker.store.joberrors import BLOCKED_REASON, BLOCKED_RETRY_AT, BLOCKED_SINCE, error_recovered
from worker.store.replies import decode_hash

#: Counters shown even when zero, in display order.
COUNTERS = (
    "received",
    "accepted",
    "stale",
    "merged",
    "queued_behind_unfinished",
    "batches_sealed",
    "sealed_for_shared_identifier",
    "batches_submitted",
    "batches_completed",
    "batches_resent",
    "batches_deadlettered",
    "sends_interrupted",
    "sends_uncertain",
    "coalesced_while_held",
    "users_sent",
    "users_delivered",
    "record_failures",
    "deadlettered_users",
    "responses_429",
    "leases_expired",
    "results_unavailable",
    "results_unreadable_lines",
    "backfill_waits_for_backlog",
    # `deadletters redrive`: changes placed again, changes a newer one had superseded, entries removed
    "redriven",
    "redrive_superseded",
    "deadletters_redriven",
)


def _number(value: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            continue
    return value


def _ms(value: str | None) -> int | None:
    try:
        return int(value) if value else None
    except ValueError:
        return None


def job_status(client: redis.Redis, job_id: str) -> dict[str, Any]:
    """Everything an operator needs about one job, as plain JSON-able data."""
    job = JobStore(client).get(job_id)
    buffer = JobBuffer(client, job_id, job.config.batch_size)
    raw = decode_hash(client.hgetall(keys.job_status(job_id)))
    counters: dict[str, Any] = {name: 0 for name in COUNTERS}
    counters.update({k: _number(v) for k, v in raw.items() if k in COUNTERS or k.startswith("polls_")})
    return {
        "job": job.id,
        "label": job.config.label,
        "state": str(job.state),
        "pause_reason": job.pause_reason or None,
        # Its API key cannot be read (deleted authorization, wrong EXPORT_SECRET_KEY): nothing is
        # sent, changes keep buffering, and the key is tried again at retry_at_ms.
        "blocked": {
            "reason": raw[BLOCKED_REASON],
            "since_ms": _ms(raw.get(BLOCKED_SINCE)),
            "retry_at_ms": _ms(raw.get(BLOCKED_RETRY_AT)),
        }
        if raw.get(BLOCKED_REASON)
        else None,
        "audiences": list(job.config.audiences),
        "counters": counters,
        "rate_limited_seconds": round(float(raw.get("rate_limited_seconds", 0)), 3),
        "buffer": {
            "users_in_open_batch": buffer.open_size(),
            "batches_waiting_to_send": buffer.sealed_count(),
            "batches_at_attentive": int(client.zcard(keys.polls(job_id))),
            **_at_attentive(client, job_id),
            "users_in_unfinished_batches": buffer.outstanding_users(),
            "users_waiting_for_earlier_change": buffer.waiting_users(),
        },
        "skips": {k: int(v) for k, v in decode_hash(client.hgetall(keys.job_skips(job_id))).items()},
        "field_drops": {
            k: int(v) for k, v in decode_hash(client.hgetall(keys.job_field_drops(job_id))).items()
        },
        # By reason class (exact, beyond the cap too), entries kept, dropped by DEADLETTER_CAP, purged.
        "deadletters": deadletters.summary(client, job_id).as_dict(),
        "last_error": raw.get("last_error") or None,
        # Written beside last_error by newer pipeline code; None where only the text was kept.
        "last_error_at_ms": int(raw["last_error_at_ms"]) if raw.get("last_error_at_ms") else None,
        # True once a send or status check succeeded after it (and nothing is failing now).
        "last_error_recovered": error_recovered(raw),
        "last_attentive_status": raw.get("last_attentive_status") or None,
        "last_record_failures": raw.get("last_record_failures") or None,
        "last_flush_at_ms": int(raw["last_flush_at"]) if "last_flush_at" in raw else None,
        "last_poll_at_ms": _ms(raw.get("last_poll_at")),
        "last_ingest_at_ms": int(raw["last_ingest_at"]) if "last_ingest_at" in raw else None,
        "backfill": backfill.progress(client, job_id),
    }


def ingest_status(client: redis.Redis) -> dict[str, int]:
    """Counters before routing: received, rejected by reason, unroutable."""
    return {k: int(v) for k, v in decode_hash(client.hgetall(keys.ingest_status())).items()}


#: A batch at Attentive longer than this is shown as overdue; longer than the second, as an alert.
OVERDUE_MS = 12 * 3600 * 1000
ALERT_MS = 24 * 3600 * 1000


def _at_attentive(client: redis.Redis, job_id: str) -> dict[str, Any]:
    """How long the oldest batch has been at Attentive, and how many are overdue (> 12 h) or
    alerting (> 24 h): Attentive documents hours per job, not days."""
    seconds, micros = client.time()
    oldest = cast("list[tuple[bytes, float]]", client.zrange(keys.in_flight(job_id), 0, 0, withscores=True))
    now = int(seconds) * 1000 + int(micros) // 1000
    return {
        "oldest_at_attentive_seconds": round((now - oldest[0][1]) / 1000, 1) if oldest else None,
        "batches_overdue_12h": int(client.zcount(keys.in_flight(job_id), "-inf", now - OVERDUE_MS)),
        "batches_alert_24h": int(client.zcount(keys.in_flight(job_id), "-inf", now - ALERT_MS)),
    }
