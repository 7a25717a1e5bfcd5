"""Changing a job (issue 13): the configuration diff and its refusals (pure), then carrying a change
out on fakeredis with the backfill machinery: added audiences backfilled, removed ones torn down
(or kept), resyncs, ``stop --teardown``, a change cut short, and retries an operator can drive.

No Celery and no network: a recording dispatcher and a Lytics on ``httpx.MockTransport``.
"""

from __future__ import annotations

import json
from typing import Any

import fakeredis
import pytest

from worker.backfill import ops
from worker.backfill import steps as backfill
from worker.mapping.mapper import compiled_mapper
from worker.observe.status import job_status
from worker.pipeline.buffer import JobBuffer
from worker.pipeline.ingest import ingest_lines
from worker.setup.changes import diff, plan_update, render_update, resync_sends, teardown_sends
from worker.setup.jobconfig import JobState, parse_job_config
from worker.setup.jobs import ExportJob, JobError, JobStateError, JobStore
from worker.store import keys

from .test_backfill import T0, TOKEN, World, config

LYTICS_BOTH = {
    "lytics_segments": {"vip": "seg-vip", "lapsed": "seg-lapsed"},
    "lytics_token_env": "TEST_LYTICS_TOKEN",
}


def cfg(**overrides: Any) -> Any:
    return parse_job_config(config(**overrides))


# --- the diff and its refusals (pure) --------------------------------------------------------------------
def test_diff_tells_audiences_mapping_and_other_fields_apart() -> None:
    old = cfg(attribute_mappings={"first_name": "firstName"})
    new = cfg(
        audiences=["vip", "winback"],
        attribute_mappings={"first_name": "firstName", "town": "city"},
        flush_interval_seconds=10,
        backfill={"lytics_segments": {"vip": "seg-vip"}, "lytics_token_env": "TEST_LYTICS_TOKEN"},
    )
    change = diff(old, new)
    assert (change.added, change.removed) == (["winback"], ["lapsed"])
    assert [c.field for c in change.mapping] == ["attribute_mappings"]
    assert [c.field for c in change.other] == ["flush_interval_seconds"]
    assert change.changed and not diff(old, old).changed


def test_an_added_audience_is_backfilled_and_a_removed_one_torn_down_from_its_old_segment() -> None:
    old = cfg(backfill=LYTICS_BOTH)
    new = cfg(
        audiences=["vip", "winback"],
        backfill={
            "lytics_segments": {"vip": "seg-vip", "winback": "seg-wb"},
            "lytics_token_env": "TEST_LYTICS_TOKEN",
        },
    )
    plan = plan_update(old, new, started=True)
    assert plan.problems == []
    assert [(s.audience, s.why, s.event, s.segment) for s in plan.sends] == [
        ("winback", "backfill", "enter", "seg-wb"),
        ("lapsed", "teardown", "exit", "seg-lapsed"),
    ]
    text = "\n".join(render_update(plan, "j1", "running"))
    assert "+ audience winback" in text and "- audience lapsed" in text
    assert "teardown: each current member of lapsed (Lytics segment seg-lapsed) gets lapsed: false" in text
    assert "backfill: each current member of winback (Lytics segment seg-wb) gets winback: true" in text
    # Nothing is re-sent for vip: only the added audience's members.
    assert all(s.audience != "vip" for s in plan.sends)


def test_keep_removed_sends_nothing_and_says_so() -> None:
    plan = plan_update(
        cfg(backfill=LYTICS_BOTH), cfg(backfill=None, audiences=["vip"]), started=True, keep_removed=True
    )
    assert plan.problems == [] and plan.sends == []
    text = "\n".join(render_update(plan, "j1", "running"))
    assert "- audience lapsed  (kept: --keep-removed)" in text
    assert "lapsed: kept: its members keep lapsed as it is in Attentive (--keep-removed)" in text


def test_a_mapping_change_applies_later_unless_resync_resends_every_audience() -> None:
    old = cfg(backfill=LYTICS_BOTH)
    new = cfg(backfill=LYTICS_BOTH, attribute_mappings={"city": "city"})
    plan = plan_update(old, new, started=True)
    assert plan.sends == [] and any("add --resync" in n for n in plan.notes)
    resynced = plan_update(old, new, started=True, resync=True)
    assert [(s.audience, s.why) for s in resynced.sends] == [("vip", "resync"), ("lapsed", "resync")]


def test_every_problem_of_an_update_is_listed_at_once() -> None:
    old = cfg(identifier_mappings={"email": "email", "phone": "phone"})  # key: email
    new = cfg(
        identifier_mappings={"phone": "phone", "email": "email"},  # key would become phone
        audiences=["vip"],  # lapsed removed, no segment for it
        custom_attributes=["LAPSED"],
    )
    plan = plan_update(old, new, started=True, member_files={"vip"}, same_authorization=False)
    problems = "\n".join(plan.problems)
    assert len(plan.problems) == 5, plan.problems
    assert "user_key_field: the user key would change from 'email' (email) to 'phone' (phone)" in problems
    assert "set user_key_field: email to keep it" in problems
    assert "authorization: 'auth-1' -> 'auth-1' is another Attentive account" in problems
    assert (
        "custom_attributes[0]: 'LAPSED' is the flag of audience 'lapsed' that this update removes" in problems
    )
    assert "removing 'lapsed' tears its members down" in problems and "--keep-removed" in problems
    assert "--members vip: this update sends no members of 'vip'" in problems


def test_a_phone_key_cannot_change_region_but_other_fields_can() -> None:
    old = cfg(identifier_mappings={"phone": "phone"})
    assert (
        "user key would change"
        in plan_update(
            old, cfg(identifier_mappings={"phone": "phone"}, default_phone_region="GB"), started=True
        ).problems[0]
    )
    assert plan_update(cfg(), cfg(default_phone_region="GB", label="renamed"), started=True).problems == []


def test_an_unstarted_job_takes_the_change_with_nothing_sent() -> None:
    plan = plan_update(cfg(), cfg(audiences=["vip"]), started=False)
    assert plan.sends == [] and plan.problems == []  # no teardown: it never sent lapsed
    assert any("has not started" in n for n in plan.notes)


def test_resync_and_teardown_sources() -> None:
    sends, notes, problems = resync_sends(cfg(), None)
    assert [s.audience for s in sends] == ["vip"] and "lapsed: no Lytics segment" in notes[0] and not problems
    assert resync_sends(cfg(), "lapsed")[2][0].startswith("lapsed: no Lytics segment")
    assert [s.segment for s in resync_sends(cfg(), "lapsed", {"lapsed"})[0]] == [None]
    assert resync_sends(cfg(), "nope")[2] == ["--audience 'nope' is not exported by the job (vip, lapsed)"]
    sends, problems = teardown_sends(cfg())
    assert [s.audience for s in sends] == ["vip"]
    assert problems == [
        "lapsed: no Lytics segment in the job's backfill section, so its members cannot be found: give "
        "them with --members lapsed=FILE, or stop without --teardown"
    ]
    assert teardown_sends(cfg(), {"lapsed"})[1] == []


# --- carrying a change out ---------------------------------------------------------------------------------
@pytest.fixture
def world(fake_redis: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch) -> World:
    monkeypatch.setattr(backfill, "PAGES_PER_STEP", 10)
    return World(fake_redis, 250, monkeypatch)


def at(monkeypatch: pytest.MonkeyPatch, ms: int) -> None:
    monkeypatch.setattr(backfill, "now_ms", lambda: ms)


def backfilled(world: World, **overrides: Any) -> ExportJob:
    job = world.job(**overrides)
    for part in list(backfill.unfinished_parts(world.redis, job.id)):
        world.run_to_end(job, part)
    assert world.jobs.get(job.id).state is JobState.RUNNING
    return world.jobs.get(job.id)


def update(world: World, job: ExportJob, new: Any, **options: Any) -> ops.Applied:
    member_files = options.pop("member_files", {})
    plan = plan_update(job.config, new, started=True, member_files=set(member_files), **options)
    assert plan.problems == []
    return ops.apply_update(
        world.redis, world.jobs, job, new, plan, world.dispatch, member_files, chunk_lines=100
    )


def flags(world: World, job: ExportJob, user: str) -> list[dict[str, Any]]:
    return [r.get("attributes", {}).get("custom", {}) for r in world.pending(job, user)]


def test_update_writes_the_config_workers_reload_it_and_the_mapping_is_recompiled(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = backfilled(world)
    worker_view = JobStore(world.redis)
    worker_view.refresh()
    before = compiled_mapper(job.id, worker_view.cached(job.id).config)  # type: ignore[union-attr]
    version = world.redis.get(keys.jobs_version())
    new = cfg(attribute_mappings={"first_name": "firstName"}, audiences=["vip", "lapsed", "winback"])
    update(world, job, new)
    assert world.redis.get(keys.jobs_version()) != version
    cached = worker_view.cached(job.id)  # a worker's next routing read
    assert cached is not None and cached.config == new
    assert [j.id for j in worker_view.routes("winback")] == [job.id]
    after = compiled_mapper(job.id, cached.config)
    assert after is not before
    record = after.map({"email": "a@x.io", "first_name": "Ada"}, {"vip": True}).record
    assert record is not None and record["attributes"]["firstName"] == "Ada"


def test_an_added_audience_is_backfilled_alone_at_the_update_time(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = backfilled(world)
    world.dispatch.backfills.clear()
    T1 = T0 + 60_000
    at(monkeypatch, T1)
    new = cfg(
        audiences=["vip", "lapsed", "winback"],
        backfill={
            "lytics_segments": {"vip": "seg-vip", "winback": "seg-wb"},
            "lytics_token_env": "TEST_LYTICS_TOKEN",
        },
    )
    applied = update(world, job, new)
    assert applied.parts == ["winback"] and world.dispatch.backfills == [(job.id, "winback", 0.0)]
    assert applied.job.state is JobState.BACKFILLING and applied.job.pending_ops == []
    part = world.part(job, "winback")
    assert (part["op"], part["event"], part["at_ms"], part["segment"]) == (
        "backfill",
        "enter",
        str(T1),
        "seg-wb",
    )
    requests = len(world.lytics.requests)
    world.run_to_end(job, "winback")
    assert len(world.lytics.requests) == requests + 3  # only the new segment was scanned
    assert world.lww(job, "m7@x.io", "winback") == T1 and world.lww(job, "m7@x.io", "vip") == T0
    assert world.jobs.get(job.id).state is JobState.RUNNING
    assert flags(world, job, "m7@x.io")[-1] == {"winback": True}


def test_a_removed_audience_is_torn_down_even_though_it_is_no_longer_routed(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = backfilled(world, backfill=LYTICS_BOTH)
    # A real-time change stamped after the teardown's start (a clock ahead): last writer wins, it stays.
    world.realtime("enter", "m9@x.io", T0 + 120_000, audience="lapsed")
    T1 = T0 + 60_000
    at(monkeypatch, T1)
    applied = update(
        world,
        job,
        cfg(
            audiences=["vip"],
            backfill={"lytics_segments": {"vip": "seg-vip"}, "lytics_token_env": "TEST_LYTICS_TOKEN"},
        ),
    )
    assert applied.parts == ["teardown:lapsed"]
    part = world.part(job, "teardown:lapsed")
    assert (part["event"], part["segment"], part["op"]) == ("exit", "seg-lapsed", "teardown")
    # Transitions for lapsed no longer reach the job...
    received = world.counters(job)["received"]
    world.realtime("exit", "m1@x.io", T1 + 5, audience="lapsed")
    assert world.counters(job)["received"] == received
    # ...but its teardown does.
    world.run_to_end(job, "teardown:lapsed")
    assert world.lww(job, "m3@x.io", "lapsed") == T1
    assert flags(world, job, "m3@x.io")[-1] == {"lapsed": False}
    assert world.pending(job, "m3@x.io")[-1].get("attributes", {}).keys() == {
        "custom"
    }  # identifiers + flag only
    assert world.lww(job, "m9@x.io", "lapsed") == T0 + 120_000  # the newer change was not overwritten
    assert world.counters(job)["stale"] >= 1
    assert world.lww(job, "m3@x.io", "vip") == T0  # other audiences untouched
    assert world.jobs.get(job.id).state is JobState.RUNNING


def test_removing_an_audience_cancels_its_backfill_under_way(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backfill, "PAGES_PER_STEP", 1)
    job = world.job(backfill=LYTICS_BOTH)
    world.step(job, "lapsed")  # one page of three
    at(monkeypatch, T0 + 1_000)
    update(
        world,
        job,
        cfg(
            audiences=["vip"],
            backfill={"lytics_segments": {"vip": "seg-vip"}, "lytics_token_env": "TEST_LYTICS_TOKEN"},
        ),
    )
    lapsed = world.part(job, "lapsed")
    assert lapsed["finished"] == "1" and "torn down" in lapsed["cancelled"]
    assert world.step(job, "lapsed").skipped == "already finished"


def test_a_member_file_tears_down_an_audience_without_a_segment(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = backfilled(world)
    world.realtime("enter", "f1@x.io", T0 - 10, audience="lapsed")
    at(monkeypatch, T0 + 1_000)
    lines = [json.dumps({"email": f"f{i}@x.io"}) for i in range(150)] + [
        "not json",
        '{"audience": "lapsed", "event": "enter", "at": 1, "user": {}}',
    ]
    applied = update(world, job, cfg(audiences=["vip"]), member_files={"lapsed": lines})
    report = applied.files["lapsed"]
    assert (report.profiles, report.chunks, report.skipped) == (150, 2, 2)
    assert dict(report.reasons) == {"not_json": 1, "transition_not_profile": 1}
    world.run_to_end(job, "teardown:lapsed")
    assert world.lww(job, "f1@x.io", "lapsed") == T0 + 1_000
    assert flags(world, job, "f1@x.io")[-1] == {"lapsed": False}
    assert world.redis.keys("*backfill:file:chunk*") == []  # consumed chunks are gone
    progress = job_status(world.redis, job.id)["backfill"]["audiences"]["teardown:lapsed"]
    assert (progress["source"], progress["members"], progress["total_chunks"], progress["finished"]) == (
        "file",
        150,
        2,
        True,
    )


def test_a_refused_update_stores_nothing(world: World) -> None:
    job = backfilled(world)
    world.jobs.update_config(
        job.id, cfg(label="renamed"), expected=job.config
    )  # someone else got there first
    plan = plan_update(job.config, cfg(audiences=["vip"]), started=True, member_files={"lapsed"})
    with pytest.raises(JobError, match="changed by someone else"):
        ops.apply_update(
            world.redis,
            world.jobs,
            job,
            cfg(audiences=["vip"]),
            plan,
            world.dispatch,
            {"lapsed": ['{"email": "a@x.io"}']},
        )
    assert world.redis.keys("*backfill:file:chunk*") == []
    assert world.jobs.get(job.id).config.label == "renamed"
    other = world.jobs.create(cfg(label="taken"), state=JobState.RUNNING)
    with pytest.raises(JobError, match="already labelled 'taken'"):
        world.jobs.update_config(job.id, cfg(label="TAKEN"), expected=world.jobs.get(job.id).config)
    assert other.id != job.id


def test_resync_sends_current_members_again_and_newer_realtime_changes_win(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backfill, "PAGES_PER_STEP", 1)
    job = backfilled(world)
    T1 = T0 + 60_000
    at(monkeypatch, T1)
    sends, _notes, _problems = resync_sends(job.config, "vip")
    applied = ops.resync(world.redis, world.jobs, job.id, sends, world.dispatch)
    assert applied.parts == ["vip"] and applied.job.state is JobState.BACKFILLING
    part = world.part(job)
    assert (part["op"], part["at_ms"], part["pages"], part["finished"]) == ("resync", str(T1), "0", "0")
    world.realtime("exit", "m150@x.io", T1 + 1)  # newer than the resync: wins
    world.realtime("exit", "m5@x.io", T1 - 1)  # older: the resync's enter wins
    world.run_to_end(job)
    assert world.lww(job, "m150@x.io") == T1 + 1 and flags(world, job, "m150@x.io")[-1] == {"vip": False}
    assert world.lww(job, "m5@x.io") == T1 and flags(world, job, "m5@x.io")[-1] == {"vip": True}
    assert world.jobs.get(job.id).state is JobState.RUNNING


def test_a_step_of_a_restarted_run_saves_nothing(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backfill, "PAGES_PER_STEP", 1)
    job = world.job()
    world.step(job)
    real = ingest_lines

    def restart_meanwhile(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        at(monkeypatch, T0 + 5_000)
        sends, _n, _p = resync_sends(world.jobs.get(job.id).config, "vip")
        monkeypatch.setattr(backfill, "ingest_lines", real)
        ops.resync(world.redis, world.jobs, job.id, sends, world.dispatch)
        return result

    monkeypatch.setattr(backfill, "ingest_lines", restart_meanwhile)
    report = world.step(job)  # buffers page 2 of the old run while a resync restarts the part
    assert report.skipped == "the part was restarted or cancelled meanwhile" and report.next_in is None
    part = world.part(job)
    assert (part["pages"], part["next"], part["at_ms"]) == ("0", "", str(T0 + 5_000))


def test_a_change_cut_short_after_it_was_written_is_finished_by_the_sweep(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = backfilled(world)
    new = cfg(
        audiences=["vip", "lapsed", "winback"],
        backfill={
            "lytics_segments": {"vip": "seg-vip", "winback": "seg-wb"},
            "lytics_token_env": "TEST_LYTICS_TOKEN",
        },
    )
    plan = plan_update(job.config, new, started=True)
    with monkeypatch.context() as dies:
        dies.setattr(backfill, "activate_pending", lambda *a, **k: [])  # the process dies here
        ops.apply_update(world.redis, world.jobs, job, new, plan, world.dispatch)
    at(monkeypatch, T0 + backfill.OPS_GRACE_MS)
    stored = world.jobs.get(job.id)
    assert stored.config == new and len(stored.pending_ops) == 1
    world.dispatch.backfills.clear()
    assert backfill.redrive_stalled(world.redis, world.dispatch, now=T0 + backfill.OPS_GRACE_MS) == 1
    assert world.dispatch.backfills == [(job.id, "@ops", 0.0)]
    world.step(job, "@ops")
    assert world.jobs.get(job.id).pending_ops == []
    assert world.redis.zscore(keys.backfill_due(job.id), "winback") == T0 + backfill.OPS_GRACE_MS  # due now
    world.run_to_end(job, "winback")
    assert world.lww(job, "m1@x.io", "winback") == T0 + backfill.OPS_GRACE_MS


def drain(world: World, job: ExportJob) -> None:
    """As if Attentive completed every batch: claim and complete until nothing is left."""
    buffer = JobBuffer(world.redis, job.id)
    buffer.seal_now()
    while (batch := buffer.claim(60_000)) is not None:
        buffer.complete(batch.batch_id)


def test_stop_with_teardown_sends_every_flag_false_then_stops(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = backfilled(world, backfill=LYTICS_BOTH)
    drain(world, job)
    monkeypatch.setattr(backfill, "PAGES_PER_STEP", 1)
    at(monkeypatch, T0 + 1_000)
    sends, problems = teardown_sends(job.config)
    assert problems == []
    world.dispatch.backfills.clear()
    applied = ops.stop_with_teardown(world.redis, world.jobs, job.id, sends, world.dispatch)
    assert applied.job.state is JobState.STOPPING and applied.job.stop_after_teardown
    assert sorted(applied.parts) == ["teardown:lapsed", "teardown:vip"]
    assert (job.id, "@stop", 0.0) in world.dispatch.backfills
    # A stopping job takes no more changes, cannot be resumed or updated.
    received = world.counters(job)["received"]
    world.realtime("enter", "new@x.io", T0 + 2_000)
    assert world.counters(job)["received"] == received
    with pytest.raises(JobStateError, match="is stopping"):
        world.jobs.set_state(job.id, JobState.RUNNING)
    with pytest.raises(JobStateError, match="can no longer change"):
        world.jobs.update_config(job.id, cfg(label="x"), expected=job.config)
    assert world.step(job, "@stop").skipped == "teardown in progress"
    world.run_to_end(job, "teardown:vip")
    world.run_to_end(job, "teardown:lapsed")
    assert flags(world, job, "m4@x.io") == [{"vip": False}, {"lapsed": False}]
    waiting = world.step(job, "@stop")
    assert waiting.skipped == "waiting for the teardown to reach Attentive" and waiting.sealed
    assert waiting.next_in == backfill.STOP_CHECK_SECONDS
    assert world.jobs.get(job.id).state is JobState.STOPPING
    drain(world, job)
    done = world.step(job, "@stop")
    assert done.finished and done.next_in is None
    assert world.jobs.get(job.id).state is JobState.STOPPED
    assert world.redis.zscore(keys.backfill_due(job.id), "@stop") is None


def test_a_job_paused_while_stopping_resumes_to_stopping(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = backfilled(world)
    sends, _ = teardown_sends(job.config)
    ops.stop_with_teardown(world.redis, world.jobs, job.id, sends, world.dispatch)
    assert world.jobs.set_state_if(job.id, JobState.PAUSED, {JobState.STOPPING}, "key refused")
    assert world.step(job, "@stop").skipped == "paused while stopping"
    assert world.jobs.routes("vip") == []  # paused, but still not taking changes
    backfill.resume(world.redis, world.jobs, job.id, world.dispatch)
    assert world.jobs.get(job.id).state is JobState.STOPPING
    # A plain stop ends it at once.
    assert world.jobs.set_state(job.id, JobState.STOPPED).state is JobState.STOPPED


def test_stop_teardown_of_a_job_that_never_started_just_stops(world: World) -> None:
    job = world.jobs.create(cfg(), state=JobState.CREATED)
    assert (
        ops.stop_with_teardown(world.redis, world.jobs, job.id, [], world.dispatch).job.state
        is JobState.STOPPED
    )


def test_stopping_cancels_backfills_under_way(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backfill, "PAGES_PER_STEP", 1)
    job = world.job()
    world.step(job)
    sends, _ = teardown_sends(job.config)
    ops.stop_with_teardown(world.redis, world.jobs, job.id, sends, world.dispatch)
    vip = world.part(job)
    assert vip["finished"] == "1" and vip["cancelled"] == "audience 'vip' is being torn down"


def test_retry_now_redrives_a_halted_part_and_a_recovered_error_clears(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = world.job()
    monkeypatch.delenv("TEST_LYTICS_TOKEN")
    assert "TEST_LYTICS_TOKEN" in world.step(job).error
    vip = job_status(world.redis, job.id)["backfill"]["audiences"]["vip"]
    assert vip["next_try_at_ms"] == T0 + backfill.HALT_RETRY_MS and "not set" in vip["last_error"]
    monkeypatch.setenv("TEST_LYTICS_TOKEN", TOKEN)
    world.dispatch.backfills.clear()
    assert ops.retry_now(world.redis, world.jobs, job.id, world.dispatch) == ["vip"]
    assert world.dispatch.backfills == [(job.id, "vip", 0.0)]
    assert world.redis.zscore(keys.backfill_due(job.id), "vip") == T0 + backfill.STALL_MS
    world.run_to_end(job)
    vip = job_status(world.redis, job.id)["backfill"]["audiences"]["vip"]
    assert (vip["last_error"], vip["next_try_at_ms"], vip["errors"], vip["finished"]) == (None, None, 1, True)


def test_an_update_fixing_the_token_variable_retries_at_once(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = world.job(backfill={"lytics_segments": {"vip": "seg-vip"}, "lytics_token_env": "WRONG_VARIABLE"})
    assert "WRONG_VARIABLE" in world.step(job).error
    world.dispatch.backfills.clear()
    update(world, job, cfg())
    assert (job.id, "vip", 0.0) in world.dispatch.backfills
    assert world.step(job).members > 0


def test_keep_removed_stops_the_removed_audiences_backfill_and_the_job_runs(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backfill, "PAGES_PER_STEP", 1)
    job = world.job(backfill=LYTICS_BOTH)
    world.run_to_end(job, "vip")
    world.step(job, "lapsed")  # one page of three, then the update
    new = cfg(
        audiences=["vip"],
        backfill={"lytics_segments": {"vip": "seg-vip"}, "lytics_token_env": "TEST_LYTICS_TOKEN"},
    )
    applied = update(world, job, new, keep_removed=True)
    assert applied.parts == [] and applied.job.state is JobState.RUNNING
    lapsed = world.part(job, "lapsed")
    assert lapsed["finished"] == "1" and lapsed["cancelled"] == "audience 'lapsed' was removed from the job"
    assert world.redis.zscore(keys.backfill_due(job.id), "lapsed") is None
    assert world.step(job, "lapsed").skipped == "already finished"
