"""Every Attentive job that Attentive accepted (or may have) is followed to its end, and a user's next
change waits for all of them (DESIGN.md invariant 2 across Attentive's asynchronous jobs).

Regression tests for jobs the old flush forgot: a split (after a 400) whose accepted half was dropped
when a later part got a 429, and a send whose answer never came (the connection dropped after
Attentive accepted it), which the old client even replayed.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import redis

from worker.pipeline import poll as poll_module
from worker.pipeline.buffer import now_ms
from worker.pipeline.flush import flush_job

from .pipeline_kit import Pipeline, emails_of, error, exit_

LATER = "2026-11-26T19:00:00Z"


@pytest.fixture
def pipe(any_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> Pipeline:
    return Pipeline(any_redis, monkeypatch, uncertain_send_hold_seconds=600.0)


def enter_later(email: str) -> dict[str, Any]:
    return {"audience": "vip", "event": "enter", "at": LATER, "user": {"email": email}}


def recorded(pipe: Pipeline, job: Any, bid: int) -> list[dict[str, Any]]:
    return list(json.loads(pipe.buffer(job).batch(bid)["attentive_jobs"]))


def vip_posts(pipe: Pipeline, email: str) -> list[bool]:
    """The ``vip`` flag of every POST that carried ``email``, in order."""
    return [
        u["attributes"]["custom"]["vip"]
        for body in pipe.attentive.bulk_bodies
        for u in body
        if u["identifiers"]["email"] == email
    ]


def poll(pipe: Pipeline, job: Any, bid: int, _attempt: int) -> bool:
    """One check of a batch, as the key's poller makes it; True when the batch is settled."""
    return pipe.check(job, bid).done


def run_polls(pipe: Pipeline, job: Any, bid: int, rounds: int = 5) -> None:
    for attempt in range(rounds):
        if poll(pipe, job, bid, attempt):
            return


def test_a_429_in_the_middle_of_a_split_never_forgets_the_accepted_half(pipe: Pipeline) -> None:
    job = pipe.create_job()
    emails = ["a@x.io", "b@x.io", "c@x.io", "poison@x.io"]
    pipe.ingest(*(exit_(e) for e in emails))
    (bid,) = pipe.buffer(job).seal_now()
    answers = iter(
        [
            error(400, "Invalid email address: poison@x.io"),  # the whole batch: split it
            None,  # [a, b]: accepted, job A carries their exits
            error(429, "Too many requests"),  # [c, poison]: the rest must wait
        ]
    )

    def bulk(users: list[dict[str, Any]]) -> Any:
        answer = next(answers, None)
        return pipe.attentive.accept(users) if answer is None else answer

    pipe.attentive.bulk = bulk
    report = flush_job(pipe.rt, job.id)

    assert report.retry_in is not None and report.retry_in > 0  # the 429 holds the key off
    batch = pipe.buffer(job).batch(bid)
    (job_a,) = recorded(pipe, job, bid)
    assert batch["state"] == "submitted" and sorted(job_a["idx"]) == [0, 1]
    assert pipe.status(job)["sends_interrupted"] == "1"

    # a's next change arrives while job A (carrying a's exit) is still running: it must wait.
    pipe.attentive.statuses[job_a["id"]] = ["IN_PROGRESS", "COMPLETED"]
    pipe.ingest(enter_later("a@x.io"))
    assert pipe.buffer(job).seal_now() == []  # held: a is outstanding in the batch
    assert not poll(pipe, job, bid, 0)
    assert vip_posts(pipe, "a@x.io") == [False, False]  # only the exit (whole batch, then the half)

    # Job A completes: the poll sends the users still open (c, poison) again, first.
    pipe.attentive.bulk = pipe.attentive.accept
    pipe.attentive.refuse_containing("poison@x.io")
    assert poll(pipe, job, bid, 1)
    gets_for_a = [r for r in pipe.attentive.status_gets() if r.url.path.endswith(job_a["id"])]
    assert len(gets_for_a) == 2  # the accepted half was polled to its end
    assert flush_job(pipe.rt, job.id).submitted == [bid]
    resent = [emails_of(b) for b in pipe.attentive.bulk_bodies[-3:]]
    assert ["a@x.io", "b@x.io"] not in resent  # what job A carried is not sent again
    run_polls(pipe, job, bid)

    # Only now is a's enter released, and it is the last thing Attentive hears about a.
    assert pipe.buffer(job).batch(bid) == {}
    (next_bid,) = pipe.buffer(job).seal_now()
    assert flush_job(pipe.rt, job.id).submitted == [next_bid]
    assert vip_posts(pipe, "a@x.io") == [False, False, True]


def test_a_send_whose_answer_never_came_holds_its_users_until_that_job_surely_ended(
    pipe: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = pipe.create_job()
    pipe.ingest(exit_("a@x.io"), exit_("b@x.io"))
    (bid,) = pipe.buffer(job).seal_now()
    calls = {"n": 0}

    def bulk(users: list[dict[str, Any]]) -> Any:
        calls["n"] += 1
        reply = pipe.attentive.accept(users)  # Attentive accepts and runs it ...
        if calls["n"] == 1:
            raise httpx.ReadError("[Errno 104] Connection reset by peer")  # ... but the 202 is lost
        return reply

    pipe.attentive.bulk = bulk
    first = flush_job(pipe.rt, job.id)

    assert first.retry_in is not None and len(pipe.attentive.posts()) == 1  # never replayed in-call
    (unknown,) = recorded(pipe, job, bid)
    assert unknown["id"].startswith("unknown:") and unknown["until"] >= now_ms() + 599_000
    assert pipe.status(job)["sends_uncertain"] == "1"
    assert pipe.buffer(job).batch(bid)["state"] == "sealed"  # sent again at once ...

    assert flush_job(pipe.rt, job.id).submitted == [bid]
    assert not poll(pipe, job, bid, 0)  # ... but held while the lost job may run
    pipe.ingest(enter_later("a@x.io"))
    assert pipe.buffer(job).seal_now() == []  # a's enter waits behind the hold

    # Once the hold has passed, the lost job has surely ended: the batch completes, the enter goes.
    later = now_ms() + 601_000
    monkeypatch.setattr(poll_module, "now_ms", lambda: later)
    assert poll(pipe, job, bid, 1)
    assert pipe.buffer(job).batch(bid) == {}
    assert len(pipe.buffer(job).seal_now()) == 1
    flush_job(pipe.rt, job.id)
    assert vip_posts(pipe, "a@x.io") == [False, False, True]


class WorkerDied(BaseException):
    """Stands for SIGKILL: nothing after it in the flush runs (no except clause catches it)."""


def test_a_worker_killed_after_attentive_accepted_but_before_recording_it_holds_its_users(
    pipe: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = pipe.create_job()
    pipe.ingest(exit_("a@x.io"), exit_("b@x.io"))
    buffer = pipe.buffer(job)
    (bid,) = buffer.seal_now()

    def accept_then_die(users: list[dict[str, Any]]) -> Any:
        pipe.attentive.accept(users)  # Attentive runs job A, carrying the exits ...
        raise WorkerDied  # ... and the worker dies before its answer is recorded

    pipe.attentive.bulk = accept_then_die
    with pytest.raises(WorkerDied):
        flush_job(pipe.rt, job.id)
    (pending,) = recorded(pipe, job, bid)
    assert pending["id"].startswith("unknown:") and pending["until"] >= now_ms() + 599_000

    # The lease expires: the batch is sent again at once, but stays held while job A may run.
    requeued = buffer.reap(now=now_ms() + 61_000)
    assert requeued == 1 and buffer.batch(bid)["state"] == "sealed"
    pipe.attentive.bulk = pipe.attentive.accept
    assert flush_job(pipe.rt, job.id).submitted == [bid]
    assert not poll(pipe, job, bid, 0)
    pipe.ingest(enter_later("a@x.io"))
    assert buffer.seal_now() == []  # a's enter waits: job A could still overwrite it

    later = now_ms() + 601_000
    monkeypatch.setattr(poll_module, "now_ms", lambda: later)
    assert poll(pipe, job, bid, 1)
    assert len(buffer.seal_now()) == 1
    flush_job(pipe.rt, job.id)
    assert vip_posts(pipe, "a@x.io") == [False, False, True]


def test_an_answered_request_leaves_no_pending_entry(pipe: Pipeline) -> None:
    job = pipe.create_job()
    pipe.ingest(*(exit_(e) for e in ("a@x.io", "b@x.io", "poison@x.io")))
    (bid,) = pipe.buffer(job).seal_now()
    pipe.attentive.refuse_containing("poison@x.io")
    flush_job(pipe.rt, job.id)
    ids = [j["id"] for j in recorded(pipe, job, bid)]
    assert ids and not any(i.startswith("unknown:") for i in ids)  # 400s and 202s replaced theirs


def test_a_flush_killed_after_attentive_accepted_part_hands_the_batch_to_the_poll(pipe: Pipeline) -> None:
    job = pipe.create_job()
    pipe.ingest(exit_("a@x.io"), exit_("b@x.io"))
    buffer = pipe.buffer(job)
    (bid,) = buffer.seal_now()
    claimed = buffer.claim(lease_ms=1_000, now=10_000)
    assert claimed is not None
    # The flush recorded Attentive's job id, then died before marking the batch submitted.
    assert buffer.record_accepted(bid, {"id": "aj-dead", "idx": [0]})

    requeued = buffer.reap(now=11_001)

    assert requeued == 0 and pipe.polled(job) == [bid]  # due for a check at once ...
    assert buffer.batch(bid)["state"] == "submitted"
    assert buffer.claim(1_000, now=11_002) is None  # ... and never re-sends it alongside that job
    pipe.attentive.accepted["aj-dead"] = [{"identifiers": {"email": "a@x.io"}}]
    assert poll(pipe, job, bid, 0)  # aj-dead completed; b is still open: resend
    again = buffer.claim(60_000)
    assert again is not None and again.batch_id == bid and again.settled == frozenset({0})


def test_a_batch_never_completes_while_a_recorded_job_is_unfinished(pipe: Pipeline) -> None:
    job = pipe.create_job()
    pipe.ingest(exit_("a@x.io"))
    (bid,) = pipe.buffer(job).seal_now()
    flush_job(pipe.rt, job.id)
    (first,) = recorded(pipe, job, bid)
    # A second job for the same batch (a send that outlived its lease recorded it late).
    assert pipe.buffer(job).record_accepted(bid, {"id": "aj-late", "idx": [0]})
    pipe.attentive.statuses["aj-late"] = ["IN_PROGRESS"]
    pipe.attentive.accepted["aj-late"] = [{"identifiers": {"email": "a@x.io"}}]

    assert not poll(pipe, job, bid, 0)  # the first completed; aj-late still runs
    assert f"done:{first['id']}" in pipe.buffer(job).batch(bid)
    pipe.attentive.statuses["aj-late"] = ["COMPLETED"]
    assert poll(pipe, job, bid, 1)
    assert pipe.buffer(job).batch(bid) == {}
