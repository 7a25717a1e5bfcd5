"""Dead letters: changes that will never reach Attentive, each with the reason, for operators.

Invariant 1 says a transition either reaches Attentive or ends here. Entries hold the record we
would have sent (personal data stays in Redis, never in broker messages or logs).

Invariant 8 says Redis memory must not grow with the number of changes: a job keeps at most
``DEADLETTER_CAP`` entries, the oldest dropped first, while a count per reason class stays exact.
Both are written in the caller's one MULTI round trip, so the counts never disagree with the list:

- ``keys.job_deadletters``: LIST of JSON entries, trimmed to the cap in the same MULTI as the push;
- ``keys.job_deadletter_counts``: HASH reason class -> entries recorded (kept or dropped);
- ``deadlettered_users`` in the job's status hash: every entry ever recorded (purges do not undo it).

How many the cap dropped is not written anywhere: it is the counted total minus the entries kept,
read in one MULTI (:func:`summary`), so nothing on the write path has to read first. A purge
removes a class's entries and its count together, which keeps that difference exact.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any, TypeVar

import redis

from worker.settings import DEFAULT_DEADLETTER_CAP, SettingsError, load_settings
from worker.store import keys
from worker.store.replies import decode_hash, text

#: A reason's head (the text before its first ':') that names its class as it is, e.g.
#: ``attentive_400`` or ``attentive_record_413``: a short token, no spaces, so no free text.
_CLASS_TOKEN = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
#: Reasons written as prose (their head carries ids or messages) and the class each gets.
GAVE_UP = "gave_up_after_failed_sends"
DATA_MISSING = "batch_data_missing"
#: Any other reason: counted, never a class of its own (classes must stay few, invariant 8).
OTHER = "other"
_GAVE_UP = re.compile(r"; gave up after \d+ failed sends$")
_DATA_MISSING_PREFIX = "batch records missing in Redis"
#: Fields of the job's status hash: counted dead letters an operator purged, and entries removed
#: because a re-drive put their changes back in the buffer.
PURGED = "deadletters_purged"
REDRIVEN = "deadletters_redriven"
#: Entry field: audience -> event time (ms) a re-drive may send it at, or null where a newer change
#: of the audience was held when the entry was written (worker.pipeline.redrive).
REDRIVE = "redrive"
#: Per user key, ``REDRIVE`` of its entry.
Stamps = Mapping[str, Mapping[str, int | None]]
_T = TypeVar("_T")
#: Entries read per LRANGE when a read or a purge walks the list.
_PAGE = 2_000
#: Attempts of a purge against dead letters being written meanwhile (WATCH).
_PURGE_ATTEMPTS = 20


def reason_class(reason: str) -> str:
    """The stable class a reason is counted under: ``attentive_400: Invalid email address: x@y``
    gives ``attentive_400``; prose reasons map to a fixed few; anything else is ``other``."""
    if _GAVE_UP.search(reason):
        return GAVE_UP
    if reason.startswith(_DATA_MISSING_PREFIX):
        return DATA_MISSING
    head = reason.partition(":")[0].strip()
    return head if _CLASS_TOKEN.fullmatch(head) else OTHER


@cache
def default_cap() -> int:
    """``DEADLETTER_CAP`` of this process, read once (callers without the settings at hand).

    Falls back to the default when the environment is invalid: a process that validated its
    settings at start never gets here, and a dead letter must not fail over an unrelated variable.
    """
    try:
        return load_settings().deadletter_cap
    except SettingsError:
        return DEFAULT_DEADLETTER_CAP


def record(
    client: redis.Redis,
    job_id: str,
    batch_id: int,
    entries: Iterable[tuple[str, str, Any]],
    *,
    cap: int | None = None,
    stamps: Stamps | None = None,
) -> int:
    """Append ``(user key, reason, record)`` entries; returns how many were written."""
    pipe = client.pipeline(transaction=True)
    written = queue(pipe, job_id, batch_id, entries, cap=cap, stamps=stamps)
    if written:
        pipe.execute()
    return written


def queue(
    pipe: Any,
    job_id: str,
    batch_id: int,
    entries: Iterable[tuple[str, str, Any]],
    *,
    cap: int | None = None,
    stamps: Stamps | None = None,
) -> int:
    """Add the writes of :func:`record` to a caller's MULTI pipeline (to commit them with other writes).

    ``cap``: entries kept for the job (default ``DEADLETTER_CAP``); older ones are trimmed in the
    same MULTI, their counts by class stay. ``stamps``: per user, its audiences with the time a
    re-drive may send each at (``JobBuffer.stamps``), stored as the entry's ``redrive``.
    """
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    rows: list[str] = []
    classes: Counter[str] = Counter()
    for user, reason, rec in entries:
        cls = reason_class(reason)
        classes[cls] += 1
        row = {
            "at": now,
            "batch": batch_id,
            "user": user,
            "reason": reason,
            "reason_class": cls,
            "record": rec,
        }
        if stamps and rec is not None and user in stamps:
            row[REDRIVE] = stamps[user]
        rows.append(json.dumps(row))
    if rows:
        key = keys.job_deadletters(job_id)
        pipe.rpush(key, *rows)
        pipe.ltrim(key, -(cap if cap is not None else default_cap()), -1)
        counts = keys.job_deadletter_counts(job_id)
        for cls, n in classes.items():
            pipe.hincrby(counts, cls, n)
        pipe.hincrby(keys.job_status(job_id), "deadlettered_users", len(rows))
    return len(rows)


def entry_class(entry: dict[str, Any]) -> str:
    """An entry's class (entries written before classes were stored get theirs from the reason)."""
    return str(entry.get("reason_class") or reason_class(str(entry.get("reason", ""))))


def read(
    client: redis.Redis, job_id: str, limit: int = 100, reason: str | None = None
) -> list[dict[str, Any]]:
    """The newest ``limit`` dead letters (all kept with ``limit`` 0), oldest first; only those of
    class ``reason`` when given.

    A filtered read walks the list from its newest end a page at a time and stops once it has
    ``limit``; entries written meanwhile shift the pages, so it may then show one twice.
    """
    key = keys.job_deadletters(job_id)
    if reason is None:
        return [json.loads(r) for r in client.lrange(key, -limit if limit > 0 else 0, -1)]
    found = _newest_matching(client, key, limit, lambda _raw: True, lambda e: entry_class(e) == reason)
    found.reverse()
    return found


def for_user(client: redis.Redis, job_id: str, user: str, limit: int = 20) -> list[dict[str, Any]]:
    """The newest ``limit`` dead letters of one user (as the buffer keys it), newest first.

    Walks the kept entries from the newest end a page at a time (at most ``DEADLETTER_CAP``);
    entries of other users are skipped without being parsed.
    """
    needle = user.encode()
    return _newest_matching(
        client,
        keys.job_deadletters(job_id),
        limit,
        # Cheap test first: the user's key is in the entry's text unless JSON escaped it.
        lambda raw: needle in raw or b"\\" in raw,
        lambda entry: entry.get("user") == user,
    )


def _newest_matching(
    client: redis.Redis,
    key: str,
    limit: int,
    maybe: Callable[[bytes], bool],
    wanted: Callable[[dict[str, Any]], bool],
) -> list[dict[str, Any]]:
    """Up to ``limit`` entries (all with ``limit`` 0) that ``wanted``, newest first, read a page at a
    time from the list's newest end; ``maybe`` rules entries out before they are parsed."""
    found: list[dict[str, Any]] = []
    end = -1
    while limit <= 0 or len(found) < limit:
        page = client.lrange(key, end - _PAGE + 1, end)
        for raw in reversed(page):
            data = raw if isinstance(raw, bytes) else raw.encode()
            if not maybe(data):
                continue
            entry = json.loads(data)
            if wanted(entry):
                found.append(entry)
                if len(found) == limit:
                    break
        if len(page) < _PAGE:
            break
        end -= _PAGE
    return found


@dataclass(frozen=True, slots=True)
class Summary:
    """What an operator needs to judge a job's dead letters without reading them."""

    #: Reason class -> dead letters recorded (kept or dropped by the cap), since the last purge.
    by_reason: dict[str, int]
    #: Entries in the list now (at most the cap).
    kept: int
    #: Counted entries no longer in the list because the cap dropped them.
    dropped_by_cap: int
    #: Counted entries removed by operators' purges (``attentive-export deadletters purge``).
    purged: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "by_reason": dict(sorted(self.by_reason.items())),
            "kept": self.kept,
            "dropped_by_cap": self.dropped_by_cap,
            "purged": self.purged,
        }


def summary(client: redis.Redis, job_id: str) -> Summary:
    """Counts by reason class, entries kept and dropped by the cap, read together (one MULTI)."""
    pipe = client.pipeline(transaction=True)
    pipe.hgetall(keys.job_deadletter_counts(job_id))
    pipe.llen(keys.job_deadletters(job_id))
    pipe.hget(keys.job_status(job_id), PURGED)
    raw_counts, kept, purged = pipe.execute()
    by_reason = {k: int(v) for k, v in decode_hash(raw_counts).items()}
    # Entries recorded before counts existed are kept without a count: never a negative drop.
    dropped = max(0, sum(by_reason.values()) - int(kept))
    return Summary(by_reason, int(kept), dropped, int(text(purged)) if purged is not None else 0)


@dataclass(frozen=True, slots=True)
class Purged:
    """What a purge removed."""

    #: Entries removed from the list.
    entries: int
    #: Dead letters removed from the counts (those entries plus any the cap had dropped).
    counted: int


def purge(client: redis.Redis, job_id: str, reason: str | None = None) -> Purged:
    """Remove a job's dead letters, all or those of class ``reason``, with their counts.

    Atomic against dead letters written meanwhile (WATCH on the list and the counts, retried), so a
    new entry is never removed unseen nor its count lost.

    Raises:
        redis.WatchError: dead letters kept being written through every attempt.
    """
    counts = keys.job_deadletter_counts(job_id)

    def body(pipe: Any) -> Purged:
        if reason is None:
            removed = int(pipe.llen(keys.job_deadletters(job_id)))
            counted = sum(int(v) for v in pipe.hvals(counts))
            kept: list[bytes] | None = None
        else:
            gone, kept = _partition(pipe, job_id, lambda entry: entry_class(entry) == reason)
            removed = len(gone)
            counted = int(pipe.hget(counts, reason) or 0)
        if not removed and not counted:
            return Purged(0, 0)
        pipe.multi()
        _rewrite(pipe, job_id, kept)
        if reason is None:
            pipe.delete(counts)
        else:
            pipe.hdel(counts, reason)
        if counted:
            pipe.hincrby(keys.job_status(job_id), PURGED, counted)
        return Purged(removed, counted)

    return _watched(client, job_id, body)


def remove(client: redis.Redis, job_id: str, entries: Counter[bytes]) -> int:
    """Remove these entries (as stored, each as many times as counted) and take them off their
    classes' counts, as a re-drive does once their changes are back in the buffer; entries the cap
    trimmed meanwhile are skipped. Returns how many were removed. Atomic like :func:`purge`.

    Raises:
        redis.WatchError: dead letters kept being written through every attempt.
    """
    counts = keys.job_deadletter_counts(job_id)

    def body(pipe: Any) -> int:
        left = Counter(entries)

        def take(entry: dict[str, Any], raw: bytes) -> bool:
            if left[raw] <= 0:
                return False
            left[raw] -= 1
            return True

        gone, kept = _partition(pipe, job_id, take, raw_too=True)
        if not gone:
            return 0
        by_class = Counter(entry_class(entry) for entry in gone)
        before = dict(zip(by_class, pipe.hmget(counts, list(by_class)), strict=True))
        pipe.multi()
        _rewrite(pipe, job_id, kept)
        for cls, n in by_class.items():
            after = int(before[cls] or 0) - n
            if after > 0:
                pipe.hset(counts, cls, after)
            else:  # entries written before counts existed were never counted
                pipe.hdel(counts, cls)
        pipe.hincrby(keys.job_status(job_id), REDRIVEN, len(gone))
        return len(gone)

    return _watched(client, job_id, body)


def _watched(client: redis.Redis, job_id: str, body: Callable[[Any], _T]) -> _T:
    """Run ``body`` on a pipeline WATCHing the job's dead-letter list and counts, then commit the
    writes it queued after ``multi()``; retried while dead letters are written meanwhile."""
    for _ in range(_PURGE_ATTEMPTS):
        with client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(keys.job_deadletters(job_id), keys.job_deadletter_counts(job_id))  # type: ignore[no-untyped-call]
                result = body(pipe)
                if pipe.explicit_transaction:
                    pipe.execute()
                else:
                    pipe.unwatch()
                return result
            except redis.WatchError:
                continue
    raise redis.WatchError(f"dead letters of job {job_id} kept changing during {_PURGE_ATTEMPTS} attempts")


def _partition(
    pipe: Any, job_id: str, drop: Callable[..., bool], *, raw_too: bool = False
) -> tuple[list[dict[str, Any]], list[bytes]]:
    """(entries ``drop`` picks, parsed; every other entry as stored, in order), read under WATCH.
    ``drop`` gets the parsed entry, and its stored text too with ``raw_too``."""
    key = keys.job_deadletters(job_id)
    gone: list[dict[str, Any]] = []
    kept: list[bytes] = []
    start = 0
    while True:
        page = pipe.lrange(key, start, start + _PAGE - 1)
        for raw in page:
            entry = json.loads(raw)
            if drop(entry, raw) if raw_too else drop(entry):
                gone.append(entry)
            else:
                kept.append(raw)
        if len(page) < _PAGE:
            return gone, kept
        start += _PAGE


def _rewrite(pipe: Any, job_id: str, kept: list[bytes] | None) -> None:
    """Queue the list's new content (``None``: empty) on a MULTI pipeline."""
    key = keys.job_deadletters(job_id)
    pipe.delete(key)
    for start in range(0, len(kept or ()), _PAGE):
        pipe.rpush(key, *(kept or [])[start : start + _PAGE])
