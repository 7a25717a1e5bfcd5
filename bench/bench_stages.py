"""Where the CPU of one transition goes: ingest, flush and poll run one after another in this process.

``bench cpu`` measures the whole pipeline in real worker processes, which says how much but not
where. This runs the same stages in one process, one job, against the sandbox over real HTTP
(Attentive's 100 requests/s, jobs complete at once) and a Redis of its own choosing (db 8 emptied,
as the other benchmarks), and splits the cost:

* per stage: this process's CPU (``time.process_time``) and Redis' (``INFO cpu``) per transition
  and per batch of 256, and the Redis round trips per batch (each command or pipeline sent);
* inside Redis: the buffer script by op and the rate-limit script (``SLOWLOG`` with every command
  logged for the run; the previous threshold is put back);
* HTTP: client CPU per request by kind (the bulk POST, the status GET, the results download);
* ingest in Python, part by part, on the same lines: reading the line, mapping, encoding the
  record, identifiers and last-writer-wins digest, packing the script call.

Sleeps (token waits) cost no CPU and are not counted. One process has the machine's other core for
Redis and the sandbox, so these figures are lower than ``bench cpu``'s, where two pool processes,
Redis and the sandbox share two cores; compare shares, not totals, across the two.
"""

from __future__ import annotations

import collections
import hashlib
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

REDIS_BASE = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379").rstrip("/")
USERS = 40_000
BATCH = 256
LUA = Path(__file__).resolve().parents[1] / "worker" / "store" / "lua"


class _RoundTrips:
    """Counts what this process sends to Redis: one per command or pipeline (a round trip each)."""

    def __init__(self) -> None:
        self.count = 0

    @contextmanager
    def counting(self) -> Iterator[None]:
        from redis.connection import AbstractConnection

        original = AbstractConnection.send_packed_command

        def counted(conn: Any, command: Any, check_health: bool = True) -> None:
            self.count += 1
            original(conn, command, check_health)  # type: ignore[no-untyped-call]

        AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]
        try:
            yield
        finally:
            AbstractConnection.send_packed_command = original  # type: ignore[method-assign]


def _http_kind(method: str, path: str) -> str:
    if method == "POST":
        return "bulk POST"
    return "status GET" if path.startswith("/v2/bulk/job/") else "results GET"


@contextmanager
def _http_cpu(out: dict[str, list[float]]) -> Iterator[None]:
    """Client CPU of each request the Attentive client sends, by kind."""
    from worker.clients.attentive.client import AttentiveClient

    original = AttentiveClient._send

    def timed(client: Any, request: Any, **kwargs: Any) -> Any:
        start = time.process_time()
        try:
            response = original(client, request, **kwargs)
            if kwargs.get("stream"):
                response.read()  # the download itself, not the caller's parse
            return response
        finally:
            out[_http_kind(request.method, request.url.path)].append(time.process_time() - start)

    AttentiveClient._send = timed  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        AttentiveClient._send = original  # type: ignore[method-assign]


class _NoTasks:
    """A dispatcher that queues nothing: the flush and poll a task would run, this process runs."""

    def ingest(self, chunk_id: str) -> None:
        pass

    def flush(self, job_id: str, countdown: float = 0.0) -> None:
        pass

    def poll_key(self, key_hash: str, countdown: float = 0.0) -> None:
        pass

    def backfill(self, job_id: str, part: str, countdown: float = 0.0) -> None:
        pass


def _redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _script_names() -> dict[str, str]:
    return {hashlib.sha1(p.read_bytes()).hexdigest(): p.stem for p in LUA.glob("*.lua")}


def _slowlog_scripts(client: redis.Redis) -> dict[str, tuple[int, int]]:
    """(calls, µs) per script, the buffer script per op, from the SLOWLOG (every command logged)."""
    names = _script_names()
    out: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for entry in client.slowlog_get(1_000_000):
        command = entry["command"]
        args = (command.decode(errors="replace") if isinstance(command, bytes) else str(command)).split(" ")
        if not args or args[0].upper() != "EVALSHA" or len(args) < 3:
            continue
        name = names.get(args[1], "other (redis-py Lock)")
        nkeys = int(args[2])
        if name == "buffer" and len(args) > 3 + nkeys:
            name = f"buffer {args[3 + nkeys]}"
        out[name][0] += 1
        out[name][1] += int(entry["duration"])
    return {k: (v[0], v[1]) for k, v in out.items()}


def _ingest_parts(lines: list[str], config: Any, reps: int = 3) -> dict[str, float]:
    """Python µs per transition of each ingest step, run on its own over the same lines."""
    import orjson

    from worker.mapping.mapper import Mapper
    from worker.mapping.transitions import parse_line
    from worker.pipeline.buffer import identifier_list
    from worker.store.keys import lww_digest
    from worker.store.packing import HiredisPacker

    mapper = Mapper(config)
    n = len(lines)

    def timed(step: Callable[[], Any]) -> tuple[float, Any]:
        times, result = [], None
        for _ in range(reps):
            start = time.process_time()
            result = step()
            times.append((time.process_time() - start) * 1e6 / n)
        return statistics.median(times), result

    parts: dict[str, float] = {}
    parts["read the line (JSON, transition)"], found = timed(
        lambda: [t for ln in lines for t in parse_line(ln)]
    )
    parts["map the profile"], mapped = timed(
        lambda: [mapper.map(t.user, {t.audience: t.enter}, include_attributes=t.enter) for t in found]
    )
    parts["record JSON"], records = timed(lambda: [orjson.dumps(m.record) for m in mapped])
    parts["identifier list"], ids = timed(lambda: [identifier_list(m.record["identifiers"]) for m in mapped])
    parts["last-writer-wins digest"], digests = timed(
        lambda: [lww_digest(m.user_key, t.audience) for m, t in zip(mapped, found, strict=True)]
    )
    args: list[Any] = []
    for m, t, rec, idl, dig in zip(mapped, found, records, ids, digests, strict=True):
        args += [m.user_key, t.audience, t.at_ms, rec, idl, dig]
    packer = HiredisPacker()
    per_call = 6 * 512
    parts["pack the script calls"], _ = timed(
        lambda: [
            packer.pack("EVALSHA", "0" * 40, 1, "k", "ingest", 0, *args[s : s + per_call])
            for s in range(0, len(args), per_call)
        ]
    )
    return parts


def measure(users: int = USERS, data_url: str = f"{REDIS_BASE}/8") -> dict[str, Any]:
    """Run the three stages on ``users`` users in ``data_url``'s database (emptied first)."""
    from bench.bench_pipeline import _line, job_config
    from tests.sandboxproc import start_sandbox
    from worker.pipeline.flush import flush_job
    from worker.pipeline.ingest import ingest_lines
    from worker.pipeline.poller import key_hash_of, run_poller
    from worker.runtime import Runtime
    from worker.setup.authorizations import AuthorizationStore
    from worker.setup.crypto import generate_secret_key
    from worker.setup.jobconfig import parse_job_config
    from worker.setup.jobs import JobStore
    from worker.store import keys

    users -= users % BATCH  # full batches only: every stage's work is then whole batches
    batches = users // BATCH
    data = redis.Redis.from_url(data_url)
    data.flushdb()
    with start_sandbox(["bench-key"], processing_delay=0.0) as sandbox:
        env = {
            "REDIS_URL": data_url,
            "ATTENTIVE_API_URL": sandbox.url,
            "EXPORT_SECRET_KEY": generate_secret_key(),
            "ATTENTIVE_FIRST_POLL_SECONDS": "0.01",
        }
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            rt = Runtime(dispatcher=_NoTasks())  # the stages run here, one after another
            AuthorizationStore(rt.redis, env["EXPORT_SECRET_KEY"]).create("bench", "bench-key")
            config = parse_job_config(job_config("stages", "bench", ["aud"], 30))
            job = JobStore(rt.redis).create(config)
            now = int(time.time() * 1000)
            lines = [_line(i, now, "aud", "aud-") for i in range(users)]
            status = keys.job_status(job.id)

            def counter(name: str) -> int:
                return int(data.hget(status, name) or 0)

            def ingest() -> None:
                for s in range(0, users, 1000):
                    ingest_lines(rt.redis, rt.jobs, lines[s : s + 1000])

            def flush() -> None:
                while counter("batches_submitted") < batches:
                    flush_job(rt, job.id)

            def poll() -> None:
                key_hash = key_hash_of(rt, job)
                assert key_hash is not None
                while counter("batches_completed") < batches:
                    run_poller(rt, key_hash)

            slowlog = str(data.config_get("slowlog-log-slower-than")["slowlog-log-slower-than"])
            slowlog_len = str(data.config_get("slowlog-max-len")["slowlog-max-len"])
            data.config_set("slowlog-max-len", 1_000_000)
            stages: dict[str, dict[str, float]] = {}
            http: dict[str, list[float]] = collections.defaultdict(list)
            trips = _RoundTrips()
            try:
                data.config_set("slowlog-log-slower-than", 0)
                data.slowlog_reset()
                with trips.counting(), _http_cpu(http):
                    for name, stage in (("ingest", ingest), ("flush", flush), ("poll", poll)):
                        trips.count = 0
                        cpu, redis_cpu = time.process_time(), _redis_cpu(data)
                        stage()
                        stages[name] = {
                            "python_s": time.process_time() - cpu,
                            "redis_s": _redis_cpu(data) - redis_cpu,
                            "round_trips": trips.count,
                        }
                data.config_set("slowlog-log-slower-than", 1_000_000_000)  # stop logging before reading it
                scripts = _slowlog_scripts(data)
            finally:
                data.config_set("slowlog-log-slower-than", slowlog)
                data.config_set("slowlog-max-len", slowlog_len)
                data.slowlog_reset()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return {
        "users": users,
        "batches": batches,
        "stages": stages,
        "scripts": scripts,
        "http": {k: statistics.median(v) for k, v in http.items()},
        "http_calls": {k: len(v) for k, v in http.items()},
        "ingest_parts": _ingest_parts(lines[:20_000], config),
    }


def report(m: dict[str, Any]) -> str:
    users, batches = m["users"], m["batches"]
    lines = [
        "## Where the CPU goes, stage by stage",
        "",
        f"{users:,} users entering one audience of one job, ingest, flush and poll run one after another "
        "in one process (`python -m bench stages`, `bench/bench_stages.py`); the sandbox over real HTTP, "
        "jobs complete at once. Python = this process, Redis = the server (`INFO cpu`); round trips = "
        "commands or pipelines this process sent.",
        "",
        "| stage | Python µs/t | Python ms/batch | Redis µs/t | Redis ms/batch | round trips/batch |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    total_py = total_redis = 0.0
    for name, s in m["stages"].items():
        total_py += s["python_s"]
        total_redis += s["redis_s"]
        lines.append(
            f"| {name} | {s['python_s'] * 1e6 / users:.1f} | {s['python_s'] * 1e3 / batches:.2f} "
            f"| {s['redis_s'] * 1e6 / users:.1f} | {s['redis_s'] * 1e3 / batches:.2f} "
            f"| {s['round_trips'] / batches:.1f} |"
        )
    lines.append(
        f"| **all** | **{total_py * 1e6 / users:.1f}** | | **{total_redis * 1e6 / users:.1f}** | | |"
    )
    lines += ["", "Inside Redis, by script (SLOWLOG, every command logged):", ""]
    lines += ["| script (op) | calls | µs/call | µs/t |", "|---|---:|---:|---:|"]
    for name, (calls, us) in sorted(m["scripts"].items(), key=lambda kv: -kv[1][1]):
        lines.append(f"| {name} | {calls:,} | {us / calls:,.0f} | {us / users:.2f} |")
    lines += ["", "HTTP, client CPU per request (median):", ""]
    lines += ["| request | count | µs | µs/t |", "|---|---:|---:|---:|"]
    for kind, cpu in sorted(m["http"].items()):
        count = m["http_calls"][kind]
        lines.append(f"| {kind} | {count} | {cpu * 1e6:.0f} | {cpu * 1e6 * count / users:.2f} |")
    lines += [
        "",
        "Ingest in Python, step by step (each step alone over the same 20,000 lines, median of 3):",
        "",
    ]
    lines += ["| step | µs/t |", "|---|---:|"]
    for step, us in m["ingest_parts"].items():
        lines.append(f"| {step} | {us:.2f} |")
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> str:
    users = int(argv[0]) if argv else USERS
    return report(measure(users))


if __name__ == "__main__":
    import sys

    print(run(sys.argv[1:]))
