"""Job lifecycle through the operator's CLI against a real Redis and real ``celery worker``/``beat``
processes: a stop is final, labels are unique, ``jobs delete`` leaves no key of the job after a real
run put data everywhere, and ``jobs resume`` during a backfill keeps the backfill going.

Shares the backfill tests' module sandbox (Attentive plus Lytics' segment scan) and fixtures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.celeryproc import ROOT, wait_for
from tests.integration.test_backfill_pipeline import (  # noqa: F401 (fixtures)
    SEGMENT,
    bf,
    lytics_requests,
    sandbox_server,
    seed_segment,
    wait_backfilled,
)
from tests.integration.test_pipeline import Pipeline, base_config, line, pipeline  # noqa: F401 (fixture)
from tests.unit.test_job_lifecycle import keys_of
from worker.cli.main import main
from worker.dispatch import CeleryDispatcher
from worker.setup import jobs as jobs_module
from worker.setup.jobconfig import JobState
from worker.setup.jobs import ExportJob
from worker.store import keys

pytestmark = pytest.mark.integration

BACKFILL = {"lytics_segments": {"vip": SEGMENT}, "lytics_token_env": "LYTICS_API_TOKEN"}


def job_file(tmp_path: Path, **overrides: Any) -> str:
    path = tmp_path / f"job-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(base_config(**overrides)))
    return str(path)


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def create(capsys: pytest.CaptureFixture[str], path: str, *options: str) -> str:
    code, out, err = cli(capsys, "jobs", "create", *options, path)
    assert code == 0, err
    return out.split("created export job ", 1)[1].split()[0]


def test_a_stopped_job_cannot_be_resumed_or_paused(
    bf: Pipeline,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    job_id = create(capsys, job_file(tmp_path))
    assert cli(capsys, "jobs", "stop", job_id)[:2] == (0, f"job {job_id} is now stopped\n")

    code, out, err = cli(capsys, "jobs", "resume", job_id)
    assert (code, out) == (2, "")
    assert err.startswith(f"error: job {job_id} is stopped, and a stop is final: it cannot be resumed; ")
    assert "create a new job" in err and err.count("\n") == 1
    code, _, err = cli(capsys, "jobs", "pause", job_id)
    assert code == 2 and "it cannot be paused" in err
    assert bf.jobs.get(job_id).state is JobState.STOPPED


def test_a_label_in_use_is_refused_even_by_concurrent_creates(
    bf: Pipeline,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    first = create(capsys, job_file(tmp_path, label="Spring sale"), "--no-start")
    code, out, err = cli(capsys, "jobs", "create", job_file(tmp_path, label="spring SALE"))
    assert (code, out) == (2, "")
    assert err == (
        f"error: export job {first} (created) is already labelled 'Spring sale': choose another label, "
        "or stop and delete that job first\n"
    )

    # Six processes create one new label at the same moment: one wins, five are refused.
    path = job_file(tmp_path, label="race")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "worker.cli.main", "jobs", "create", "--no-start", path],
            cwd=ROOT,
            env=os.environ.copy(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    results = [(p.wait(timeout=60), p.stderr.read() if p.stderr else "") for p in procs]
    assert sorted(code for code, _ in results) == [0, 2, 2, 2, 2, 2], results
    assert all("already labelled 'race'" in err for code, err in results if code)
    assert sorted(j.config.label for j in bf.jobs.list()) == ["Spring sale", "race"]


def test_delete_after_a_real_run_leaves_no_key_of_the_job(
    bf: Pipeline,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seed_segment(bf.sandbox, [{"email": f"m{i}@x.io"} for i in range(300)])
    # The doomed job also scans a segment Lytics does not know: that part waits out its error in the
    # global backfill schedule, which the delete must clear too.
    halted = {
        "lytics_segments": {"vip": SEGMENT, "lapsed": "nosuchsegment"},
        "lytics_token_env": "LYTICS_API_TOKEN",
    }
    doomed_id = create(capsys, job_file(tmp_path, label="doomed", backfill=halted))
    kept_id = create(capsys, job_file(tmp_path, label="kept", audiences=["vip"]))
    doomed, kept = bf.jobs.get(doomed_id), bf.jobs.get(kept_id)
    bf.procs.worker(concurrency=2)
    bf.procs.beat()
    now = int(time.time() * 1000)
    # Real-time changes for both jobs, with a bad phone (a field drop) and a profile that cannot be
    # sent (a skip); a file backfill for the doomed one.
    bf.send([line("vip", "enter", now, email=f"r{i}@x.io") for i in range(100)])
    bf.send(
        [line("vip", "enter", now, phone="not a phone", email="p@x.io"), line("vip", "enter", now, city="x")]
    )
    members = tmp_path / "members.jsonl"
    members.write_text("\n".join(json.dumps({"email": f"f{i}@x.io"}) for i in range(50)) + "\n")
    assert cli(capsys, "backfill", doomed_id, "--audience", "vip", str(members))[0] == 0
    wait_for(
        lambda: (
            bf.status(doomed)["counters"]["users_delivered"] >= 300 + 101 + 50
            and bf.status(doomed)["backfill"]["audiences"]["lapsed"]["last_error"]
        ),
        90,
        "the doomed job's backfill and changes to be delivered",
    )
    bf.wait_settled(kept)
    assert bf.redis.zscore(keys.backfill_due(doomed_id), "lapsed") is not None  # a key of the job's

    # A second wave is still in the pipeline (buffered, sent, being polled) when the job stops.
    received = bf.status(doomed)["counters"]["received"]
    bf.send([line("vip", "exit", now + 1000, email=f"r{i}@x.io") for i in range(100)])
    wait_for(lambda: bf.status(doomed)["counters"]["received"] > received, 30, "the second wave")
    before = keys_of(bf.redis, doomed_id)
    assert len(before) >= 10, before  # the run really left data behind
    assert cli(capsys, "jobs", "stop", doomed_id)[0] == 0
    code, _, err = cli(capsys, "jobs", "delete", kept_id)
    assert code == 2 and "only a stopped job can be deleted; stop it first" in err

    monkeypatch.setattr(jobs_module, "DELETE_GRACE_SECONDS", 3.0)  # the test's tasks are quick
    code, out, _ = cli(capsys, "jobs", "delete", doomed_id)
    assert code == 0
    assert out.startswith(f"note: job {doomed_id} was stopped")
    assert f"deleted export job {doomed_id} (doomed): removed " in out
    assert keys_of(bf.redis, doomed_id) == []

    # Late tasks for the deleted job find no job and write nothing; the other job goes on.
    CeleryDispatcher().flush(doomed_id)
    CeleryDispatcher().backfill(doomed_id, "vip")
    bf.send([line("vip", "enter", now + 2000, email=f"late{i}@x.io") for i in range(20)])
    wait_for(lambda: bf.custom("late19@x.io").get("vip") is True, 60, "the kept job's late enters")
    bf.wait_settled(kept)
    time.sleep(2)  # a few sweeps (every 0.5 s) and the late tasks
    assert keys_of(bf.redis, doomed_id) == []
    assert keys_of(bf.redis, kept_id)  # only the deleted job's keys went
    assert cli(capsys, "status", doomed_id)[0] == 2
    assert [j.id for j in bf.jobs.list()] == [kept_id]
    create(capsys, job_file(tmp_path, label="doomed"), "--no-start")  # its label is free again


def test_resume_during_a_backfill_keeps_the_backfill_going(
    bf: Pipeline,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seed_segment(bf.sandbox, [{"email": f"b{i}@x.io"} for i in range(1000)])
    job_id = create(capsys, job_file(tmp_path, audiences=["vip"], backfill=BACKFILL))
    job: ExportJob = bf.jobs.get(job_id)
    assert job.state is JobState.BACKFILLING

    # Paused (say by a refused key) while backfilling, then resumed: back to backfilling.
    assert cli(capsys, "jobs", "pause", job_id)[0] == 0
    code, out, _ = cli(capsys, "jobs", "resume", job_id)
    assert code == 0
    assert out == (
        f"job {job_id} is now backfilling\n"
        f"the backfill of vip goes on where it was; follow it with `status {job_id}`\n"
    )
    # A job an older release resumed to running half-way: resuming it puts it back too.
    bf.jobs.set_state(job_id, JobState.RUNNING)
    assert cli(capsys, "jobs", "resume", job_id)[1].startswith(f"job {job_id} is now backfilling\n")
    assert bf.jobs.get(job_id).state is JobState.BACKFILLING

    bf.procs.worker(concurrency=2)
    bf.procs.beat()
    st = wait_backfilled(bf, job, 1000)  # then running, by the backfill's own end
    vip = st["backfill"]["audiences"]["vip"]
    assert (vip["pages"], vip["members"], vip["finished"]) == (10, 1000, True)
    assert lytics_requests(bf.sandbox) == {"200": 10}  # the re-driven steps rescanned nothing
    assert {u["identifiers"]["email"] for u in bf.sandbox.users()} == {f"b{i}@x.io" for i in range(1000)}
