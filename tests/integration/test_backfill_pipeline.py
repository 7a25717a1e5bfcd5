"""Existing Users backfill end to end: real Redis, real ``celery worker``/``celery beat`` processes,
the sandbox over HTTP as both Attentive and Lytics' segment scan, and the operator's CLI.

Reuses the real-time pipeline's fixture and helpers (tests/integration/test_pipeline.py); the only
difference is a sandbox started with a Lytics token, and that token given to the workers by name.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.celeryproc import wait_for
from tests.integration.test_pipeline import (  # noqa: F401 (fixture)
    Pipeline,
    base_config,
    line,
    on_both_brokers,
    pipeline,
)
from tests.sandboxproc import SandboxProcess, start_sandbox
from worker.cli.main import main
from worker.pipeline.ingest import ingest_lines
from worker.setup.jobconfig import JobState
from worker.setup.jobs import ExportJob

pytestmark = pytest.mark.integration

LYTICS_TOKEN = "lytics-test-token"
SEGMENT = "0123abcdseg"


@pytest.fixture(scope="module")
def sandbox_server() -> Iterator[SandboxProcess]:
    """This module's sandbox: the session one's settings plus a Lytics token for the scan endpoint."""
    with start_sandbox(["test-key"], processing_delay=0.2, lytics_token=LYTICS_TOKEN) as server:
        yield server


@pytest.fixture
def bf(pipeline: Pipeline) -> Pipeline:  # noqa: F811
    """The pipeline whose workers can reach the sandbox's Lytics with the token named in job files."""
    pipeline.procs.env.update({"LYTICS_API_URL": pipeline.sandbox.url, "LYTICS_API_TOKEN": LYTICS_TOKEN})
    pipeline.authorize()
    return pipeline


def seed_segment(sandbox: SandboxProcess, members: list[dict[str, Any]]) -> None:
    httpx.put(
        f"{sandbox.url}/_sandbox/lytics/segments/{SEGMENT}", json=members, timeout=10
    ).raise_for_status()


def lytics_requests(sandbox: SandboxProcess) -> dict[str, int]:
    result: dict[str, int] = httpx.get(f"{sandbox.url}/_sandbox/lytics", timeout=10).json()["requests"]
    return result


def create_job_with_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], **overrides: Any
) -> tuple[str, str]:
    """Create a job with ``attentive-export jobs create``; returns its id and what the command printed."""
    path = tmp_path / "job.json"
    path.write_text(json.dumps(base_config(**overrides)))
    assert main(["jobs", "create", str(path)]) == 0
    out = capsys.readouterr().out
    return out.split("created export job ", 1)[1].split()[0], out


def wait_backfilled(p: Pipeline, job: ExportJob, users: int, timeout: float = 90) -> dict[str, Any]:
    def done() -> bool:
        st = p.status(job)
        return (
            st["state"] == "running"
            and st["counters"]["users_delivered"] >= users
            and not any(st["buffer"].values())
        )

    try:
        wait_for(done, timeout, "the backfill to be delivered and the job to run")
    except AssertionError:
        print(json.dumps(p.status(job), indent=2))
        print(p.procs.log("w1")[-5000:])
        raise
    return p.status(job)


@on_both_brokers  # the backfill task and its countdowns on RabbitMQ too
def test_existing_users_are_backfilled_from_a_lytics_segment_then_the_job_runs(
    bf: Pipeline, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    members = [{"email": f"b{i}@x.io", "first_name": f"B{i}", "segments": ["vip"]} for i in range(1000)]
    seed_segment(bf.sandbox, members)
    job_id, out = create_job_with_cli(
        tmp_path,
        capsys,
        audiences=["vip"],
        backfill={"lytics_segments": {"vip": SEGMENT}, "lytics_token_env": "LYTICS_API_TOKEN"},
    )
    assert "state backfilling" in out and "backfilling existing members of vip from Lytics" in out
    assert "not run" not in out
    job = bf.jobs.get(job_id)
    assert job.state is JobState.BACKFILLING
    bf.procs.worker(concurrency=2)
    bf.procs.beat()

    st = wait_backfilled(bf, job, 1000)
    progress = st["backfill"]["audiences"]["vip"]
    assert (progress["pages"], progress["members"], progress["total"], progress["finished"]) == (
        10,
        1000,
        1000,
        True,
    )
    assert progress["last_error"] is None and st["backfill"]["finished"] is True
    assert lytics_requests(bf.sandbox) == {"200": 10}  # ten pages of 100, each fetched once
    stored = {u["identifiers"]["email"]: u for u in bf.sandbox.users()}
    assert set(stored) == {f"b{i}@x.io" for i in range(1000)}
    assert all(u["custom"] == {"vip": True} for u in stored.values())
    assert stored["b7@x.io"]["attributes"]["firstName"] == "B7"

    assert main(["status", "--json", job_id]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["state"] == "running" and shown["backfill"]["audiences"]["vip"]["members"] == 1000
    assert LYTICS_TOKEN not in json.dumps(shown)


def test_a_realtime_exit_newer_than_the_backfill_start_is_never_overwritten(
    bf: Pipeline, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seed_segment(bf.sandbox, [{"email": f"b{i}@x.io"} for i in range(1000)])
    job_id, _ = create_job_with_cli(
        tmp_path,
        capsys,
        audiences=["vip"],
        backfill={"lytics_segments": {"vip": SEGMENT}, "lytics_token_env": "LYTICS_API_TOKEN"},
    )
    job = bf.jobs.get(job_id)
    # b950 exits in real time after the backfill started but before the scan reaches its page
    # (no worker runs yet, so its page cannot have been buffered).
    ingest_lines(bf.redis, bf.jobs, [line("vip", "exit", int(time.time() * 1000), email="b950@x.io")])
    bf.procs.worker(concurrency=2)
    bf.procs.beat()
    # b5 exits in real time after its page was backfilled.
    wait_for(
        lambda: (bf.status(job)["backfill"]["audiences"]["vip"]["pages"] or 0) >= 1, 60, "the first page"
    )
    bf.send([line("vip", "exit", int(time.time() * 1000), email="b5@x.io")])

    st = wait_backfilled(bf, job, 1000)
    wait_for(lambda: bf.custom("b5@x.io").get("vip") is False, 30, "b5's exit to reach Attentive")
    assert bf.custom("b950@x.io") == {"vip": False}
    assert st["counters"]["stale"] >= 1  # b950's backfilled enter lost to the newer exit
    others = [u for u in bf.sandbox.users() if u["identifiers"]["email"] not in ("b5@x.io", "b950@x.io")]
    assert len(others) == 998 and all(u["custom"] == {"vip": True} for u in others)
    # The backfill never sent b950 as a member.
    sent_b950 = [
        user["attributes"]["custom"]["vip"]
        for req in bf.sandbox.requests(bodies=True)
        for user in req["body"]["users"]
        if user["identifiers"].get("email") == "b950@x.io"
    ]
    assert sent_b950 == [False]


def test_file_backfill_through_the_cli(
    bf: Pipeline, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job_id, out = create_job_with_cli(tmp_path, capsys)  # existing_users on, no Lytics segment: running
    assert f"attentive-export backfill {job_id} --audience A FILE" in out
    job = bf.jobs.get(job_id)
    assert job.state is JobState.RUNNING
    data = tmp_path / "members.jsonl"
    profiles = [json.dumps({"email": f"p{i}@x.io", "city": "Oakland"}) for i in range(300)]
    exit_line = line("vip", "exit", int(time.time() * 1000) + 60_000, email="p3@x.io")
    data.write_text("\n".join([*profiles, exit_line, "not json"]) + "\n")
    bf.procs.worker()
    bf.procs.beat()

    assert main(["backfill", job_id, "--audience", "lapsed", str(data)]) == 0
    out = capsys.readouterr().out
    assert "queued 300 profiles and 1 transitions in 1 chunks, 1 skipped" in out

    wait_for(
        lambda: (bf.status(job)["backfill"] or {}).get("finished") is True, 60, "the file backfill to finish"
    )
    st = wait_backfilled(bf, job, 301)
    assert st["backfill"]["file"]["members"] == 301
    assert all(bf.custom(f"p{i}@x.io").get("lapsed") is True for i in range(300))
    assert bf.custom("p3@x.io") == {"lapsed": True, "vip": False}
    p0 = bf.sandbox.user(email="p0@x.io")
    assert p0 is not None and p0["attributes"]["location"]["city"] == "Oakland"

    # Refusals are one clear line: a profile file without --audience, an audience the job lacks.
    assert main(["backfill", job_id, str(data)]) == 2
    assert "give --audience" in capsys.readouterr().err
    assert main(["backfill", job_id, "--audience", "nope", str(data)]) == 2
    assert "not exported by job" in capsys.readouterr().err
