"""Dead-letter re-drive: changes go again after a fix, never over a newer change (fakeredis).

DESIGN.md invariant 1 (what did not arrive can be acted on) and invariant 3 (last writer wins by
event time, across a re-drive too).
"""

from __future__ import annotations

import calendar
import json
import time
from collections import Counter
from typing import Any

import fakeredis
import pytest

import worker.cli.main as cli
from worker.pipeline import deadletters
from worker.pipeline.buffer import Change
from worker.pipeline.flush import flush_job
from worker.pipeline.redrive import NO_RECORD, NO_TIMES, redrive
from worker.setup.jobs import ExportJob

from .pipeline_kit import AT, Pipeline, enter, exit_

AT_MS = calendar.timegm(time.strptime(AT, "%Y-%m-%dT%H:%M:%SZ")) * 1000
LATER = "2026-11-26T18:00:00Z"


@pytest.fixture
def pipe(fake_redis: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch) -> Pipeline:
    return Pipeline(fake_redis, monkeypatch)


def send_all(pipe: Pipeline, job: ExportJob) -> None:
    """Seal, send and complete at Attentive whatever the job holds, until nothing is left."""
    for _ in range(5):
        pipe.buffer(job).seal_now()
        flush_job(pipe.rt, job.id)
        for bid in pipe.polled(job):
            pipe.check(job, bid)
        if not pipe.polled(job) and not pipe.buffer(job).open_size() and not pipe.buffer(job).waiting_users():
            return
    raise AssertionError("the job did not settle")


def last_sent(pipe: Pipeline, email: str) -> dict[str, Any]:
    """The custom attributes of the newest request item that carried ``email``."""
    for body in reversed(pipe.attentive.bulk_bodies):
        for user in body:
            if user["identifiers"].get("email") == email:
                custom: dict[str, Any] = user.get("attributes", {}).get("custom", {})
                return custom
    raise AssertionError(f"{email} was never sent")


def refused_then_fixed(
    pipe: Pipeline, job: ExportJob, *transitions: dict[str, Any], refuse: tuple[str, ...] = ("bad@x.io",)
) -> None:
    """Ingest ``transitions``, have Attentive refuse ``refuse`` (400), then fix it (accept all)."""
    pipe.ingest(*transitions)
    pipe.attentive.refuse_containing(*refuse)
    send_all(pipe, job)
    pipe.attentive.bulk = pipe.attentive.accept


def test_a_refused_change_goes_again_after_the_fix(pipe: Pipeline) -> None:
    job = pipe.create_job()
    refused_then_fixed(pipe, job, enter("bad@x.io"), enter("ok@x.io"))
    [letter] = deadletters.read(pipe.redis, job.id)
    assert letter["reason_class"] == "attentive_400"
    assert letter[deadletters.REDRIVE] == {"vip": AT_MS}
    posts = len(pipe.attentive.posts())

    done = redrive(pipe.redis, job.id, job.config.batch_size)
    assert (done.entries, done.changes, done.superseded, dict(done.kept)) == (1, 1, 0, {})
    send_all(pipe, job)
    assert len(pipe.attentive.posts()) == posts + 1
    assert pipe.attentive.bulk_bodies[-1] == [letter["record"]]
    summary = deadletters.summary(pipe.redis, job.id)
    assert (summary.by_reason, summary.kept) == ({}, 0)
    status = pipe.status(job)
    assert (status["redriven"], status[deadletters.REDRIVEN]) == ("1", "1")
    # Nothing left to re-drive: a second run does nothing.
    assert redrive(pipe.redis, job.id, job.config.batch_size).entries == 0


def test_a_change_superseded_since_it_was_dead_lettered_is_not_sent(pipe: Pipeline) -> None:
    job = pipe.create_job()
    refused_then_fixed(pipe, job, enter("bad@x.io"))
    pipe.ingest(exit_("bad@x.io", at=LATER))  # the user left the audience since: delivered
    send_all(pipe, job)
    assert last_sent(pipe, "bad@x.io") == {"vip": False}
    posts = len(pipe.attentive.posts())

    done = redrive(pipe.redis, job.id, job.config.batch_size)
    assert (done.entries, done.changes, done.superseded) == (1, 0, 1)
    send_all(pipe, job)
    assert len(pipe.attentive.posts()) == posts  # the stale enter never went out
    assert last_sent(pipe, "bad@x.io") == {"vip": False}
    assert deadletters.summary(pipe.redis, job.id).kept == 0
    assert pipe.status(job)["redrive_superseded"] == "1"


def test_an_audience_with_a_newer_held_change_is_stamped_superseded_the_others_go(pipe: Pipeline) -> None:
    """The user's entry carries vip and lapsed; a newer vip exit is held behind the batch when the
    400 comes. The held exit delivers vip; a re-drive sends lapsed alone, without the old vip flag."""
    job = pipe.create_job()
    pipe.ingest(enter("bad@x.io", "vip"), enter("bad@x.io", "lapsed"))
    pipe.buffer(job).seal_now()
    pipe.ingest(exit_("bad@x.io", "vip", at=LATER))  # held: the user's batch is unfinished
    assert pipe.buffer(job).waiting_users() == 1
    pipe.attentive.refuse_containing("bad@x.io")
    flush_job(pipe.rt, job.id)
    [letter] = deadletters.read(pipe.redis, job.id)
    assert letter[deadletters.REDRIVE] == {"vip": None, "lapsed": AT_MS}
    assert letter["record"]["attributes"]["custom"] == {"vip": True, "lapsed": True}
    pipe.attentive.bulk = pipe.attentive.accept
    send_all(pipe, job)  # the held exit goes once the batch finished
    assert last_sent(pipe, "bad@x.io") == {"vip": False}

    done = redrive(pipe.redis, job.id, job.config.batch_size)
    assert (done.entries, done.changes, done.superseded) == (1, 1, 1)
    send_all(pipe, job)
    assert last_sent(pipe, "bad@x.io") == {"lapsed": True}


def test_entries_that_cannot_be_redriven_stay_and_are_reported(pipe: Pipeline) -> None:
    job = pipe.create_job()
    record = {"identifiers": {"email": "old@x.io"}, "attributes": {"custom": {"vip": True}}}
    deadletters.record(pipe.redis, job.id, 1, [("old@x.io", "attentive_400: old", record)])  # no times
    deadletters.record(
        pipe.redis, job.id, 2, [("lost@x.io", "batch records missing in Redis (data lost or edited)", None)]
    )

    done = redrive(pipe.redis, job.id, job.config.batch_size)
    assert (done.entries, done.changes, done.kept) == (0, 0, Counter({NO_TIMES: 1, NO_RECORD: 1}))
    assert [d["user"] for d in deadletters.read(pipe.redis, job.id)] == ["old@x.io", "lost@x.io"]
    assert pipe.buffer(job).open_size() == 0


def test_a_reason_class_redrives_only_its_entries(pipe: Pipeline) -> None:
    job = pipe.create_job()
    refused_then_fixed(pipe, job, enter("bad@x.io"))
    deadletters.record(pipe.redis, job.id, 9, [("x@x.io", "attentive_record_413: too big", {"x": 1})])

    done = redrive(pipe.redis, job.id, job.config.batch_size, "attentive_record_413")
    assert (done.entries, done.kept) == (0, Counter({NO_TIMES: 1}))
    done = redrive(pipe.redis, job.id, job.config.batch_size, "attentive_400")
    assert (done.entries, done.changes) == (1, 1)
    assert deadletters.summary(pipe.redis, job.id).by_reason == {"attentive_record_413": 1}


def test_the_buffer_places_a_redriven_change_only_while_it_is_the_newest(pipe: Pipeline) -> None:
    job = pipe.create_job()
    buffer = pipe.buffer(job)
    record = json.dumps({"identifiers": {"email": "a@x.io"}, "attributes": {"custom": {"vip": True}}})
    assert buffer.ingest([Change("a@x.io", "vip", 1000, record)]).accepted == 1
    buffer.seal_now()
    # As new as the newest accepted: placed (once, however often it comes in one call).
    again = buffer.redrive([Change("a@x.io", "vip", 1000, record), Change("a@x.io", "vip", 1000, record)])
    assert (again.accepted + again.merged + again.queued, again.stale) == (1, 1)
    # Older than the newest accepted: superseded; a plain ingest of the same time stays stale.
    assert buffer.redrive([Change("a@x.io", "vip", 999, record)]).stale == 1
    assert buffer.ingest([Change("a@x.io", "vip", 1000, record)]).stale == 1


def test_a_dead_letter_written_during_the_removal_is_kept_and_counted(
    pipe: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = pipe.create_job()
    refused_then_fixed(pipe, job, enter("bad@x.io"))
    real = deadletters._partition
    calls: list[int] = []

    def partition_while_a_worker_writes(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)
        if not calls:
            deadletters.record(pipe.redis, job.id, 5, [("late@x.io", "attentive_400: late", None)])
        calls.append(1)
        return out

    monkeypatch.setattr(deadletters, "_partition", partition_while_a_worker_writes)
    assert redrive(pipe.redis, job.id, job.config.batch_size).entries == 1
    assert len(calls) == 2
    assert [d["user"] for d in deadletters.read(pipe.redis, job.id)] == ["late@x.io"]
    assert deadletters.summary(pipe.redis, job.id).by_reason == {"attentive_400": 1}


def test_cli_redrive(
    pipe: Pipeline, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "_redis", lambda settings: pipe.redis)
    job = pipe.create_job()
    refused_then_fixed(pipe, job, enter("bad@x.io"), enter("worse@x.io"), refuse=("bad@x.io", "worse@x.io"))
    deadletters.record(pipe.redis, job.id, 9, [("old@x.io", "attentive_400: old", {"identifiers": {}})])

    assert cli.main(["deadletters", "redrive", job.id]) == 0
    out = capsys.readouterr().out
    assert out == (
        f"re-drove 2 dead letters of job {job.id}: 2 changes back in the buffer (sent with the next batch), "
        "0 superseded by newer changes and not sent; kept 1 that cannot be re-driven (1 no_event_times)\n"
    )
    assert cli.main(["deadletters", "redrive", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no export job 'nope'") and err.count("\n") == 1
