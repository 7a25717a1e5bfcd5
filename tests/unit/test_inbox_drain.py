"""Drains: the receiver's one-request chunks ingested many at a time, each by one task only.

On fakeredis and the real test Redis (``any_redis``): claims rely on ``SET NX GET`` and TTLs."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis

from worker.pipeline import inbox
from worker.pipeline.ingest import DrainReport, drain_inbox, ingest_chunk
from worker.store import keys

from .pipeline_kit import Pipeline, enter, users


@pytest.fixture
def pipe(any_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> Pipeline:
    return Pipeline(any_redis, monkeypatch)


def one_line_chunks(pipe: Pipeline, emails: list[str]) -> list[str]:
    """One chunk per user, as the receiver writes Lytics' unbatched audience triggers."""
    return [inbox.put_chunk(pipe.redis, [json.dumps(enter(e))]) for e in emails]


def chunks_a_group(monkeypatch: pytest.MonkeyPatch, chunks: list[str], n: int) -> None:
    """Groups of ``n`` of these one-line chunks (a drain claims one group at a time)."""
    monkeypatch.setattr(inbox, "GROUP_BYTES", n * (inbox.chunk_bytes(chunks[0]) or 0))


def pending(pipe: Pipeline) -> list[str]:
    return inbox.pending_window(pipe.redis, 0, 100_000)


def drain(pipe: Pipeline, owner: str, sealed: dict[str, list[int]] | None = None, **kw: Any) -> DrainReport:
    """A drain as the task runs it; the batches it reports sealed are collected in ``sealed``."""
    got = sealed if sealed is not None else {}

    def on_sealed(batches: dict[str, list[int]]) -> None:
        for job_id, ids in batches.items():
            got.setdefault(job_id, []).extend(ids)

    return drain_inbox(pipe.redis, pipe.rt.jobs, owner=owner, on_sealed=on_sealed, **kw)


def test_a_drain_ingests_every_pending_chunk_in_one_task_and_drops_them(pipe: Pipeline) -> None:
    job = pipe.create_job(batch_size=256)
    emails = users(600)
    chunks = one_line_chunks(pipe, emails)  # more than two claim windows
    sealed: dict[str, list[int]] = {}
    report = drain(pipe, "drain-1", sealed)
    assert (report.chunks, report.lines, report.more) == (600, 600, False)
    assert sealed == {job.id: [1, 2]}  # 512 of 600 sealed, handed over for flushing
    assert pending(pipe) == []
    assert not [c for c in chunks if pipe.redis.exists(keys.inbox_chunk(c), keys.inbox_claim(c))]
    assert pipe.status(job)["received"] == "600" and pipe.buffer(job).open_size() == 600 - 512


def test_chunks_another_task_holds_are_stepped_over_and_left_to_it(pipe: Pipeline) -> None:
    pipe.create_job()
    chunks = one_line_chunks(pipe, users(300))
    held = chunks[:200] + chunks[250:260]  # the front of the first window and some of the second
    assert inbox.claim(pipe.redis, held, "other") == held
    report = drain(pipe, "drain-1", budget_seconds=5.0)
    assert (report.chunks, report.more) == (300 - len(held), False)  # done, not out of time
    assert pending(pipe) == held  # still theirs, still pending
    # A per-chunk task for one of them does nothing either: it neither ingests nor drops it.
    assert ingest_chunk(pipe.redis, pipe.rt.jobs, held[0], owner="task-9").received == 0
    assert pipe.redis.exists(keys.inbox_chunk(held[0])) == 1


def test_a_redelivered_task_takes_back_what_it_held_and_others_wait_for_the_lease(pipe: Pipeline) -> None:
    job = pipe.create_job()
    chunks = one_line_chunks(pipe, users(5))
    # A drain claimed them and its worker died before it dropped them.
    assert inbox.claim(pipe.redis, chunks, "drain-1", lease_ms=60_000) == chunks
    assert drain(pipe, "drain-2").chunks == 0
    ttl = pipe.redis.pttl(keys.inbox_claim(chunks[0]))
    assert 0 < ttl <= 60_000
    # Celery redelivers the message with the same task id: it renews the lease and ingests them.
    report = drain(pipe, "drain-1")
    assert report.chunks == 5 and pending(pipe) == [] and pipe.status(job)["received"] == "5"


def test_a_chunk_whose_claim_lapsed_is_ingested_by_the_next_task(pipe: Pipeline) -> None:
    pipe.create_job()
    (chunk,) = one_line_chunks(pipe, ["a@x.io"])
    assert inbox.claim(pipe.redis, [chunk], "dead-task", lease_ms=60_000) == [chunk]
    pipe.redis.delete(keys.inbox_claim(chunk))  # its lease ended (TTL)
    assert ingest_chunk(pipe.redis, pipe.rt.jobs, chunk, owner="task-2").received == 1
    assert pending(pipe) == []


def test_a_drain_out_of_budget_or_told_to_stop_claims_nothing_and_asks_for_another(pipe: Pipeline) -> None:
    pipe.create_job()
    chunks = one_line_chunks(pipe, users(3))
    assert drain(pipe, "d", budget_seconds=0.0).more is True
    assert drain(pipe, "d", stop=lambda: True).more is True
    assert pending(pipe) == chunks and not pipe.redis.exists(keys.inbox_claim(chunks[0]))


def test_a_drain_stopped_between_groups_holds_no_claim_on_what_it_left(
    pipe: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe.create_job()
    chunks = one_line_chunks(pipe, users(6))
    chunks_a_group(monkeypatch, chunks, 1)
    asked = iter([False, False, True])  # the worker is told to stop during the second group
    report = drain(pipe, "d", stop=lambda: next(asked, True))
    assert (report.chunks, report.more) == (2, True)
    assert pending(pipe) == chunks[2:]
    assert not [c for c in chunks if pipe.redis.exists(keys.inbox_claim(c))]  # free for the next task


def test_a_drain_that_finds_more_than_a_group_asks_once_for_another_and_holds_one_group(
    pipe: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe.create_job()
    chunks = one_line_chunks(pipe, users(9))
    chunks_a_group(monkeypatch, chunks, 3)
    real_read = inbox.read_chunks
    held: list[list[str]] = []

    def read(client: redis.Redis, ids: list[str]) -> list[bytes | str]:
        held.append(sorted(c for c in chunks if pipe.redis.get(keys.inbox_claim(c)) == b"d"))
        return real_read(client, ids)

    monkeypatch.setattr(inbox, "read_chunks", read)
    helpers: list[str] = []
    report = drain(pipe, "d", on_backlog=lambda: helpers.append("asked"))
    assert report.chunks == 9 and helpers == ["asked"]  # once, not once per group
    assert held == [sorted(chunks[0:3]), sorted(chunks[3:6]), sorted(chunks[6:9])]  # one group each time
    one_line_chunks(pipe, users(3))
    assert drain(pipe, "e", on_backlog=lambda: helpers.append("again")).chunks == 3
    assert helpers == ["asked"]  # all it found was one group: nobody else is needed


def test_a_drain_that_only_steps_over_others_chunks_asks_for_no_helper(
    pipe: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe.create_job()
    chunks = one_line_chunks(pipe, users(6))
    chunks_a_group(monkeypatch, chunks, 3)
    assert inbox.claim(pipe.redis, chunks, "others") == chunks  # two groups, both held
    helpers: list[str] = []
    assert drain(pipe, "d", on_backlog=lambda: helpers.append("asked")).chunks == 0
    assert helpers == []  # it held nothing: it moved on by itself, nobody else is needed
    one_line_chunks(pipe, users(3))  # one more group, behind the held ones: taken, nothing after it
    assert drain(pipe, "e", on_backlog=lambda: helpers.append("asked")).chunks == 3
    assert helpers == []


def test_two_drains_side_by_side_share_a_burst_and_leave_nothing(
    pipe: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = pipe.create_job()
    chunks = one_line_chunks(pipe, users(1000))  # four claim windows
    real_read = inbox.read_chunks
    second: list[DrainReport] = []

    def read(client: redis.Redis, ids: list[str]) -> list[bytes | str]:
        if not second:  # the helper the first drain asked for starts while it reads its group
            second.append(DrainReport())
            second[0] = drain(pipe, "helper")
        return real_read(client, ids)

    monkeypatch.setattr(inbox, "read_chunks", read)
    first = drain(pipe, "first", on_backlog=lambda: None)
    assert first.chunks > 0 and second[0].chunks > 0 and first.chunks + second[0].chunks == 1000
    assert pending(pipe) == [] and not [c for c in chunks if pipe.redis.exists(keys.inbox_claim(c))]
    assert pipe.status(job)["received"] == "1000"


def test_chunks_that_move_in_front_of_a_drain_while_it_works_are_still_taken(
    pipe: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another task holds the front; this drain steps over it, and while it ingests the next group
    the other drops its own, so the rest moves in front of where this drain looks next."""
    job = pipe.create_job()
    chunks = one_line_chunks(pipe, users(9))
    front, mine, rest = chunks[:3], chunks[3:6], chunks[6:]
    chunks_a_group(monkeypatch, chunks, 3)
    assert inbox.claim(pipe.redis, front, "other") == front
    real_read = inbox.read_chunks

    def read(client: redis.Redis, ids: list[str]) -> list[bytes | str]:
        if ids == mine:  # the other task finishes its group meanwhile
            inbox.drop_chunks(pipe.redis, front)
        return real_read(client, ids)

    monkeypatch.setattr(inbox, "read_chunks", read)
    assert drain(pipe, "d").chunks == 6  # its group, then the rest from the front, not left behind
    assert pending(pipe) == [] and pipe.status(job)["received"] == "6"
    assert not [c for c in rest if pipe.redis.exists(keys.inbox_chunk(c))]


def test_a_drain_clears_the_queued_mark_so_a_later_chunk_asks_for_the_next(pipe: Pipeline) -> None:
    pipe.create_job()
    assert inbox.request_drain(pipe.redis, pipe.rt.dispatch) is True
    assert inbox.request_drain(pipe.redis, pipe.rt.dispatch) is False  # one queued is enough
    drain(pipe, "d")
    assert inbox.request_drain(pipe.redis, pipe.rt.dispatch, countdown=0.0) is True
    assert pipe.dispatch.drains == [inbox.DRAIN_GATHER_SECONDS, 0.0]


def test_a_refused_drain_request_leaves_no_mark(pipe: Pipeline) -> None:
    class Down:
        def drain(self, countdown: float = 0.0) -> None:
            raise ConnectionError("broker down")

    with pytest.raises(ConnectionError):
        inbox.request_drain(pipe.redis, Down())
    assert not pipe.redis.exists(keys.inbox_drain_queued())


def test_chunks_are_read_in_groups_bounded_by_the_sizes_their_ids_carry() -> None:
    small = [f"1-aa-{n}" for n in (400, 400, 300, 100)]
    assert inbox.groups(small, max_bytes=1000) == [small[:2], small[2:]]
    big, old = "2-bb-5000", "1700000000000-cc"  # an id from before ids carried a size
    assert inbox.groups([small[0], big, small[1], old, small[2]], max_bytes=1000) == [
        [small[0]],
        [big],
        [small[1]],
        [old],
        [small[2]],
    ]
    assert inbox.chunk_bytes(old) is None and inbox.chunk_bytes(big) == 5000


def test_a_chunk_id_carries_its_size(pipe: Pipeline) -> None:
    chunk = inbox.put_chunk(pipe.redis, ["abc", b"de"])
    assert inbox.chunk_bytes(chunk) == 5


class DrainBetweenWrites:
    """A client that runs a drain right after the first command a producer sends: where a drain on
    another worker would land between the two writes of :func:`inbox.put_chunk`."""

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe, self.drained = pipe, False

    def __getattr__(self, name: str) -> object:
        command = getattr(self.pipe.redis, name)

        def then_drain(*args: object, **kwargs: object) -> object:
            out = command(*args, **kwargs)
            if not self.drained:
                self.drained = True
                drain(self.pipe, "between")
            return out

        return then_drain


def test_a_drain_between_a_chunks_two_writes_loses_nothing(pipe: Pipeline) -> None:
    job = pipe.create_job()
    producer = DrainBetweenWrites(pipe)
    chunk = inbox.put_chunk(producer, [json.dumps(enter("a@x.io"))])  # type: ignore[arg-type]
    assert producer.drained
    assert drain(pipe, "next").chunks in (0, 1)
    assert pipe.status(job)["received"] == "1"  # ingested by one drain or the other, not lost
    assert pending(pipe) == [] and not pipe.redis.exists(keys.inbox_chunk(chunk))


def test_the_drain_task_asks_for_a_helper_when_more_than_a_group_waits(
    pipe: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tasks.ingest

    job = pipe.create_job(batch_size=256)
    one_line_chunks(pipe, users(300))  # more than one claim window: a group and more
    monkeypatch.setattr(tasks.ingest, "runtime", lambda: pipe.rt)
    tasks.ingest.drain.apply(task_id="drain-1")  # the task as a worker runs it, in this process
    assert pipe.dispatch.drains == [0.0]  # a helper at once, not after the gather time
    assert pending(pipe) == [] and pipe.status(job)["received"] == "300"
    assert pipe.dispatch.flushes  # the batch it sealed is on its way


def test_the_receivers_write_is_one_round_trip_on_one_redis_and_the_chunk_comes_first_on_a_cluster(
    pipe: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[list[str]] = []
    real_execute = redis.client.Pipeline.execute

    def execute(self: redis.client.Pipeline, raise_on_error: bool = True) -> Any:
        sent.append([str(args[0]) for args, _options in self.command_stack])
        return real_execute(self, raise_on_error)

    monkeypatch.setattr(redis.client.Pipeline, "execute", execute)
    first, send = inbox.put_chunk_for_drain(pipe.redis, [json.dumps(enter("a@x.io"))])
    assert send and sent == [["RPUSH", "ZADD", "SET"]]  # one connection keeps the order
    sent.clear()
    monkeypatch.setattr(inbox, "is_cluster", lambda client: True)
    second, send = inbox.put_chunk_for_drain(pipe.redis, [json.dumps(enter("b@x.io"))])
    assert not send  # a drain is marked as queued already
    assert sent == [["RPUSH"], ["ZADD", "SET"]]  # nodes are written side by side: the chunk first
    assert pending(pipe) == [first, second]
