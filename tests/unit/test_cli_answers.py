"""The CLI answers every input with a result or one ``error:`` line: never a traceback, and a
command that cannot queue its work (broker down) changes nothing."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis
from celery import Celery

import worker.cli.main as cli
import worker.dispatch
from tests.celeryproc import ROOT
from tests.conftest import TEST_REDIS_URL
from worker.dispatch import BrokerUnavailable, CeleryDispatcher
from worker.setup.authorizations import Authorization, AuthorizationStore
from worker.setup.crypto import generate_secret_key
from worker.setup.jobconfig import JobState, parse_job_config
from worker.setup.jobs import ExportJob, JobStore
from worker.store import keys
from worker.store.ratelimit import api_key_hash

SECRET = generate_secret_key()


# --- every argument has help ---------------------------------------------------------------------------
def _actions(parser: argparse.ArgumentParser, path: str = "attentive-export") -> list[tuple[str, Any]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            helped = {choice.dest for choice in action._choices_actions if choice.help}
            for name, sub in action.choices.items():
                found.append((f"{path} {name}", name if name in helped else None))
                found += _actions(sub, f"{path} {name}")
            continue
        found.append((f"{path} {'/'.join(action.option_strings) or action.dest}", action.help))
    return found


def test_every_command_and_argument_has_help_text() -> None:
    actions = _actions(cli.build_parser())
    assert len(actions) > 40  # the walk reached the subcommands
    missing = [where for where, text in actions if not text or not str(text).strip()]
    assert missing == []


# --- job files -----------------------------------------------------------------------------------------
def test_each_problem_of_a_job_file_is_one_error_line_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    assert cli.main(["preview", str(listy), "-"]) == 2
    assert capsys.readouterr().err == (
        f"error: {listy}: the configuration must be a mapping of keys, got list\n"
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("label: x\naudiences: 5\nbatch_size: 9999\n")
    assert cli.main(["preview", str(bad), "-"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) >= 3
    assert all(line.startswith(f"error: {bad}: ") for line in lines), lines
    assert f"error: {bad}: batch_size: input should be less than or equal to 256" in lines


# --- auth delete ---------------------------------------------------------------------------------------
def _authorization(client: redis.Redis, label: str) -> Authorization:
    record = Authorization(
        id=f"au_{label.encode().hex()[:12]:0<12}",
        label=label,
        created_at="2026-12-01T00:00:00Z",
        key_hint="••••abcd",
        key_hash=api_key_hash(label),
        encrypted_key="x",
    )
    data = record.model_dump(mode="json") | {"encrypted_key": "x"}
    client.hset(keys.authorizations(), record.id, json.dumps(data))
    return record


def _job(jobs: JobStore, label: str, authorization: str, state: JobState) -> ExportJob:
    config = {"label": label, "authorization": authorization, "audiences": ["vip"]}
    job = jobs.create(parse_job_config({**config, "identifier_mappings": {"email": "email"}}))
    if state is not JobState.RUNNING:
        jobs.set_state(job.id, state)
    return jobs.get(job.id)


@pytest.fixture
def fake_cli(monkeypatch: pytest.MonkeyPatch) -> fakeredis.FakeRedis:
    client = fakeredis.FakeRedis()
    monkeypatch.setattr(cli, "_redis", lambda settings: client)
    monkeypatch.setenv("EXPORT_SECRET_KEY", SECRET)
    return client


def test_auth_delete_is_refused_while_jobs_use_it_and_lists_them(
    fake_cli: fakeredis.FakeRedis, capsys: pytest.CaptureFixture[str]
) -> None:
    acme = _authorization(fake_cli, "acme")
    _authorization(fake_cli, "other")
    jobs = JobStore(fake_cli)
    running = _job(jobs, "by label", "ACME", JobState.RUNNING)  # labels match case-insensitively
    by_id = _job(jobs, "by id", acme.id, JobState.PAUSED)
    _job(jobs, "stopped one", "acme", JobState.STOPPED)  # a stopped job needs no key
    _job(jobs, "elsewhere", "other", JobState.RUNNING)

    assert cli.main(["auth", "delete", "acme"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: authorization 'acme' (")
    assert f"{running.id} (running, 'by label')" in err and f"{by_id.id} (paused, 'by id')" in err
    assert "stopped one" not in err and "elsewhere" not in err and "--force" in err
    assert AuthorizationStore(fake_cli, SECRET).get("acme").id == acme.id  # nothing changed
    assert jobs.get(running.id).state is JobState.RUNNING


def test_auth_delete_force_pauses_the_sending_jobs_first(
    fake_cli: fakeredis.FakeRedis, capsys: pytest.CaptureFixture[str]
) -> None:
    acme = _authorization(fake_cli, "acme")
    jobs = JobStore(fake_cli)
    running = _job(jobs, "by label", "acme", JobState.RUNNING)
    paused = _job(jobs, "paused one", "acme", JobState.PAUSED)

    assert cli.main(["auth", "delete", "acme", "--force"]) == 0
    out = capsys.readouterr().out
    assert f"paused job {running.id} (by label): its authorization is deleted" in out
    assert f"note: job {paused.id} (paused one, paused) names it" in out
    assert out.endswith(f"deleted authorization {acme.id} (acme)\n")
    job = jobs.get(running.id)
    assert job.state is JobState.PAUSED
    assert "'acme'" in job.pause_reason and "was deleted with --force" in job.pause_reason
    assert f"jobs resume {running.id}" in job.pause_reason
    assert AuthorizationStore(fake_cli, SECRET).list() == []

    assert cli.main(["auth", "delete", "acme"]) == 2  # gone: an unknown authorization is an error
    assert capsys.readouterr().err == "error: no authorization with id or label 'acme'\n"


# --- ingest --------------------------------------------------------------------------------------------
class _Dispatcher:
    def __init__(self, fail_after: int | None = None) -> None:
        self.ingests: list[str] = []
        self.fail_after = fail_after

    def ingest(self, chunk_id: str) -> None:
        if self.fail_after is not None and len(self.ingests) >= self.fail_after:
            raise ConnectionError("broker gone")
        self.ingests.append(chunk_id)


def transition(email: str) -> bytes:
    return json.dumps(
        {"audience": "vip", "event": "enter", "at": 1_796_000_000, "user": {"email": email}}
    ).encode()


def test_ingest_queues_the_usable_lines_and_says_what_it_left_out(
    fake_cli: fakeredis.FakeRedis,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dispatcher = _Dispatcher()
    monkeypatch.setattr(worker.dispatch, "CeleryDispatcher", lambda: dispatcher)
    data = tmp_path / "in.jsonl"
    data.write_bytes(
        transition("a@x.io")
        + b"\n"
        + b'{"audience": "vip", "event": "enter", "user": {"email": "\xff"}}\n'
        + b"\n"
        + transition("b@x.io")
        + b"\n"
        + b'{"audience": "vip", "event": "jump", "user": {}}\n'
    )
    assert cli.main(["ingest", str(data)]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert out.startswith(
        "queued 2 lines in 1 chunk; not queued: 2 unusable lines (bad_event 1, not_json 1; "
    )
    assert "line 2: not valid JSON: 'utf-8' codec can't decode byte 0xff" in out
    assert "line 5: " in out
    (chunk,) = dispatcher.ingests
    lines = fake_cli.lrange(keys.inbox_chunk(chunk), 0, -1)
    assert [line.strip() for line in lines] == [transition("a@x.io"), transition("b@x.io")]
    # Counted where the ingest task counts its refusals, so `status` shows them too.
    counted = fake_cli.hgetall(keys.ingest_status())
    assert counted[b"rejected:bad_event"] == b"1" and counted[b"rejected:not_json"] == b"1"


def test_ingest_losing_the_broker_mid_file_takes_back_the_chunk_it_could_not_queue(
    fake_cli: fakeredis.FakeRedis,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dispatcher = _Dispatcher(fail_after=1)
    monkeypatch.setattr(worker.dispatch, "CeleryDispatcher", lambda: dispatcher)
    monkeypatch.setattr(cli, "INGEST_CHUNK", 2)
    data = tmp_path / "in.jsonl"
    data.write_bytes(b"\n".join(transition(f"u{i}@x.io") for i in range(5)) + b"\n")
    assert cli.main(["ingest", str(data)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: the Celery broker stopped answering (")
    assert "after 2 lines were queued in 1 chunk; the rest of" in err
    assert fake_cli.zrange(keys.inbox_pending(), 0, -1) == [dispatcher.ingests[0].encode()]


# --- the broker down -----------------------------------------------------------------------------------
def test_check_broker_is_one_line_with_the_password_masked() -> None:
    dispatcher = CeleryDispatcher()
    dispatcher._app = Celery(broker="redis://:hunter2secret@127.0.0.1:1/0")
    with pytest.raises(BrokerUnavailable) as info:
        dispatcher.check_broker()
    message = str(info.value)
    assert message.startswith("cannot reach the Celery broker at CELERY_BROKER_URL=redis://:**@127.0.0.1:1/0")
    assert "hunter2secret" not in message and "\n" not in message


def run_cli(*argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli.main", *argv],
        cwd=ROOT,
        env={**os.environ, "EXPORT_SECRET_KEY": SECRET, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_with_the_broker_down_commands_say_so_in_one_line_and_change_nothing(
    real_redis: redis.Redis, tmp_path: Path
) -> None:
    jobs = JobStore(real_redis)
    paused = _job(jobs, "paused", "acme", JobState.PAUSED)
    created = _job(jobs, "created", "acme", JobState.CREATED)
    down = {"REDIS_URL": TEST_REDIS_URL, "CELERY_BROKER_URL": "redis://:pw9secret@127.0.0.1:1/0"}
    data = tmp_path / "in.jsonl"
    data.write_bytes(transition("a@x.io") + b"\n")
    before = sorted(real_redis.keys("*"))

    for argv in (
        ("jobs", "resume", paused.id),
        ("jobs", "resume", created.id),
        ("ingest", str(data)),
        ("backfill", paused.id, "--audience", "vip", str(data)),
    ):
        done = run_cli(*argv, **down)
        assert done.returncode == 2, (argv, done.stderr)
        assert done.stdout == ""
        assert done.stderr.startswith(
            "error: cannot reach the Celery broker at CELERY_BROKER_URL=redis://:**@"
        )
        assert done.stderr.count("\n") == 1, done.stderr
        assert "pw9secret" not in done.stderr

    assert jobs.get(paused.id).state is JobState.PAUSED
    assert jobs.get(created.id).state is JobState.CREATED
    assert sorted(real_redis.keys("*")) == before  # no inbox chunk, no backfill part, no state


def test_redis_down_is_one_line_too() -> None:
    done = run_cli("jobs", "list", REDIS_URL="redis://:pw9secret@127.0.0.1:1/0")
    assert done.returncode == 2
    assert done.stderr.startswith("error: cannot reach Redis at REDIS_URL=redis://:**@127.0.0.1:1/0: ")
    assert done.stderr.count("\n") == 1 and "pw9secret" not in done.stderr


def test_the_webhook_app_without_a_token_is_one_line_under_uvicorn() -> None:
    env = {k: v for k, v in os.environ.items() if k != "WEBHOOK_TOKEN"}
    for target in ("worker.webhook:app", "worker.webhook.receiver:app"):
        done = subprocess.run(
            [sys.executable, "-m", "uvicorn", target, "--port", "1"],
            cwd=ROOT,
            env={**env, "REDIS_URL": TEST_REDIS_URL},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 1, done.stderr
        assert done.stderr.startswith("error: WEBHOOK_TOKEN is not set"), done.stderr
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
