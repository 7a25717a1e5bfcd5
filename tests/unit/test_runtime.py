"""Worker process warm-up: what a pool process prepares before its first task."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import redis

import worker.runtime
from worker.mapping import mapper as mapper_module
from worker.setup.jobconfig import JobState

from .pipeline_kit import Pipeline


def test_warm_up_compiles_mappings_and_builds_clients_of_active_jobs(
    fake_redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = Pipeline(fake_redis, monkeypatch)
    running, paused, stopped = pipe.create_job(), pipe.create_job(), pipe.create_job()
    pipe.rt.jobs.set_state(paused.id, JobState.PAUSED, "operator")
    pipe.rt.jobs.set_state(stopped.id, JobState.STOPPED, "operator")
    clients: list[str] = []
    monkeypatch.setattr(pipe.rt, "client_for", lambda job: clients.append(job.id))

    pipe.rt.warm_up()

    assert clients == [running.id]  # only a sending job needs its key decrypted
    compiled = {job_id for job_id in (running.id, paused.id) if job_id in mapper_module._compiled}
    assert compiled == {running.id, paused.id}  # a paused job still ingests


def test_one_job_failing_to_warm_up_does_not_keep_the_others_cold(
    fake_redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = Pipeline(fake_redis, monkeypatch)
    broken, fine = pipe.create_job(), pipe.create_job()
    warmed: list[str] = []

    def client_for(job: Any) -> None:
        if job.id == broken.id:
            raise LookupError("no authorization with id or label 'auth-1'")
        warmed.append(job.id)

    monkeypatch.setattr(pipe.rt, "client_for", client_for)
    pipe.rt.warm_up()
    assert warmed == [fine.id]


def test_a_failed_warm_up_never_keeps_a_worker_from_starting(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class Down:
        def warm_up(self) -> None:
            raise redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:6379")

    monkeypatch.setattr(worker.runtime, "runtime", lambda: Down())
    with caplog.at_level(logging.WARNING):
        worker.runtime._warm_up()
    assert "warm-up skipped: ConnectionError" in caplog.text
