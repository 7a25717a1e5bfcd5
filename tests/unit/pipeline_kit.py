"""Shared scaffolding for the pipeline decision-logic tests (flush, poll, sweep, ingest).

No Celery and no network: a :class:`Runtime` on a (fake or real) Redis, a dispatcher that records what
the pipeline asks for next, and an Attentive client on ``httpx.MockTransport`` whose answers each test
scripts through :class:`FakeAttentive`.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import redis

from worker.clients.attentive import AttentiveClient
from worker.pipeline.buffer import JobBuffer
from worker.pipeline.ingest import ingest_lines
from worker.pipeline.poll import Check, check_batch
from worker.runtime import Runtime
from worker.settings import Settings
from worker.setup.jobconfig import parse_job_config
from worker.setup.jobs import ExportJob
from worker.store.ratelimit import RateLimiter

BASE_URL = "https://attentive.test"
RESULTS_HOST = "https://results.test"
#: Rate-limiter key of the fake API key: tests build a second limiter on it to see shared state.
KEY_HASH = "testkeyhash00000"
RATE = 10_000.0
AT = "2026-11-26T17:00:00Z"

#: Default job labels, distinct (the job store refuses a label already in use).
_JOB_LABELS = itertools.count(1)


@dataclass
class RecordingDispatcher:
    """Records the next steps the pipeline asks for instead of sending Celery tasks."""

    ingests: list[str] = field(default_factory=list)
    drains: list[float] = field(default_factory=list)
    flushes: list[tuple[str, float]] = field(default_factory=list)
    pollers: list[tuple[str, float]] = field(default_factory=list)

    def ingest(self, chunk_id: str) -> None:
        self.ingests.append(chunk_id)

    def drain(self, countdown: float = 0.0) -> None:
        self.drains.append(countdown)

    def flush(self, job_id: str, countdown: float = 0.0) -> None:
        self.flushes.append((job_id, countdown))

    def poll_key(self, key_hash: str, countdown: float = 0.0) -> None:
        self.pollers.append((key_hash, countdown))


Reply = httpx.Response | Exception


class FakeAttentive:
    """A scripted Attentive behind ``httpx.MockTransport``.

    * ``bulk(users)`` answers ``POST /v2/bulk/user/attributes``; the default accepts with a new job id.
    * ``statuses[job_id]`` is a list of job statuses (or full replies) served in turn, the last one
      repeating; jobs not listed are ``COMPLETED``.
    * ``record_failures[email] = (code, message)`` marks records the results file reports as failed.

    Every request is kept in ``requests``; ``bulk_bodies`` holds each POST's users in order.
    """

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.bulk_bodies: list[list[dict[str, Any]]] = []
        self.accepted: dict[str, list[dict[str, Any]]] = {}
        self.statuses: dict[str, list[str | Reply]] = {}
        self.record_failures: dict[str, tuple[int, str]] = {}
        #: Results lines without ``index`` (the line format is undocumented; order is all there is).
        self.results_without_index = False
        self.bulk: Callable[[list[dict[str, Any]]], Reply] = self.accept
        self._ids = itertools.count(1)

    # --- scripted answers ----------------------------------------------------------------------
    def accept(self, users: list[dict[str, Any]]) -> Reply:
        job_id = f"aj-{next(self._ids)}"
        self.accepted[job_id] = users
        return httpx.Response(202, json={"message": "submitted", "batchJobId": job_id})

    def refuse_containing(self, *emails: str) -> None:
        """400 for any request that carries one of ``emails``, naming it like Attentive would."""

        def bulk(users: list[dict[str, Any]]) -> Reply:
            for user in users:
                email = user["identifiers"].get("email")
                if email in emails:
                    return error(400, f"Invalid email address: {email}")
            return self.accept(users)

        self.bulk = bulk

    # --- transport -----------------------------------------------------------------------------
    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        if request.method == "POST" and path == "/v2/bulk/user/attributes":
            users = json.loads(request.content)["users"]
            self.bulk_bodies.append(users)
            return _reply(self.bulk(users))
        if request.method == "GET" and path.startswith("/v2/bulk/job/"):
            job_id = path.rsplit("/", 1)[1]
            script = self.statuses.get(job_id, ["COMPLETED"])
            step = script.pop(0) if len(script) > 1 else script[0]
            if not isinstance(step, str):
                return _reply(step)
            body: dict[str, Any] = {"bulkJobId": job_id, "status": step}
            if step == "COMPLETED":
                body["url"] = f"{RESULTS_HOST}/{job_id}.jsonl"
                body["totalRecords"] = len(self.accepted.get(job_id, []))
            return httpx.Response(200, json=body)
        if request.method == "GET" and request.url.host == "results.test":
            job_id = path.strip("/").removesuffix(".jsonl")
            lines = []
            for i, user in enumerate(self.accepted[job_id]):
                code, message = self.record_failures.get(user["identifiers"].get("email"), (202, ""))
                response: dict[str, Any] = {"statusCode": code, "body": {}}
                if message:
                    response["body"] = {"error": {"message": message}}
                line: dict[str, Any] = {"index": i, "request": user, "response": response}
                if self.results_without_index:
                    del line["index"]
                lines.append(json.dumps(line))
            return httpx.Response(200, text="\n".join(lines) + "\n")
        return httpx.Response(404, json={"error": {"message": f"no route {request.method} {path}"}})

    # --- what was sent -------------------------------------------------------------------------
    def posts(self) -> list[httpx.Request]:
        return [r for r in self.requests if r.method == "POST"]

    def status_gets(self) -> list[httpx.Request]:
        return [r for r in self.requests if r.url.path.startswith("/v2/bulk/job/")]


def error(status: int, message: str = "", headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"error": {"id": 1, "message": message}} if message else None
    return httpx.Response(status, json=body, headers=headers)


def _reply(reply: Reply) -> httpx.Response:
    if isinstance(reply, Exception):
        raise reply
    return reply


def emails_of(users: Iterable[dict[str, Any]]) -> list[str]:
    return [u["identifiers"]["email"] for u in users]


class Pipeline:
    """A Runtime wired to a fake Attentive and a recording dispatcher, plus test conveniences."""

    def __init__(self, client: redis.Redis, monkeypatch: pytest.MonkeyPatch, **settings: Any) -> None:
        self.attentive = FakeAttentive()
        self.dispatch = RecordingDispatcher()
        params: dict[str, Any] = {
            "rate_limit_per_second": RATE,
            "first_poll_seconds": 0.01,
            "lease_seconds": 60.0,
        }
        params.update(settings)
        self.rt = Runtime(Settings(**params), client, self.dispatch)
        self.http = AttentiveClient(
            "test-key", BASE_URL, transport=httpx.MockTransport(self.attentive.handler), max_attempts=1
        )
        # No authorization is stored: the job's client and its limiter come from here. limiter_for is
        # patched too because the real one reads the client cache that client_for fills.
        monkeypatch.setattr(self.rt, "client_for", lambda job: self.http)
        monkeypatch.setattr(self.rt, "limiter_for", lambda job: self.limiter())

    @property
    def redis(self) -> redis.Redis:
        return self.rt.redis

    def limiter(self) -> RateLimiter:
        return RateLimiter(self.rt.redis, KEY_HASH, RATE)

    def create_job(self, audiences: tuple[str, ...] = ("vip", "lapsed"), **config: Any) -> ExportJob:
        data: dict[str, Any] = {
            "label": f"test job {next(_JOB_LABELS)}",  # labels are unique among jobs
            "authorization": "auth-1",
            "audiences": list(audiences),
            "identifier_mappings": {"email": "email"},
        }
        data.update(config)
        return self.rt.jobs.create(parse_job_config(data))

    def buffer(self, job: ExportJob) -> JobBuffer:
        return JobBuffer(self.rt.redis, job.id, job.config.batch_size)

    def ingest(self, *transitions: dict[str, Any]) -> None:
        ingest_lines(self.rt.redis, self.rt.jobs, [json.dumps(t) for t in transitions])

    def sealed_batch(self, job: ExportJob, emails: Iterable[str], audience: str = "vip") -> int:
        """Ingest an enter for each email and seal the open batch; returns the batch id."""
        self.ingest(*(enter(e, audience) for e in emails))
        sealed = self.buffer(job).seal_now()
        assert len(sealed) == 1
        return sealed[0]

    def polled(self, job: ExportJob) -> list[int]:
        """Batches in the job's check schedule (at Attentive, waiting for the poller), in batch order."""
        from worker.store import keys

        return sorted(int(b) for b in self.rt.redis.zrange(keys.polls(job.id), 0, -1))

    def check(self, job: ExportJob, bid: int, sends_waiting: bool = False) -> Check:
        """One check of a batch, as the key's poller makes it, with a token always at hand."""
        return check_batch(self.rt, job, bid, lambda: 0.0, self.limiter(), 1, sends_waiting)

    def status(self, job: ExportJob) -> dict[str, str]:
        from worker.store import keys
        from worker.store.replies import decode_hash

        return decode_hash(self.rt.redis.hgetall(keys.job_status(job.id)))


def enter(email: str, audience: str = "vip", at: str = AT, **profile: Any) -> dict[str, Any]:
    return {"audience": audience, "event": "enter", "at": at, "user": {"email": email, **profile}}


def exit_(email: str, audience: str = "vip", at: str = "2026-11-26T18:00:00Z") -> dict[str, Any]:
    return {"audience": audience, "event": "exit", "at": at, "user": {"email": email}}


def users(n: int, prefix: str = "u") -> list[str]:
    return [f"{prefix}{i}@x.io" for i in range(n)]
