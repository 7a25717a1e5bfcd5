"""A job's Redis buffer: open batch, sealed batches, leases, and per-user ordering.

All the logic that decides where a change goes lives in ``lua/buffer.lua`` so each step is atomic;
this module is its typed front door. A batch's data stays in Redis until Attentive reports its job
finished (:meth:`JobBuffer.complete`), so a worker killed anywhere loses nothing (DESIGN.md §2.1).
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import orjson
import redis

from worker.store import keys, scripts
from worker.store.replies import decode_hash, text

#: Entries of a job's old last-writer-wins HASH moved per :meth:`JobBuffer.migrate_last_writer` call.
MIGRATE_STEP = 500


def now_ms() -> int:
    return int(time.time() * 1000)


class Change(NamedTuple):
    """One audience change for one user, already mapped to an Attentive record (JSON text).

    A named tuple, not a frozen dataclass: ingest builds one per transition, and a frozen
    dataclass's ``__init__`` (``object.__setattr__`` per field) cost about 1 µs of it.
    """

    user_key: str
    audience: str
    at_ms: int
    record_json: str | bytes
    #: The record's identifiers as :func:`identifier_list` writes them: two users carrying one of the
    #: same never share a request. Empty: none compared.
    identifiers: str = ""


@dataclass(frozen=True, slots=True)
class IngestOutcome:
    accepted: int
    merged: int
    queued: int
    stale: int
    sealed: list[int]
    #: Open batches sealed early because a user carried an identifier another user of it carried.
    sealed_for_shared_identifier: int = 0


@dataclass(frozen=True, slots=True)
class CheckSchedule:
    """One job's status checks as the key's poller reads them each round (:func:`check_schedules`)."""

    #: Up to the limit asked for: (due ms, batch id) of checks due, soonest first.
    due: list[tuple[int, int]]
    #: When the earliest check is due (ms); None when nothing is at Attentive.
    next_at: int | None
    #: Sealed batches waiting to be sent.
    sealed: int
    #: Batches at Attentive (submitted, not yet completed).
    at_attentive: int


def check_schedules(
    client: redis.Redis, job_ids: Sequence[str], now_ms: int, limit: int
) -> dict[str, CheckSchedule]:
    """Each job's :class:`CheckSchedule`, all in one round trip: the poller reads them every round,
    often once per check, and a round trip costs a worker about 50 µs of CPU (bench/RESULTS.md)."""
    pipe = client.pipeline(transaction=False)
    for job_id in job_ids:
        polls = keys.polls(job_id)
        pipe.zrangebyscore(polls, "-inf", now_ms, start=0, num=limit, withscores=True)
        pipe.zrange(polls, 0, 0, withscores=True)
        pipe.llen(keys.sealed(job_id))
        pipe.zcard(polls)
    replies = pipe.execute() if job_ids else []
    out: dict[str, CheckSchedule] = {}
    for n, job_id in enumerate(job_ids):
        due, first, sealed, at_attentive = replies[4 * n : 4 * n + 4]
        out[job_id] = CheckSchedule(
            due=[(int(at), int(bid)) for bid, at in due],
            next_at=int(first[0][1]) if first else None,
            sealed=int(sealed),
            at_attentive=int(at_attentive),
        )
    return out


def jobs_needing_a_poller(client: redis.Redis, job_ids: Sequence[str], now_ms: int) -> set[str]:
    """Of ``job_ids``, those whose key's poller has work: a check is due, or one can be brought
    forward (its floor has passed and nothing waits to be sent: :func:`pull_checks_forward`). The
    second matters once traffic stops: with no check due, no poller runs to pull one. One round trip
    for all (the sweep asks about every sending job)."""
    pipe = client.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.zrangebyscore(keys.polls(job_id), "-inf", now_ms, start=0, num=1)
        pipe.zrangebyscore(keys.check_floors(job_id), "-inf", now_ms, start=0, num=1)
        pipe.llen(keys.sealed(job_id))
    replies = pipe.execute() if job_ids else []
    out: set[str] = set()
    for n, job_id in enumerate(job_ids):
        due, pullable, sealed = replies[3 * n : 3 * n + 3]
        if due or (pullable and not sealed):
            out.add(job_id)
    return out


def pull_checks_forward(
    client: redis.Redis, job_ids: Sequence[str], now_ms: int, interval_ms: float, limit: int
) -> int:
    """For each job, bring up to ``limit`` checks forward into the free slots of its next ``limit``
    spare intervals (``interval_ms`` apart from ``now_ms`` on), the longest past their floor first,
    each no earlier than its floor (:meth:`JobBuffer.schedule_check`); returns how many moved.

    For a key with requests to spare: a check put far out to keep status traffic inside the poll
    share while sends waited stays there after the sends stop, and the users of its batch wait
    for it (a change behind an unfinished batch is held until the batch is confirmed). The
    candidates come from the floors' own ZSET, not from the head of the schedule: a 1 M-user run
    left far backfill checks behind a hundred real-time ones, out of reach of a head-only read
    (bench/RESULTS.md, scale-backlog). A slot a check already holds stays its own; a check only
    ever moves earlier (``ZADD XX LT``), and one completed or sent again meanwhile is not put back.

    All jobs together take at most three round trips (the poller runs this for every job of its key
    each round with nothing due)."""
    horizon = now_ms + limit * interval_ms
    pipe = client.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.zrangebyscore(keys.polls(job_id), "-inf", horizon, start=0, num=limit, withscores=True)
        pipe.zrangebyscore(keys.check_floors(job_id), "-inf", horizon, start=0, num=limit, withscores=True)
    replies = cast("list[list[tuple[bytes, float]]]", pipe.execute() if job_ids else [])
    pulled = [(job_id, replies[2 * n], replies[2 * n + 1]) for n, job_id in enumerate(job_ids)]
    pulled = [(job_id, soon, candidates) for job_id, soon, candidates in pulled if candidates]
    if not pulled:
        return 0
    pipe = client.pipeline(transaction=False)
    for job_id, _soon, candidates in pulled:
        pipe.zmscore(keys.polls(job_id), [text(bid) for bid, _floor in candidates])
    all_dues = pipe.execute()
    moves: dict[str, dict[bytes, int]] = {}
    for (job_id, soon, candidates), dues in zip(pulled, all_dues, strict=True):
        taken = {max(0, int((due - now_ms) // interval_ms)) for _bid, due in soon}
        moved: dict[bytes, int] = {}
        for (bid, floor), due in zip(candidates, dues, strict=True):
            if due is None or due <= horizon:
                continue  # completed or sent again meanwhile, or due within reach already
            k = max(0, math.ceil((floor - now_ms) / interval_ms))
            while k in taken:
                k += 1
            if k < limit:
                taken.add(k)
                moved[bid] = int(now_ms + k * interval_ms)
        if moved:
            moves[job_id] = moved
    if moves:
        pipe = client.pipeline(transaction=False)
        for job_id, moved in moves.items():
            pipe.zadd(keys.polls(job_id), moved, xx=True, lt=True)
        pipe.execute()
    return sum(len(moved) for moved in moves.values())


def identifier_list(identifiers: Mapping[str, Any]) -> str:
    """A record's identifiers as the buffer compares them: ``type:value`` strings joined by tabs.

    ``{"email": "a@x.io", "customIdentifiers": [{"key": "loyalty", "value": "7"}]}`` gives
    ``"email:a@x.io\tcustom:loyalty:7"``. Values come normalised from the mapping (emails lowercased,
    phones E.164). A tab or newline in a value (buffer.lua keeps a held change's identifiers on one
    line) becomes a space: at worst two odd values compare equal and a batch is sealed needlessly.
    """
    parts = []
    for name, value in identifiers.items():
        if name == "customIdentifiers":
            parts += [f"custom:{item['key']}:{item['value']}" for item in value]
        else:
            parts.append(f"{name}:{value}")
    joined = "\t".join(parts)
    if "\n" in joined or joined.count("\t") >= len(parts):  # a stray tab or newline in a value
        joined = "\t".join(p.replace("\t", " ").replace("\n", " ") for p in parts)
    return joined


class BatchDataMissing(LookupError):
    """A claimed batch's records are gone from Redis (completed by a twin, or data lost)."""

    def __init__(self, batch_id: int, users: list[str]) -> None:
        super().__init__(f"batch {batch_id}: records missing")
        self.batch_id = batch_id
        self.users = users


@dataclass(frozen=True, slots=True)
class ClaimedBatch:
    """A sealed batch a flush owns under a lease: per user, its entry as stored (see :func:`entry_json`)."""

    batch_id: int
    users: list[str]
    entries: list[bytes]
    attempts: int
    token: str
    #: Indices of users already finished for good in an earlier send (delivered by a completed
    #: Attentive job, or refused and dead-lettered): a re-send leaves them out.
    settled: frozenset[int] = frozenset()
    #: Sealed batches of the job still queued behind this one when it was claimed.
    queued_behind: int = 0
    #: Indices of users carried by Attentive jobs of an earlier send that are still unfinished: this
    #: send leaves them out, the poll follows those jobs.
    carried: frozenset[int] = frozenset()
    #: The ``unknown:`` job the claim recorded for the send about to go out (every user neither
    #: settled nor carried), '' for none: see :meth:`JobBuffer.claim`.
    pending_send: str = ""
    #: The hold (ms) that recorded send got, for the sends of a split that follow it.
    hold_ms: int = 0

    @property
    def records(self) -> list[list[dict[str, Any]]]:
        """Each user's pending records, oldest first (parsed on every call)."""
        return [entry_records(e) for e in self.entries]


class JobBuffer:
    """Buffer operations for one export job. Cheap to construct; holds no state of its own."""

    def __init__(self, client: redis.Redis, job_id: str, batch_size: int = 256) -> None:
        self._redis = client
        self.job_id = job_id
        self.batch_size = batch_size
        self._keys = [
            keys.open_entries(job_id),
            keys.open_order(job_id),
            keys.open_since(job_id),
            keys.last_writer(job_id),
            keys.outstanding(job_id),
            keys.waiting(job_id),
            keys.sealed(job_id),
            keys.batch_seq(job_id),
            keys.job_status(job_id),
            keys.leases(job_id),
            keys.polls(job_id),
            keys.open_identifiers(job_id),
            keys.in_flight(job_id),
            keys.last_writer_meta(job_id),
            keys.check_floors(job_id),
        ]
        self._batch_prefix = keys.batch(job_id, "")

    def _run(self, op: str, *args: Any, now: int | None = None) -> Any:
        argv = [op, now if now is not None else now_ms(), self._batch_prefix, self.batch_size, *args]
        return scripts.script(self._redis, "buffer")(keys=self._keys, args=argv)

    # --- ingest side ----------------------------------------------------------------------------
    def ingest(self, changes: Sequence[Change], now: int | None = None) -> IngestOutcome:
        """Add changes atomically: stale ones dropped, conflicts (a user's second change for an
        audience, or an identifier another user of the open batch carries) sealed first, busy users
        queued."""
        return self._place("ingest", changes, now)

    def redrive(self, changes: Sequence[Change]) -> IngestOutcome:
        """Place dead-lettered changes again, each with the time :meth:`stamps` gave it; ``stale``
        counts those a newer change of their (user, audience) superseded since."""
        return self._place("redrive", changes, None)

    def _place(self, op: str, changes: Sequence[Change], now: int | None) -> IngestOutcome:
        if not changes:
            return IngestOutcome(0, 0, 0, 0, [])
        args: list[Any] = []
        digest = keys.lww_digest
        for c in changes:
            args += [
                c.user_key,
                c.audience,
                c.at_ms,
                c.record_json,
                c.identifiers,
                digest(c.user_key, c.audience),
            ]
        accepted, merged, queued, stale, sealed, shared, legacy = self._run(op, *args, now=now)
        if legacy:
            # The job still has last-writer-wins state in the old layout: move some of it on.
            self.migrate_last_writer()
        return IngestOutcome(
            int(accepted), int(merged), int(queued), int(stale), [int(b) for b in sealed], int(shared)
        )

    # --- last-writer-wins state (buffer.lua header) ----------------------------------------------
    def last_accepted(self, pairs: Sequence[tuple[str, str]]) -> list[int | None]:
        """The newest accepted event time (ms) of each (user key, audience), None where none was."""
        args: list[Any] = []
        for user, audience in pairs:
            args += [user, audience, keys.lww_digest(user, audience)]
        got = self._run("lww_get", *args) if args else []
        return [int(t) if t is not None else None for t in got]

    def stamps(self, users: Sequence[str], entries: Sequence[bytes]) -> dict[str, dict[str, int | None]]:
        """Per user about to be dead-lettered from an unfinished batch (its stored entry beside it),
        each audience of the entry with the event time a re-drive may send it at; None where a newer
        change of that audience is already held (it will deliver the final value)."""
        pairs = [
            (user, aud) for user, entry in zip(users, entries, strict=True) for aud in entry_audiences(entry)
        ]
        args: list[Any] = []
        for user, audience in pairs:
            args += [user, audience, keys.lww_digest(user, audience)]
        got = self._run("stamp", *args) if args else []
        out: dict[str, dict[str, int | None]] = {}
        for (user, audience), t in zip(pairs, got, strict=True):
            out.setdefault(user, {})[audience] = int(t) if t is not None else None
        return out

    def migrate_last_writer(self, count: int = MIGRATE_STEP) -> int:
        """Move about ``count`` entries of the job's old last-writer-wins HASH into the buckets (each
        ingest call while it exists does this once); returns its entries left, 0 once it is gone.

        Safe to run anywhere, any number of times: the script re-reads every entry it moves, and until
        the HASH is gone every read takes the newer of both layouts.
        """
        legacy = keys.last_writer(self.job_id)
        cursor = int(self._redis.hget(keys.last_writer_meta(self.job_id), "cursor") or 0)
        cursor, fields = self._redis.hscan(legacy, cursor, count=count)
        args: list[Any] = [cursor]
        for name in fields:
            raw = name.encode() if isinstance(name, str) else name
            audience, _, user = raw.partition(b"|")  # slugs never hold "|"; user keys may
            args += [user, audience, keys.lww_digest(user, audience)]
        return int(self._run("lww_migrate", *args))

    def seal_due(self, interval_ms: int, now: int | None = None) -> list[int]:
        """Seal the open batch if its oldest entry has waited ``interval_ms``; returns sealed ids."""
        return [int(b) for b in self._run("seal_due", interval_ms, now=now)]

    def seal_now(self) -> list[int]:
        return [int(b) for b in self._run("seal_now")]

    # --- flush side -----------------------------------------------------------------------------
    def claim(
        self, lease_ms: int, now: int | None = None, hold_ms: int | None = None, slack_ms: int = 0
    ) -> ClaimedBatch | None:
        """Take the oldest sealed batch under a lease, with its entries; None when nothing is ready.

        With ``hold_ms`` (the uncertain-send hold's floor) the send about to go out is recorded in the
        same step as an ``unknown:`` job (:attr:`ClaimedBatch.pending_send`), held ``slack_ms`` longer
        than :meth:`record_accepted` would hold it: one script call per batch instead of two.
        """
        token = secrets.token_hex(8)
        args: list[Any] = [token, lease_ms] if hold_ms is None else [token, lease_ms, hold_ms, slack_ms]
        got = self._run("claim", *args, now=now)
        if got is None:
            return None
        raw_bid, users_json, attempts, settled, left, carried, pending, hold = got
        bid = int(raw_bid)
        users: list[str] = orjson.loads(users_json)
        entries: list[bytes] = []
        for entry in self._redis.hmget(f"{self._batch_prefix}{bid}:entries", users):
            if entry is None:
                # Never back to the front of the queue: it would be claimed again first, forever.
                raise BatchDataMissing(bid, users)
            entries.append(entry.encode() if isinstance(entry, str) else entry)
        return ClaimedBatch(
            bid,
            users,
            entries,
            int(attempts or 0),
            token,
            frozenset(orjson.loads(settled)),
            int(left),
            frozenset(orjson.loads(carried)),
            text(pending),
            int(hold),
        )

    def release(self, batch: ClaimedBatch) -> bool:
        """Give a claimed batch back, unsent, to the front of the queue."""
        return bool(self._run("release", batch.batch_id, batch.token))

    def record_accepted(self, batch_id: int, job: dict[str, Any], replaces: str = "") -> bool:
        """Record one request Attentive accepted (``{"id", "idx"}``), or may have (an ``unknown:`` id
        with ``until``), the moment it happens: the batch completes only once it has finished.

        ``replaces`` names a recorded job this one stands in for (the ``unknown:`` entry written just
        before the request went out), removed in the same step. Whoever owns the batch: a job
        Attentive runs must be polled however this send ends. False only when the batch is gone
        (completed), which a live send cannot see.
        """
        return bool(self._run("accepted", batch_id, json.dumps(job, separators=(",", ":")), replaces))

    def forget_job(self, batch_id: int, job_id: str) -> bool:
        """Remove a recorded ``unknown:`` entry once the request it stood for got an answer that
        says Attentive did not accept it (a 400, 429 or 5xx)."""
        return bool(self._run("accepted", batch_id, "", job_id))

    def end_job(self, batch_id: int, job_id: str, reason: str, *, failed: bool = False) -> bool:
        """Mark one recorded job finished without delivering; ``failed`` counts it toward the batch's
        failed sends. True only for the first call per job (twin polls count nothing twice)."""
        return bool(self._run("ended", batch_id, job_id, reason, "1" if failed else "0"))

    def mark_submitted(
        self,
        batch: ClaimedBatch,
        first_check_ms: int,
        settled: Iterable[int] = (),
    ) -> bool:
        """Hand the batch to the poller, its first status check due at ``first_check_ms`` (its jobs
        were recorded by :meth:`record_accepted`), with the users now settled for good (refused and
        dead-lettered); False if the lease was lost meanwhile."""
        return bool(
            self._run(
                "submitted",
                batch.batch_id,
                batch.token,
                first_check_ms,
                json.dumps(sorted(batch.settled.union(settled))),
            )
        )

    def schedule_check(self, batch_id: int, due_ms: int, floor_ms: int | None = None) -> bool:
        """Set when the batch's next status check is due; False (and off the schedule) if it is no
        longer at Attentive (sent again or completed meanwhile).

        ``floor_ms``: the earliest the check may be brought forward to when the key has requests to
        spare (:func:`pull_checks_forward`); without it the check stays at ``due_ms``.
        """
        if floor_ms is None:
            return bool(self._run("poll_due", batch_id, due_ms))
        return bool(self._run("poll_due", batch_id, due_ms, min(floor_ms, due_ms)))

    def pull_checks_forward(self, now_ms: int, interval_ms: float, limit: int) -> int:
        """:func:`pull_checks_forward` for this job alone."""
        return pull_checks_forward(self._redis, [self.job_id], now_ms, interval_ms, limit)

    def resend(self, batch_id: int, reason: str) -> bool:
        """Put a submitted batch whose jobs have all finished, with users still open, back at the front
        of the queue (a job failed or was lost, a send's answer never came, a split stopped half way)."""
        return bool(self._run("resend", batch_id, reason))

    def complete(self, batch_id: int, counters: dict[str, int] | None = None) -> list[int]:
        """Finish a batch: delete its data, free its users, move their waiting changes on.

        Returns ids of batches sealed as a result (waiting changes can fill the open batch).
        """
        args: list[Any] = [batch_id]
        for name, value in (counters or {}).items():
            args += [name, value]
        _done, sealed = self._run("complete", *args)
        return [int(b) for b in sealed]

    def reap(self, now: int | None = None) -> int:
        """Re-queue batches whose flush lease expired; returns how many went back to the queue."""
        return int(self._run("reap", now=now))

    # --- reads ----------------------------------------------------------------------------------
    def batch(self, batch_id: int) -> dict[str, str]:
        return decode_hash(self._redis.hgetall(keys.batch(self.job_id, batch_id)))

    def entries(self, batch_id: int, users: Sequence[str]) -> list[bytes]:
        """The stored entries of ``users`` in a sealed batch, in that order.

        A batch's entries never change until it completes, so reading them outside the script is safe.
        Raises:
            LookupError: an entry is missing (the batch completed meanwhile, or its data was lost).
        """
        if not users:
            return []
        found: list[bytes] = []
        for entry in self._redis.hmget(keys.batch_entries(self.job_id, batch_id), list(users)):
            if entry is None:
                raise LookupError(f"job {self.job_id} batch {batch_id}: user entries missing")
            found.append(entry.encode() if isinstance(entry, str) else entry)
        return found

    def batch_exists(self, batch_id: int) -> bool:
        return bool(self._redis.exists(keys.batch(self.job_id, batch_id)))

    def records_for(
        self, batch_id: int, users: Sequence[str]
    ) -> tuple[list[dict[str, Any] | None], dict[str, dict[str, int | None]]]:
        """Each user's request item in a batch, for dead letters (None where the data is lost), and
        the users' re-drive times (:meth:`stamps`; none where the data is lost).

        Raises:
            LookupError: the batch no longer exists (a twin task completed it).
        """
        try:
            found = self.entries(batch_id, users)
        except LookupError:
            if not self.batch_exists(batch_id):
                raise
            return [None] * len(users), {}
        return [entry_record(e) for e in found], self.stamps(users, found)

    def open_size(self) -> int:
        return int(self._redis.llen(keys.open_order(self.job_id)))

    def open_users(self) -> list[str]:
        """Users in the open batch, in arrival order."""
        return [text(u) for u in self._redis.lrange(keys.open_order(self.job_id), 0, -1)]

    def sealed_count(self) -> int:
        return int(self._redis.llen(keys.sealed(self.job_id)))

    def waiting_users(self) -> int:
        return int(self._redis.hlen(keys.waiting(self.job_id)))

    def outstanding_users(self) -> int:
        return int(self._redis.hlen(keys.outstanding(self.job_id)))


def _split_entry(entry: bytes) -> tuple[int, bytes]:
    """(number of records, the JSON array text of them) from ``|aud|aud|<TAB>[record,...]``."""
    tab = entry.index(b"\t")
    # One record per audience: each change appends one of each (buffer.lua keeps them paired).
    return entry.count(b"|", 0, tab) - 1, entry[tab + 1 :]


def entry_audiences(entry: bytes) -> list[str]:
    """The audiences of one stored entry, in the order of its records."""
    return entry[1 : entry.index(b"\t") - 1].decode().split("|")


def entry_records(entry: bytes) -> list[dict[str, Any]]:
    """The records of one stored entry, oldest first."""
    records: list[dict[str, Any]] = orjson.loads(_split_entry(entry)[1])
    return records


def entry_record(entry: bytes) -> dict[str, Any]:
    """The request item of one stored entry: its records merged (see :func:`merge_records`)."""
    return merge_records(entry_records(entry))


def entry_json(entry: bytes) -> bytes:
    """The request item of one stored entry as JSON text.

    Usually the entry holds one record, whose text is sliced out as it is: no parse and re-encode
    on the flush path. Several records are merged first.
    """
    count, array = _split_entry(entry)
    if count == 1:
        return array[1:-1]
    return orjson.dumps(entry_record(entry))


def merge_records(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One request entry from a user's pending records, later values winning.

    Records of one entry touch different audiences (the buffer guarantees it), so merging only
    combines independent attributes; profile fields take the newest values.
    """
    if len(records) == 1:
        return records[0]
    merged: dict[str, Any] = {}
    for record in records:
        _deep_update(merged, record)
    return merged


def _deep_update(target: dict[str, Any], source: dict[str, Any]) -> None:
    for key, value in source.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        elif isinstance(value, dict):
            target[key] = {}
            _deep_update(target[key], value)
        else:
            target[key] = value
