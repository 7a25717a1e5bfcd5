"""Dead letters: capped per job, counted exactly by reason class, listed, purged (fakeredis).

DESIGN.md invariant 1 (an operator sees why a change will not arrive) and 8 (memory does not grow
with the number of changes: the list is capped, the counts stay exact).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest
import redis

import worker.cli.main as cli
from worker.observe.status import job_status
from worker.pipeline import deadletters
from worker.pipeline.flush import flush_job
from worker.settings import DEFAULT_DEADLETTER_CAP, Settings, SettingsError, load_settings
from worker.store import keys

from .pipeline_kit import Pipeline, users

JOB = "j1"


@pytest.fixture(autouse=True)
def fresh_cap() -> Iterator[None]:
    """``default_cap`` reads DEADLETTER_CAP once per process: forget it around each test."""
    deadletters.default_cap.cache_clear()
    yield
    deadletters.default_cap.cache_clear()


@pytest.fixture
def pipe(fake_redis: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch) -> Pipeline:
    return Pipeline(fake_redis, monkeypatch)


def dead(n: int, reason: str = "attentive_400: Invalid email address", prefix: str = "u") -> list[Any]:
    return [
        (f"{prefix}{i}@x.io", f"{reason}: {prefix}{i}@x.io", {"identifiers": {"email": f"{prefix}{i}"}})
        for i in range(n)
    ]


def kept_users(client: redis.Redis, job_id: str = JOB) -> list[str]:
    return [d["user"] for d in deadletters.read(client, job_id, limit=0)]


# --- reason classes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("attentive_400: Invalid email address: x@y", "attentive_400"),
        ("attentive_record_413: Record exceeds 1 MiB", "attentive_record_413"),
        ("attentive_record_None:", "attentive_record_None"),
        ("Attentive job aj-77 ended FAILED; gave up after 3 failed sends", deadletters.GAVE_UP),
        ("Attentive has no job aj-9 (404): lost; gave up after 3 failed sends", deadletters.GAVE_UP),
        ("users left open by an earlier send; gave up after 3 failed sends", deadletters.GAVE_UP),
        (
            "batch records missing in Redis (data lost or edited): the change cannot be sent",
            deadletters.DATA_MISSING,
        ),
        # Free text before the first ':' (ids, spaces, messages) never becomes a class of its own.
        ("Invalid phone +1 555: refused", deadletters.OTHER),
        ("", deadletters.OTHER),
        ("x" * 65 + ": too long to be a class", deadletters.OTHER),
    ],
)
def test_reason_class_is_stable_and_never_free_text(reason: str, expected: str) -> None:
    assert deadletters.reason_class(reason) == expected


# --- cap and exact counts -------------------------------------------------------------------------


def test_the_cap_keeps_the_newest_entries_and_the_counts_stay_exact(fake_redis: fakeredis.FakeRedis) -> None:
    for i in range(12):  # one at a time, as a flush isolating 400s writes them
        reason = "attentive_400: bad email" if i % 3 else "attentive_record_413: too big"
        assert deadletters.record(fake_redis, JOB, 7, [(f"u{i}", f"{reason} {i}", None)], cap=5) == 1

    assert kept_users(fake_redis) == [f"u{i}" for i in range(7, 12)]
    s = deadletters.summary(fake_redis, JOB)
    assert s.by_reason == {"attentive_400": 8, "attentive_record_413": 4}
    assert (s.kept, s.dropped_by_cap, s.purged) == (5, 7, 0)
    assert fake_redis.hget(keys.job_status(JOB), "deadlettered_users") == b"12"
    # The full reason stays in the entry; the class beside it.
    last = deadletters.read(fake_redis, JOB, limit=1)[0]
    assert last["reason"] == "attentive_400: bad email 11" and last["reason_class"] == "attentive_400"


def test_one_write_larger_than_the_cap_keeps_its_newest_entries(fake_redis: fakeredis.FakeRedis) -> None:
    assert deadletters.record(fake_redis, JOB, 1, dead(8), cap=3) == 8
    assert kept_users(fake_redis) == ["u5@x.io", "u6@x.io", "u7@x.io"]
    s = deadletters.summary(fake_redis, JOB)
    assert s.by_reason == {"attentive_400": 8} and s.kept == 3 and s.dropped_by_cap == 5


def test_cap_comes_from_deadletter_cap(
    fake_redis: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEADLETTER_CAP", "2")
    deadletters.record(fake_redis, JOB, 1, dead(4))
    assert kept_users(fake_redis) == ["u2@x.io", "u3@x.io"]
    assert deadletters.summary(fake_redis, JOB).dropped_by_cap == 2


def test_deadletter_cap_setting_default_and_bounds() -> None:
    assert Settings.from_env({}).deadletter_cap == DEFAULT_DEADLETTER_CAP == 100_000
    assert load_settings({"DEADLETTER_CAP": " 5 "}).deadletter_cap == 5
    for bad in ("0", "-3", "abc", "1.5", "10000001"):
        with pytest.raises(SettingsError, match=r"^DEADLETTER_CAP: must be a whole number of entries"):
            load_settings({"DEADLETTER_CAP": bad})


def test_queue_commits_with_the_callers_other_writes_in_one_multi(fake_redis: fakeredis.FakeRedis) -> None:
    pipe = fake_redis.pipeline(transaction=True)
    pipe.hset(keys.batch(JOB, 3), "done", 1)  # (a key of the job's: one MULTI, one Cluster slot)
    assert deadletters.queue(pipe, JOB, 3, dead(2), cap=10) == 2
    assert fake_redis.llen(keys.job_deadletters(JOB)) == 0  # nothing before EXEC
    pipe.execute()
    assert fake_redis.hget(keys.batch(JOB, 3), "done") == b"1"
    assert deadletters.summary(fake_redis, JOB).by_reason == {"attentive_400": 2}


def test_nothing_to_write_sends_nothing(fake_redis: fakeredis.FakeRedis) -> None:
    assert deadletters.record(fake_redis, JOB, 1, [], cap=5) == 0
    assert fake_redis.keys("*") == []


# --- reading ----------------------------------------------------------------------------------------


def test_read_by_class_returns_the_newest_matches_oldest_first_across_pages(
    fake_redis: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(deadletters, "_PAGE", 3)  # several pages for ten entries
    for i in range(10):
        reason = "attentive_400: x" if i in (0, 1, 4, 8) else "attentive_record_400: y"
        deadletters.record(fake_redis, JOB, 1, [(f"u{i}", reason, None)], cap=100)

    def users_of(**kw: Any) -> list[str]:
        return [d["user"] for d in deadletters.read(fake_redis, JOB, **kw)]

    assert users_of(limit=0, reason="attentive_400") == ["u0", "u1", "u4", "u8"]
    assert users_of(limit=2, reason="attentive_400") == ["u4", "u8"]
    assert users_of(limit=3) == ["u7", "u8", "u9"]
    assert users_of(limit=0, reason="nope") == []


def test_entries_written_before_classes_were_stored_are_classed_from_their_reason(
    fake_redis: fakeredis.FakeRedis,
) -> None:
    old = {
        "at": "2026-01-01T00:00:00Z",
        "batch": 1,
        "user": "old",
        "reason": "attentive_400: x",
        "record": None,
    }
    fake_redis.rpush(keys.job_deadletters(JOB), json.dumps(old))
    assert [d["user"] for d in deadletters.read(fake_redis, JOB, reason="attentive_400")] == ["old"]
    s = deadletters.summary(fake_redis, JOB)  # uncounted: kept, never a negative drop
    assert (s.kept, s.dropped_by_cap, s.by_reason) == (1, 0, {})


# --- purge ------------------------------------------------------------------------------------------


def test_purge_one_class_removes_its_entries_and_count_and_keeps_the_rest_in_order(
    fake_redis: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(deadletters, "_PAGE", 2)
    deadletters.record(fake_redis, JOB, 1, dead(6, "attentive_400", "a"), cap=8)  # 6 a's
    deadletters.record(fake_redis, JOB, 2, dead(4, "attentive_record_400", "r"), cap=8)  # drops a0, a1

    done = deadletters.purge(fake_redis, JOB, "attentive_400")

    assert (done.entries, done.counted) == (4, 6)
    assert kept_users(fake_redis) == [f"r{i}@x.io" for i in range(4)]
    s = deadletters.summary(fake_redis, JOB)
    assert (s.by_reason, s.kept, s.dropped_by_cap, s.purged) == ({"attentive_record_400": 4}, 4, 0, 6)
    assert fake_redis.hget(keys.job_status(JOB), "deadlettered_users") == b"10"  # history stays
    assert deadletters.purge(fake_redis, JOB, "attentive_400") == deadletters.Purged(0, 0)


def test_purge_all(fake_redis: fakeredis.FakeRedis) -> None:
    deadletters.record(
        fake_redis, JOB, 1, dead(5, "attentive_400") + dead(2, "attentive_record_413", "r"), cap=4
    )
    assert deadletters.purge(fake_redis, JOB) == deadletters.Purged(4, 7)
    s = deadletters.summary(fake_redis, JOB)
    assert (s.by_reason, s.kept, s.dropped_by_cap, s.purged) == ({}, 0, 0, 7)


def test_a_dead_letter_written_during_a_purge_is_neither_lost_nor_uncounted(
    fake_redis: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    deadletters.record(fake_redis, JOB, 1, dead(3, "attentive_400"), cap=10)
    real_split = deadletters._partition
    calls: list[int] = []

    def split_while_a_worker_writes(*args: Any, **kwargs: Any) -> Any:
        out = real_split(*args, **kwargs)
        if not calls:  # a worker dead-letters between the purge's read and its write
            deadletters.record(fake_redis, JOB, 2, [("late", "attentive_record_400: y", None)], cap=10)
        calls.append(1)
        return out

    monkeypatch.setattr(deadletters, "_partition", split_while_a_worker_writes)
    assert deadletters.purge(fake_redis, JOB, "attentive_400") == deadletters.Purged(3, 3)
    assert len(calls) == 2  # the first attempt was aborted by WATCH and redone
    assert kept_users(fake_redis) == ["late"]
    assert deadletters.summary(fake_redis, JOB).by_reason == {"attentive_record_400": 1}


# --- through the pipeline ---------------------------------------------------------------------------


def test_dead_letters_from_flushes_are_capped_and_counted_by_class(
    pipe: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real dead letters: users a 400 isolates, then a batch whose records are gone from Redis."""
    monkeypatch.setenv("DEADLETTER_CAP", "3")
    job = pipe.create_job()
    refused = users(4, "bad")
    pipe.sealed_batch(job, [*refused, *users(2, "ok")])
    pipe.attentive.refuse_containing(*refused)
    flush_job(pipe.rt, job.id)  # the bisection isolates four 400s, dead-lettered in one write

    lost = users(2, "lost")
    bid = pipe.sealed_batch(job, lost)
    pipe.redis.delete(keys.batch_entries(job.id, bid))
    flush_job(pipe.rt, job.id)  # nothing to send: its users are dead-lettered

    assert kept_users(pipe.redis, job.id) == ["bad3@x.io", *lost]
    st = job_status(pipe.redis, job.id)
    assert st["deadletters"] == {
        "by_reason": {"attentive_400": 4, deadletters.DATA_MISSING: 2},
        "kept": 3,
        "dropped_by_cap": 3,
        "purged": 0,
    }
    assert st["counters"]["deadlettered_users"] == 6


# --- command line -----------------------------------------------------------------------------------


@pytest.fixture
def run_cli(pipe: Pipeline, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Any:
    monkeypatch.setattr(cli, "_redis", lambda settings: pipe.redis)

    def run(*argv: str) -> tuple[int, str, str]:
        code = cli.main(["deadletters", *argv])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def test_cli_unknown_job_is_an_error_not_an_empty_list(run_cli: Any) -> None:
    for argv in (("nope",), ("counts", "nope"), ("purge", "nope")):
        code, out, err = run_cli(*argv)
        assert code == 2 and out == ""
        assert err.startswith("error: no export job 'nope'") and err.count("\n") == 1


def test_cli_list_counts_and_purge(pipe: Pipeline, run_cli: Any) -> None:
    job = pipe.create_job()
    deadletters.record(
        pipe.redis, job.id, 1, dead(4, "attentive_400") + dead(2, "attentive_record_413", "r"), cap=5
    )

    code, out, _ = run_cli(job.id)  # `deadletters JOB` still lists
    assert code == 0 and [d["user"] for d in json.loads(out)] == [
        "u1@x.io",
        "u2@x.io",
        "u3@x.io",
        "r0@x.io",
        "r1@x.io",
    ]
    code, out, _ = run_cli("list", job.id, "--reason", "attentive_400", "--limit", "2")
    assert code == 0 and [d["user"] for d in json.loads(out)] == ["u2@x.io", "u3@x.io"]

    code, out, _ = run_cli("counts", job.id)
    assert code == 0 and json.loads(out) == {
        "job": job.id,
        "by_reason": {"attentive_400": 4, "attentive_record_413": 2},
        "kept": 5,
        "dropped_by_cap": 1,
        "purged": 0,
    }

    code, out, _ = run_cli("purge", job.id, "--reason", "attentive_record_413")
    assert code == 0 and out == f"purged 2 dead letters of class 'attentive_record_413' from job {job.id}\n"
    code, out, _ = run_cli("purge", job.id, "--reason", "attentive_record_413")
    assert (
        out
        == f"no dead letters of class 'attentive_record_413' to purge in job {job.id} (classes: attentive_400)\n"
    )
    code, out, _ = run_cli("purge", job.id)
    assert code == 0
    assert out == f"purged 3 dead letters from job {job.id}; 1 more counted had been dropped by the cap\n"
    code, out, _ = run_cli("counts", job.id)
    assert json.loads(out)["purged"] == 6 and json.loads(out)["by_reason"] == {}


def test_cli_refuses_options_that_do_not_apply(pipe: Pipeline, run_cli: Any) -> None:
    job = pipe.create_job()
    code, out, err = run_cli("counts", job.id, "--reason", "attentive_400")
    assert code == 2 and out == "" and err.startswith("error: --reason applies to list, redrive and purge")
    code, out, err = run_cli("purge", job.id, "--limit", "3")
    assert code == 2 and err.startswith("error: --limit applies to list, not purge")
