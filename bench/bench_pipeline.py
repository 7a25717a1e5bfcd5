"""End-to-end pipeline: transitions/s from ingest to accepted by the sandbox, and latency at low load.

Real parts throughout: Redis on 127.0.0.1:6379, or on ``BENCH_REDIS_URL`` (data in db 8, broker in
db 7, both emptied, so on a shared machine give it a Redis of your own), the sandbox as its own
process with Attentive's rate limit (100 requests/s per token), and real ``celery worker`` processes
(prefork, 1 or 2 processes) plus ``celery beat``.

* Throughput: N users each enter one audience. All transitions are written to the inbox in chunks
  of 1,000 and their ingest tasks queued while the workers are idle; the clock runs from queueing to
  the moment the sandbox has accepted every user (its own request log). Mean users per request comes
  from the same log. Repeated; medians reported.
* Latency: one transition every 100 ms (10/s) for 30 s with a 5 s flush interval; latency is the
  sandbox's accept time of the request carrying a user minus the time the transition was queued.
* Where the time goes: CPU seconds each process used during a throughput run (from /proc), and the
  requests the sandbox answered in it, since the limiter's 90/s is shared by sends and polls.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import redis

from tests.celeryproc import CeleryProcesses, wait_for
from tests.sandboxproc import SandboxProcess, start_sandbox

REDIS_BASE = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379").rstrip("/")
DATA_URL = f"{REDIS_BASE}/8"
BROKER_URL = f"{REDIS_BASE}/7"
TOKEN = "bench-key"
USERS = 60_000
REPETITIONS = 5
TARGET_TPS = 20_000
TARGET_USERS_PER_REQUEST = 250


def fresh_run(data_url: str, broker_url: str, sandbox_url: str) -> tuple[redis.Redis, dict[str, str]]:
    """Empty the data and broker databases; the workers' environment (a new secret key, fast first
    polls and sweeps), also set in this process. Returns a client of the data database and it."""
    from worker.setup.crypto import generate_secret_key

    data = redis.Redis.from_url(data_url)
    data.flushdb()
    redis.Redis.from_url(broker_url).flushdb()
    env = {
        "REDIS_URL": data_url,
        "CELERY_BROKER_URL": broker_url,
        "ATTENTIVE_API_URL": sandbox_url,
        "EXPORT_SECRET_KEY": generate_secret_key(),
        "ATTENTIVE_FIRST_POLL_SECONDS": "1",
        "SWEEP_INTERVAL_SECONDS": "1",
    }
    os.environ.update(env)
    return data, env


def job_config(label: str, authorization: str, audiences: list[str], flush_interval: int) -> dict[str, Any]:
    """The benchmarks' export job: the profile fields of :func:`_line`, each mapped."""
    return {
        "label": label,
        "authorization": authorization,
        "audiences": audiences,
        "identifier_mappings": {"email": "email", "phone": "phone", "user_id": "clientUserId"},
        "attribute_mappings": {
            "first_name": "firstName",
            "last_name": "lastName",
            "city": "city",
            "birthday": "dateOfBirth",
        },
        "custom_attributes": ["ltv", "tier", "tags"],
        "flush_interval_seconds": flush_interval,
    }


def _setup(sandbox: SandboxProcess, flush_interval: int) -> tuple[redis.Redis, dict[str, str], str]:
    from worker.setup.authorizations import AuthorizationStore
    from worker.setup.jobconfig import parse_job_config
    from worker.setup.jobs import JobStore

    sandbox.reset()
    data, env = fresh_run(DATA_URL, BROKER_URL, sandbox.url)
    AuthorizationStore(data, env["EXPORT_SECRET_KEY"]).create("bench", TOKEN)
    config = job_config("bench", "bench", ["vip", "lapsed"], flush_interval)
    job = JobStore(data).create(parse_job_config(config))
    return data, env, job.id


def _line(i: int, at: int, audience: str = "vip", prefix: str = "") -> str:
    """User ``i`` entering ``audience``; ``prefix`` keeps users of several jobs apart (bench_cpu)."""
    user = {
        "email": f"{prefix}user{i}@example.com",
        "phone": f"+1415{5550000 + i % 10_000_000:07d}"[:12],
        "user_id": f"{prefix}u{i}",
        "first_name": "Ada",
        "last_name": "Lovelace",
        "city": "Oakland",
        "birthday": "1990-07-04",
        "ltv": i % 1000,
        "tier": "gold",
        "tags": ["a", "b"],
    }
    return json.dumps({"audience": audience, "event": "enter", "at": at, "user": user})


def _cpu_seconds(pids: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each named group of processes (Linux /proc)."""
    hz = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for name, group in pids.items():
        total = 0
        for pid in group:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])
        out[name] = total / hz
    return out


def worker_groups(procs: CeleryProcesses, worker: str, data: redis.Redis) -> dict[str, list[int]]:
    """The processes whose CPU is ours: ``worker``'s pool and main process, beat, and Redis."""
    main = procs.procs[worker].pid
    return {
        "pool": _children(main),
        "main": [main],
        "beat": [procs.procs["beat"].pid],
        "redis": [_redis_pid(data)],
    }


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _redis_pid(data: redis.Redis) -> int:
    return int(data.info("server")["process_id"])


def _accepted_users(sandbox: SandboxProcess) -> tuple[int, int]:
    counters = sandbox.counters(TOKEN)
    hist = counters.get("users_per_request", {})
    return sum(int(n) * c for n, c in hist.items()), sum(hist.values())


def _polls(sandbox: SandboxProcess) -> int:
    counts = sandbox.counters(TOKEN).get("requests", {}).get("GET /v2/bulk/job/{bulkJobId}", {})
    return sum(int(n) for n in counts.values())


def throughput(sandbox: SandboxProcess, processes: int) -> dict[str, Any]:
    from worker.dispatch import CeleryDispatcher
    from worker.pipeline import inbox
    from worker.store import keys

    data, env, job_id = _setup(sandbox, flush_interval=30)
    procs = CeleryProcesses(env)
    try:
        procs.worker("bench", concurrency=processes)
        procs.beat()
        wait_for(lambda: "ready" in procs.log("bench"), 30, "the worker to start")
        now = int(time.time() * 1000)
        lines = [_line(i, now) for i in range(USERS)]
        chunks = [inbox.put_chunk(data, lines[s : s + 1000]) for s in range(0, USERS, 1000)]
        dispatcher = CeleryDispatcher()
        main = procs.procs["bench"].pid
        pids = {
            "worker processes": _children(main),
            "worker main": [main],
            "redis": [_redis_pid(data)],
            "sandbox": [sandbox.proc.pid],
        }
        cpu_before = _cpu_seconds(pids)
        polls_before = _polls(sandbox)
        start = time.monotonic()
        for chunk in chunks:
            dispatcher.ingest(chunk)
        # Users of the last partial batch wait for the 30 s interval: count only full batches.
        full = USERS - USERS % 256
        wait_for(lambda: _accepted_users(sandbox)[0] >= full, 300, "the sandbox to accept every user", 0.05)
        elapsed = time.monotonic() - start
        cpu = {k: v - cpu_before[k] for k, v in _cpu_seconds(pids).items()}
        users, requests = _accepted_users(sandbox)
        polls = _polls(sandbox) - polls_before
        # Then until Attentive's jobs for those batches are confirmed complete (polled, results read).
        status = keys.job_status(job_id)
        batches = USERS // 256
        wait_for(
            lambda: int(data.hget(status, "batches_completed") or 0) >= batches,
            300,
            "every batch to complete",
        )
        completed = time.monotonic() - start
        return {
            "tps": full / elapsed,
            "users_per_request": users / max(requests, 1),
            "seconds": elapsed,
            "sends_per_s": requests / elapsed,
            "polls": polls,
            "completed": completed,
            "cpu": cpu,
        }
    finally:
        procs.stop()


def latency(sandbox: SandboxProcess) -> dict[str, float]:
    from worker.dispatch import CeleryDispatcher
    from worker.pipeline import inbox

    data, env, _job = _setup(sandbox, flush_interval=5)
    procs = CeleryProcesses(env)
    try:
        procs.worker("bench", concurrency=2)
        procs.beat()
        wait_for(lambda: "ready" in procs.log("bench"), 30, "the worker to start")
        dispatcher = CeleryDispatcher()
        sent: dict[str, float] = {}
        for i in range(300):
            at = time.time()
            dispatcher.ingest(inbox.put_chunk(data, [_line(i, int(at * 1000))]))
            sent[f"user{i}@example.com"] = at
            time.sleep(max(0.0, at + 0.1 - time.time()))
        wait_for(lambda: _accepted_users(sandbox)[0] >= len(sent), 60, "every user to be accepted")
        latencies = []
        for req in sandbox.requests():
            for ident in req["identifiers"]:
                email = ident.get("email") if isinstance(ident, dict) else None
                if email in sent:
                    latencies.append(req["time"] - sent[email])
        latencies.sort()
        return {
            "p50": statistics.median(latencies),
            "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
            "n": len(latencies),
        }
    finally:
        procs.stop()


def run() -> str:
    rows: list[str] = []
    medians: dict[int, dict[str, Any]] = {}
    with start_sandbox([TOKEN], processing_delay=0.5) as sandbox:
        for processes in (1, 2):
            runs = [throughput(sandbox, processes) for _ in range(REPETITIONS)]
            for n, r in enumerate(runs, 1):
                cpu = r["cpu"]
                rows.append(
                    f"| {processes} | {n} | {r['seconds']:.2f} | {r['tps']:,.0f} | {r['completed']:.1f} "
                    f"| {r['users_per_request']:.1f} "
                    f"| {r['sends_per_s']:.0f} | {r['polls']} | {cpu['worker processes']:.2f} "
                    f"| {cpu['worker main']:.2f} | {cpu['redis']:.2f} | {cpu['sandbox']:.2f} "
                    f"| {sum(cpu.values()) / r['seconds'] / (os.cpu_count() or 1):.0%} |"
                )
            medians[processes] = {
                "tps": statistics.median(r["tps"] for r in runs),
                "upr": statistics.median(r["users_per_request"] for r in runs),
                "sends": statistics.median(r["sends_per_s"] for r in runs),
                "completed": statistics.median(r["completed"] for r in runs),
            }
        lat = latency(sandbox)
    one, two = medians[1], medians[2]
    return "\n".join(
        [
            "## Pipeline: ingest to accepted by the sandbox",
            "",
            f"{USERS:,} users entering one audience, queued as 60 ingest tasks while the workers idle; the",
            "sandbox enforces Attentive's 100 requests/s per token and completes jobs after 0.5 s; our",
            "limiter targets 90/s for submissions and polls together. One `celery worker` with 1 or 2",
            "prefork processes, plus beat. Time from queueing to the sandbox accepting the last full batch.",
            "",
            "CPU columns are CPU-seconds used during the run by the pool processes, the worker's main",
            "(consumer) process, Redis and the sandbox; *busy* is their sum over the run's wall time and",
            f"the machine's {os.cpu_count()} cores. *Polls* are job-status GETs answered during the run.",
            "*Completed* is the time from queueing until every one of those batches was confirmed",
            "complete by a poll (the job's `batches_completed`): polls wait for spare budget, so most run",
            "after the sends.",
            "",
            "| worker processes | rep | seconds | transitions/s | completed (s) | users/request | sends/s "
            "| polls | CPU pool | CPU main | CPU Redis | CPU sandbox | busy |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
            f"**Median: {one['tps']:,.0f} transitions/s with 1 process, {two['tps']:,.0f} with 2 "
            f"({two['tps'] / one['tps']:.2f}x); {two['tps'] / TARGET_TPS:.2f}x the {TARGET_TPS:,}/s target. "
            f"Users per request: {two['upr']:.1f} (target {TARGET_USERS_PER_REQUEST}).** "
            f"Every batch confirmed complete after a median {one['completed']:.1f} s (1 process) and "
            f"{two['completed']:.1f} s (2).",
            "",
            f"Latency at 10 transitions/s, flush interval 5 s ({lat['n']:.0f} users): "
            f"p50 {lat['p50']:.2f} s, p99 {lat['p99']:.2f} s (target: p99 under interval + 2 s = 7 s).",
            "",
            f"With 2 processes the sends ran at a median {two['sends']:.0f} requests/s against the limiter's 90/s:",
            f"{USERS // 256} full batches need {USERS // 256 / 90:.2f} s at 90/s, a ceiling of "
            f"{(USERS - USERS % 256) / (USERS // 256 / 90):,.0f} transitions/s for this run. One flush task",
            "sends a job's batches while ingest fills them, and the key's poller checks batches within its share of the budget",
            "(README, How it works); the sandbox applies accepted records to its user store when read,",
            "since at Attentive that work happens on Attentive's servers.",
        ]
    )
