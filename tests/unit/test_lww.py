"""Last-writer-wins state in buckets (buffer.lua header), run on fakeredis and on a real Redis.

What must hold whatever the layout: per (user, audience), a change as old as or older than the
newest accepted one is stale, exactly, however many buckets the job has grown into; audiences are
independent; a job written by the old layout (one HASH ``audience|user``) never accepts a stale
change after the upgrade; and a digest collision costs at most the two pairs that share it.
"""

from __future__ import annotations

import json
import string
from typing import Any

import fakeredis
import pytest

from worker.pipeline.buffer import Change, JobBuffer
from worker.setup.purge import purge_job_data
from worker.store import keys

JOB = "lww1"


def change(user: str, audience: str, at: int) -> Change:
    record = {"identifiers": {"email": user}, "attributes": {"custom": {audience: True}}}
    return Change(user, audience, at, json.dumps(record))


def meta(client: Any, job: str = JOB) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in client.hgetall(keys.last_writer_meta(job)).items()}


def buckets(client: Any, job: str = JOB) -> dict[int, dict[bytes, int]]:
    """Bucket number -> its fields and times."""
    shape = meta(client, job)
    count = 2 ** shape.get("level", 0) + shape.get("split", 0)
    out = {}
    for b in range(count):
        raw = client.hgetall(keys.last_writer_bucket(job, b))
        if raw:
            out[b] = {f: int(t) for f, t in raw.items()}
    return out


def ingest_all(buf: JobBuffer, changes: list[Change], chunk: int = 512) -> tuple[int, int]:
    """(taken, stale) over every change, in script calls of ``chunk`` like worker.pipeline.ingest."""
    taken = stale = 0
    for s in range(0, len(changes), chunk):
        out = buf.ingest(changes[s : s + chunk])
        taken += out.accepted + out.merged + out.queued
        stale += out.stale
    return taken, stale


def test_digest_is_printable_and_shared_by_a_users_audiences() -> None:
    a, b = keys.lww_digest("u@x.io", "vip"), keys.lww_digest("u@x.io", "lapsed")
    allowed = set(
        (string.digits + ":;<=>?@" + string.ascii_uppercase + "[\\]^_`" + "abcdefghijklmno").encode()
    )
    assert len(a) == len(b) == 15 and set(a) <= allowed and set(b) <= allowed
    assert a[:5] == b[:5] and a != b  # one bucket per user, one field per audience
    assert keys.lww_digest(b"u@x.io", b"vip") == a  # the drain passes bytes from the old HASH


def test_stale_detection_is_exact_across_many_buckets(any_redis: Any) -> None:
    buf = JobBuffer(any_redis, JOB)
    users = [f"user{i}@x.io" for i in range(1500)]
    first = [change(u, aud, 1000 + i) for i, u in enumerate(users) for aud in ("vip", "lapsed")]
    assert ingest_all(buf, first) == (len(first), 0)
    shape = meta(any_redis)
    assert shape["n"] == len(first)
    stored = buckets(any_redis)
    assert len(stored) > 64  # the job grew into many buckets, split one at a time
    assert sum(len(b) for b in stored.values()) == len(first)
    assert max(len(b) for b in stored.values()) <= 128  # each small enough to stay a listpack
    # Every pair: the same time and an older one are stale, a newer one is taken.
    replay = [change(c.user_key, c.audience, c.at_ms - d) for c in first for d in (0, 1)]
    assert ingest_all(buf, replay) == (0, len(replay))
    newer = [change(c.user_key, c.audience, c.at_ms + 5) for c in first]
    assert ingest_all(buf, newer) == (len(newer), 0)
    pairs = [(c.user_key, c.audience) for c in first]
    assert buf.last_accepted(pairs) == [c.at_ms + 5 for c in first]
    assert meta(any_redis)["n"] == len(first)  # updates add no pair


def test_splits_between_ops_keep_every_time(any_redis: Any) -> None:
    """Growth in small steps: every op splits a bucket or two; nothing is lost or duplicated."""
    buf = JobBuffer(any_redis, JOB)
    for i in range(300):
        buf.ingest([change(f"s{i}@x.io", "vip", 10_000 + i), change(f"s{i}@x.io", "lapsed", 20_000 + i)])
    got = buf.last_accepted([(f"s{i}@x.io", aud) for i in range(300) for aud in ("vip", "lapsed")])
    assert got == [t for i in range(300) for t in (10_000 + i, 20_000 + i)]
    assert sum(len(b) for b in buckets(any_redis).values()) == meta(any_redis)["n"] == 600


def test_splits_made_by_a_read_are_recorded(any_redis: Any) -> None:
    """Any op may have to split before it reads (here a read-only one, after the pair count was
    raised behind its back); the new shape is recorded at once, or later ops would look in the
    wrong buckets and take stale changes."""
    buf = JobBuffer(any_redis, JOB)
    first = [change(f"r{i}@x.io", "vip", 1_000 + i) for i in range(60)]
    buf.ingest(first)
    before = len(buckets(any_redis))
    any_redis.hset(keys.last_writer_meta(JOB), "n", 2_000)
    assert buf.last_accepted([(c.user_key, c.audience) for c in first]) == [c.at_ms for c in first]
    assert len(buckets(any_redis)) > before
    assert buf.ingest(first).stale == len(first)


def test_audiences_of_a_user_are_independent(any_redis: Any) -> None:
    buf = JobBuffer(any_redis, JOB)
    assert buf.ingest([change("a@x.io", "vip", 500)]).accepted == 1
    # An older change for another audience is not stale: that audience has seen nothing yet.
    out = buf.ingest([change("a@x.io", "lapsed", 100)])
    assert (out.stale, out.accepted + out.merged + out.queued) == (0, 1)
    assert buf.ingest([change("a@x.io", "lapsed", 100)]).stale == 1
    assert buf.ingest([change("a@x.io", "vip", 499)]).stale == 1
    assert buf.last_accepted([("a@x.io", "vip"), ("a@x.io", "lapsed"), ("a@x.io", "churn")]) == [
        500,
        100,
        None,
    ]


def test_one_op_with_several_changes_for_a_pair_keeps_the_newest(any_redis: Any) -> None:
    buf = JobBuffer(any_redis, JOB)
    out = buf.ingest([change("a@x.io", "vip", 1), change("a@x.io", "vip", 3), change("a@x.io", "vip", 2)])
    assert out.stale == 1 and out.accepted + out.merged + out.queued == 2
    assert buf.last_accepted([("a@x.io", "vip")]) == [3]


def legacy(client: Any, entries: dict[tuple[str, str], int], job: str = JOB) -> None:
    """Write last-writer-wins state as the old script did: one HASH ``audience|user`` -> ms."""
    client.hset(
        keys.last_writer(job), mapping={f"{aud}|{user}": str(t) for (user, aud), t in entries.items()}
    )


def test_old_layout_is_honoured_then_moved_into_buckets(any_redis: Any) -> None:
    old = {(f"o{i}@x.io", "vip"): 5_000 + i for i in range(40)}
    old[("pipe|user@x.io", "lapsed")] = 7_000  # a user key may hold the separator
    legacy(any_redis, old)
    buf = JobBuffer(any_redis, JOB, batch_size=1000)
    # Before anything moved: times of the old layout are read.
    assert buf.last_accepted(list(old)) == list(old.values())
    # The upgrade never accepts a stale change: equal and older ones are stale, newer ones taken.
    out = buf.ingest(
        [change("o0@x.io", "vip", 5_000), change("o1@x.io", "vip", 4_000), change("o2@x.io", "vip", 6_000)]
    )
    assert (out.stale, out.accepted) == (2, 1)
    # That ingest found the old HASH and drained it (it is small); every time survived.
    assert any_redis.exists(keys.last_writer(JOB)) == 0
    expected = {**old, ("o2@x.io", "vip"): 6_000}
    assert buf.last_accepted(list(expected)) == list(expected.values())
    assert buf.ingest([change("pipe|user@x.io", "lapsed", 7_000)]).stale == 1
    assert meta(any_redis)["n"] == len(old)
    assert "cursor" not in meta(any_redis)


def test_drain_in_steps_while_changes_arrive(any_redis: Any) -> None:
    old = {(f"d{i}@x.io", aud): 1_000 + i for i in range(300) for aud in ("vip", "lapsed")}
    legacy(any_redis, old)
    buf = JobBuffer(any_redis, JOB)
    left = buf.migrate_last_writer(count=100)
    assert 0 < left < len(old)
    # A newer change for a pair still in the old HASH, and a stale one for a pair already moved.
    moved = next(
        pair for pair in old if any_redis.hget(keys.last_writer(JOB), f"{pair[1]}|{pair[0]}") is None
    )
    still = next(
        pair for pair in old if any_redis.hget(keys.last_writer(JOB), f"{pair[1]}|{pair[0]}") is not None
    )
    out = buf.ingest([change(*moved, old[moved]), change(*still, old[still] + 1)])
    assert out.stale == 1 and out.accepted + out.merged + out.queued == 1
    while buf.migrate_last_writer(count=100):
        pass
    assert any_redis.exists(keys.last_writer(JOB)) == 0
    expected = {**old, still: old[still] + 1}
    assert buf.last_accepted(list(expected)) == list(expected.values())
    assert meta(any_redis)["n"] == len(old) == sum(len(b) for b in buckets(any_redis).values())
    assert buf.migrate_last_writer() == 0


def test_old_layout_written_after_the_buckets_still_wins_when_newer(any_redis: Any) -> None:
    """An old worker still running during a rolling upgrade writes the old HASH: the newer of the
    two layouts counts, and the drain keeps it."""
    buf = JobBuffer(any_redis, JOB)
    buf.ingest([change("m@x.io", "vip", 100)])
    legacy(any_redis, {("m@x.io", "vip"): 200})
    assert buf.last_accepted([("m@x.io", "vip")]) == [200]
    assert buf.ingest([change("m@x.io", "vip", 150)]).stale == 1
    assert buf.last_accepted([("m@x.io", "vip")]) == [200]
    assert any_redis.exists(keys.last_writer(JOB)) == 0


def test_a_digest_collision_costs_only_the_two_pairs(any_redis: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two pairs sharing a digest (about 1e-9 per job of 10M users x 5 audiences) share one time:
    the pair with the older events sees its changes counted stale until they pass the other's. No
    error, no other pair touched."""
    real = keys.lww_digest

    def colliding(user: str | bytes, audience: str | bytes) -> bytes:
        if user in ("x@x.io", "y@x.io"):
            return real("x@x.io", "vip")
        return real(user, audience)

    monkeypatch.setattr(keys, "lww_digest", colliding)
    buf = JobBuffer(any_redis, JOB)
    others = [change(f"o{i}@x.io", "vip", 100) for i in range(50)]
    out = buf.ingest([change("x@x.io", "vip", 200), *others])
    assert out.accepted == 51
    assert buf.ingest([change("y@x.io", "lapsed", 150)]).stale == 1  # the cost: looks stale
    assert buf.ingest([change("y@x.io", "lapsed", 250)]).accepted == 1  # newer than both: taken
    assert buf.ingest([change("x@x.io", "vip", 220)]).stale == 1
    assert buf.last_accepted([(c.user_key, "vip") for c in others]) == [100] * 50


def test_a_bucket_that_outgrew_a_listpack_is_rewritten_when_split(any_redis: Any) -> None:
    """A bucket past 128 entries (many audiences per user) becomes a hashtable; its split writes
    what stays anew, a listpack again, with every time kept."""
    real = not isinstance(any_redis, fakeredis.FakeRedis)
    if real:  # as in redis.conf (a server started without one allows 512)
        setting = any_redis.config_get("hash-max-listpack-entries")["hash-max-listpack-entries"]
        any_redis.config_set("hash-max-listpack-entries", 128)
    try:
        entries = {(f"h{i}@x.io", aud): 1_000 + i for i in range(30) for aud in ("a", "b", "c", "d", "e")}
        fields = {keys.lww_digest(u, aud): t for (u, aud), t in entries.items()}
        any_redis.hset(keys.last_writer_bucket(JOB, 0), mapping=fields)  # one bucket holds all 150
        any_redis.hset(keys.last_writer_meta(JOB), mapping={"n": len(fields), "level": 0, "split": 0})
        if real:
            assert any_redis.object("encoding", keys.last_writer_bucket(JOB, 0)) == b"hashtable"
        buf = JobBuffer(any_redis, JOB)
        assert buf.ingest([change("h0@x.io", "a", 999)]).stale == 1  # the op split first, then read
        assert buf.last_accepted(list(entries)) == list(entries.values())
        stored = buckets(any_redis)
        assert len(stored) > 1 and max(len(b) for b in stored.values()) <= 128
        assert sum(len(b) for b in stored.values()) == len(entries)
        if real:
            encodings = {any_redis.object("encoding", keys.last_writer_bucket(JOB, b)) for b in stored}
            assert encodings == {b"listpack"}
    finally:
        if real:
            any_redis.config_set("hash-max-listpack-entries", setting)


def test_bucket_keys_carry_the_job_tag_so_delete_removes_them(any_redis: Any) -> None:
    buf = JobBuffer(any_redis, JOB)
    ingest_all(buf, [change(f"p{i}@x.io", "vip", 1) for i in range(400)])
    other = JobBuffer(any_redis, "lww2")
    other.ingest([change("p0@x.io", "vip", 1)])
    lww_keys = [k for k in any_redis.scan_iter(match=keys.job_keys_match(JOB)) if b":lww" in k]
    assert len(lww_keys) > 10
    purge_job_data(any_redis, JOB)
    assert [k for k in any_redis.scan_iter(match="*") if f"{{job:{JOB}}}".encode() in k] == []
    assert other.last_accepted([("p0@x.io", "vip")]) == [1]
