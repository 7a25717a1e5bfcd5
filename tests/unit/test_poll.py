"""Poll decisions: keep polling, settle COMPLETED results, resend FAILED/lost jobs, pause on 401."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis

from worker.observe.status import job_status
from worker.pipeline import deadletters
from worker.pipeline.buffer import now_ms
from worker.pipeline.flush import flush_job
from worker.pipeline.poll import MAX_SEND_ATTEMPTS, NEEDS_REVIEW_CHECK_SECONDS, Check, next_check_in
from worker.setup.jobconfig import JobState
from worker.setup.jobs import ExportJob
from worker.store import keys

from .pipeline_kit import Pipeline, emails_of, enter, error, exit_, users


@pytest.fixture
def pipe(any_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> Pipeline:
    return Pipeline(any_redis, monkeypatch)


def submitted(pipe: Pipeline, job: ExportJob, emails: list[str]) -> tuple[int, list[str]]:
    """A batch of ``emails`` flushed to Attentive; returns its id and its Attentive job ids."""
    bid = pipe.sealed_batch(job, emails)
    assert flush_job(pipe.rt, job.id).submitted == [bid]
    jobs = json.loads(pipe.buffer(job).batch(bid)["attentive_jobs"])
    return bid, [j["id"] for j in jobs]


def check(pipe: Pipeline, job: ExportJob, bid: int) -> Check:
    """One check of the batch as the key's poller makes it (a token always at hand)."""
    return pipe.check(pipe.rt.jobs.get(job.id), bid)


def test_in_progress_is_not_done_and_schedules_the_next_check(pipe: Pipeline) -> None:
    job = pipe.create_job()
    bid, (aj,) = submitted(pipe, job, users(2))
    pipe.attentive.statuses[aj] = ["IN_PROGRESS"]
    before = now_ms()

    report = check(pipe, job, bid)

    assert not report.done and report.stop_for is None
    assert report.statuses == ("IN_PROGRESS",)
    due = pipe.redis.zscore(keys.polls(job.id), bid)
    first_ms = pipe.rt.settings.first_poll_seconds * 1000
    assert due is not None and before + 0.8 * first_ms <= due <= now_ms() + 1.2 * first_ms
    assert pipe.buffer(job).batch(bid)["state"] == "submitted"
    assert pipe.buffer(job).outstanding_users() == 2
    assert pipe.status(job)["last_attentive_status"] == "IN_PROGRESS"


def test_next_check_moves_out_with_age_and_with_the_batches_at_attentive(pipe: Pipeline) -> None:
    settings = pipe.rt.settings.model_copy(
        update={"first_poll_seconds": 2.0, "poll_cap_seconds": 900.0, "rate_limit_per_second": 90.0}
    )
    low, high = 0.8, 1.2  # jitter

    def within(got: float, expected: float) -> bool:
        return expected * low <= got <= expected * high

    assert within(next_check_in(settings, 0.0, 1, False), 2.0)  # young: the first-check delay
    assert within(next_check_in(settings, 240.0, 1, False), 60.0)  # a quarter of its age
    assert within(next_check_in(settings, 4 * 3600.0, 1, False), 900.0)  # capped
    # 39,000 batches out while sends wait: spread over 10% of 90/s, every check ~72 min apart.
    assert within(next_check_in(settings, 60.0, 39_000, True), 39_000 / 9.0)
    # With nothing to send, checks are spread over half the key instead.
    assert within(next_check_in(settings, 60.0, 39_000, False), 39_000 / 45.0)
    assert within(next_check_in(settings, 10.0, 1, False, "NEEDS_REVIEW"), NEEDS_REVIEW_CHECK_SECONDS)


def test_completed_results_settle_batch_deadletter_failed_records_and_free_users(pipe: Pipeline) -> None:
    job = pipe.create_job()
    emails = users(5)
    bid, _ = submitted(pipe, job, emails)
    pipe.attentive.record_failures = {
        "u1@x.io": (413, "Record exceeds 1 MiB"),
        "u3@x.io": (400, "Invalid attribute value"),
    }
    # Later changes for u1 (failed) and u2 (delivered) wait behind the unfinished batch.
    pipe.ingest(exit_("u1@x.io"), exit_("u2@x.io"))
    assert pipe.buffer(job).waiting_users() == 2 and pipe.buffer(job).open_size() == 0

    report = check(pipe, job, bid)

    assert report.done and report.statuses == ("COMPLETED",)
    status = pipe.status(job)
    assert status["batches_completed"] == "1"
    assert status["users_delivered"] == "3"
    assert status["record_failures"] == "2"
    dead = {d["user"]: d for d in deadletters.read(pipe.redis, job.id)}
    assert set(dead) == {"u1@x.io", "u3@x.io"}
    assert dead["u1@x.io"]["reason"] == "attentive_record_413: Record exceeds 1 MiB"
    assert dead["u3@x.io"]["reason"] == "attentive_record_400: Invalid attribute value"
    assert dead["u3@x.io"]["record"]["attributes"]["custom"] == {"vip": True}
    assert pipe.redis.exists(keys.batch(job.id, bid)) == 0
    assert pipe.redis.zscore(keys.polls(job.id), bid) is None
    buffer = pipe.buffer(job)
    assert buffer.outstanding_users() == 0
    assert buffer.waiting_users() == 0 and buffer.open_size() == 2  # the exits moved on
    assert json.loads(status["last_record_failures"]) == [
        "u1@x.io: attentive_record_413: Record exceeds 1 MiB",
        "u3@x.io: attentive_record_400: Invalid attribute value",
    ]

    # A duplicate poll (a redelivered task) changes nothing and asks Attentive nothing.
    requests = len(pipe.attentive.requests)
    again = check(pipe, job, bid)
    assert again.done
    assert len(pipe.attentive.requests) == requests
    assert len(deadletters.read(pipe.redis, job.id)) == 2
    assert pipe.status(job) == status


def test_failed_job_resends_the_batch_then_deadletters_after_max_attempts(pipe: Pipeline) -> None:
    job = pipe.create_job()
    emails = users(3)
    bid, (aj,) = submitted(pipe, job, emails)
    for attempt in range(1, MAX_SEND_ATTEMPTS):
        pipe.attentive.statuses[aj] = ["FAILED"]
        report = check(pipe, job, bid)

        assert report.done
        batch = pipe.buffer(job).batch(bid)
        assert batch["state"] == "sealed" and batch["attempts"] == str(attempt)
        assert "ended FAILED" in batch["last_error"]
        assert pipe.buffer(job).sealed_count() == 1
        assert pipe.dispatch.flushes[-1] == (job.id, 0.0)
        assert deadletters.read(pipe.redis, job.id) == []
        assert flush_job(pipe.rt, job.id).submitted == [bid]  # the dispatched flush sends it again
        recorded = json.loads(pipe.buffer(job).batch(bid)["attentive_jobs"])
        assert len(recorded) == attempt + 1  # every job stays recorded until the batch completes
        aj = recorded[-1]["id"]

    assert [emails_of(b) for b in pipe.attentive.bulk_bodies] == [emails] * MAX_SEND_ATTEMPTS
    pipe.attentive.statuses[aj] = ["FAILED"]
    flushes = len(pipe.dispatch.flushes)
    assert check(pipe, job, bid).done

    dead = deadletters.read(pipe.redis, job.id)
    assert sorted(d["user"] for d in dead) == emails
    assert all(
        d["reason"] == f"Attentive job {aj} ended FAILED; gave up after {MAX_SEND_ATTEMPTS} failed sends"
        for d in dead
    )
    assert pipe.redis.exists(keys.batch(job.id, bid)) == 0
    assert pipe.buffer(job).outstanding_users() == 0 and pipe.buffer(job).sealed_count() == 0
    assert len(pipe.dispatch.flushes) == flushes  # nothing left to send
    status = pipe.status(job)
    assert status["batches_deadlettered"] == "1" and status["batches_resent"] == str(MAX_SEND_ATTEMPTS - 1)


@pytest.mark.parametrize("answer", ["CANCELLED", "404"])
def test_cancelled_or_lost_job_is_resent_like_failed(pipe: Pipeline, answer: str) -> None:
    job = pipe.create_job()
    bid, (aj,) = submitted(pipe, job, users(2))
    pipe.attentive.statuses[aj] = [error(404, "not found") if answer == "404" else answer]

    assert check(pipe, job, bid).done

    batch = pipe.buffer(job).batch(bid)
    assert batch["state"] == "sealed" and batch["attempts"] == "1"
    assert ("(404): lost" if answer == "404" else "ended CANCELLED") in batch["last_error"]
    assert pipe.buffer(job).sealed_count() == 1
    assert pipe.dispatch.flushes == [(job.id, 0.0)]
    assert pipe.buffer(job).outstanding_users() == 2  # still owned by the batch


@pytest.mark.parametrize("answer", ["NEEDS_REVIEW", "QUARANTINED"])
def test_needs_review_and_unknown_status_keep_polling_and_show_in_status(pipe: Pipeline, answer: str) -> None:
    job = pipe.create_job()
    bid, (aj,) = submitted(pipe, job, users(2))
    pipe.attentive.statuses[aj] = [answer, answer, "COMPLETED"]

    for _ in (0, 1):
        report = check(pipe, job, bid)
        assert not report.done
        due = pipe.redis.zscore(keys.polls(job.id), bid)
        expected_ms = (NEEDS_REVIEW_CHECK_SECONDS if answer == "NEEDS_REVIEW" else 0.01) * 1000
        assert due is not None and due >= now_ms() + 0.8 * expected_ms - 1000
    shown = job_status(pipe.redis, job.id)
    assert shown["last_attentive_status"] == answer
    assert shown["counters"][f"polls_{answer.lower()}"] == 2
    assert shown["buffer"]["batches_at_attentive"] == 1
    assert pipe.buffer(job).batch(bid)["state"] == "submitted"

    assert check(pipe, job, bid).done
    assert pipe.status(job)["users_delivered"] == "2"
    assert job_status(pipe.redis, job.id)["last_attentive_status"] == "COMPLETED"  # not stuck on review


def test_401_during_poll_pauses_the_job_and_keeps_the_batch(pipe: Pipeline) -> None:
    job = pipe.create_job()
    bid, (aj,) = submitted(pipe, job, users(2))
    pipe.attentive.statuses[aj] = [error(401, "bad key")]

    report = check(pipe, job, bid)

    assert not report.done  # paused: the key's poller skips the job until it is resumed
    stored = pipe.rt.jobs.get(job.id)
    assert stored.state is JobState.PAUSED and "401" in stored.pause_reason
    assert pipe.buffer(job).batch(bid)["state"] == "submitted"
    assert pipe.redis.zscore(keys.polls(job.id), bid) is not None  # still in the schedule


def test_429_during_poll_backs_off_for_everyone_and_polls_again(pipe: Pipeline) -> None:
    job = pipe.create_job()
    bid, (aj,) = submitted(pipe, job, users(1))
    pipe.attentive.statuses[aj] = [error(429, "slow", headers={"Retry-After": "3"})]

    report = check(pipe, job, bid)

    assert not report.done and report.stop_for == 3.0  # the poller stops for the hold
    due = pipe.redis.zscore(keys.polls(job.id), bid)
    assert due is not None and due >= now_ms() + 2_000
    assert 2.0 < pipe.limiter().try_acquire() <= 3.0
    assert pipe.status(job)["responses_429"] == "1"
    assert pipe.buffer(job).batch(bid)["state"] == "submitted"


def test_batch_split_into_several_jobs_completes_only_when_all_have_completed(pipe: Pipeline) -> None:
    job = pipe.create_job()
    emails = users(4)
    bid = pipe.sealed_batch(job, emails)
    pipe.attentive.refuse_containing("u2@x.io")
    assert flush_job(pipe.rt, job.id).submitted == [bid]
    subs = json.loads(pipe.buffer(job).batch(bid)["attentive_jobs"])
    assert len(subs) == 2
    done_first, later = subs[0]["id"], subs[1]["id"]
    pipe.attentive.statuses[done_first] = ["COMPLETED"]
    pipe.attentive.statuses[later] = ["IN_PROGRESS", "COMPLETED"]
    pipe.attentive.record_failures = {emails_of(pipe.attentive.accepted[done_first])[0]: (413, "too big")}
    pipe.ingest(exit_("u0@x.io"))

    first = check(pipe, job, bid)

    assert not first.done and first.statuses == ("COMPLETED", "IN_PROGRESS")
    assert pipe.buffer(job).batch(bid)["state"] == "submitted"
    assert pipe.buffer(job).outstanding_users() == 4 and pipe.buffer(job).waiting_users() == 1
    assert len(deadletters.read(pipe.redis, job.id)) == 2  # the 400 one, and the 413 one (once)

    second = check(pipe, job, bid)

    assert second.done and second.statuses == ("COMPLETED",)  # the settled job is not asked again
    assert [r.url.path.rsplit("/", 1)[1] for r in pipe.attentive.status_gets()] == [done_first, later, later]
    assert len(deadletters.read(pipe.redis, job.id)) == 2
    status = pipe.status(job)
    assert status["users_delivered"] == "2" and status["record_failures"] == "1"
    assert pipe.buffer(job).outstanding_users() == 0 and pipe.buffer(job).open_size() == 1


def test_check_of_an_unknown_batch_does_nothing_and_drops_it_from_the_schedule(pipe: Pipeline) -> None:
    job = pipe.create_job()
    pipe.redis.zadd(keys.polls(job.id), {"999": 0})
    assert check(pipe, job, 999).done
    assert pipe.attentive.status_gets() == [] and pipe.polled(job) == []


def test_enter_then_exit_reach_attentive_in_order(pipe: Pipeline) -> None:
    job = pipe.create_job()
    pipe.ingest(enter("a@x.io"), exit_("a@x.io"))
    flush_job(pipe.rt, job.id)
    (bid,) = pipe.polled(job)
    assert check(pipe, job, bid).done
    pipe.buffer(job).seal_now()
    flush_job(pipe.rt, job.id)
    flags = [b[0]["attributes"]["custom"]["vip"] for b in pipe.attentive.bulk_bodies]
    assert flags == [True, False]


def test_results_settlement_interrupted_midway_loses_no_dead_letter(
    pipe: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A poll killed while settling results is retried; the refused records must still be dead-lettered."""
    job = pipe.create_job()
    bid, _ = submitted(pipe, job, users(3))
    pipe.attentive.record_failures = {"u1@x.io": (413, "Record exceeds 1 MiB")}

    class DiesOnce:
        """Stands in for ``json`` inside worker.pipeline.deadletters: the worker dies writing the first dead letter."""

        died = False

        def dumps(self, obj: object) -> str:
            if not self.died:
                self.died = True
                raise RuntimeError("worker killed")
            return json.dumps(obj)

        loads = staticmethod(json.loads)

    monkeypatch.setattr(deadletters, "json", DiesOnce())
    with pytest.raises(RuntimeError, match="worker killed"):
        check(pipe, job, bid)

    assert check(pipe, job, bid).done  # the task's retry

    dead = deadletters.read(pipe.redis, job.id)
    assert [d["user"] for d in dead] == ["u1@x.io"]
    status = pipe.status(job)
    assert status["users_delivered"] == "2" and status["record_failures"] == "1"


def _split_batch(pipe: Pipeline, job: ExportJob) -> tuple[int, str, str]:
    """u0..u3 with u2 refused (400): sub-job A carries two users, sub-job B one."""
    bid = pipe.sealed_batch(job, users(4))
    pipe.attentive.refuse_containing("u2@x.io")
    assert flush_job(pipe.rt, job.id).submitted == [bid]
    a, b = (s["id"] for s in json.loads(pipe.buffer(job).batch(bid)["attentive_jobs"]))
    return bid, a, b


def test_resend_after_a_failed_sub_job_does_not_deadletter_the_refused_user_twice(pipe: Pipeline) -> None:
    job = pipe.create_job()
    bid, a, b = _split_batch(pipe, job)
    pipe.attentive.statuses[a] = ["COMPLETED"]
    pipe.attentive.statuses[b] = ["FAILED"]
    assert check(pipe, job, bid).done
    assert flush_job(pipe.rt, job.id).submitted == [bid]

    assert [d["user"] for d in deadletters.read(pipe.redis, job.id)] == ["u2@x.io"]


def test_giving_up_on_a_split_batch_deadletters_only_undelivered_users(pipe: Pipeline) -> None:
    job = pipe.create_job()
    bid, _, _ = _split_batch(pipe, job)
    for _ in range(MAX_SEND_ATTEMPTS):
        for sub in json.loads(pipe.buffer(job).batch(bid)["attentive_jobs"]):
            carries = emails_of(pipe.attentive.accepted[sub["id"]])
            pipe.attentive.statuses[sub["id"]] = ["FAILED" if "u3@x.io" in carries else "COMPLETED"]
        assert check(pipe, job, bid).done
        flush_job(pipe.rt, job.id)

    gave_up = [d["user"] for d in deadletters.read(pipe.redis, job.id) if "gave up" in d["reason"]]
    assert gave_up == ["u3@x.io"]


def test_twin_polls_settling_at_once_deadletter_once_and_leave_no_batch_behind(
    pipe: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A redelivered poll task runs to completion while the first one is still reading the results."""
    job = pipe.create_job()
    bid, _ = submitted(pipe, job, users(3))
    pipe.attentive.record_failures = {"u2@x.io": (413, "Record exceeds 1 MiB")}
    read_results = pipe.http.iter_results
    twin_ran = False

    def results_with_a_twin(url: str) -> Any:
        nonlocal twin_ran
        if not twin_ran:
            twin_ran = True
            assert check(pipe, job, bid).done  # the twin settles the whole batch
        return read_results(url)

    monkeypatch.setattr(pipe.http, "iter_results", results_with_a_twin)

    check(pipe, job, bid)

    assert twin_ran
    assert [d["user"] for d in deadletters.read(pipe.redis, job.id)] == ["u2@x.io"]
    status = pipe.status(job)
    assert status["batches_completed"] == "1" and status["record_failures"] == "1"
    assert pipe.redis.exists(keys.batch(job.id, bid)) == 0  # no stray batch hash re-created
    assert check(pipe, job, bid).done


def test_results_lines_without_index_are_matched_by_position(pipe: Pipeline) -> None:
    job = pipe.create_job()
    emails = users(4)
    bid, _ = submitted(pipe, job, emails)
    pipe.attentive.results_without_index = True
    pipe.attentive.record_failures = {"u2@x.io": (400, "Invalid attribute value")}

    assert check(pipe, job, bid).done

    status = pipe.status(job)
    assert (status["users_delivered"], status["record_failures"]) == ("3", "1")
    [dead] = deadletters.read(pipe.redis, job.id)
    assert dead["user"] == "u2@x.io"


def test_every_failure_shape_in_a_results_file_is_dead_lettered_and_nothing_else(
    pipe: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The poll reads a results file skipping the lines that plainly report a 2xx: a failure in any
    shape Attentive might write (the line format is undocumented) is still found, and an unreadable
    line that ends like a success is still counted unreadable."""
    import httpx

    from worker.clients.attentive import AttentiveClient

    from .pipeline_kit import BASE_URL, RESULTS_HOST

    job = pipe.create_job()
    emails = users(12)
    bid, _ = submitted(pipe, job, emails)
    odd = {
        1: '{"index":1,"response":{"statusCode":400,"body":{"error":{"message":"bad phone"}}}}',
        3: '{"index":3,"response":{"status":"413"}}',
        5: '{"index":5,"code":500,"message":"boom"}',
        7: '{"index":7,"response":"503 Service Unavailable"}',
        9: '{"index":9,"response":{"statusCode":500},"score":NaN}',
        10: '{"index":10,"response":{"statusCode":202,"statusCode":429}}',
        11: '{"index":11,"request":{"email":},"response":{"statusCode":202,"body":{}}}',  # unreadable
    }
    body = "\n".join(
        odd.get(i, json.dumps({"index": i, "request": {}, "response": {"statusCode": 202, "body": {}}}))
        for i in range(len(emails))
    )

    def handler(request: httpx.Request) -> httpx.Response:
        if f"{request.url.scheme}://{request.url.host}" == RESULTS_HOST:
            return httpx.Response(200, text=body)
        return pipe.attentive.handler(request)

    client = AttentiveClient("test-key", BASE_URL, transport=httpx.MockTransport(handler), max_attempts=1)
    monkeypatch.setattr(pipe.rt, "client_for", lambda job: client)

    assert check(pipe, job, bid).done

    dead = {d["user"]: d["reason"] for d in deadletters.read(pipe.redis, job.id)}
    assert sorted(dead) == sorted(emails[i] for i in (1, 3, 5, 7, 9, 10))
    assert dead[emails[1]] == "attentive_record_400: bad phone"
    assert dead[emails[3]].startswith("attentive_record_413")
    status = pipe.status(job)
    assert (status["users_delivered"], status["record_failures"]) == ("6", "6")
    assert status["results_unreadable_lines"] == "1"
