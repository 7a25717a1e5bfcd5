"""The Existing Users backfill: configuration, the step state machine, last-writer-wins against
real-time changes, resumption after a crash, the sweep's re-drive, file backfills and status.

No Celery and no network: fakeredis, a recording dispatcher and a Lytics on ``httpx.MockTransport``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fakeredis
import httpx
import pytest
import redis

from tests.celeryproc import ROOT
from tests.conftest import TEST_BROKER_URL, TEST_REDIS_URL
from worker import shutdown
from worker.backfill import steps as backfill
from worker.backfill.steps import FILE_PART, FileBackfillError, FileReport, run_step
from worker.clients.lytics import LyticsClient
from worker.observe.status import job_status
from worker.pipeline.buffer import JobBuffer, entry_records
from worker.pipeline.ingest import ingest_lines
from worker.setup.jobconfig import JobConfigError, JobState, parse_job_config
from worker.setup.jobs import ExportJob, JobStore
from worker.store import keys
from worker.store.replies import decode_hash

from .pipeline_kit import RecordingDispatcher
from .test_lytics import FakeScan

TOKEN = "lytics-secret-token-123"
T0 = 1_790_000_000_000  # the backfill's start, epoch ms


class Dispatcher(RecordingDispatcher):
    """The pipeline kit's recording dispatcher plus backfill steps."""

    def __init__(self) -> None:
        super().__init__()
        self.backfills: list[tuple[str, str, float]] = []

    def backfill(self, job_id: str, part: str, countdown: float = 0.0) -> None:
        self.backfills.append((job_id, part, countdown))


def config(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "label": "backfill test",
        "authorization": "auth-1",
        "audiences": ["vip", "lapsed"],
        "identifier_mappings": {"email": "email"},
        "backfill": {"lytics_segments": {"vip": "seg-vip"}, "lytics_token_env": "TEST_LYTICS_TOKEN"},
    }
    data.update(overrides)
    return data


# --- configuration --------------------------------------------------------------------------------------
def test_config_backfill_section_round_trips_with_defaults() -> None:
    cfg = parse_job_config(config())
    assert cfg.backfill is not None
    assert cfg.backfill.lytics_segments == {"vip": "seg-vip"}
    assert cfg.backfill.page_size == 100
    assert parse_job_config(cfg.model_dump(mode="json")) == cfg
    assert parse_job_config(config(backfill=None)).backfill is None


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        (
            {"backfill": {"lytics_segments": {"vipp": "s1"}}},
            "backfill.lytics_segments.vipp: 'vipp' is not one of the job's audiences (lapsed, vip)",
        ),
        ({"backfill": {"lytics_segments": {}}}, "backfill.lytics_segments: map at least one audience"),
        ({"backfill": {"lytics_segments": {"vip": "a/b"}}}, "backfill.lytics_segments.vip: segment id 'a/b'"),
        (
            {"backfill": {"lytics_segmnts": {"vip": "s"}}},
            "backfill.lytics_segmnts: unknown key (a typo?); expected one of lytics_segments, lytics_token_env, page_size",
        ),
        (
            {"backfill": {"lytics_segments": {"vip": "s"}, "lytics_token_env": "EXPORT_SECRET_KEY"}},
            "holds this service's own secret",
        ),
        (
            {"backfill": {"lytics_segments": {"vip": "s"}, "lytics_token_env": "not a name"}},
            "is not an environment variable name",
        ),
        (
            {"backfill": {"lytics_segments": {"vip": "s"}, "page_size": 101}},
            "backfill.page_size: input should be less than or equal to 100",
        ),
        ({"existing_users": False}, "backfill: existing_users is false"),
        (
            {"backfill": {"lytics_segments": {"vip": "s"}, "lytics_token": "abc"}},
            "backfill.lytics_token: unknown key",
        ),
    ],
)
def test_config_backfill_problems(overrides: dict[str, Any], problem: str) -> None:
    with pytest.raises(JobConfigError) as info:
        parse_job_config(config(**overrides))
    assert any(p.startswith(problem) or problem in p for p in info.value.problems), info.value.problems


# --- fixtures -------------------------------------------------------------------------------------------
class World:
    def __init__(self, client: fakeredis.FakeRedis, members: int, monkeypatch: pytest.MonkeyPatch) -> None:
        self.redis = client
        self.jobs = JobStore(client)
        self.dispatch = Dispatcher()
        self.lytics = FakeScan(members=members)
        monkeypatch.setenv("TEST_LYTICS_TOKEN", TOKEN)
        monkeypatch.setattr(backfill, "now_ms", lambda: T0)

    def factory(self) -> Callable[[str], LyticsClient]:
        return lambda token: LyticsClient(
            token,
            "https://lytics.test",
            transport=httpx.MockTransport(self.lytics.handler),
            sleep=lambda s: None,
        )

    def job(self, **overrides: Any) -> ExportJob:
        overrides.setdefault("label", f"backfill test {len(self.jobs.list()) + 1}")  # labels are unique
        job = self.jobs.create(parse_job_config(config(**overrides)), state=JobState.CREATED)
        backfill.start(self.redis, self.jobs, job.id, self.dispatch, now=T0)
        return self.jobs.get(job.id)

    def step(self, job: ExportJob, part: str = "vip") -> backfill.StepReport:
        return run_step(self.redis, job.id, part, self.factory())

    def run_to_end(self, job: ExportJob, part: str = "vip", limit: int = 100) -> int:
        steps = 0
        while True:
            steps += 1
            assert steps <= limit, "backfill did not finish"
            report = self.step(job, part)
            if report.next_in is None:
                return steps

    def part(self, job: ExportJob, part: str = "vip") -> dict[str, str]:
        return decode_hash(self.redis.hgetall(keys.backfill_part(job.id, part)))

    def lww(self, job: ExportJob, user: str, audience: str = "vip") -> int | None:
        return JobBuffer(self.redis, job.id).last_accepted([(user, audience)])[0]

    def pending(self, job: ExportJob, user: str) -> list[dict[str, Any]]:
        """The user's records not yet sent, oldest first: the open batch, then changes waiting for it."""
        open_entry = self.redis.hget(keys.open_entries(job.id), user)
        records = [] if open_entry is None else entry_records(open_entry)
        waiting = self.redis.hget(keys.waiting(job.id), user)
        for entry in (waiting or b"").decode().splitlines():
            records.append(json.loads(entry.split("\t")[1]))  # aud<TAB>record<TAB>identifiers
        return records

    def counters(self, job: ExportJob) -> dict[str, Any]:
        return job_status(self.redis, job.id)["counters"]

    def realtime(self, event: str, email: str, at: int, audience: str = "vip") -> None:
        line = json.dumps({"audience": audience, "event": event, "at": at, "user": {"email": email}})
        ingest_lines(self.redis, JobStore(self.redis), [line])


@pytest.fixture
def world(fake_redis: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch) -> World:
    monkeypatch.setattr(backfill, "PAGES_PER_STEP", 1)
    return World(fake_redis, 250, monkeypatch)


# --- starting -------------------------------------------------------------------------------------------
def test_start_records_the_run_sets_backfilling_and_dispatches_ids_only(world: World) -> None:
    job = world.job()
    assert job.state is JobState.BACKFILLING
    assert world.dispatch.backfills == [(job.id, "vip", 0.0)]
    part = world.part(job)
    assert part["segment"] == "seg-vip" and part["at_ms"] == str(T0)
    assert part["finished"] == "0" and part["pages"] == "0"
    assert world.redis.zscore(keys.backfill_due(job.id), "vip") == T0 + backfill.STALL_MS
    # Starting again does not restart (or rescan) the run.
    assert backfill.start(world.redis, world.jobs, job.id, world.dispatch) == []
    assert len(world.dispatch.backfills) == 1


def test_a_start_cut_short_after_recording_the_run_is_finished_by_starting_again(world: World) -> None:
    job = world.job()
    # As if the process died after recording the run but before switching the job's state.
    world.jobs.set_state(job.id, JobState.CREATED)
    assert backfill.start(world.redis, world.jobs, job.id, world.dispatch) == []
    assert world.jobs.get(job.id).state is JobState.BACKFILLING
    assert world.part(job)["pages"] == "0"  # the recorded run is kept, not restarted


def test_a_job_without_a_backfill_source_just_runs(world: World) -> None:
    job = world.job(backfill=None)
    assert job.state is JobState.RUNNING and world.dispatch.backfills == []
    assert job_status(world.redis, job.id)["backfill"] is None
    no_users = world.job(existing_users=False, backfill=None)
    assert no_users.state is JobState.RUNNING


# --- stepping -------------------------------------------------------------------------------------------
def test_each_step_buffers_one_page_saves_the_token_and_the_last_one_makes_the_job_running(
    world: World,
) -> None:
    job = world.job()
    first = world.step(job)
    assert (first.pages, first.members, first.next_in, first.finished) == (1, 100, 0.0, False)
    assert world.part(job)["next"] == "100" and world.part(job)["pages"] == "1"
    assert world.counters(job)["accepted"] == 100
    assert world.lytics.requests[-1].url.params.get("start") is None
    assert world.jobs.get(job.id).state is JobState.BACKFILLING

    second = world.step(job)
    assert second.members == 100 and world.lytics.requests[-1].url.params["start"] == "100"
    third = world.step(job)
    assert third.finished and third.next_in is None and third.members == 50
    part = world.part(job)
    assert (part["pages"], part["members"], part["finished"], part["total"]) == ("3", "250", "1", "250")
    assert world.jobs.get(job.id).state is JobState.RUNNING
    assert world.redis.zscore(keys.backfill_due(job.id), "vip") is None
    assert world.counters(job)["accepted"] == 250
    # Every member is an enter at the backfill's start, with the audience flag set.
    assert world.lww(job, "m7@x.io") == T0
    [record] = world.pending(job, "m7@x.io")
    assert record["attributes"]["custom"] == {"vip": True}
    # A late duplicate task finds the part finished and does nothing.
    assert world.step(job).skipped == "already finished"


def test_several_pages_per_step_when_allowed(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backfill, "PAGES_PER_STEP", 5)
    job = world.job()
    report = world.step(job)
    assert report.pages == 3 and report.finished


def test_a_stopping_worker_ends_the_step_after_the_page_in_hand_and_hands_the_part_over(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backfill, "PAGES_PER_STEP", 5)
    job = world.job()
    shutdown.request()  # SIGTERM arrived (worker/shutdown.py)
    try:
        report = world.step(job)
    finally:
        shutdown.clear()
    assert (report.pages, report.finished, report.next_in) == (1, False, 0.0)  # due again at once
    assert world.part(job)["next"] == "100"
    report = world.step(job)  # another worker, not stopping, carries on
    assert report.pages == 2 and report.finished


def test_job_goes_running_only_when_every_audience_is_finished(world: World) -> None:
    job = world.job(
        backfill={"lytics_segments": {"vip": "a", "lapsed": "b"}, "lytics_token_env": "TEST_LYTICS_TOKEN"}
    )
    assert sorted(p for _j, p, _c in world.dispatch.backfills) == ["lapsed", "vip"]
    world.run_to_end(job, "vip")
    assert world.jobs.get(job.id).state is JobState.BACKFILLING
    world.run_to_end(job, "lapsed")
    assert world.jobs.get(job.id).state is JobState.RUNNING
    assert world.lww(job, "m0@x.io", "lapsed") == T0


def test_a_worker_killed_after_buffering_a_page_redoes_it_without_double_counting(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = world.job()
    world.step(job)
    real_save = backfill._save_page

    def crash(*args: Any, **kwargs: Any) -> None:
        raise SystemExit("worker killed before saving the token")

    monkeypatch.setattr(backfill, "_save_page", crash)
    with pytest.raises(SystemExit):
        world.step(job)
    assert world.part(job)["next"] == "100"  # the page was buffered but its token not saved
    # The lock of the killed step would expire; here the test releases it as the timeout would.
    world.redis.delete(keys.backfill_lock(job.id, "vip"))
    monkeypatch.setattr(backfill, "_save_page", real_save)
    world.run_to_end(job)
    part = world.part(job)
    assert part["members"] == "250" and part["pages"] == "3"
    counters = world.counters(job)
    assert counters["accepted"] == 250
    assert counters["stale"] == 100  # the replayed page tied with itself and was dropped
    assert [r.url.params.get("start") for r in world.lytics.requests] == [None, "100", "100", "200"]


def test_only_one_step_works_on_a_part_at_a_time(world: World) -> None:
    job = world.job()
    lock = world.redis.lock(keys.backfill_lock(job.id, "vip"), timeout=60)
    assert lock.acquire(blocking=False)
    report = world.step(job)
    assert report.skipped.startswith("another task") and report.next_in is None
    assert world.lytics.requests == []
    lock.release()
    assert world.step(job).pages == 1


def test_backfilled_members_go_to_this_job_only(world: World) -> None:
    other = world.jobs.create(parse_job_config(config(label="other", backfill=None)), state=JobState.RUNNING)
    job = world.job()
    world.run_to_end(job)
    assert world.counters(job)["accepted"] == 250
    assert world.counters(other)["accepted"] == 0


# --- last writer wins against real-time changes -----------------------------------------------------------
def test_a_realtime_exit_after_the_start_is_never_overwritten_by_the_backfill(world: World) -> None:
    job = world.job()
    world.step(job)  # m5 was backfilled as a member at T0
    world.realtime("exit", "m5@x.io", T0 + 1_000)  # then exits in real time
    world.realtime("exit", "m150@x.io", T0 + 2_000)  # exits before its page is scanned
    world.run_to_end(job)
    for user, exit_at in (("m5@x.io", T0 + 1_000), ("m150@x.io", T0 + 2_000)):
        assert world.lww(job, user) == exit_at
        assert world.pending(job, user)[-1]["attributes"]["custom"] == {"vip": False}
    assert world.counters(job)["stale"] == 1  # m150's backfilled enter lost to the newer exit


def test_a_realtime_change_older_than_the_start_loses_to_the_backfill(world: World) -> None:
    job = world.job()
    world.realtime("exit", "m3@x.io", T0 - 60_000)  # stale news: the scan says m3 is a member now
    world.run_to_end(job)
    assert world.lww(job, "m3@x.io") == T0
    assert world.pending(job, "m3@x.io")[-1]["attributes"]["custom"] == {"vip": True}


# --- failures -------------------------------------------------------------------------------------------
def test_transient_lytics_failure_reschedules_with_a_countdown(world: World) -> None:
    job = world.job()
    world.lytics.replies = [503, 503, 503]
    report = world.step(job)
    assert report.next_in == backfill.RETRY_SECONDS and report.pages == 0
    part = world.part(job)
    assert "503" in part["last_error"] and part["errors"] == "1" and part["next"] == ""
    assert world.step(job).pages == 1  # Lytics is back: the same page is fetched


def test_refused_token_halts_without_retry_storm_and_never_stores_the_token(world: World) -> None:
    job = world.job()
    world.lytics.replies = [401]
    report = world.step(job)
    assert report.next_in is None and "401" in report.error
    assert len(world.lytics.requests) == 1
    stored = json.dumps(job_status(world.redis, job.id))
    assert TOKEN not in stored and "401" in stored
    assert world.redis.zscore(keys.backfill_due(job.id), "vip") == T0 + backfill.HALT_RETRY_MS
    assert world.jobs.get(job.id).state is JobState.BACKFILLING


def test_missing_token_variable_is_reported_by_name(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    job = world.job()
    monkeypatch.delenv("TEST_LYTICS_TOKEN")
    report = world.step(job)
    assert report.next_in is None and "TEST_LYTICS_TOKEN" in report.error
    assert world.lytics.requests == []


def test_a_stopped_job_abandons_its_backfill(world: World) -> None:
    job = world.job()
    world.jobs.set_state(job.id, JobState.STOPPED)
    report = world.step(job)
    assert report.skipped == "job stopped" and report.next_in is None
    assert world.redis.zscore(keys.backfill_due(job.id), "vip") is None


def test_a_paused_job_keeps_buffering_its_backfill_and_stays_paused(world: World) -> None:
    job = world.job()
    world.jobs.set_state(job.id, JobState.PAUSED, "key refused")
    world.run_to_end(job)
    assert world.counters(job)["accepted"] == 250
    assert world.jobs.get(job.id).state is JobState.PAUSED


# --- the sweep ------------------------------------------------------------------------------------------
def test_sweep_redrives_a_part_whose_task_was_lost_once_it_is_due(world: World) -> None:
    job = world.job()
    world.dispatch.backfills.clear()
    assert backfill.redrive_stalled(world.redis, world.dispatch, now=T0 + 1_000) == 0
    assert world.dispatch.backfills == []
    due = T0 + backfill.STALL_MS
    assert backfill.redrive_stalled(world.redis, world.dispatch, now=due) == 1
    assert world.dispatch.backfills == [(job.id, "vip", 0.0)]
    # Pushed forward: the next sweep a second later does not dispatch it again.
    assert backfill.redrive_stalled(world.redis, world.dispatch, now=due + 1_000) == 0


def test_sweep_task_wiring_redrives_backfills(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    import tasks.sweep
    from worker.runtime import Runtime
    from worker.settings import Settings

    job = world.job()
    world.dispatch.backfills.clear()
    world.redis.zadd(keys.backfill_due(job.id), {"vip": 0})
    monkeypatch.setattr(tasks.sweep, "runtime", lambda: Runtime(Settings(), world.redis, world.dispatch))
    tasks.sweep.sweep()  # the task as beat runs it, in this process
    assert world.dispatch.backfills == [(job.id, "vip", 0.0)]


# --- file backfills -------------------------------------------------------------------------------------
def test_file_lines_turn_profiles_into_enters_and_keep_transitions() -> None:
    report = FileReport()
    lines = [
        '{"email": "a@x.io", "first_name": "A"}\n',
        "\n",
        '{"audience": "lapsed", "event": "exit", "at": 5, "user": {"email": "b@x.io"}}\n',
        '{"audience": "elsewhere", "event": "enter", "at": 5, "user": {"email": "c@x.io"}}\n',
        "not json\n",
        "[1, 2]\n",
    ]
    out = [json.loads(x) for x in backfill.file_lines(lines, ["vip", "lapsed"], "vip", T0, report)]
    assert out == [
        {"audience": "vip", "event": "enter", "at": T0, "user": {"email": "a@x.io", "first_name": "A"}},
        {"audience": "lapsed", "event": "exit", "at": 5, "user": {"email": "b@x.io"}},
    ]
    assert (report.lines, report.profiles, report.transitions, report.skipped) == (5, 1, 1, 3)


def test_file_backfill_is_chunked_stepped_and_finished(world: World) -> None:
    job = world.jobs.create(parse_job_config(config(backfill=None)), state=JobState.RUNNING)
    report = FileReport()
    lines = [json.dumps({"email": f"f{i}@x.io"}) for i in range(25)]
    converted = backfill.file_lines(lines, job.config.audiences, "lapsed", T0, report)
    backfill.enqueue_file(world.redis, job, converted, report, world.dispatch, chunk_lines=10)
    assert report.chunks == 3 and world.dispatch.backfills == [(job.id, FILE_PART, 0.0)]
    steps = world.run_to_end(job, FILE_PART)
    assert steps == 4  # three chunks, then the step that finds the queue empty
    status = job_status(world.redis, job.id)["backfill"]
    assert (
        status["file"]["members"] == 25
        and status["file"]["finished"]
        and status["file"]["chunks_waiting"] == 0
    )
    assert status["finished"] and status["audiences"] == {}
    assert world.lww(job, "f3@x.io", "lapsed") == T0
    assert world.jobs.get(job.id).state is JobState.RUNNING
    assert world.redis.keys("*backfill:file:chunk*") == []
    # A second file later reopens the part.
    report2 = FileReport()
    backfill.enqueue_file(
        world.redis,
        job,
        backfill.file_lines(lines[:1], ["lapsed"], "lapsed", T0 + 5, report2),
        report2,
        world.dispatch,
    )
    assert job_status(world.redis, job.id)["backfill"]["file"]["finished"] is False
    world.run_to_end(job, FILE_PART)
    assert world.lww(job, "f0@x.io", "lapsed") == T0 + 5


def test_a_profile_without_an_audience_is_refused_and_nothing_is_queued(world: World) -> None:
    """The whole file is read before anything is written: a bad line far past the first chunks
    still leaves Redis as it was."""
    job = world.jobs.create(parse_job_config(config(backfill=None)), state=JobState.RUNNING)
    lines = ['{"audience": "vip", "event": "enter", "at": 5, "user": {"email": "x@x.io"}}\n'] * 25 + [
        '{"email": "p@x.io"}\n'
    ]
    with pytest.raises(FileBackfillError, match="line 26 is a profile"):
        backfill.backfill_file(
            world.redis, job, lambda: lines, None, T0, world.dispatch, max_staged=None, chunk_lines=2
        )
    assert world.redis.keys("*backfill*") == [] and world.dispatch.backfills == []


def file_job(world: World) -> ExportJob:
    return world.jobs.create(parse_job_config(config(backfill=None)), state=JobState.RUNNING)


def profiles(n: int, start: int = 0) -> list[str]:
    return [json.dumps({"email": f"f{i}@x.io"}) for i in range(start, start + n)]


def staged_lines(client: fakeredis.FakeRedis, job: ExportJob) -> int:
    """The job's file lines in Redis right now: every queued chunk's length."""
    queued = client.lrange(keys.backfill_file_queue(job.id), 0, -1)
    return sum(int(client.llen(keys.backfill_file_chunk(job.id, c.decode()))) for c in queued)


def test_a_file_is_streamed_under_the_cap_while_a_slow_backfill_takes_it(world: World) -> None:
    """Invariant 8: however long the file, Redis holds at most the cap plus one chunk of it."""
    job = file_job(world)
    cap, chunk = 25, 10
    samples: list[int] = []
    seen: list[dict[str, Any]] = []

    def slow_backfill(_seconds: float) -> None:
        """Where the command sleeps: one step (one chunk: PAGES_PER_STEP is 1) per wait."""
        samples.append(staged_lines(world.redis, job))
        world.step(job, FILE_PART)
        samples.append(staged_lines(world.redis, job))

    report = backfill.backfill_file(
        world.redis,
        job,
        lambda: profiles(200),
        "lapsed",
        T0,
        world.dispatch,
        max_staged=cap,
        chunk_lines=chunk,
        on_wait=lambda p: seen.append({"progress": p, **job_status(world.redis, job.id)["backfill"]["file"]}),
        sleep=slow_backfill,
    )
    assert (report.staged, report.total, report.chunks, report.profiles) == (200, 200, 20, 200)
    assert max(samples) <= cap + chunk and max(samples) >= cap  # it reached the cap and waited there
    assert len(seen) >= 15 and world.dispatch.backfills == [(job.id, FILE_PART, 0.0)]  # dispatched once
    first = seen[0]
    assert first["progress"] == backfill.StreamProgress(30, 200, 30, cap, "running")
    assert (first["lines_staged"], first["lines_total"], first["streaming"]) == (30, 200, True)
    assert first["finished"] is False
    world.run_to_end(job, FILE_PART)
    file_part = job_status(world.redis, job.id)["backfill"]["file"]
    assert (file_part["members"], file_part["finished"], file_part["last_error"]) == (200, True, None)
    assert (file_part["lines_staged"], file_part["lines_waiting"], file_part["streaming"]) == (200, 0, False)
    assert file_part["incomplete"] is False
    assert all(world.lww(job, f"f{i}@x.io", "lapsed") == T0 for i in range(200))
    assert world.redis.keys("*backfill:file:chunk*") == []


def test_the_part_does_not_finish_while_the_command_is_still_streaming(world: World) -> None:
    job = file_job(world)
    checks: list[backfill.StepReport] = []

    def lines() -> Iterator[bytes]:
        report = FileReport()
        yield from backfill.file_lines(profiles(10), ["lapsed"], "lapsed", T0, report)
        # The first chunk is staged; the command reads on slowly. The backfill takes the chunk...
        checks.append(world.step(job, FILE_PART))
        # ...and finds nothing more, but the command's mark is live: the part stays open.
        checks.append(world.step(job, FILE_PART))
        yield from backfill.file_lines(profiles(10, 10), ["lapsed"], "lapsed", T0, report)

    backfill.enqueue_file(world.redis, job, lines(), FileReport(total=20), world.dispatch, chunk_lines=10)
    took, waited = checks
    assert took.members == 10 and not took.finished
    assert (waited.members, waited.finished, waited.next_in) == (0, False, backfill.PRODUCER_WAIT_SECONDS)
    assert waited.skipped == "waiting for `attentive-export backfill` to stage more lines"
    assert world.part(job, FILE_PART)["finished"] == "0"
    world.run_to_end(job, FILE_PART)  # the command ended (its mark is gone): the rest, then finished
    part = world.part(job, FILE_PART)
    assert (part["members"], part["finished"], part.get("last_error")) == ("20", "1", None)


def test_a_command_that_died_lets_the_part_finish_and_says_how_far_it_got(world: World) -> None:
    """Its mark expires: the part finishes with what arrived and says how to send the rest."""
    job = file_job(world)
    at_ms = 1_790_000_000_123
    finished: list[backfill.StepReport] = []

    def lines() -> Iterator[bytes]:
        report = FileReport()
        yield from backfill.file_lines(profiles(10), ["lapsed"], "lapsed", at_ms, report)
        time.sleep(0.3)  # frozen past its mark's life (as if killed): the backfill goes on
        finished.extend(world.step(job, FILE_PART) for _ in range(2))
        yield from backfill.file_lines(profiles(20, 10), ["lapsed"], "lapsed", at_ms, report)

    with pytest.raises(backfill.FileStreamError, match="lost its producer mark") as info:
        backfill.enqueue_file(
            world.redis,
            job,
            lines(),
            FileReport(total=30),
            world.dispatch,
            chunk_lines=10,
            at_ms=at_ms,
            at_defaulted=True,
            mark_ttl=0.2,
        )
    assert "after 10 of 30 lines were staged" in str(info.value)
    assert finished[0].members == 10 and finished[1].finished
    file_part = job_status(world.redis, job.id)["backfill"]["file"]
    assert (file_part["finished"], file_part["incomplete"], file_part["members"]) == (True, True, 10)
    error = file_part["last_error"]
    assert error.startswith(
        "file backfill incomplete: the `attentive-export backfill` command stopped (killed, or cut off"
    )
    assert "after staging 10 of 30 lines (those are sent)" in error
    assert "to send the rest, run the same command again with --at 2026-09-21T14:13:20.123Z (safe" in error
    assert "stale duplicates" in error and "--at was not given" in error
    assert world.redis.keys("*backfill:file:chunk*") == []  # the late chunk was never written


def test_ctrl_c_ends_the_stream_where_it_is_and_the_part_finishes_with_what_was_staged(world: World) -> None:
    job = file_job(world)
    report = FileReport()

    def interrupt(_seconds: float) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        backfill.backfill_file(
            world.redis,
            job,
            lambda: profiles(50),
            "lapsed",
            T0,
            world.dispatch,
            max_staged=20,
            chunk_lines=10,
            sleep=interrupt,
            report=report,
        )
    assert (report.staged, report.total) == (20, 50)
    assert world.redis.keys("*backfill:file:producer*") == []  # the part need not wait out the mark
    assert world.part(job, FILE_PART)["stream_state"] == "interrupted"
    world.run_to_end(job, FILE_PART)
    part = world.part(job, FILE_PART)
    assert (part["members"], part["finished"]) == ("20", "1")
    assert "command was interrupted after staging 20 of 50 lines" in part["last_error"]
    assert "--at was not given" not in part["last_error"]


def test_a_cancelled_file_part_stops_the_command(world: World) -> None:
    job = file_job(world)

    def cancel(_progress: backfill.StreamProgress) -> None:
        backfill.cancel_part(world.redis, job.id, FILE_PART, "the job is stopping: only its teardown is sent")

    with pytest.raises(backfill.FileStreamError, match=r"cancelled \(the job is stopping"):
        backfill.backfill_file(
            world.redis,
            job,
            lambda: profiles(50),
            "lapsed",
            T0,
            world.dispatch,
            max_staged=20,
            chunk_lines=10,
            on_wait=cancel,
            sleep=lambda s: None,
        )
    assert world.redis.keys("*backfill:file:chunk*") == [] and world.redis.keys("*producer*") == []


def test_one_command_streams_into_a_job_at_a_time(world: World) -> None:
    job = file_job(world)
    world.redis.set(keys.backfill_file_producer(job.id), "another", px=30_000)
    with pytest.raises(backfill.FileStreamError, match="another `attentive-export backfill` is streaming"):
        backfill.backfill_file(
            world.redis, job, lambda: profiles(5), "lapsed", T0, world.dispatch, max_staged=None
        )
    assert world.redis.keys("*backfill:file:chunk*") == [] and world.dispatch.backfills == []


def test_ctrl_c_in_the_command_is_one_line_saying_how_to_send_the_rest(
    real_redis: redis.Redis, tmp_path: Path
) -> None:
    """The real command, interrupted with SIGINT while it waits for room: no traceback, exit 130."""
    job = file_job_on(real_redis)
    data = tmp_path / "members.jsonl"
    data.write_text("\n".join(profiles(3000)) + "\n")
    env = {
        **os.environ,
        "REDIS_URL": TEST_REDIS_URL,
        "CELERY_BROKER_URL": TEST_BROKER_URL,
        "BACKFILL_FILE_MAX_STAGED_LINES": "1000",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli.main", "backfill", job.id, "--audience", "lapsed", str(data)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        waiting = proc.stderr.readline()  # no worker takes the lines: it waits at the cap
        assert waiting.startswith(
            "staged 1,000 of 3,000 lines; waiting for the backfill to catch up (1,000 staged"
        )
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(
        f"interrupted: staged 1,000 of 3,000 lines of {data} into job {job.id}; they will be sent"
    )
    assert "; to send the rest, run the same command again with --at " in err and "--at was not given" in err
    assert not real_redis.exists(keys.backfill_file_producer(job.id))
    while not run_step(real_redis, job.id, FILE_PART).finished:
        pass
    part = decode_hash(real_redis.hgetall(keys.backfill_part(job.id, FILE_PART)))
    assert part["members"] == "1000" and "was interrupted after staging 1,000 of 3,000" in part["last_error"]
    redis.Redis.from_url(TEST_BROKER_URL).flushdb()  # the step task the command queued


def file_job_on(client: redis.Redis) -> ExportJob:
    return JobStore(client).create(parse_job_config(config(backfill=None)), state=JobState.RUNNING)


def test_status_shows_progress_per_audience(world: World) -> None:
    job = world.job()
    world.step(job)
    block = job_status(world.redis, job.id)["backfill"]
    vip = block["audiences"]["vip"]
    assert (vip["pages"], vip["members"], vip["total"], vip["finished"], vip["segment"]) == (
        1,
        100,
        250,
        False,
        "seg-vip",
    )
    assert vip["members_at_ms"] == T0 and vip["last_error"] is None
    assert block["finished"] is False and block["file"] is None


def test_a_step_waits_while_the_jobs_queued_backlog_is_over_its_cap(world: World) -> None:
    """Real-time changes queue behind sealed batches: a backfill that kept sealing would make them
    wait minutes, and Redis would hold the whole segment."""
    job = world.job(batch_size=100)
    first = run_step(world.redis, job.id, "vip", world.factory(), max_queued_users=150)
    assert first.members == 100  # one full batch sealed: 100 users queued, under the cap
    second = run_step(world.redis, job.id, "vip", world.factory(), max_queued_users=150)
    assert second.members == 100  # now 200 queued
    held = run_step(world.redis, job.id, "vip", world.factory(), max_queued_users=150)
    assert (held.members, held.next_in) == (0, backfill.BACKLOG_WAIT_SECONDS)
    assert world.part(job)["pages"] == "2" and len(world.lytics.requests) == 2  # no page read
    assert world.counters(job)["backfill_waits_for_backlog"] == 1
    world.redis.delete(keys.sealed(job.id))  # sent: the backlog drained
    assert run_step(world.redis, job.id, "vip", world.factory(), max_queued_users=150).finished
