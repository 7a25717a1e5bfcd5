"""``attentive-export trace JOB USER``: where one user's changes are, per audience of the job.

Answers "what happened to this user?" from what Redis holds, read-only:

- the newest accepted event time per (user, audience): the last-writer-wins state
  (:meth:`JobBuffer.last_accepted`), the time any newer change must beat;
- where that change is now, from the buffer's per-user structures: the open batch
  (``open_entries``), held behind an unfinished batch (``waiting`` + ``outstanding``), or in a sealed
  batch (its hash: ``state``, ``sealed_at``, ``submitted_at``, ``attentive_jobs``, ``done:<id>``,
  ``ended:<id>``), waiting to be sent, being sent, or at Attentive;
- once nothing is pending: dead-lettered (the job's dead letters, newest first, with the reason),
  or delivered, from the job's bounded delivery history (:mod:`worker.pipeline.deliveries`: the
  last few hundred completed batches). Older than that history, and with no dead letter, the
  honest answer is "delivered or not pending".

The user is named by the key the buffer orders by (README, "Trace a user"): the job's
``user_key_field`` (by default the source field of its first identifier mapping), normalised like
that identifier, so ``Ada@Example.com`` finds ``ada@example.com`` when the key is an email. A
profile without that field is keyed by another identifier, ``email:<address>`` for example, which
can be given as it is.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from worker.mapping.mapper import compiled_mapper
from worker.observe.summary import iso, when
from worker.pipeline import deadletters
from worker.pipeline.buffer import JobBuffer
from worker.pipeline.deliveries import HISTORY_BATCHES, Delivery, last_delivery
from worker.setup.jobs import ExportJob, JobStore
from worker.store import keys

#: Dead letters of the user read (newest first).
DEADLETTERS_READ = 20
#: Where a change can be (``where`` of :class:`AudienceTrace`).
NONE = "none"
OPEN = "open"
HELD = "held"
SEALED = "sealed"
SENDING = "sending"
AT_ATTENTIVE = "at_attentive"
DELIVERED = "delivered"
DEADLETTERED = "deadlettered"
NOT_PENDING = "delivered_or_not_pending"
UNKNOWN_PREFIX = "unknown:"


@dataclass
class AttentiveJob:
    """The Attentive job that carries (or carried) the user in a batch."""

    id: str
    #: ``unfinished``, ``completed``, ``ended: <reason>``, or ``no answer yet`` (a send whose answer
    #: never came; held until ``hold_until_ms``).
    status: str
    hold_until_ms: int | None = None


@dataclass
class AudienceTrace:
    audience: str
    #: Newest accepted event time (ms) for this user and audience; None: none accepted.
    last_event_ms: int | None
    where: str
    #: One sentence for people.
    detail: str
    #: ``enter`` or ``exit`` where the pending (or dead-lettered) record shows it.
    event: str | None = None
    batch_id: int | None = None
    batch_state: str | None = None
    attentive_job: AttentiveJob | None = None
    #: When the change reached where it is (open batch since, sealed, sent, completed, dead-lettered).
    since_ms: int | None = None
    reason: str | None = None


@dataclass
class Trace:
    job_id: str
    job_label: str
    job_state: str
    #: The user key looked up (after normalisation).
    user: str
    audiences: list[AudienceTrace]
    #: The user's newest dead letters (without their records), newest first.
    deadletters: list[dict[str, Any]] = field(default_factory=list)
    last_delivery: Delivery | None = None
    at_ms: int = 0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for aud in out["audiences"]:
            if aud["last_event_ms"] is not None:
                aud["last_event_at"] = iso(aud["last_event_ms"])
            if aud["since_ms"] is not None:
                aud["since"] = iso(aud["since_ms"])
        if self.last_delivery is not None:
            out["last_delivery"]["at"] = iso(self.last_delivery.at_ms)
        out["delivery_history_batches"] = HISTORY_BATCHES
        return out


# --- reading the buffer's per-user structures ------------------------------------------------------------
def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _event(record: Any, audience: str) -> str | None:
    """``enter``/``exit`` from a mapped record's audience flag."""
    try:
        flag = record["attributes"]["custom"][audience]
    except (KeyError, TypeError):
        return None
    return "enter" if flag is True else "exit" if flag is False else None


def parse_entry(entry: str | bytes | None) -> dict[str, Any]:
    """An open or batch entry ``|aud|aud|<TAB>[record,...]`` as audience -> record (one per audience,
    in order: buffer.lua keeps them paired)."""
    if entry is None:
        return {}
    raw = _text(entry)
    head, _, array = raw.partition("\t")
    audiences = [a for a in head.split("|") if a]
    try:
        records = json.loads(array)
    except ValueError:
        records = []
    return {a: (records[i] if i < len(records) else None) for i, a in enumerate(audiences)}


def parse_waiting(held: str | bytes | None) -> dict[str, Any]:
    """A ``waiting`` value ``aud<TAB>record[<TAB>id...]\\n...`` as audience -> the newest held record."""
    if held is None:
        return {}
    out: dict[str, Any] = {}
    for line in _text(held).split("\n"):
        if not line:
            continue
        audience, _, rest = line.partition("\t")
        record_text = rest.split("\t", 1)[0]  # record JSON never holds a raw tab
        try:
            out[audience] = json.loads(record_text)
        except ValueError:
            out[audience] = None
    return out


def _user_job(batch: dict[str, str], user: str) -> AttentiveJob | None:
    """The newest recorded Attentive job of ``batch`` that carries ``user``, with its status."""
    try:
        index = json.loads(batch.get("users") or "[]").index(user)
    except ValueError:
        return None
    found: AttentiveJob | None = None
    for job in json.loads(batch.get("attentive_jobs") or "[]"):
        if "idx" in job and index not in job["idx"]:
            continue
        job_id = str(job["id"])
        if f"done:{job_id}" in batch:
            status = "completed"
        elif f"ended:{job_id}" in batch:
            status = f"ended: {batch[f'ended:{job_id}']}"
        elif job_id.startswith(UNKNOWN_PREFIX):
            found = AttentiveJob(job_id, "no answer yet", int(job.get("until") or 0) or None)
            continue
        else:
            status = "unfinished"
        found = AttentiveJob(job_id, status)
    return found


def _decode(raw: dict[Any, Any]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in raw.items()}


def _int(value: Any) -> int | None:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


# --- the trace -----------------------------------------------------------------------------------------
def user_keys(job: ExportJob, user: str) -> list[str]:
    """Keys ``user`` may be stored under: as the job's mapping normalises its key field, then as given."""
    normalised = compiled_mapper(job.id, job.config).user_key({job.config.key_field: user})
    return list(dict.fromkeys(k for k in (normalised, user.strip(), user) if k))


def trace_user(client: redis.Redis, job_id: str, user: str, now_ms: int | None = None) -> Trace:
    """Where ``user``'s changes are in job ``job_id``, per audience.

    Raises:
        worker.setup.jobs.JobNotFound: no such job.
    """
    now = now_ms if now_ms is not None else int(time.time() * 1000)
    job = JobStore(client).get(job_id)
    audiences = list(job.config.audiences)
    buffer = JobBuffer(client, job.id)
    candidates = user_keys(job, user)
    chosen, state = candidates[0], None
    for key in candidates:
        got = _read_user(client, buffer, job.id, key, audiences)
        if state is None:
            state = got
        if got["found"]:
            chosen, state = key, got
            break
    assert state is not None
    letters = deadletters.for_user(client, job.id, chosen, DEADLETTERS_READ)
    delivery = last_delivery(client, job.id, chosen)
    traces = [_audience(audience, state, letters, delivery, job, now) for audience in audiences]
    shown = [{k: v for k, v in entry.items() if k != "record"} for entry in letters]
    return Trace(job.id, job.config.label, str(job.state), chosen, traces, shown, delivery, now)


def _read_user(
    client: redis.Redis, buffer: JobBuffer, job_id: str, user: str, audiences: list[str]
) -> dict[str, Any]:
    """Everything Redis holds about one user key, in one round trip (plus the batch, if any)."""
    pipe = client.pipeline(transaction=False)
    pipe.hget(keys.open_entries(job_id), user)
    pipe.hget(keys.waiting(job_id), user)
    pipe.hget(keys.outstanding(job_id), user)
    pipe.get(keys.open_since(job_id))
    open_entry, held, owner, open_since = pipe.execute()
    times = dict(zip(audiences, buffer.last_accepted([(user, a) for a in audiences]), strict=True))
    batch: dict[str, str] = {}
    batch_entry: dict[str, Any] = {}
    first_sent: int | None = None
    bid = _int(_text(owner)) if owner is not None else None
    if bid is not None:
        pipe = client.pipeline(transaction=False)
        pipe.hgetall(keys.batch(job_id, bid))
        pipe.hget(keys.batch_entries(job_id, bid), user)
        pipe.zscore(keys.in_flight(job_id), bid)
        raw_batch, raw_entry, sent = pipe.execute()
        batch, batch_entry = _decode(raw_batch), parse_entry(raw_entry)
        first_sent = _int(sent)
    found = bool(open_entry or held or owner) or any(t is not None for t in times.values())
    return {
        "found": found,
        "times": times,
        "open": parse_entry(open_entry),
        "open_since": _int(_text(open_since)) if open_since is not None else None,
        "held": parse_waiting(held),
        "batch_id": bid,
        "batch": batch,
        "batch_entry": batch_entry,
        "first_sent": first_sent,
        "user_job": _user_job(batch, user) if batch else None,
    }


def _letter_for(letters: list[dict[str, Any]], audience: str) -> dict[str, Any] | None:
    """The user's newest dead letter that carried ``audience`` (a lost batch's letters have no record:
    they may have carried any audience)."""
    for entry in letters:
        record = entry.get("record")
        if record is None or _event(record, audience) is not None:
            return entry
    return None


def _letter_ms(entry: dict[str, Any]) -> int | None:
    try:
        return int(dt.datetime.fromisoformat(str(entry["at"]).replace("Z", "+00:00")).timestamp() * 1000)
    except (KeyError, ValueError):
        return None


def _audience(
    audience: str,
    state: dict[str, Any],
    letters: list[dict[str, Any]],
    delivery: Delivery | None,
    job: ExportJob,
    now: int,
) -> AudienceTrace:
    last = state["times"].get(audience)
    bid: int | None = state["batch_id"]
    batch: dict[str, str] = state["batch"]
    if audience in state["held"]:
        record = state["held"][audience]
        behind = _batch_words(bid, batch, state, now)
        return AudienceTrace(
            audience,
            last,
            HELD,
            f"held until {behind} completes at Attentive (a user's next change waits for its "
            "unfinished batch); it then joins a new batch",
            _event(record, audience),
            bid,
            batch.get("state"),
            state.get("user_job"),
        )
    if audience in state["open"]:
        since = state["open_since"]
        return AudienceTrace(
            audience,
            last,
            OPEN,
            f"in the open batch (open since {when(since, now) if since else 'now'}); sealed once it is "
            f"{job.config.flush_interval_seconds} s old or full, or sooner",
            _event(state["open"][audience], audience),
            since_ms=since,
        )
    if audience in state["batch_entry"]:
        return _in_batch(audience, last, state, letters, now)
    letter = _letter_for(letters, audience)
    if letter is not None and (delivery is None or int(letter.get("batch", 0)) >= delivery.batch_id):
        reason = str(letter.get("reason", ""))
        return AudienceTrace(
            audience,
            last,
            DEADLETTERED,
            f"dead-lettered from batch {letter.get('batch')} at {letter.get('at')}: {reason}",
            _event(letter.get("record"), audience),
            _int(letter.get("batch")),
            since_ms=_letter_ms(letter),
            reason=reason,
        )
    if last is None:
        return AudienceTrace(
            audience,
            None,
            NONE,
            "no change accepted for this user and audience (none arrived, all were skipped or stale, "
            "or the user key differs: see `preview`)",
        )
    via = f", Attentive job {delivery.attentive_job_id}" if delivery and delivery.attentive_job_id else ""
    if delivery is not None and letter is not None:
        # The history is per user, not per audience: the later delivery may not have carried this one.
        return AudienceTrace(
            audience,
            last,
            NOT_PENDING,
            f"delivered or not pending: dead-lettered from batch {letter.get('batch')} "
            f"({letter.get('reason')}); the user's later delivery, batch {delivery.batch_id}{via}, "
            f"completed {when(delivery.at_ms, now)}, may have carried a newer change of this audience",
            batch_id=delivery.batch_id,
            since_ms=delivery.at_ms,
            reason=str(letter.get("reason", "")),
        )
    if delivery is not None:
        return AudienceTrace(
            audience,
            last,
            DELIVERED,
            f"delivered (nothing pending, no dead letter); the user's latest delivery was batch "
            f"{delivery.batch_id}{via}, completed {when(delivery.at_ms, now)}",
            batch_id=delivery.batch_id,
            attentive_job=AttentiveJob(delivery.attentive_job_id, "completed")
            if delivery.attentive_job_id
            else None,
            since_ms=delivery.at_ms,
        )
    return AudienceTrace(
        audience,
        last,
        NOT_PENDING,
        "delivered or not pending: nothing pending and no dead letter kept, and the user is not in "
        f"the job's delivery history (its last {HISTORY_BATCHES} completed batches)",
    )


def _batch_words(bid: int | None, batch: dict[str, str], state: dict[str, Any], now: int) -> str:
    """``batch 7 (Attentive job 123, unfinished, sent ...)`` for the held case."""
    if bid is None:
        return "the user's unfinished batch"
    job = state.get("user_job")
    if job is not None:
        sent = _int(batch.get("submitted_at"))
        return f"batch {bid} (Attentive job {job.id}, {job.status}" + (
            f", sent {when(sent, now)})" if sent else ")"
        )
    if batch.get("state") == "sealed":
        return f"batch {bid} (waiting to be sent)"
    if batch.get("state") == "submitting":
        return f"batch {bid} (being sent)"
    return f"batch {bid}"


def _in_batch(
    audience: str, last: int | None, state: dict[str, Any], letters: list[dict[str, Any]], now: int
) -> AudienceTrace:
    bid: int = state["batch_id"]
    batch: dict[str, str] = state["batch"]
    record = state["batch_entry"][audience]
    event = _event(record, audience)
    job: AttentiveJob | None = state.get("user_job")
    batch_state = batch.get("state")
    sealed_at, submitted_at = _int(batch.get("sealed_at")), _int(batch.get("submitted_at"))
    last_error = batch.get("last_error")
    err = f"; last error: {last_error}" if last_error else ""
    for letter in letters:
        if _int(letter.get("batch")) == bid and _letter_for([letter], audience) is not None:
            reason = str(letter.get("reason", ""))
            return AudienceTrace(
                audience,
                last,
                DEADLETTERED,
                f"dead-lettered from batch {bid} at {letter.get('at')}: {reason} (the batch waits for "
                "its other users)",
                event,
                bid,
                batch_state,
                job,
                _letter_ms(letter),
                reason,
            )
    if job is not None and job.status == "completed":
        return AudienceTrace(
            audience,
            last,
            DELIVERED,
            f"delivered by Attentive job {job.id} in batch {bid} (the batch completes once its other "
            "Attentive jobs finish)",
            event,
            bid,
            batch_state,
            job,
            submitted_at,
        )
    if batch_state == "sealed":
        resend = " to be sent again" if job is not None else ""
        return AudienceTrace(
            audience,
            last,
            SEALED,
            f"in batch {bid}, sealed {when(sealed_at, now) if sealed_at else ''}, waiting{resend} to be "
            f"sent{err}",
            event,
            bid,
            batch_state,
            job,
            sealed_at,
        )
    if batch_state == "submitting":
        lease = _int(batch.get("lease_until"))
        return AudienceTrace(
            audience,
            last,
            SENDING,
            f"being sent in batch {bid}" + (f" (lease until {when(lease, now)})" if lease else "") + err,
            event,
            bid,
            batch_state,
            job,
            sealed_at,
        )
    since = submitted_at or state.get("first_sent")
    if job is not None and job.status == "no answer yet":
        hold = f" until {when(job.hold_until_ms, now)}" if job.hold_until_ms else ""
        detail = (
            f"sent in batch {bid}, but the answer never came: held{hold} in case Attentive runs it, "
            "then sent again"
        )
    else:
        jid = f", Attentive job {job.id} ({job.status})" if job is not None else ""
        first = state.get("first_sent")
        also = f", first sent {when(first, now)}" if first and first != since else ""
        detail = f"at Attentive in batch {bid}{jid}, sent {when(since, now) if since else '?'}{also}{err}"
    return AudienceTrace(audience, last, AT_ATTENTIVE, detail, event, bid, batch_state, job, since)


# --- output ----------------------------------------------------------------------------------------------
_WIDTH = 14


def render(trace: Trace) -> str:
    """The trace as a few lines for people."""
    now = trace.at_ms
    lines = [f"user {trace.user} in job {trace.job_id} ({trace.job_label}, {trace.job_state})"]
    for aud in trace.audiences:
        lines.append(aud.audience)
        if aud.last_event_ms is not None:
            event = f"{aud.event} " if aud.event else ""
            lines.append(f"  {'newest event':<{_WIDTH}}{event}at {when(aud.last_event_ms, now)}")
        else:
            lines.append(f"  {'newest event':<{_WIDTH}}none accepted")
        lines.append(f"  {'now':<{_WIDTH}}{aud.detail}")
    if trace.deadletters:
        lines.append(f"dead letters of this user (newest first, {len(trace.deadletters)} shown)")
        for entry in trace.deadletters:
            lines.append(f"  {entry.get('at')}  batch {entry.get('batch')}  {entry.get('reason')}")
    if trace.last_delivery is not None:
        d = trace.last_delivery
        via = f" by Attentive job {d.attentive_job_id}" if d.attentive_job_id else ""
        lines.append(f"latest delivery: batch {d.batch_id}{via}, completed {when(d.at_ms, now)}")
    return "\n".join(lines)
