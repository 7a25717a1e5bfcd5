"""The README's walkthrough is a test: its operator commands, read from README.md and run in order as
``attentive-export`` subprocesses against the sandbox, a real worker and beat, each answer checked.

The commands come from the README itself ("Running it for real", then the block after "Then, as an
operator:"), so editing them there changes what runs here, and a command added there without a
check here fails this test: the docs cannot drift from the product again. Placeholders are filled
in as an operator would: ``ATTENTIVE_KEY=...`` gets a sandbox key, ``JOB_ID`` the id ``jobs create``
printed, ``pause|resume|stop`` runs each in turn.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from tests.celeryproc import ROOT, wait_for
from tests.conftest import TEST_BROKER_URL, TEST_REDIS_URL
from tests.integration.test_pipeline import Pipeline, running_pipeline
from tests.sandboxproc import SandboxProcess
from worker.celeryconfig import task_queues
from worker.observe import heartbeat
from worker.observe.status import job_status
from worker.setup.authorizations import MASK
from worker.setup.jobs import JobStore
from worker.store import keys

pytestmark = pytest.mark.integration

README = ROOT / "README.md"


def _sh_block_after(marker: str) -> str:
    text = README.read_text()
    assert marker in text, f"README.md no longer has {marker!r}"
    return text.split(marker, 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]


def operator_commands() -> list[list[str]]:
    """The walkthrough's commands as argument lists, ``a|b|c`` alternatives expanded in order."""
    commands: list[list[str]] = []
    for raw in _sh_block_after("Then, as an operator:").splitlines():
        words = shlex.split(raw, comments=True)
        if not words:
            continue
        alternatives = [i for i, w in enumerate(words) if "|" in w]
        assert len(alternatives) <= 1, raw
        if not alternatives:
            commands.append(words)
            continue
        i = alternatives[0]
        commands += [[*words[:i], choice, *words[i + 1 :]] for choice in words[i].split("|")]
    return commands


def deployment_lines() -> list[str]:
    return [line.strip() for line in _sh_block_after("## Running it for real").splitlines() if line.strip()]


def attentive_export() -> list[str]:
    """The installed ``attentive-export`` script beside this interpreter (else the module)."""
    script = Path(sys.executable).with_name("attentive-export")
    if script.exists():
        return [str(script)]
    found = shutil.which("attentive-export")
    return [found] if found else [sys.executable, "-m", "worker.cli.main"]


@dataclass
class Run:
    argv: list[str]
    code: int
    out: str
    err: str

    def ok(self) -> str:
        assert self.code == 0, f"{' '.join(self.argv)} exited {self.code}: {self.err}"
        assert self.err == "", f"{' '.join(self.argv)} wrote to stderr: {self.err}"
        return self.out


@dataclass
class Walkthrough:
    pipeline: Pipeline
    env: dict[str, str]
    api_key: str
    job_id: str = ""
    ran: list[str] = field(default_factory=list)

    def run(self, words: list[str], extra_env: dict[str, str] | None = None) -> Run:
        """Run one README command line (``VAR=value`` prefixes become its environment)."""
        env = {**self.env, **(extra_env or {})}
        while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
            name, value = words[0].split("=", 1)
            env[name] = self.api_key if value == "..." else value
            words = words[1:]
        assert words[0] == "attentive-export", words
        argv = [self.job_id if w == "JOB_ID" else w for w in words[1:]]
        done = subprocess.run(
            [*attentive_export(), *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )
        self.ran.append(" ".join(argv))
        return Run(argv, done.returncode, done.stdout, done.stderr)


# --- the checks, one per command of the walkthrough ---------------------------------------------------------
EXAMPLE_JOB = yaml.safe_load((ROOT / "examples" / "vip-job.yaml").read_text())


def check_auth_add(w: Walkthrough, run: Run) -> None:
    out = run.ok()
    assert re.fullmatch(r"saved authorization au_[0-9a-f]{12} \(demo\) for Walkthrough Co \S+\n", out), out
    assert out.rstrip().endswith(MASK + w.api_key[-4:])  # "the last four characters"
    assert w.api_key not in out


def check_jobs_create(w: Walkthrough, run: Run) -> None:
    out = run.ok()
    found = re.match(r"created export job (\w+) \((.+)\), state running\n", out)
    assert found, out
    w.job_id = found.group(1)
    assert found.group(2) == EXAMPLE_JOB["label"]
    # existing_users without a Lytics segment: the command says how to load the members instead
    assert "note: no Lytics segment configured for vip_shoppers, lapsed_buyers" in out


def _json_documents(text: str) -> list[Any]:
    decoder, docs, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        doc, i = decoder.raw_decode(text, i)
        docs.append(doc)
    return docs


def check_preview(w: Walkthrough, run: Run) -> None:
    by_line = {d["line"]: d for d in _json_documents(run.ok())}
    assert sorted(by_line) == [1, 2, 3, 4, 5]
    ada = by_line[1]["record"]
    assert ada["identifiers"]["phone"] == "+14155550142"
    assert ada["attributes"]["custom"]["vip_shoppers"] is True
    assert ada["attributes"]["demographic"]["dateOfBirth"] == "1990-07-04"
    assert ada["attributes"]["custom"]["favorite_categories"] == "shoes,bags"
    assert ["phone_number", "invalid_phone"] in [d[:2] for d in by_line[2]["dropped_fields"]]
    assert by_line[3]["record"]["attributes"]["custom"] == {"vip_shoppers": False}
    assert by_line[5]["skipped"] == "no_identifier"
    assert JobStore(w.pipeline.redis).get(w.job_id)  # a dry run: nothing but the job is stored
    assert not w.pipeline.redis.zcard(keys.inbox_pending())


def check_ingest(w: Walkthrough, run: Run) -> None:
    assert run.ok().startswith("queued 5 lines in 1 chunk; follow progress")

    def delivered() -> bool:
        st = job_status(w.pipeline.redis, w.job_id)
        # 4 mapped (the 5th has no identifier: skipped); ada twice (her exit waits for her enter's
        # Attentive job), bo and cy once: 4 users delivered, nothing left anywhere.
        return (
            st["counters"]["received"] + sum(st["skips"].values()) == 5
            and st["counters"]["users_delivered"] == 4
            and not any(v for k, v in st["buffer"].items() if k != "oldest_at_attentive_seconds")
        )

    try:
        wait_for(delivered, 90, "the example transitions to reach Attentive")
    except AssertionError:
        print(json.dumps(job_status(w.pipeline.redis, w.job_id), indent=2))
        print(w.pipeline.procs.log("w1")[-5000:])
        raise
    sandbox = w.pipeline.sandbox
    wait_for(lambda: (sandbox.user(email="ada@example.com") or {}).get("custom"), 30, "ada in Attentive")
    assert sandbox.user(email="ada@example.com")["custom"]["vip_shoppers"] is False  # enter, then exit
    assert sandbox.user(email="bo@example.com")["custom"] == {"lapsed_buyers": True}
    assert sandbox.user(email="cy@example.com")["custom"] == {"vip_shoppers": True}  # a Lytics trigger


def check_status(w: Walkthrough, run: Run) -> None:
    out = run.ok()
    assert f"job {w.job_id}  '{EXAMPLE_JOB['label']}'  RUNNING\n" in out
    assert "4 received" in out and "1 skipped (no_identifier 1)" in out and "4 delivered" in out
    assert "fields left out invalid_phone 1" in out
    # Two workers, as the README runs them: real-time and sends, and backfill apart.
    assert "workers       2 alive" in out and "DOWN" not in out and "BLOCKED" not in out
    # The flags the walkthrough's comment points at (see Monitoring) agree with it.
    as_json = json.loads(w.run(["attentive-export", "status", "--json", "JOB_ID"]).ok())
    assert as_json["counters"]["users_delivered"] == 4 and as_json["skips"] == {"no_identifier": 1}
    health = w.run(["attentive-export", "health"]).ok().splitlines()
    assert len(health) >= 3 and all(line.startswith("ok ") for line in health), health
    scrape = w.run(["attentive-export", "metrics", "--once"]).ok()
    assert f'attentive_export_job_state{{export_job="{w.job_id}",state="running"}} 1.0' in scrape


def check_deadletters(w: Walkthrough, run: Run) -> None:
    assert json.loads(run.ok()) == []  # nothing the sandbox refused
    counts = json.loads(w.run(["attentive-export", "deadletters", "counts", "JOB_ID"]).ok())
    assert counts["job"] == w.job_id and counts["by_reason"] == {}


def state_check(state: str) -> Callable[[Walkthrough, Run], None]:
    def check(w: Walkthrough, run: Run) -> None:
        assert run.ok().startswith(f"job {w.job_id} is now {state}"), run.out
        assert JobStore(w.pipeline.redis).get(w.job_id).state == state

    return check


def check_jobs_delete(w: Walkthrough, run: Run) -> None:
    out = run.ok()
    assert re.search(
        rf"deleted export job {w.job_id} \({re.escape(EXAMPLE_JOB['label'])}\): removed \d+ Redis keys", out
    )
    assert JobStore(w.pipeline.redis).list() == []
    assert not list(w.pipeline.redis.scan_iter(keys.job_keys_match(w.job_id)))


def check_auth_delete(w: Walkthrough, run: Run) -> None:
    assert re.fullmatch(r"deleted authorization au_[0-9a-f]{12} \(demo\)\n", run.ok())


CHECKS: dict[tuple[str, ...], Callable[[Walkthrough, Run], None]] = {
    ("auth", "add"): check_auth_add,
    ("jobs", "create"): check_jobs_create,
    ("preview",): check_preview,
    ("ingest",): check_ingest,
    ("status",): check_status,
    ("deadletters",): check_deadletters,
    ("jobs", "pause"): state_check("paused"),
    ("jobs", "resume"): state_check("running"),
    ("jobs", "stop"): state_check("stopped"),
    ("jobs", "delete"): check_jobs_delete,
    ("auth", "delete"): check_auth_delete,
}


def check_for(words: list[str]) -> Callable[[Walkthrough, Run], None]:
    argv = [w for w in words if not re.fullmatch(r"[A-Z_]+=.*", w)][1:]
    for size in (2, 1):
        if tuple(argv[:size]) in CHECKS:
            return CHECKS[tuple(argv[:size])]
    raise AssertionError(f"README walkthrough command without a check in {__file__}: {' '.join(words)}")


def test_every_walkthrough_command_has_a_check() -> None:
    commands = operator_commands()
    assert len(commands) >= 10
    for words in commands:
        check_for(words)


# --- the run ----------------------------------------------------------------------------------------------
@pytest.fixture
def walkthrough(real_redis: redis.Redis, sandbox: SandboxProcess) -> Iterator[Walkthrough]:
    base = {
        **os.environ,
        "REDIS_URL": TEST_REDIS_URL,
        "CELERY_BROKER_URL": TEST_BROKER_URL,
        "ATTENTIVE_API_URL": sandbox.url,
    }
    base.pop("EXPORT_SECRET_KEY", None)
    # "export EXPORT_SECRET_KEY=$(attentive-export secret-key)", as the README has it
    lines = deployment_lines()
    assert "export EXPORT_SECRET_KEY=$(attentive-export secret-key)" in " ".join(lines)
    made = subprocess.run(
        [*attentive_export(), "secret-key"], cwd=ROOT, env=base, capture_output=True, text=True, timeout=60
    )
    assert made.returncode == 0 and made.stderr == "", made.stderr
    secret = made.stdout.strip()
    api_key = f"attn_live_{secrets.token_hex(12)}"
    sandbox.add_token(f"{api_key}:company=Walkthrough Co")
    with running_pipeline(real_redis, sandbox, EXPORT_SECRET_KEY=secret) as pipeline:
        # "celery -A worker.app worker -Q ...": the README's workers, each run as written, serve
        # every queue there is between them, none twice.
        worker_lines = [line for line in lines if line.startswith("celery -A worker.app worker")]
        groups = []
        for line in worker_lines:
            words = shlex.split(line, comments=True)
            groups.append(words[words.index("-Q") + 1])
        served = [q for queues in groups for q in queues.split(",")]
        assert sorted(served) == sorted(q.name for q in task_queues), groups
        assert any(line.startswith("celery -A worker.app beat") for line in lines)
        for n, queues in enumerate(groups):
            pipeline.procs.worker(name=f"w{n + 1}", queues=queues)
        pipeline.procs.beat()
        wait_for(lambda: heartbeat.read(real_redis).workers_alive(), 60, "the worker's first heartbeat")
        yield Walkthrough(pipeline, {**base, **pipeline.procs.env}, api_key)


def test_the_readme_walkthrough_runs_as_written(walkthrough: Walkthrough) -> None:
    w = walkthrough
    for words in operator_commands():
        check = check_for(words)
        if words[1:3] == ["jobs", "delete"]:
            # `jobs delete` waits out two minutes after a stop for tasks still writing (README, Job
            # lifecycle); stand the stop's time back instead of sleeping through them here.
            job = JobStore(w.pipeline.redis).get(w.job_id)
            record = json.loads(job.to_json()) | {"updated_at": "2000-01-01T00:00:00+00:00"}
            w.pipeline.redis.hset(keys.jobs(), job.id, json.dumps(record))
        started = time.monotonic()
        run = w.run(words)
        check(w, run)
        assert time.monotonic() - started < 120
    assert w.ran[0].startswith("auth add") and w.ran[-1].startswith("auth delete")
