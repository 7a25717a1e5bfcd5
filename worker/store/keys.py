"""Every Redis key this service writes, in one place, and which keys share a Redis Cluster slot.

On a Redis Cluster (``worker.store.connection``) a script or a MULTI/EXEC may touch keys of one hash
slot only. The keys that go together carry one hash tag (the part of a key name inside the first
``{...}``, which alone decides its slot):

* A job's keys: ``{job:<id>}``. Its buffer, batches, last-writer-wins buckets, schedules, counters,
  dead letters and backfill progress live on one slot, so every buffer op is one script, and jobs
  spread over the cluster's nodes by their ids.
* An API key's rate limiter, 429 streak and poller: ``{rl:<key hash>}``.
* The job table and its version counter: the counter's tag is the table's whole name, the slot a
  key without a tag has, so a job change writes both in one MULTI (the table keeps its name).

The rest are one key each, read or written alone or in pipelines without MULTI: the
authorizations, the inbox chunks (spread by their ids) and its pending set, ingest counters,
heartbeats and the sweep lock. None is on the hot path: they take a write per chunk or sweep,
never one per change.
"""

from __future__ import annotations

from hashlib import blake2b as _blake2b

#: Prefix on every key, so the service can share a Redis with others and tests can clean up by pattern.
PREFIX = "aex"


def _job(job_id: str, suffix: str) -> str:
    return f"{PREFIX}:{{job:{job_id}}}:{suffix}"


def _glob_escape(value: str) -> str:
    """``value`` matched literally in a SCAN/ZSCAN ``MATCH`` pattern (Redis globs: ``* ? [ ] \\``)."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in value)


def job_keys_match(job_id: str) -> str:
    """SCAN ``MATCH`` pattern of every per-job key of one job (they all carry its hash tag).

    Deleting a job scans for it rather than listing key names, so a per-job key added later
    can never be left behind.
    """
    return _job(_glob_escape(job_id), "*")


# --- registries -------------------------------------------------------------------------------------
def authorizations() -> str:
    """Hash: authorization id -> encrypted JSON record."""
    return f"{PREFIX}:authorizations"


def jobs() -> str:
    """Hash: export job id -> JSON job record (config + state)."""
    return f"{PREFIX}:jobs"


def jobs_version() -> str:
    """STRING: incremented on every job change, so processes know to reload their job table.

    Its hash tag is :func:`jobs`'s whole name: on a Redis Cluster both share a slot, so a change
    writes the table and the counter in one MULTI.
    """
    return f"{PREFIX}:{{{jobs()}}}:version"


def ratelimit(key_hash: str) -> str:
    """String: GCRA theoretical arrival time (integer microseconds, Redis clock) for one Attentive API key.

    ``key_hash`` is :func:`worker.store.ratelimit.api_key_hash` of the key, never the key itself.
    """
    return f"{PREFIX}:{{rl:{key_hash}}}:tat"


def ratelimit_streak(key_hash: str) -> str:
    """String: 429s in a row for this API key across every worker (reset by a success, expires)."""
    return f"{PREFIX}:{{rl:{key_hash}}}:streak429"


def poller_lock(key_hash: str) -> str:
    """String (redis-py Lock): held by the one poller checking this API key's batches."""
    return f"{PREFIX}:{{rl:{key_hash}}}:poller"


def poller_queued(key_hash: str) -> str:
    """String with a TTL: a poller task for this API key is queued and has not started yet."""
    return f"{PREFIX}:{{rl:{key_hash}}}:poller:queued"


def poll_share(key_hash: str) -> str:
    """String: GCRA TAT of the schedule that caps this key's status checks at their share of its
    rate while sends wait; in the slot of the key's own schedule and poller lock, so one script
    renews the lock and takes from both (``RateLimiter.poll_token``)."""
    return f"{PREFIX}:{{rl:{key_hash}}}:polls:tat"


def ratelimit_backoff(key_hash: str) -> str:
    """String: epoch microseconds (Redis clock) until which every worker holds off this API key after a 429."""
    return f"{PREFIX}:{{rl:{key_hash}}}:backoff"


# --- per job ----------------------------------------------------------------------------------------
def job_status(job_id: str) -> str:
    """Hash of counters and last-seen values shown by ``status``."""
    return _job(job_id, "status")


def job_skips(job_id: str) -> str:
    """Hash: skip reason -> count."""
    return _job(job_id, "skips")


def job_deadletters(job_id: str) -> str:
    """LIST of JSON dead-letter records (user key, reason, record) an operator can read; the newest
    ``DEADLETTER_CAP`` are kept (worker.pipeline.deadletters)."""
    return _job(job_id, "deadletters")


def job_deliveries(job_id: str) -> str:
    """STREAM: the job's most recently completed batches (users, Attentive jobs, when), capped
    (worker.pipeline.deliveries), for ``attentive-export trace``."""
    return _job(job_id, "deliveries")


def job_deadletter_counts(job_id: str) -> str:
    """HASH: dead-letter reason class -> entries recorded, exact even for entries the cap dropped."""
    return _job(job_id, "deadletters:counts")


def open_entries(job_id: str) -> str:
    """HASH: user -> ``|aud|aud|<TAB>[record,...]``, the audiences and records pending in the open batch."""
    return _job(job_id, "open:entries")


def open_order(job_id: str) -> str:
    """LIST: users of the open (unsealed) batch in arrival order."""
    return _job(job_id, "open:order")


def open_since(job_id: str) -> str:
    """STRING: when the open batch got its first user (ms), for the interval seal."""
    return _job(job_id, "open:since")


def open_identifiers(job_id: str) -> str:
    """HASH: ``type:value`` identifier -> the user of the open batch carrying it, so two users sharing an
    identifier never travel in one request (cleared when the open batch is sealed)."""
    return _job(job_id, "open:identifiers")


def last_writer(job_id: str) -> str:
    """HASH: ``audience|user`` -> newest accepted event time (ms): last-writer-wins state as jobs kept it
    before :func:`last_writer_bucket`. Read as a fallback and drained while it exists; its name is also
    the prefix of the buckets."""
    return _job(job_id, "lww")


def last_writer_bucket(job_id: str, bucket: int) -> str:
    """HASH: :func:`lww_digest` -> newest accepted event time (ms), one bucket of a job's last-writer-wins
    state (buffer.lua derives these names from :func:`last_writer`; see its header)."""
    return _job(job_id, f"lww:{bucket}")


def last_writer_meta(job_id: str) -> str:
    """HASH: the shape of the job's last-writer-wins buckets (pairs, level, split pointer) and the
    cursor of the old layout's drain."""
    return _job(job_id, "lww:meta")


def lww_digest(user_key: str | bytes, audience: str | bytes) -> bytes:
    """The 15-character field naming one (user, audience) in the last-writer-wins buckets.

    5 characters from a hash of the user (buffer.lua reads them as a 30-bit number that picks the
    bucket, so a user's audiences share one), then 10 from a hash of (audience, user); 6 bits per
    character, drawn from the 64 printable ASCII characters ``0`` (0x30) to ``o`` (0x6F), so fields
    stay text. Two pairs of a job share a field with probability 2^-90 (different users) or 2^-60 (one
    user, two audiences); see README "Last-writer-wins state".
    """
    user = user_key.encode() if isinstance(user_key, str) else user_key
    aud = audience.encode() if isinstance(audience, str) else audience
    raw = _blake2b(user, digest_size=5).digest() + _blake2b(aud + b"|" + user, digest_size=10).digest()
    return raw.translate(_LWW_CHARS)


#: byte -> one of 64 printable characters (its low 6 bits + 0x30), for :func:`lww_digest`.
_LWW_CHARS = bytes(0x30 + (b & 0x3F) for b in range(256))


def outstanding(job_id: str) -> str:
    """HASH: user -> id of the unfinished (sealed, submitting or submitted) batch carrying the user."""
    return _job(job_id, "outstanding")


def waiting(job_id: str) -> str:
    """HASH: user -> changes held until the user's unfinished batch completes at Attentive."""
    return _job(job_id, "waiting")


def sealed(job_id: str) -> str:
    """LIST: ids of sealed batches ready to submit, oldest first."""
    return _job(job_id, "sealed")


def batch_seq(job_id: str) -> str:
    """STRING: batch id counter."""
    return _job(job_id, "batch:seq")


def batch(job_id: str, batch_id: int | str) -> str:
    """HASH: one batch (users in request order, state, attempts, owner, Attentive job ids)."""
    return _job(job_id, f"batch:{batch_id}")


def batch_entries(job_id: str, batch_id: int | str) -> str:
    """HASH: a batch's user -> entry, as in :func:`open_entries` (the open batch's hash, renamed)."""
    return _job(job_id, f"batch:{batch_id}:entries")


def flush_queued(job_id: str) -> str:
    """STRING with a TTL: a flush task for the job is queued and has not started yet."""
    return _job(job_id, "flush:queued")


def flush_running(job_id: str) -> str:
    """STRING with a TTL: a flush task for the job is claiming batches; newly sealed ones need no task."""
    return _job(job_id, "flush:running")


def in_flight(job_id: str) -> str:
    """ZSET: batch id -> when it was first sent to Attentive (ms), until it completes."""
    return _job(job_id, "inflight")


def sweep_lock() -> str:
    """STRING: lock held by the one sweep running (redis-py Lock, with a timeout)."""
    return f"{PREFIX}:sweep:lock"


def leases(job_id: str) -> str:
    """ZSET: batch id -> lease expiry (ms) while a flush task owns the batch."""
    return _job(job_id, "leases")


def polls(job_id: str) -> str:
    """ZSET: batch id -> when its next status check is due (ms), while it is at Attentive."""
    return _job(job_id, "polls")


def check_floors(job_id: str) -> str:
    """ZSET: batch id -> the earliest its status check may be brought forward to (ms), for checks
    spread out beyond their age rule while sends waited (worker.pipeline.buffer.JobBuffer.schedule_check)."""
    return _job(job_id, "polls:floors")


# --- inbox and ingest -------------------------------------------------------------------------------
def inbox_chunk(chunk_id: str) -> str:
    """LIST: raw transition JSON texts of one chunk, deleted once ingested."""
    return f"{PREFIX}:inbox:{chunk_id}"


def inbox_pending() -> str:
    """ZSET: chunk id -> written/re-driven at (ms); the sweep re-drives old entries."""
    return f"{PREFIX}:inbox:pending"


def inbox_claim(chunk_id: str) -> str:
    """STR with a TTL: the task ingesting the chunk (its Celery task id), so no other takes it.

    Its hash tag is the chunk's whole key name, so both share a Cluster slot and are deleted by one
    DEL. (Claims of releases before this one were named ``aex:inbox:<id>:claim``: a task of such a
    release still running during an upgrade is not seen, and may ingest a chunk a new drain takes
    too, which changes nothing: the newest event wins.)"""
    return f"{PREFIX}:inbox:{{{inbox_chunk(chunk_id)}}}:claim"


def inbox_drain_queued() -> str:
    """STR with a TTL: a drain task is queued and has not started (one at a time)."""
    return f"{PREFIX}:inbox:drain_queued"


def ingest_status() -> str:
    """HASH: counters for transitions before routing (received, rejected by reason, unroutable)."""
    return f"{PREFIX}:ingest:status"


def job_field_drops(job_id: str) -> str:
    """HASH: field drop reason -> count (a field left out of a record, the record still sent)."""
    return _job(job_id, "field_drops")


# --- backfill (worker/backfill.py) ------------------------------------------------------------------
def backfill_parts(job_id: str) -> str:
    """SET: the parts of a job's backfill: audience slugs scanned from Lytics, and ``@file``."""
    return _job(job_id, "backfill:parts")


def backfill_part(job_id: str, part: str) -> str:
    """HASH: one backfill part's progress (scan token, pages, members, finished, last error, times)."""
    return _job(job_id, f"backfill:part:{part}")


def backfill_lock(job_id: str, part: str) -> str:
    """STRING: lock held by the one task working on a backfill part (redis-py Lock, with a timeout)."""
    return _job(job_id, f"backfill:lock:{part}")


def backfill_file_queue(job_id: str) -> str:
    """LIST: ids of file-backfill chunks not yet ingested, oldest first."""
    return _job(job_id, "backfill:file:queue")


def backfill_file_chunk(job_id: str, chunk_id: str) -> str:
    """LIST: canonical transition JSON lines of one file-backfill chunk."""
    return _job(job_id, f"backfill:file:chunk:{chunk_id}")


def backfill_file_producer(job_id: str) -> str:
    """STRING with a TTL: the token of the one ``attentive-export backfill`` streaming a file into the
    job's ``@file`` part, refreshed while it runs; the part does not finish while it is set."""
    return _job(job_id, "backfill:file:producer")


def backfill_due(job_id: str) -> str:
    """ZSET: part -> time (ms) after which the sweep re-drives the part if it made no progress.

    Under the job's tag, so it is written in the same MULTI as the parts on a Redis Cluster too.
    """
    return _job(job_id, "backfill:due")


def legacy_backfill_due() -> str:
    """ZSET: ``<job id>|<part>`` -> time: every job's :func:`backfill_due` in one key, as releases
    before Redis Cluster support kept it. The sweep moves its entries to their jobs and it goes."""
    return f"{PREFIX}:backfill:due"


def legacy_backfill_due_match(job_id: str) -> str:
    """ZSCAN ``MATCH`` pattern of one job's members of :func:`legacy_backfill_due`."""
    return f"{_glob_escape(job_id)}|*"


# --- liveness (worker/observe/heartbeat.py) ---------------------------------------------------------
def heartbeat(component: str) -> str:
    """STRING: when ``component`` last beat (ms): ``beat`` published a sweep (with a TTL), ``sweep`` ran."""
    return f"{PREFIX}:heartbeat:{component}"


def worker_heartbeat(node: str) -> str:
    """STRING with a TTL: when the Celery worker ``node`` (``name@host``) last beat (ms)."""
    return f"{PREFIX}:heartbeat:worker:{node}"


def worker_heartbeats() -> str:
    """ZSET: worker node -> last beat (ms), so readers list workers without SCAN; pruned on write."""
    return f"{PREFIX}:heartbeat:workers"
