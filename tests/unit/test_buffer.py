"""The buffer script's ordering rules, run on fakeredis and on a real Redis."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis

from worker.pipeline.buffer import BatchDataMissing, Change, JobBuffer, entry_json, merge_records
from worker.store import keys


def change(user: str, audience: str, at: int, flag: bool = True, **extra: Any) -> Change:
    record = {"identifiers": {"email": user}, "attributes": {"custom": {audience: flag, **extra}}}
    return Change(user, audience, at, json.dumps(record))


def flags(batch_records: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [merge_records(recs)["attributes"]["custom"] for recs in batch_records]


def test_full_batch_is_sealed_at_batch_size(any_redis: Any) -> None:
    buf = JobBuffer(any_redis, "j1", batch_size=3)
    out = buf.ingest([change(f"u{i}@x.io", "vip", 1) for i in range(4)])
    assert out.accepted == 4
    assert out.sealed == [1]
    assert buf.open_size() == 1
    claimed = buf.claim(lease_ms=10_000)
    assert claimed is not None
    assert claimed.users == ["u0@x.io", "u1@x.io", "u2@x.io"]


def test_stale_and_duplicate_transitions_are_dropped(any_redis: Any) -> None:
    buf = JobBuffer(any_redis, "j1")
    assert buf.ingest([change("a@x.io", "vip", 100)]).accepted == 1
    out = buf.ingest([change("a@x.io", "vip", 100), change("a@x.io", "vip", 99, flag=False)])
    assert (out.accepted, out.stale) == (0, 2)


def test_change_for_other_audience_merges_into_pending_entry(any_redis: Any) -> None:
    buf = JobBuffer(any_redis, "j1")
    out = buf.ingest([change("a@x.io", "vip", 1), change("a@x.io", "lapsed", 2, flag=False)])
    assert (out.accepted, out.merged, out.sealed) == (1, 1, [])
    buf.seal_now()
    claimed = buf.claim(10_000)
    assert claimed is not None and claimed.users == ["a@x.io"]
    assert flags(claimed.records) == [{"vip": True, "lapsed": False}]


def test_second_change_same_audience_seals_first_and_waits_for_completion(any_redis: Any) -> None:
    buf = JobBuffer(any_redis, "j1")
    out = buf.ingest(
        [change("a@x.io", "vip", 1), change("b@x.io", "vip", 1), change("a@x.io", "vip", 2, False)]
    )
    assert out.sealed == [1] and out.queued == 1
    first = buf.claim(10_000)
    assert first is not None and flags(first.records) == [{"vip": True}, {"vip": True}]
    # The exit waits: it is in no batch until batch 1 completes at Attentive.
    assert buf.seal_now() == []
    # Other users are not held back.
    buf.ingest([change("c@x.io", "vip", 3)])
    assert buf.seal_now() == [2]
    assert buf.record_accepted(first.batch_id, {"id": "job-1", "idx": [0, 1]})
    assert buf.mark_submitted(first, first_check_ms=10**13)
    buf.complete(first.batch_id)
    assert buf.waiting_users() == 0
    assert buf.open_size() == 1
    buf.seal_now()
    second = buf.claim(10_000)
    third = buf.claim(10_000)
    assert second is not None and third is not None
    assert (second.users, third.users) == (["c@x.io"], ["a@x.io"])
    assert flags(third.records) == [{"vip": False}]


def test_held_changes_coalesce_to_the_newest_per_audience(any_redis: Any) -> None:
    """A user held behind an unfinished batch keeps only its newest change per audience, so four
    flips take two Attentive round trips, not four (the last one wins). Bug caught: one round trip
    (hours at Attentive's pace) per held change."""
    buf = JobBuffer(any_redis, "j1")
    buf.ingest([change("a@x.io", "vip", t, flag=bool(t % 2)) for t in range(1, 5)])
    buf.ingest([change("a@x.io", "lapsed", 5)])
    assert any_redis.hget(keys.waiting("j1"), "a@x.io").count(b"\n") == 2  # one per audience
    assert any_redis.hget(keys.job_status("j1"), "coalesced_while_held") == b"2"
    seen = []
    for _ in range(2):
        buf.seal_now()
        b = buf.claim(10_000)
        assert b is not None and b.users == ["a@x.io"]
        seen.append(flags(b.records)[0]["vip"])
        buf.record_accepted(b.batch_id, {"id": "j", "idx": [0]})
        buf.mark_submitted(b, 10**13)
        buf.complete(b.batch_id)
    assert seen == [True, False]  # t=1 went first; t=4 replaced t=2 and t=3 while they were held
    assert buf.claim(10_000) is None


def test_time_based_seal_waits_for_interval(any_redis: Any) -> None:
    buf = JobBuffer(any_redis, "j1")
    buf.ingest([change("a@x.io", "vip", 1)], now=1_000)
    assert buf.seal_due(30_000, now=30_999) == []
    assert buf.seal_due(30_000, now=31_000) == [1]


def test_expired_lease_is_requeued_and_completed_batch_deleted(any_redis: Any) -> None:
    buf = JobBuffer(any_redis, "j1")
    buf.ingest([change("a@x.io", "vip", 1)])
    buf.seal_now()
    claimed = buf.claim(lease_ms=1_000, now=10_000)
    assert claimed is not None
    assert buf.claim(1_000, now=10_500) is None
    requeued = buf.reap(now=11_001)
    assert requeued == 1
    again = buf.claim(1_000, now=11_002)
    assert again is not None and again.batch_id == claimed.batch_id
    # The first owner lost its lease: its late report is refused.
    assert not buf.mark_submitted(claimed, 10**13)
    assert buf.mark_submitted(again, 10**13)
    buf.complete(again.batch_id, {"users_delivered": 1})
    assert buf.batch(again.batch_id) == {}
    assert any_redis.exists(keys.batch_entries("j1", again.batch_id)) == 0
    assert buf.outstanding_users() == 0


def test_resend_puts_batch_back_first(any_redis: Any) -> None:
    buf = JobBuffer(any_redis, "j1", batch_size=1)
    buf.ingest([change("a@x.io", "vip", 1), change("b@x.io", "vip", 1)])
    first = buf.claim(10_000)
    assert first is not None
    buf.record_accepted(first.batch_id, {"id": "j", "idx": [0]})
    buf.mark_submitted(first, 10**13)
    assert buf.end_job(first.batch_id, "j", "FAILED", failed=True)
    assert not buf.end_job(first.batch_id, "j", "FAILED", failed=True)  # a twin poll counts nothing twice
    assert buf.resend(first.batch_id, "FAILED")
    again = buf.claim(10_000)
    assert again is not None and again.batch_id == first.batch_id and again.attempts == 1
    assert again.carried == frozenset()  # the failed job carries nobody: all are sent again


def test_merge_records_deep_merges_later_wins() -> None:
    a = {"identifiers": {"email": "a@x.io"}, "attributes": {"firstName": "A", "custom": {"vip": True}}}
    b = {
        "identifiers": {"email": "a@x.io", "phone": "+15005550006"},
        "attributes": {"custom": {"lapsed": False}},
    }
    assert merge_records([a, b]) == {
        "identifiers": {"email": "a@x.io", "phone": "+15005550006"},
        "attributes": {"firstName": "A", "custom": {"vip": True, "lapsed": False}},
    }
    assert a["attributes"]["custom"] == {"vip": True}


def test_claimed_entries_encode_to_the_request_items(any_redis: Any) -> None:
    """A single record is sent as stored; several are merged; a record's own "|" or tab changes nothing."""
    buf = JobBuffer(any_redis, "j1")
    buf.ingest(
        [
            change("a@x.io", "vip", 1, note="x|vip|y\tz"),
            change("b@x.io", "vip", 1),
            change("b@x.io", "lapsed", 2, flag=False),
        ]
    )
    buf.seal_now()
    claimed = buf.claim(10_000)
    assert claimed is not None and claimed.users == ["a@x.io", "b@x.io"]
    single, merged = (json.loads(entry_json(e)) for e in claimed.entries)
    assert single == {
        "identifiers": {"email": "a@x.io"},
        "attributes": {"custom": {"vip": True, "note": "x|vip|y\tz"}},
    }
    assert merged == merge_records(claimed.records[1])
    assert merged["attributes"]["custom"] == {"vip": True, "lapsed": False}
    # The open batch's hash became the batch's: nothing is left open.
    assert buf.open_size() == 0 and any_redis.exists(keys.open_entries("j1")) == 0


def test_claim_reports_lost_records_instead_of_requeueing_the_batch(any_redis: Any) -> None:
    buf = JobBuffer(any_redis, "j1")
    buf.ingest([change("a@x.io", "vip", 1)])
    [bid] = buf.seal_now()
    any_redis.delete(keys.batch_entries("j1", bid))
    with pytest.raises(BatchDataMissing) as info:
        buf.claim(10_000)
    assert info.value.batch_id == bid and info.value.users == ["a@x.io"]
    assert buf.sealed_count() == 0  # not back at the front of the queue, where it would block the rest


def test_a_paused_job_under_real_time_load_holds_state_per_user_not_per_change(
    any_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 11: a paused job's users keep changing; its state must grow with the users that
    changed, not with the changes (held changes coalesce, so nothing seals batch after batch)."""
    from worker.setup.jobconfig import JobState
    from worker.store import keys

    from .pipeline_kit import Pipeline, users

    pipe = Pipeline(any_redis, monkeypatch)
    job = pipe.create_job()
    pipe.rt.jobs.set_state(job.id, JobState.PAUSED, "operator")
    buffer = pipe.buffer(job)
    people, rounds = users(200), 20
    for r in range(rounds):
        event = "enter" if r % 2 == 0 else "exit"
        at = 1_780_000_000_000 + r * 1000
        pipe.ingest(*({"audience": "vip", "event": event, "at": at, "user": {"email": e}} for e in people))
        buffer.seal_due(0)  # the sweep's interval seal, every round
    status = pipe.status(job)
    assert buffer.sealed_count() == 1  # the first round's batch; nothing was sealed after it
    assert buffer.waiting_users() == 200
    held = [v for v in pipe.redis.hvals(keys.waiting(job.id))]
    assert all(line.count(b"\n") == 1 for line in held)  # one held change per user and audience
    assert int(status["coalesced_while_held"]) == 200 * (rounds - 2)


@pytest.mark.parametrize("seed", range(6))
def test_random_interleavings_hold_only_busy_users_and_deliver_the_newest(any_redis: Any, seed: int) -> None:
    """Random ingests, seals, sends and completions over a few users and audiences. After every step
    a user holding changes is outstanding or in the open batch (buffer.lua's prefetch skips reading
    held changes of anyone else), and once everything completed each (user, audience) was last sent
    with its newest value. Bug caught: a completion that frees a user without draining its held
    changes (they are never sent, and the prefetch would treat the user as holding nothing)."""
    import random

    rng = random.Random(seed)
    buf = JobBuffer(any_redis, "j1", batch_size=3)
    users, audiences = [f"u{i}@x.io" for i in range(5)], ["vip", "lapsed"]
    newest: dict[tuple[str, str], tuple[int, bool]] = {}
    sent: dict[tuple[str, str], bool] = {}
    in_flight: list[Any] = []
    at = 0

    def check_held_users_are_busy() -> None:
        held = {k.decode() for k in any_redis.hkeys(keys.waiting("j1"))}
        busy = {k.decode() for k in any_redis.hkeys(keys.outstanding("j1"))}
        busy |= {k.decode() for k in any_redis.hkeys(keys.open_entries("j1"))}
        assert held <= busy

    def send_one() -> None:
        batch = buf.claim(10_000)
        if batch is None:
            return
        for user, recs in zip(batch.users, batch.records, strict=True):
            for aud, flag in merge_records(recs)["attributes"]["custom"].items():
                sent[(user, aud)] = flag
        job = {"id": f"job-{batch.batch_id}", "idx": list(range(len(batch.users)))}
        assert buf.record_accepted(batch.batch_id, job)
        assert buf.mark_submitted(batch, first_check_ms=10**13)
        in_flight.append(batch)

    for _ in range(120):
        step = rng.random()
        if step < 0.55:
            changes = []
            for _ in range(rng.randint(1, 4)):
                at += rng.randint(0, 2)  # equal times happen too: the later one is stale
                user, aud, flag = rng.choice(users), rng.choice(audiences), rng.random() < 0.5
                changes.append(change(user, aud, at, flag))
                if (user, aud) not in newest or at > newest[(user, aud)][0]:
                    newest[(user, aud)] = (at, flag)
            buf.ingest(changes)
        elif step < 0.7:
            buf.seal_now()
        elif step < 0.85:
            send_one()
        elif in_flight:
            buf.complete(in_flight.pop(rng.randrange(len(in_flight))).batch_id)
        check_held_users_are_busy()
    for _ in range(200):  # drain: everything sent and completed, held changes included
        buf.seal_now()
        send_one()
        while in_flight:
            buf.complete(in_flight.pop(0).batch_id)
            check_held_users_are_busy()
        if buf.waiting_users() == 0 and buf.open_size() == 0 and not any_redis.llen(keys.sealed("j1")):
            break
    assert sent == {pair: flag for pair, (_at, flag) in newest.items()}
