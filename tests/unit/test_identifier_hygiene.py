"""Two different users carrying the same identifier value never travel in one request.

Attentive warns that duplicate identifier values can bridge separate users together, and a strict
Attentive answers 400 to such a request. The buffer seals the open batch before a user who carries an
identifier another user of it carries (the same mechanism as the early flush). Run on fakeredis and
on a real Redis.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis

from worker.observe.status import job_status
from worker.pipeline.buffer import Change, JobBuffer, identifier_list
from worker.store import keys

from .pipeline_kit import Pipeline, enter


def change(user: str, audience: str = "vip", at: int = 1, **identifiers: Any) -> Change:
    ids: dict[str, Any] = identifiers or {"email": user}
    record = {"identifiers": ids, "attributes": {"custom": {audience: True}}}
    return Change(user, audience, at, json.dumps(record), identifier_list(ids))


def batches(buf: JobBuffer) -> list[list[str]]:
    """Users of every sealed batch, in order (claims them all)."""
    out = []
    while (claimed := buf.claim(10_000)) is not None:
        out.append(claimed.users)
    return out


def shared_count(client: redis.Redis, job_id: str = "j1") -> int:
    return int(client.hget(keys.job_status(job_id), "sealed_for_shared_identifier") or 0)


def finish(buf: JobBuffer, batch_id: int) -> list[int]:
    """Attentive finished the batch's job: complete it (its users' waiting changes move on)."""
    return buf.complete(batch_id)


# --- the token list ------------------------------------------------------------------------------
def test_identifier_list_names_each_identifier_and_custom_ones_by_key() -> None:
    ids = {
        "email": "a@x.io",
        "phone": "+14155550142",
        "clientUserId": "c-1",
        "shopifyId": "123",
        "klaviyoId": "k9",
        "customIdentifiers": [{"key": "loyalty", "value": "L7"}, {"key": "crm", "value": "C1"}],
    }
    assert identifier_list(ids).split("\t") == [
        "email:a@x.io",
        "phone:+14155550142",
        "clientUserId:c-1",
        "shopifyId:123",
        "klaviyoId:k9",
        "custom:loyalty:L7",
        "custom:crm:C1",
    ]
    assert identifier_list({}) == ""
    # buffer.lua keeps a held change's identifiers on one line, separated by tabs.
    odd = {"clientUserId": "a\nb", "shopifyId": "c\td"}
    assert identifier_list(odd) == "clientUserId:a b\tshopifyId:c d"


# --- different users sharing a value ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({"email": "same@x.io"}, {"email": "same@x.io", "phone": "+14155550100"}),
        ({"email": "a@x.io", "phone": "+14155550142"}, {"email": "b@x.io", "phone": "+14155550142"}),
        ({"clientUserId": "c-1"}, {"clientUserId": "c-1"}),
        ({"shopifyId": "77"}, {"shopifyId": "77"}),
        ({"klaviyoId": "k1"}, {"klaviyoId": "k1"}),
        (
            {"email": "a@x.io", "customIdentifiers": [{"key": "loyalty", "value": "L7"}]},
            {"email": "b@x.io", "customIdentifiers": [{"key": "loyalty", "value": "L7"}]},
        ),
    ],
    ids=["email", "phone", "clientUserId", "shopifyId", "klaviyoId", "custom"],
)
def test_two_users_sharing_an_identifier_go_to_different_batches(
    any_redis: redis.Redis, first: dict[str, Any], second: dict[str, Any]
) -> None:
    buf = JobBuffer(any_redis, "j1")
    out = buf.ingest([change("u1", **first), change("other", email="o@x.io"), change("u2", **second)])
    assert out.sealed == [1]
    assert out.sealed_for_shared_identifier == 1
    assert (out.accepted, out.queued) == (3, 0)
    buf.seal_now()
    assert batches(buf) == [["u1", "other"], ["u2"]]
    assert shared_count(any_redis) == 1


def test_users_sharing_nothing_and_one_user_with_itself_stay_in_one_batch(any_redis: redis.Redis) -> None:
    buf = JobBuffer(any_redis, "j1")
    ids: dict[str, Any] = {"email": "a@x.io", "phone": "+14155550142"}
    out = buf.ingest(
        [
            change("a", "vip", **ids),
            change("b", "vip", email="b@x.io", phone="+14155550143"),
            change("a", "lapsed", **ids),  # the same user again, another audience: merged
        ]
    )
    assert (out.accepted, out.merged, out.sealed, out.sealed_for_shared_identifier) == (2, 1, [], 0)
    # The same value under two custom identifier keys is two different identifiers.
    out = buf.ingest(
        [
            change("c", customIdentifiers=[{"key": "loyalty", "value": "7"}]),
            change("d", customIdentifiers=[{"key": "crm", "value": "7"}]),
        ]
    )
    assert out.sealed == []
    buf.seal_now()
    assert batches(buf) == [["a", "b", "c", "d"]]
    assert shared_count(any_redis) == 0


def test_a_merged_change_bringing_another_users_identifier_seals_first_and_waits(
    any_redis: redis.Redis,
) -> None:
    buf = JobBuffer(any_redis, "j1")
    buf.ingest([change("a", "vip", email="a@x.io"), change("b", "vip", email="b@x.io", phone="+14155550100")])
    # a's change for another audience now carries b's phone: it cannot join a's pending entry.
    out = buf.ingest([change("a", "lapsed", email="a@x.io", phone="+14155550100")])
    assert (out.merged, out.queued, out.sealed, out.sealed_for_shared_identifier) == (0, 1, [1], 1)
    first = buf.claim(10_000)
    assert first is not None and first.users == ["a", "b"]
    assert buf.waiting_users() == 1
    # When a's batch finishes, its held change moves into the (empty) open batch.
    assert finish(buf, first.batch_id) == []
    assert buf.open_users() == ["a"]


def test_the_index_covers_the_open_batch_only(any_redis: redis.Redis) -> None:
    buf = JobBuffer(any_redis, "j1", batch_size=2)
    out = buf.ingest([change("a", email="a@x.io"), change("b", email="b@x.io")])  # fills and seals
    assert out.sealed == [1]
    assert any_redis.exists(keys.open_identifiers("j1")) == 0
    # Sharing with a user of a sealed batch is fine: that user is in another request already.
    out = buf.ingest([change("c", email="a@x.io")])
    assert (out.sealed, out.sealed_for_shared_identifier) == ([], 0)
    assert any_redis.hgetall(keys.open_identifiers("j1")) == {b"email:a@x.io": b"c"}
    buf.seal_now()
    assert any_redis.exists(keys.open_identifiers("j1")) == 0


def test_many_users_sharing_one_phone_each_get_their_own_request(any_redis: redis.Redis) -> None:
    buf = JobBuffer(any_redis, "j1")
    family = [change(f"m{i}", email=f"m{i}@x.io", phone="+14155550199") for i in range(4)]
    out = buf.ingest([change("x", email="x@x.io"), *family])
    assert out.sealed_for_shared_identifier == 3
    buf.seal_now()
    assert batches(buf) == [["x", "m0"], ["m1"], ["m2"], ["m3"]]
    assert shared_count(any_redis) == 3


def test_a_change_past_the_prefetched_ones_still_sees_the_index(any_redis: redis.Redis) -> None:
    """The script reads the index up front only for changes that can join before the batch fills;
    one further on (after stale ones) looks it up on its own."""
    buf = JobBuffer(any_redis, "j1", batch_size=4)
    buf.ingest([change("a", at=5, email="a@x.io"), change("b", at=5, email="b@x.io")])
    stale = [change("a", at=1, email="a@x.io") for _ in range(3)]
    out = buf.ingest([*stale, change("c", at=5, email="b@x.io")])
    assert (out.stale, out.accepted, out.sealed, out.sealed_for_shared_identifier) == (3, 1, [1], 1)
    assert buf.open_users() == ["c"]


# --- the drain path ------------------------------------------------------------------------------
def test_held_changes_draining_into_the_open_batch_follow_the_rule(any_redis: redis.Redis) -> None:
    buf = JobBuffer(any_redis, "j1")
    buf.ingest([change("a", "vip", 1, email="a@x.io")])
    buf.seal_now()
    first = buf.claim(10_000)
    assert first is not None
    # a's next change waits behind batch 1; meanwhile b, who shares a's new phone, joins the open batch.
    out = buf.ingest([change("a", "vip", 2, email="a@x.io", phone="+14155550100")])
    assert out.queued == 1
    buf.ingest([change("b", "vip", 2, email="b@x.io", phone="+14155550100")])
    assert buf.open_users() == ["b"]
    sealed = finish(buf, first.batch_id)
    assert sealed == [2]  # b's batch sealed before a's held change joined
    assert buf.open_users() == ["a"]
    assert shared_count(any_redis) == 1
    buf.seal_now()
    assert batches(buf) == [["b"], ["a"]]


def test_a_drained_user_already_open_waits_again_when_it_would_share(any_redis: redis.Redis) -> None:
    """a holds two changes; the first drains in, the second carries b's phone and must wait again."""
    buf = JobBuffer(any_redis, "j1")
    buf.ingest([change("a", "vip", 1, email="a@x.io")])
    buf.seal_now()
    first = buf.claim(10_000)
    assert first is not None
    buf.ingest(
        [
            change("a", "vip", 2, email="a@x.io"),
            change("a", "lapsed", 2, email="a@x.io", phone="+14155550100"),
        ]
    )
    buf.ingest([change("b", "vip", 2, email="b@x.io", phone="+14155550100")])
    sealed = finish(buf, first.batch_id)
    # a's vip change joined b's batch; its lapsed change shares b's phone, so that batch was sealed
    # and the change waits for it.
    assert sealed == [2]
    assert buf.waiting_users() == 1
    assert shared_count(any_redis) == 1
    second = buf.claim(10_000)
    assert second is not None and second.users == ["b", "a"]
    finish(buf, second.batch_id)
    assert buf.open_users() == ["a"]
    assert buf.waiting_users() == 0


def test_held_changes_stored_before_identifiers_were_kept_still_drain(any_redis: redis.Redis) -> None:
    """A waiting line written by the previous version ("aud<TAB>record<LF>") drains as before."""
    buf = JobBuffer(any_redis, "j1")
    buf.ingest([change("a", "vip", 1)])
    buf.seal_now()
    first = buf.claim(10_000)
    assert first is not None
    record = json.dumps({"identifiers": {"email": "a"}, "attributes": {"custom": {"vip": False}}})
    any_redis.hset(keys.waiting("j1"), "a", f"vip\t{record}\n")
    finish(buf, first.batch_id)
    assert buf.open_users() == ["a"]
    buf.seal_now()
    claimed = buf.claim(10_000)
    assert claimed is not None and claimed.records == [[json.loads(record)]]


# --- through ingest, counted in status -------------------------------------------------------------
def test_ingest_passes_identifiers_and_status_counts_the_seals(
    any_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = Pipeline(any_redis, monkeypatch)
    job = pipe.create_job(
        audiences=("vip",),
        identifier_mappings={"email": "email", "phone": "phone"},
        extra_identifiers=["loyalty_id"],
    )
    pipe.ingest(
        enter("a@x.io", phone="(415) 555-0142"),
        enter("b@x.io", phone="+1 415 555 0142"),  # the same phone once normalised
        enter("c@x.io", loyalty_id="L1"),
        enter("d@x.io", loyalty_id="L1"),
        enter("e@x.io"),
    )
    buf = pipe.buffer(job)
    assert buf.sealed_count() == 2
    assert buf.open_users() == ["d@x.io", "e@x.io"]
    shown = job_status(any_redis, job.id)
    assert shown["counters"]["sealed_for_shared_identifier"] == 2
    buf.seal_now()
    assert batches(buf) == [["a@x.io"], ["b@x.io", "c@x.io"], ["d@x.io", "e@x.io"]]


def test_status_shows_the_counter_at_zero(any_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = Pipeline(any_redis, monkeypatch)
    job = pipe.create_job()
    assert job_status(any_redis, job.id)["counters"]["sealed_for_shared_identifier"] == 0


def test_every_key_of_the_buffer_shares_the_jobs_hash_tag() -> None:
    """Redis Cluster: the script may touch only keys in one slot, all declared in KEYS."""
    buf = JobBuffer(redis.Redis(), "j1")
    assert keys.open_identifiers("j1") in buf._keys
    assert all("{job:j1}" in k for k in buf._keys)
