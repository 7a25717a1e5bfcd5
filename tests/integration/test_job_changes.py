"""Jobs change over time (issue 13), through the operator's CLI against a real Redis, real ``celery
worker``/``beat`` processes and the sandbox as Attentive and as Lytics' segment scan: an audience
added (only its members are sent), removed with a teardown (its members end ``false``, others are
untouched) or kept, a mapping change re-sent with ``--resync``, ``jobs resync`` of one audience,
``jobs stop --teardown``, and ``jobs backfill --retry-now`` after fixing a missing Lytics token.

Shares the backfill tests' module sandbox (Attentive plus the Lytics stand-in) and fixtures.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.celeryproc import wait_for
from tests.integration.test_backfill_pipeline import (  # noqa: F401 (fixtures)
    LYTICS_TOKEN,
    bf,
    sandbox_server,
)
from tests.integration.test_job_lifecycle import cli, job_file
from tests.integration.test_pipeline import Pipeline, base_config, line, pipeline  # noqa: F401 (fixture)
from tests.sandboxproc import SandboxProcess
from worker.pipeline.ingest import ingest_lines
from worker.setup.jobconfig import JobState
from worker.setup.jobs import ExportJob

pytestmark = pytest.mark.integration

VIP_SEGMENT = "seg0vip"
LAPSED_SEGMENT = "seg0lapsed"
TOKEN_ENV = "LYTICS_API_TOKEN"


def seed(sandbox: SandboxProcess, segment: str, members: list[dict[str, Any]]) -> None:
    httpx.put(
        f"{sandbox.url}/_sandbox/lytics/segments/{segment}", json=members, timeout=10
    ).raise_for_status()


def segments(**audiences: str) -> dict[str, Any]:
    return {"lytics_segments": audiences, "lytics_token_env": TOKEN_ENV}


def create(capsys: pytest.CaptureFixture[str], path: str) -> str:
    code, out, err = cli(capsys, "jobs", "create", path)
    assert code == 0, err
    return out.split("created export job ", 1)[1].split()[0]


def idle(p: Pipeline, job: ExportJob, state: str = "running") -> bool:
    st = p.status(job)
    backfill = st["backfill"] or {"finished": True}
    return (
        st["state"] == state
        and backfill["finished"]
        and not any(st["buffer"].values())
        and not p.redis.zcard("aex:inbox:pending")
    )


def wait_idle(p: Pipeline, job: ExportJob, what: str, state: str = "running", timeout: float = 90) -> None:
    try:
        wait_for(lambda: idle(p, job, state), timeout, what)
    except AssertionError:
        print(json.dumps(p.status(job), indent=2))
        print(p.procs.log("w1")[-6000:])
        raise


def mark(p: Pipeline) -> int:
    """The sequence number of the newest bulk request the sandbox accepted so far."""
    return max((r["seq"] for r in p.sandbox.requests()), default=0)


def sent_since(p: Pipeline, seq: int) -> dict[str, list[dict[str, Any]]]:
    """Per email, the custom attributes of every user record sent after ``seq``, in order."""
    out: dict[str, list[dict[str, Any]]] = {}
    for req in p.sandbox.requests(bodies=True):
        if req["seq"] <= seq:
            continue
        for user in req["body"]["users"]:
            custom = user.get("attributes", {}).get("custom", {})
            out.setdefault(user["identifiers"]["email"], []).append(custom)
    return out


def start(p: Pipeline) -> None:
    p.procs.worker(concurrency=2)
    p.procs.beat()


def emails(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}@x.io" for i in range(n)]


def test_an_added_audience_backfills_only_its_own_members(
    bf: Pipeline,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seed(bf.sandbox, VIP_SEGMENT, [{"email": e} for e in emails("v", 120)])
    seed(bf.sandbox, LAPSED_SEGMENT, [{"email": e, "first_name": "L"} for e in emails("l", 80)])
    job_id = create(capsys, job_file(tmp_path, audiences=["vip"], backfill=segments(vip=VIP_SEGMENT)))
    job = bf.jobs.get(job_id)
    start(bf)
    wait_idle(bf, job, "the first backfill")
    before = mark(bf)

    new_file = job_file(
        tmp_path, audiences=["vip", "lapsed"], backfill=segments(vip=VIP_SEGMENT, lapsed=LAPSED_SEGMENT)
    )
    code, out, _ = cli(capsys, "jobs", "update", job_id, new_file, "--dry-run")
    assert code == 0
    assert "+ audience lapsed" in out
    assert (
        f"backfill: each current member of lapsed (Lytics segment {LAPSED_SEGMENT}) gets lapsed: true" in out
    )
    assert out.rstrip().endswith("dry run: nothing was changed")
    assert bf.jobs.get(job_id).config.audiences == ["vip"]

    code, out, err = cli(capsys, "jobs", "update", job_id, new_file)
    assert code == 0, err
    assert f"updated job {job_id} (pipeline test): now backfilling" in out
    # A real-time enter of the new audience reaches the job at once (workers reloaded the job table).
    bf.send([line("lapsed", "enter", int(time.time() * 1000) + 1000, email="live@x.io")])
    wait_idle(bf, job, "the added audience's backfill")

    sent = sent_since(bf, before)
    assert set(sent) == {*emails("l", 80), "live@x.io"}  # only the new audience's members
    assert all(records == [{"lapsed": True}] for records in sent.values())
    assert all(bf.custom(e) == {"vip": True} for e in emails("v", 120))
    assert all(bf.custom(e) == {"lapsed": True} for e in emails("l", 80))
    assert bf.sandbox.user(email="l5@x.io")["attributes"]["firstName"] == "L"  # type: ignore[index]
    lapsed = bf.status(job)["backfill"]["audiences"]["lapsed"]
    assert (lapsed["op"], lapsed["members"], lapsed["finished"]) == ("backfill", 80, True)
    assert bf.status(job)["backfill"]["audiences"]["vip"]["pages"] == 2  # vip was not scanned again


def test_a_removed_audience_is_torn_down_and_non_members_are_untouched(
    bf: Pipeline,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    both = emails("b", 10)  # in both audiences
    seed(bf.sandbox, VIP_SEGMENT, [{"email": e} for e in [*emails("v", 60), *both]])
    seed(bf.sandbox, LAPSED_SEGMENT, [{"email": e} for e in [*emails("l", 50), *both]])
    job_id = create(capsys, job_file(tmp_path, backfill=segments(vip=VIP_SEGMENT, lapsed=LAPSED_SEGMENT)))
    job = bf.jobs.get(job_id)
    start(bf)
    wait_idle(bf, job, "the first backfill")
    assert all(bf.custom(e) == {"vip": True, "lapsed": True} for e in both)
    before = mark(bf)

    new_file = job_file(tmp_path, audiences=["vip"], backfill=segments(vip=VIP_SEGMENT))
    code, out, _ = cli(capsys, "jobs", "update", job_id, new_file, "--dry-run")
    assert code == 0 and "- audience lapsed\n" in out
    assert (
        f"teardown: each current member of lapsed (Lytics segment {LAPSED_SEGMENT}) gets lapsed: false" in out
    )
    assert cli(capsys, "jobs", "update", job_id, new_file)[0] == 0
    wait_idle(bf, job, "the teardown")

    sent = sent_since(bf, before)
    assert set(sent) == {*emails("l", 50), *both}  # members of lapsed only
    assert all(records == [{"lapsed": False}] for records in sent.values())
    assert all(bf.custom(e) == {"lapsed": False} for e in emails("l", 50))
    assert all(bf.custom(e) == {"vip": True, "lapsed": False} for e in both)
    assert all(bf.custom(e) == {"vip": True} for e in emails("v", 60))  # non-members untouched
    teardown = bf.status(job)["backfill"]["audiences"]["teardown:lapsed"]
    assert (teardown["op"], teardown["event"], teardown["members"], teardown["finished"]) == (
        "teardown",
        "exit",
        60,
        True,
    )
    # lapsed is no longer exported: a later enter does not reach the job.
    unroutable = int(bf.redis.hget("aex:ingest:status", "unroutable") or 0)
    bf.send([line("lapsed", "enter", int(time.time() * 1000) + 1000, email="l1@x.io")])
    wait_for(
        lambda: int(bf.redis.hget("aex:ingest:status", "unroutable") or 0) > unroutable, 30, "the late enter"
    )
    assert bf.custom("l1@x.io") == {"lapsed": False}


def test_keep_removed_leaves_the_flags_as_they_are(
    bf: Pipeline,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seed(bf.sandbox, VIP_SEGMENT, [{"email": e} for e in emails("v", 30)])
    seed(bf.sandbox, LAPSED_SEGMENT, [{"email": e} for e in emails("l", 30)])
    job_id = create(capsys, job_file(tmp_path, backfill=segments(vip=VIP_SEGMENT, lapsed=LAPSED_SEGMENT)))
    job = bf.jobs.get(job_id)
    start(bf)
    wait_idle(bf, job, "the first backfill")
    before = mark(bf)

    new_file = job_file(tmp_path, audiences=["vip"], backfill=segments(vip=VIP_SEGMENT))
    code, out, _ = cli(capsys, "jobs", "update", job_id, new_file, "--keep-removed", "--dry-run")
    assert code == 0 and "- audience lapsed  (kept: --keep-removed)" in out
    assert "sent to Attentive:\n  nothing now" in out
    # A change breaking the rules is refused with every problem listed, and nothing changes.
    code, _, err = cli(
        capsys,
        "jobs",
        "update",
        job_id,
        job_file(tmp_path, audiences=["vip"], batch_size=0, flush_interval_seconds=0),
    )
    assert code == 2 and err.count("error: ") == 2 and "batch_size" in err and "flush_interval_seconds" in err
    refused = job_file(
        tmp_path,
        audiences=["vip"],
        custom_attributes=["lapsed"],
        identifier_mappings={"phone": "phone", "email": "email"},
        backfill=segments(vip=VIP_SEGMENT),
    )
    code, _, err = cli(capsys, "jobs", "update", job_id, refused)
    assert code == 2 and err.count("error: ") == 2, err
    assert "the user key would change" in err and "'lapsed' is the flag of audience 'lapsed'" in err
    assert bf.jobs.get(job_id).config == job.config

    code, out, err = cli(capsys, "jobs", "update", job_id, new_file, "--keep-removed")
    assert code == 0, err
    assert "now running" in out
    time.sleep(3)  # a few sweeps and flush intervals: nothing may be sent
    wait_idle(bf, job, "the update")
    assert sent_since(bf, before) == {}
    assert all(bf.custom(e) == {"lapsed": True} for e in emails("l", 30))
    assert "teardown:lapsed" not in bf.status(job)["backfill"]["audiences"]


def test_resync_after_a_mapping_change_sends_the_new_mapping_and_newer_changes_win(
    bf: Pipeline,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    members = [{"email": f"v{i}@x.io", "first_name": f"Old{i}", "nickname": f"New{i}"} for i in range(100)]
    seed(bf.sandbox, VIP_SEGMENT, members)
    job_id = create(
        capsys,
        job_file(
            tmp_path,
            audiences=["vip"],
            attribute_mappings={"first_name": "firstName"},
            backfill=segments(vip=VIP_SEGMENT),
        ),
    )
    job = bf.jobs.get(job_id)
    start(bf)
    wait_idle(bf, job, "the first backfill")
    assert bf.sandbox.user(email="v7@x.io")["attributes"]["firstName"] == "Old7"  # type: ignore[index]

    # The mapping changes: later transitions use it, current members are not re-sent.
    before = mark(bf)
    new_file = job_file(
        tmp_path,
        audiences=["vip"],
        attribute_mappings={"nickname": "firstName"},
        backfill=segments(vip=VIP_SEGMENT),
    )
    code, out, _ = cli(capsys, "jobs", "update", job_id, new_file)
    assert code == 0 and "add --resync" in out and "now running" in out
    bf.send([line("vip", "enter", int(time.time() * 1000), email="live@x.io", first_name="A", nickname="B")])
    wait_for(lambda: bf.custom("live@x.io").get("vip") is True, 30, "the live enter")
    assert bf.sandbox.user(email="live@x.io")["attributes"]["firstName"] == "B"  # type: ignore[index]
    wait_idle(bf, job, "the live enter")
    assert set(sent_since(bf, before)) == {"live@x.io"}

    # --resync, with the workers down so a real-time exit can arrive before the scan reaches v3.
    bf.procs.kill("w1", signal.SIGTERM)
    code, out, err = cli(capsys, "jobs", "update", job_id, new_file, "--resync")
    assert code == 0, err
    assert "resync: each current member of vip" in out and "now backfilling" in out
    ingest_lines(bf.redis, bf.jobs, [line("vip", "exit", int(time.time() * 1000) + 500, email="v3@x.io")])
    bf.procs.worker(concurrency=2)
    wait_idle(bf, job, "the resync")

    assert bf.custom("v3@x.io") == {"vip": False}  # the newer exit won over the resync
    for i in (0, 7, 99):
        user = bf.sandbox.user(email=f"v{i}@x.io")
        assert (
            user is not None
            and user["custom"] == {"vip": True}
            and user["attributes"]["firstName"] == f"New{i}"
        )
    vip = bf.status(job)["backfill"]["audiences"]["vip"]
    assert (vip["op"], vip["members"], vip["finished"]) == ("resync", 100, True)
    assert bf.status(job)["counters"]["stale"] >= 1


def test_resync_of_one_audience_resends_only_its_members(
    bf: Pipeline,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seed(bf.sandbox, VIP_SEGMENT, [{"email": e} for e in emails("v", 40)])
    seed(bf.sandbox, LAPSED_SEGMENT, [{"email": e} for e in emails("l", 70)])
    job_id = create(capsys, job_file(tmp_path, backfill=segments(vip=VIP_SEGMENT, lapsed=LAPSED_SEGMENT)))
    job = bf.jobs.get(job_id)
    start(bf)
    wait_idle(bf, job, "the first backfill")
    before = mark(bf)

    code, out, err = cli(capsys, "jobs", "resync", job_id, "--audience", "lapsed")
    assert code == 0, err
    assert f"resync: each current member of lapsed (Lytics segment {LAPSED_SEGMENT})" in out
    assert f"job {job_id} is now backfilling" in out
    wait_idle(bf, job, "the resync")
    sent = sent_since(bf, before)
    assert set(sent) == set(emails("l", 70))
    assert all(records == [{"lapsed": True}] for records in sent.values())
    code, out, _ = cli(capsys, "jobs", "backfill", job_id)
    assert code == 0 and "  lapsed: resync, 1 pages, 70 of 70 members, finished" in out
    assert "  vip: backfill, 1 pages, 40 of 40 members, finished" in out
    code, _, err = cli(capsys, "jobs", "resync", job_id, "--audience", "nope")
    assert code == 2 and "--audience 'nope' is not exported by the job" in err


def test_stop_with_teardown_sets_every_flag_false_then_stops(
    bf: Pipeline,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seed(bf.sandbox, VIP_SEGMENT, [{"email": e} for e in emails("v", 150)])
    seed(bf.sandbox, LAPSED_SEGMENT, [{"email": e} for e in emails("l", 60)])
    job_id = create(capsys, job_file(tmp_path, backfill=segments(vip=VIP_SEGMENT, lapsed=LAPSED_SEGMENT)))
    job = bf.jobs.get(job_id)
    start(bf)
    bf.send([line("vip", "enter", int(time.time() * 1000), email="outside@x.io")])  # not in the segment
    wait_idle(bf, job, "the first backfill")
    before = mark(bf)

    code, out, err = cli(capsys, "jobs", "stop", job_id, "--teardown")
    assert code == 0, err
    assert f"job {job_id} is now stopping" in out
    assert bf.jobs.get(job_id).state is JobState.STOPPING
    wait_for(lambda: bf.jobs.get(job_id).state is JobState.STOPPED, 90, "the job to stop after its teardown")

    sent = sent_since(bf, before)
    assert set(sent) == {*emails("v", 150), *emails("l", 60)}
    assert all(bf.custom(e) == {"vip": False} for e in emails("v", 150))
    assert all(bf.custom(e) == {"lapsed": False} for e in emails("l", 60))
    assert bf.custom("outside@x.io") == {"vip": True}  # only the segments' members are torn down
    # Every batch of the teardown had completed at Attentive when the job stopped.
    assert not any(bf.status(job)["buffer"].values())
    code, _, err = cli(capsys, "jobs", "resume", job_id)
    assert code == 2 and "a stop is final" in err


def test_retry_now_after_fixing_a_missing_token(
    bf: Pipeline,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seed(bf.sandbox, VIP_SEGMENT, [{"email": e} for e in emails("v", 50)])
    backfill = {"lytics_segments": {"vip": VIP_SEGMENT}, "lytics_token_env": "LYTICS_TOKEN_LATER"}
    job_id = create(capsys, job_file(tmp_path, audiences=["vip"], backfill=backfill))
    job = bf.jobs.get(job_id)
    start(bf)

    def halted() -> dict[str, Any] | None:
        vip = bf.status(job)["backfill"]["audiences"]["vip"]
        return vip if vip["last_error"] else None

    vip = wait_for(halted, 60, "the missing token to be reported")
    assert isinstance(vip, dict) and "LYTICS_TOKEN_LATER" in vip["last_error"]
    now = time.time() * 1000
    assert now + 540_000 < vip["next_try_at_ms"] < now + 600_000  # the next try is in about 10 minutes
    code, out, _ = cli(capsys, "jobs", "backfill", job_id)
    assert code == 0 and "last error: environment variable LYTICS_TOKEN_LATER" in out
    assert "next try: " in out and "(in 9 min" in out

    # The operator sets the token on the workers (a restart), then asks for a try now.
    bf.procs.env["LYTICS_TOKEN_LATER"] = LYTICS_TOKEN
    bf.procs.kill("w1", signal.SIGTERM)
    bf.procs.worker(concurrency=2)
    code, out, _ = cli(capsys, "jobs", "backfill", job_id, "--retry-now")
    assert code == 0 and "retrying now: vip" in out
    wait_idle(bf, job, "the backfill after the retry", timeout=60)
    vip = bf.status(job)["backfill"]["audiences"]["vip"]
    assert (vip["members"], vip["last_error"], vip["next_try_at_ms"], vip["errors"]) == (50, None, None, 1)
    assert all(bf.custom(e) == {"vip": True} for e in emails("v", 50))


def test_transitions_arriving_during_an_update_are_neither_lost_nor_mapped_by_a_stale_configuration(
    bf: Pipeline,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    job_id = create(
        capsys, job_file(tmp_path, audiences=["vip"], attribute_mappings={"first_name": "firstName"})
    )
    job = bf.jobs.get(job_id)
    start(bf)
    now = int(time.time() * 1000)

    def enters(prefix: str, n: int) -> list[str]:
        return [
            line("vip", "enter", now + i, email=f"{prefix}{i}@x.io", first_name="old", nickname="new")
            for i in range(n)
        ]

    # Chunks keep arriving from another thread while the update is written.
    during = enters("d", 2000)
    sender = threading.Thread(
        target=lambda: [bf.send(during[i : i + 50], chunk=50) for i in range(0, 2000, 50)]
    )
    sender.start()
    new_file = job_file(tmp_path, audiences=["vip"], attribute_mappings={"nickname": "firstName"})
    code, _, err = cli(capsys, "jobs", "update", job_id, new_file)
    sender.join()
    assert code == 0, err
    after = enters("a", 300)  # sent once the update returned: mapped by the new configuration
    bf.send(after)
    wait_for(lambda: bf.status(job)["counters"]["users_delivered"] >= 2300, 90, "every transition")
    wait_idle(bf, job, "the transitions")

    stored = {u["identifiers"]["email"]: u for u in bf.sandbox.users()}
    assert len(stored) == 2300  # none lost
    assert all(u["custom"] == {"vip": True} for u in stored.values())
    assert all(stored[f"a{i}@x.io"]["attributes"]["firstName"] == "new" for i in range(300))
    assert {stored[f"d{i}@x.io"]["attributes"]["firstName"] for i in range(2000)} <= {"old", "new"}
