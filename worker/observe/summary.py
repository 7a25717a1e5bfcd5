"""``attentive-export status`` for people: the JSON of :mod:`worker.observe.status` as a short text.

Pure formatting (no Redis), so what a person reads and what ``status --json`` gives a script are the
same figures. Times are shown as UTC ISO-8601 with how long ago; durations and sizes with units;
zeros that say nothing are left out, problems are not.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Any

#: Label width of the lines under a job.
_WIDTH = 14


def iso(ms: int | float) -> str:
    """Epoch milliseconds as UTC ISO-8601 to the second: ``2026-12-02T10:31:04Z``."""
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def duration(seconds: float) -> str:
    """``0.4 s``, ``42 s``, ``3 min 5 s``, ``2 h 5 min``, ``3 d 4 h``."""
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    for unit, size, small, small_size in (
        ("d", 86400, "h", 3600),
        ("h", 3600, "min", 60),
        ("min", 60, "s", 1),
    ):
        if whole >= size:
            rest = (whole % size) // small_size
            return f"{whole // size} {unit}" + (f" {rest} {small}" if rest else "")
    return f"{whole} s"


def when(ms: int | float | None, now_ms: int) -> str:
    """``2026-12-02T10:31:04Z (3.0 s ago)``, or ``never``."""
    if ms is None:
        return "never"
    ago = (now_ms - ms) / 1000
    rel = f"{duration(ago)} ago" if ago >= 0 else f"in {duration(-ago)}"
    return f"{iso(ms)} ({rel})"


def size(n: int | float) -> str:
    """Bytes with a binary unit: ``512 B``, ``3.2 MiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"  # pragma: no cover


def _n(value: Any) -> str:
    """A count with thousands separators; floats keep one decimal."""
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.1f}"
    try:
        return f"{int(value):,}"
    except (TypeError, ValueError):
        return str(value)


def _by_reason(counts: Mapping[str, Any]) -> str:
    """``no_identifier 8, invalid_phone 3``, largest first."""
    ranked = sorted(counts.items(), key=lambda kv: (-float(kv[1]), kv[0]))
    return ", ".join(f"{reason} {_n(n)}" for reason, n in ranked)


def _parts(*parts: str | None) -> str:
    return ", ".join(p for p in parts if p)


def _line(label: str, text: str) -> str:
    return f"  {label:<{_WIDTH - 1}} {text}"  # a space even after a label as long as the column


def service_lines(service: Mapping[str, Any]) -> list[str]:
    """Workers, beat, the sweep, the inbox and Redis memory, one line each where it matters."""
    workers = service.get("workers") or {}
    alive = service.get("workers_alive", 0)
    listed = ", ".join(f"{node} {duration(age)} ago" for node, age in workers.items())
    lines = [_line("workers", f"{alive} alive" + (f" ({listed})" if listed else " (no heartbeat from any)"))]
    stale = service.get("schedule_stale_seconds")
    for name, field in (("beat", "beat_age_seconds"), ("sweep", "sweep_age_seconds")):
        age = service.get(field)
        text = "no heartbeat" if age is None else f"last beat {duration(age)} ago"
        if stale is not None and (age is None or age > stale):
            text += f" - DOWN: {_DOWN[name]}"
        lines.append(_line(name, text))
    pending = service.get("inbox_chunks_pending", 0)
    oldest = service.get("inbox_oldest_chunk_age_seconds")
    lines.append(
        _line(
            "inbox",
            f"{_n(pending)} chunks waiting for ingest"
            + (f", oldest {duration(oldest)}" if oldest is not None else ""),
        )
    )
    used, maximum = service.get("redis_used_memory_bytes"), service.get("redis_maxmemory_bytes")
    if used is not None:
        limit = f" of {size(maximum)}" if maximum else " (no maxmemory)"
        lines.append(_line("redis memory", f"{size(used)}{limit}"))
    return lines


#: What stops while beat or the sweep is down (status says it next to their heartbeat).
_DOWN = {
    "beat": "no sweeps are scheduled, so time-based flushes and crash recovery stop "
    "(run exactly one `celery -A worker.app beat`)",
    "sweep": "time-based flushes and crash recovery stop (a worker must consume the sweep queue)",
}


def ingest_line(ingest: Mapping[str, int]) -> str:
    """Transitions before routing: received, rejected by reason, unroutable."""
    rejected = {k.removeprefix("rejected:"): v for k, v in ingest.items() if k.startswith("rejected:")}
    total = sum(rejected.values())
    return _line(
        "ingest",
        _parts(
            f"{_n(ingest.get('received', 0))} received",
            f"{_n(total)} rejected ({_by_reason(rejected)})" if total else "0 rejected",
            f"{_n(ingest.get('unroutable', 0))} unroutable",
        ),
    )


def job_lines(status: Mapping[str, Any], now_ms: int) -> list[str]:
    """One job's status (the dict of :func:`worker.observe.status.job_status`) as text lines."""
    c: Mapping[str, Any] = status.get("counters") or {}
    b: Mapping[str, Any] = status.get("buffer") or {}
    skips: Mapping[str, Any] = status.get("skips") or {}
    blocked: Mapping[str, Any] | None = status.get("blocked")
    head = f"job {status['job']}  {status.get('label', '')!r}  {str(status.get('state', '?')).upper()}"
    if blocked:
        head += ", BLOCKED"
    lines = [head, _line("audiences", ", ".join(status.get("audiences") or []) or "-")]
    if status.get("pause_reason"):
        lines.append(_line("paused", str(status["pause_reason"])))
    if blocked:
        lines.append(_line("BLOCKED", str(blocked.get("reason"))))
        lines.append(
            _line(
                "",
                f"since {when(blocked.get('since_ms'), now_ms)}; next try "
                f"{when(blocked.get('retry_at_ms'), now_ms)}",
            )
        )
    held = c.get("queued_behind_unfinished", 0)
    lines.append(
        _line(
            "transitions",
            _parts(
                f"{_n(c.get('received', 0))} received",
                f"{_n(c.get('accepted', 0))} accepted",
                f"{_n(c.get('merged', 0))} merged" if c.get("merged") else None,
                f"{_n(held)} held behind an unfinished job" if held else None,
                f"{_n(c.get('stale', 0))} stale",
                f"{_n(sum(skips.values()))} skipped ({_by_reason(skips)})" if skips else None,
            ),
        )
    )
    drops = status.get("field_drops") or {}
    if drops:
        lines.append(_line("fields left out", _by_reason(drops)))
    lines.append(
        _line(
            "batches",
            _parts(
                f"{_n(c.get('batches_sealed', 0))} sealed",
                f"{_n(c.get('batches_submitted', 0))} sent",
                f"{_n(c.get('batches_completed', 0))} completed",
                f"{_n(c.get('batches_resent', 0))} resent" if c.get("batches_resent") else None,
                f"{_n(c.get('batches_deadlettered', 0))} dead-lettered"
                if c.get("batches_deadlettered")
                else None,
            ),
        )
    )
    lines.append(
        _line(
            "users",
            _parts(
                f"{_n(c.get('users_delivered', 0))} delivered",
                f"{_n(c.get('record_failures', 0))} refused by Attentive"
                if c.get("record_failures")
                else None,
                f"{_n(c.get('deadlettered_users', 0))} dead-lettered",
            ),
        )
    )
    lines.append(
        _line(
            "right now",
            _parts(
                f"{_n(b.get('users_in_open_batch', 0))} users in the open batch",
                f"{_n(b.get('batches_waiting_to_send', 0))} batches waiting to send",
                f"{_n(b.get('batches_at_attentive', 0))} at Attentive"
                + (
                    f" (oldest sent {duration(b['oldest_at_attentive_seconds'])} ago)"
                    if b.get("oldest_at_attentive_seconds") is not None
                    else ""
                ),
                f"{_n(b.get('users_waiting_for_earlier_change', 0))} users held"
                if b.get("users_waiting_for_earlier_change")
                else None,
            ),
        )
    )
    if b.get("batches_overdue_12h"):
        lines.append(
            _line(
                "OVERDUE",
                f"{_n(b['batches_overdue_12h'])} batches at Attentive for over 12 h"
                + (f", {_n(b['batches_alert_24h'])} over 24 h" if b.get("batches_alert_24h") else ""),
            )
        )
    problems = _parts(
        *(
            f"{_n(c[k])} {text}"
            for k, text in (
                ("sends_interrupted", "sends interrupted"),
                ("sends_uncertain", "sends without an answer"),
                ("leases_expired", "flush leases expired"),
                ("results_unavailable", "results files unavailable"),
            )
            if c.get(k)
        )
    )
    if problems:
        lines.append(_line("send problems", problems))
    if c.get("responses_429") or status.get("rate_limited_seconds"):
        lines.append(
            _line(
                "rate limit",
                f"{_n(c.get('responses_429', 0))} answers 429, "
                f"all workers held off {duration(float(status.get('rate_limited_seconds') or 0))} in total",
            )
        )
    lines += _deadletter_lines(status.get("deadletters"))
    lines.append(_line("last ingest", when(status.get("last_ingest_at_ms"), now_ms)))
    lines.append(_line("last flush", when(status.get("last_flush_at_ms"), now_ms)))
    if status.get("last_attentive_status"):
        lines.append(_line("Attentive", f"last job status {status['last_attentive_status']}"))
    if status.get("last_error"):
        at = status.get("last_error_at_ms")
        recovered = status.get("last_error_recovered")
        lines.append(_line("last error", ("(recovered) " if recovered else "") + str(status["last_error"])))
        at_text = f"at {when(at, now_ms)}" if at is not None else "(time not recorded)"
        if recovered:
            at_text += "; sent or checked successfully since"
        lines.append(_line("", at_text))
    lines += _backfill_lines(status.get("backfill"), now_ms)
    return lines


def _deadletter_lines(block: Mapping[str, Any] | None) -> list[str]:
    if not block:
        return []
    by_reason = block.get("by_reason") or {}
    if not by_reason and not block.get("kept"):
        return []
    extra = _parts(
        f"{_n(block.get('kept', 0))} kept",
        f"{_n(block['dropped_by_cap'])} beyond the cap" if block.get("dropped_by_cap") else None,
        f"{_n(block['purged'])} purged" if block.get("purged") else None,
    )
    return [_line("dead letters", _parts(_by_reason(by_reason) or None, extra))]


def _staged(part: Mapping[str, Any]) -> str | None:
    """A file part's stream: ``staged 120,000 of 10,000,000 lines`` while a command streams it, or
    when it ended before staging them all."""
    if part.get("lines_total") is None or not (part.get("streaming") or part.get("incomplete")):
        return None
    return f"staged {_n(part.get('lines_staged') or 0)} of {_n(part['lines_total'])} lines"


def _backfill_lines(block: Mapping[str, Any] | None, now_ms: int) -> list[str]:
    if not block:
        return []
    lines = []
    parts: Iterable[tuple[str, Mapping[str, Any]]] = list((block.get("audiences") or {}).items())
    if block.get("file"):
        parts = [*parts, ("file", block["file"])]
    for name, part in parts:
        total = part.get("total")
        members = f"{_n(part.get('members', 0))}" + (f" of {_n(total)}" if total is not None else "")
        text = _parts(
            f"{name}: {_n(part.get('pages', 0))} pages",
            f"{members} members",
            "finished" if part.get("finished") else "in progress",
            f"{_n(part['chunks_waiting'])} chunks waiting" if part.get("chunks_waiting") else None,
            _staged(part),
        )
        lines.append(_line("backfill", text))
        if part.get("last_error"):
            # A finished part got past its error: say so rather than show it as current.
            label = (
                "earlier error (recovered)"
                if part.get("finished") and not part.get("incomplete")
                else "last error"
            )
            lines.append(
                _line("", f"{label}: {part['last_error']} ({when(part.get('last_error_at_ms'), now_ms)})")
            )
        if part.get("next_try_at_ms") is not None and not part.get("finished"):
            next_try = when(part["next_try_at_ms"], now_ms)
            lines.append(_line("", f"next try {next_try}; `jobs backfill JOB --retry-now` tries now"))
    return lines


def render(
    jobs: Iterable[Mapping[str, Any]],
    now_ms: int,
    *,
    ingest: Mapping[str, int] | None = None,
    service: Mapping[str, Any] | None = None,
) -> str:
    """The whole readable status: the service and ingest (for ``status`` without a job), then jobs."""
    lines = [f"attentive-export status at {iso(now_ms)}"]
    if service is not None:
        lines += service_lines(service)
    if ingest is not None:
        lines.append(ingest_line(ingest))
    shown = 0
    for status in jobs:
        lines += ["", *job_lines(status, now_ms)]
        shown += 1
    if not shown and ingest is not None:
        lines += ["", "no export jobs; create one with `attentive-export jobs create job.yaml`"]
    return "\n".join(lines)
