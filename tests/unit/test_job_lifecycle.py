"""Job lifecycle rules kept by the job store: a stop is final, labels are unique, a delete removes
every key of the job and leaves nothing for a late task to find, and a resume keeps a backfill going.

fakeredis and the real Redis in turn (``any_redis``) where Redis semantics matter (WATCH, SCAN).
"""

from __future__ import annotations

import json
import re
import threading
from typing import Any

import pytest
import redis

from worker.backfill import steps as backfill
from worker.cli import jobs as jobs_cli
from worker.pipeline import deadletters
from worker.pipeline.flush import flush_job
from worker.pipeline.ingest import ingest_lines
from worker.pipeline.sweep import sweep
from worker.setup import jobs as jobs_module
from worker.setup.jobconfig import JobState, parse_job_config
from worker.setup.jobs import ExportJob, JobBusy, JobNotFound, JobStateError, JobStore, LabelTaken
from worker.store import keys
from worker.store.replies import text

from .pipeline_kit import Pipeline, enter
from .test_backfill import Dispatcher

CONFIG: dict[str, Any] = {
    "label": "vip export",
    "authorization": "auth-1",
    "audiences": ["vip"],
    "identifier_mappings": {"email": "email"},
}
LYTICS = {"lytics_segments": {"vip": "seg-vip"}, "lytics_token_env": "TEST_LYTICS_TOKEN"}


def config(**overrides: Any) -> Any:
    return parse_job_config({**CONFIG, **overrides})


def keys_of(client: redis.Redis, job_id: str) -> list[str]:
    """Every key whose name mentions the job id, and every global member that does."""
    found = [text(k) for k in client.scan_iter(match=f"*{job_id}*", count=1000)]
    for key in client.scan_iter(count=1000):
        kind = text(client.type(key))
        if kind == "zset":
            found += [f"{text(key)} > {text(m)}" for m, _ in client.zscan_iter(key) if job_id in text(m)]
        elif kind == "hash":
            found += [f"{text(key)} > {text(f)}" for f in client.hkeys(key) if job_id in text(f)]
        elif kind == "set":
            found += [f"{text(key)} > {text(m)}" for m in client.smembers(key) if job_id in text(m)]
    return found


def stopped_long_ago(client: redis.Redis, job_id: str) -> None:
    """Stop the job and date the stop back past the delete grace (as if stopped minutes ago)."""
    store = JobStore(client)
    job = store.set_state(job_id, JobState.STOPPED)
    job.updated_at = "2020-01-01T00:00:00+00:00"
    client.hset(keys.jobs(), job.id, job.to_json())


# --- a stop is final ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "target", [JobState.RUNNING, JobState.BACKFILLING, JobState.PAUSED, JobState.CREATED]
)
def test_a_stopped_job_never_leaves_stopped(fake_redis: Any, target: JobState) -> None:
    store = JobStore(fake_redis)
    job = store.create(config())
    store.set_state(job.id, JobState.STOPPED)
    with pytest.raises(JobStateError, match="stop is final") as info:
        store.set_state(job.id, target)
    assert "\n" not in str(info.value) and "create a new job" in str(info.value)
    # Conditional changes (the workers') are no change either, whatever they name as allowed.
    assert not store.set_state_if(job.id, target, set(JobState))
    assert store.get(job.id).state is JobState.STOPPED


def test_stopping_twice_keeps_the_first_stop(fake_redis: Any) -> None:
    store = JobStore(fake_redis)
    job = store.create(config())
    first = store.set_state(job.id, JobState.STOPPED)
    version = fake_redis.get(keys.jobs_version())
    again = store.set_state(job.id, JobState.STOPPED)
    assert again.updated_at == first.updated_at and fake_redis.get(keys.jobs_version()) == version


def test_a_created_job_cannot_be_paused_but_can_start_or_stop(fake_redis: Any) -> None:
    store = JobStore(fake_redis)
    job = store.create(config(), state=JobState.CREATED)
    with pytest.raises(JobStateError, match="has not started"):
        store.set_state(job.id, JobState.PAUSED)
    assert store.set_state(job.id, JobState.RUNNING).state is JobState.RUNNING
    assert store.set_state(job.id, JobState.PAUSED, "why").pause_reason == "why"
    assert store.set_state(job.id, JobState.BACKFILLING).state is JobState.BACKFILLING


def test_a_conditional_change_of_a_deleted_job_is_no_change(fake_redis: Any) -> None:
    assert not JobStore(fake_redis).set_state_if("gone", JobState.PAUSED, {JobState.RUNNING})
    with pytest.raises(JobNotFound):
        JobStore(fake_redis).set_state("gone", JobState.PAUSED)


# --- unique labels --------------------------------------------------------------------------------
def test_a_label_in_use_is_refused_case_insensitively_until_its_job_is_deleted(
    any_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobs_module, "DELETE_GRACE_SECONDS", 0.0)
    store = JobStore(any_redis)
    first = store.create(config())
    with pytest.raises(LabelTaken, match=f"export job {first.id} .* already labelled 'vip export'"):
        store.create(config(label="  VIP Export "))
    store.set_state(first.id, JobState.STOPPED)
    with pytest.raises(LabelTaken):  # a stopped job still exists, and keeps its label
        store.create(config())
    store.delete(first.id)
    second = store.create(config())
    assert [j.id for j in store.list()] == [second.id]


def test_concurrent_creates_with_one_label_make_one_job(any_redis: redis.Redis) -> None:
    outcomes: list[str] = []
    start = threading.Barrier(8)

    def create() -> None:
        store = JobStore(redis.Redis(connection_pool=any_redis.connection_pool))
        start.wait()
        try:
            outcomes.append(store.create(config()).id)
        except LabelTaken:
            outcomes.append("taken")

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes).count("taken") == 7
    assert len(JobStore(any_redis).list()) == 1


# --- delete ---------------------------------------------------------------------------------------
@pytest.fixture
def pipe(any_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> Pipeline:
    return Pipeline(any_redis, monkeypatch)


def busy_job(pipe: Pipeline, label: str) -> ExportJob:
    """A job with data in most of its keys: buffers, sent batches, counters, dead letters, backfill."""
    job = pipe.create_job(label=label, audiences=("vip",), batch_size=2)
    pipe.ingest(*(enter(f"{label}-{i}@x.io") for i in range(5)))
    flush_job(pipe.rt, job.id)  # two batches sent (at Attentive, waiting for their status)
    pipe.ingest(enter(f"{label}-0@x.io", at="2026-11-26T18:00:00Z"))  # held behind its batch
    deadletters.record(pipe.redis, job.id, 9, [("u", "attentive_400: bad", {"x": 1})])
    backfill.enqueue_file(pipe.redis, job, iter([b"{}"]), backfill.FileReport(), Dispatcher())
    return job


def test_only_a_stopped_job_can_be_deleted(pipe: Pipeline) -> None:
    job = pipe.create_job()
    with pytest.raises(
        JobStateError, match=f"only a stopped job can be deleted; stop it first .*stop {job.id}"
    ):
        pipe.rt.jobs.delete(job.id)
    assert pipe.rt.jobs.get(job.id).state is JobState.RUNNING


def test_delete_waits_until_tasks_that_saw_the_job_before_its_stop_are_done(
    pipe: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = pipe.create_job()
    pipe.rt.jobs.set_state(job.id, JobState.STOPPED)
    with pytest.raises(JobBusy, match=r"was stopped [01] s ago; tasks that started before") as info:
        pipe.rt.jobs.delete(job.id)
    assert 0 < info.value.wait_seconds <= jobs_module.DELETE_GRACE_SECONDS
    monkeypatch.setattr(jobs_module, "DELETE_GRACE_SECONDS", 0.0)
    lock = keys.backfill_lock(job.id, "vip")
    pipe.redis.sadd(keys.backfill_parts(job.id), "vip")
    pipe.redis.set(lock, "token", px=60_000)
    with pytest.raises(JobBusy, match=r"a backfill step is still running \(vip\)"):
        pipe.rt.jobs.delete(job.id)
    pipe.redis.delete(lock)
    assert pipe.rt.jobs.delete(job.id).job.id == job.id


def test_delete_removes_every_key_of_the_job_and_nothing_of_another(pipe: Pipeline) -> None:
    job, other = busy_job(pipe, "gone"), busy_job(pipe, "kept")
    # Entries of the schedule all jobs shared before Redis Cluster support (the sweep moves them).
    pipe.redis.zadd(keys.legacy_backfill_due(), {f"{job.id}|vip": 1, f"{other.id}|vip": 1})
    before_other = sorted(keys_of(pipe.redis, other.id))
    assert len(keys_of(pipe.redis, job.id)) >= 15  # the fixture really filled the job's keys
    stopped_long_ago(pipe.redis, job.id)
    reader = JobStore(pipe.redis)
    assert reader.cached(job.id) is not None

    deleted = pipe.rt.jobs.delete(job.id)

    assert keys_of(pipe.redis, job.id) == []
    assert deleted.purged.keys >= 14 and deleted.purged.global_entries == 1  # its legacy entry
    assert sorted(keys_of(pipe.redis, other.id)) == before_other
    assert reader.cached(job.id) is None  # the version moved: every process drops it at its next read
    with pytest.raises(JobNotFound):
        pipe.rt.jobs.delete(job.id)


def test_tasks_that_run_after_the_delete_find_no_job_and_write_nothing(pipe: Pipeline) -> None:
    job = busy_job(pipe, "gone")
    posts = len(pipe.attentive.posts())
    pipe.rt.jobs.refresh()  # this worker's cache still has the job, as a busy worker's would
    stopped_long_ago(pipe.redis, job.id)
    pipe.rt.jobs.delete(job.id)

    assert flush_job(pipe.rt, job.id).submitted == []
    assert backfill.run_step(pipe.redis, job.id, backfill.FILE_PART).skipped == "job deleted"
    report = ingest_lines(pipe.redis, pipe.rt.jobs, [json.dumps(enter("late@x.io"))])
    assert report.unroutable == 1
    sweep(pipe.rt, lambda now: backfill.redrive_stalled(pipe.redis, Dispatcher(), now + 10**9))
    assert keys_of(pipe.redis, job.id) == []
    assert len(pipe.attentive.posts()) == posts  # and nothing was sent


def test_cli_delete_waits_out_a_recent_stop_then_says_what_it_removed(
    pipe: Pipeline, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    job = busy_job(pipe, "gone")
    pipe.rt.jobs.set_state(job.id, JobState.STOPPED)
    naps: list[float] = []

    def sleep(seconds: float) -> None:
        naps.append(seconds)
        monkeypatch.setattr(jobs_module, "DELETE_GRACE_SECONDS", 0.0)  # time passes

    jobs_cli.delete(pipe.redis, job.id, sleep=sleep)

    out = capsys.readouterr().out.splitlines()
    assert re.match(f"note: job {job.id} was stopped [01] s ago; .* waiting before deleting", out[0])
    assert len(naps) == 1
    assert out[1].startswith(f"deleted export job {job.id} (gone): removed ")
    assert out[1].endswith(" Redis keys")  # its re-drive schedule is one of its keys
    assert keys_of(pipe.redis, job.id) == []


# --- resume ---------------------------------------------------------------------------------------
@pytest.fixture
def dispatch() -> Dispatcher:
    return Dispatcher()


def backfilling_job(client: redis.Redis, dispatch: Dispatcher) -> ExportJob:
    store = JobStore(client)
    job = store.create(config(backfill=LYTICS), state=JobState.CREATED)
    assert backfill.start(client, store, job.id, dispatch, now=1_000) == ["vip"]
    dispatch.backfills.clear()
    return store.get(job.id)


@pytest.mark.parametrize("state", [JobState.PAUSED, JobState.RUNNING, JobState.BACKFILLING])
def test_resume_keeps_an_unfinished_backfill_going(
    fake_redis: Any, dispatch: Dispatcher, state: JobState
) -> None:
    store = JobStore(fake_redis)
    job = backfilling_job(fake_redis, dispatch)
    # Paused by a refused key, or (before this fix) resumed to running half-way through.
    store.set_state(job.id, state, "401")
    fake_redis.zadd(keys.backfill_due(job.id), {"vip": 10**12})  # halted: retry far away

    assert backfill.resume(fake_redis, store, job.id, dispatch, now=5_000) == ["vip"]

    assert store.get(job.id).state is JobState.BACKFILLING
    assert dispatch.backfills == [(job.id, "vip", 0.0)]  # re-driven now, not in ten minutes
    assert fake_redis.zscore(keys.backfill_due(job.id), "vip") == 5_000 + backfill.STALL_MS


def test_resume_after_the_backfill_finished_runs(fake_redis: Any, dispatch: Dispatcher) -> None:
    store = JobStore(fake_redis)
    job = backfilling_job(fake_redis, dispatch)
    store.set_state(job.id, JobState.PAUSED, "401")
    fake_redis.hset(keys.backfill_part(job.id, "vip"), "finished", 1)  # finished while paused
    assert backfill.resume(fake_redis, store, job.id, dispatch) == []
    assert store.get(job.id).state is JobState.RUNNING and dispatch.backfills == []


def test_resume_of_a_created_job_starts_its_backfill(fake_redis: Any, dispatch: Dispatcher) -> None:
    store = JobStore(fake_redis)
    job = store.create(config(backfill=LYTICS), state=JobState.CREATED)
    assert backfill.resume(fake_redis, store, job.id, dispatch) == ["vip"]
    assert store.get(job.id).state is JobState.BACKFILLING


def test_resume_of_a_stopped_job_is_refused_and_drives_nothing(fake_redis: Any, dispatch: Dispatcher) -> None:
    store = JobStore(fake_redis)
    job = backfilling_job(fake_redis, dispatch)
    store.set_state(job.id, JobState.STOPPED)
    due = fake_redis.zrange(keys.backfill_due(job.id), 0, -1, withscores=True)
    with pytest.raises(JobStateError, match="cannot be resumed"):
        backfill.resume(fake_redis, store, job.id, dispatch)
    assert store.get(job.id).state is JobState.STOPPED
    assert dispatch.backfills == []
    assert fake_redis.zrange(keys.backfill_due(job.id), 0, -1, withscores=True) == due
