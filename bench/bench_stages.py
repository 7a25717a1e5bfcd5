"""Where the CPU of one transition goes: ingest, flush and poll run one after another in this process.

``bench cpu`` measures the whole pipeline in real worker processes, which says how much but not
where. This runs the same stages in one process, one job, against the sandbox over real HTTP
(Attentive's 100 requests/s, jobs complete at once) and a Redis of its own choosing (db 8 emptied,
as the other benchmarks), and splits the cost:

* per stage: this process's CPU (``time.process_time``) and Redis' (``INFO cpu``) per transition
  and per batch of 256, and the Redis round trips per batch (each command or pipeline sent);
* inside Redis: the buffer script by op and the rate-limit script, from a second run with every
  command in the ``SLOWLOG`` (only this run's connections, named :data:`CLIENT_NAME`, are counted).
  That is server-wide: while it runs, every client's commands are logged, and the SLOWLOG is
  emptied before and after; its two settings are put back. Point it at a Redis of its own;
* HTTP: client CPU per request by kind (the bulk POST, the status GET, the results download);
* ingest in Python, part by part, on the same lines: reading the line, mapping, encoding the
  record, identifiers and last-writer-wins digest, packing the script call.

Sleeps (token waits) cost no CPU and are not counted. One process has the machine's other core for
Redis and the sandbox, so these figures are lower than ``bench cpu``'s, where two pool processes,
Redis and the sandbox share two cores; compare shares, not totals, across the two.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import hashlib
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

if TYPE_CHECKING:
    from worker.setup.jobconfig import ExportJobConfig

REDIS_BASE = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379").rstrip("/")
USERS = 40_000
BATCH = 256
LUA = Path(__file__).resolve().parents[1] / "worker" / "store" / "lua"
#: The name of this run's Redis connections: only their commands are counted.
CLIENT_NAME = "bench-stages"
#: Longest a stage may take before the run gives up (a batch that never completes, say).
STAGE_TIMEOUT_SECONDS = 300.0


class _RoundTrips:
    """Counts what this process sends to Redis: one per command or pipeline (a round trip each)."""

    def __init__(self) -> None:
        self.count = 0

    @contextmanager
    def counting(self) -> Iterator[None]:
        from redis.connection import AbstractConnection

        original = AbstractConnection.send_packed_command

        def counted(conn: Any, command: Any, check_health: bool = True) -> None:
            if getattr(conn, "client_name", None) == CLIENT_NAME:  # the product's, not the harness's
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

    def drain(self, countdown: float = 0.0) -> None:
        pass

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
        sender = entry.get("client_name")
        if (sender.decode(errors="replace") if isinstance(sender, bytes) else sender) != CLIENT_NAME:
            continue  # another client's (the harness's own reads, or anyone else on this server)
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


def _ingest_parts(lines: list[str], config: ExportJobConfig, reps: int = 5) -> dict[str, float]:
    """Python µs per transition that each ingest step adds, line by line as ingest runs them.

    Each pass runs the steps up to one more than the pass before over every line (so each line's
    objects are as fresh in the cache as in ingest); a step's cost is the difference between two
    passes (the fastest of ``reps`` each). Timed alone over all lines, a step reads objects made
    long before and costs up to twice as much."""
    import orjson

    from worker.mapping.mapper import Mapper
    from worker.mapping.transitions import Transition, parse_line
    from worker.pipeline.buffer import identifier_list
    from worker.store.keys import lww_digest
    from worker.store.packing import HiredisPacker

    mapper = Mapper(config)
    packer = HiredisPacker()
    steps = (
        "read the line (JSON, transition)",
        "map the profile",
        "record JSON",
        "identifier list",
        "last-writer-wins digest",
        "arguments and packing of the script calls",
    )

    def one_pass(upto: int) -> None:
        args: list[Any] = []
        for line in lines:
            for t in parse_line(line):
                if upto < 1 or not isinstance(t, Transition):
                    continue
                m = mapper.map(t.user, {t.audience: t.enter}, include_attributes=t.enter)
                if upto < 2 or m.record is None or m.user_key is None:
                    continue
                record = orjson.dumps(m.record)
                if upto < 3:
                    continue
                ids = identifier_list(m.record["identifiers"])
                if upto < 4:
                    continue
                digest = lww_digest(m.user_key, t.audience)
                if upto < 5:
                    continue
                args += [m.user_key, t.audience, t.at_ms, record, ids, digest]
                if len(args) == 6 * 512:
                    packer.pack("EVALSHA", "0" * 40, 1, "k", "ingest", 0, *args)
                    args = []

    totals = []
    for upto in range(len(steps)):
        times = []
        for _ in range(reps):
            gc.collect()
            gc.disable()  # a collection landing in one pass and not the next would be a step's cost
            try:
                start = time.process_time()
                one_pass(upto)
                times.append((time.process_time() - start) * 1e6 / len(lines))
            finally:
                gc.enable()
        totals.append(min(times))  # the least disturbed pass: noise only ever adds
    return {
        step: total - (totals[i - 1] if i else 0.0)
        for i, (step, total) in enumerate(zip(steps, totals, strict=True))
    }


def _run_stages(
    data_url: str, lines: list[str], config: ExportJobConfig
) -> tuple[dict[str, dict[str, float]], dict[str, list[float]]]:
    """One job in an emptied database: ingest ``lines`` (one user each, whole batches), flush and
    poll every batch. Returns per stage this process's CPU, Redis' CPU and the round trips; and each
    request's client CPU."""
    from worker.pipeline.flush import flush_job
    from worker.pipeline.ingest import ingest_lines
    from worker.pipeline.poller import key_hash_of, run_poller
    from worker.runtime import Runtime
    from worker.setup.authorizations import AuthorizationStore
    from worker.setup.jobs import JobStore
    from worker.store import keys

    data = redis.Redis.from_url(data_url)
    data.flushdb()
    rt = Runtime(dispatcher=_NoTasks())  # the stages run here, one after another
    AuthorizationStore(rt.redis, os.environ["EXPORT_SECRET_KEY"]).create("bench", "bench-key")
    job = JobStore(rt.redis).create(config)
    status = keys.job_status(job.id)
    users = len(lines)
    batches = users // BATCH

    def reached(name: str, deadline: float) -> bool:
        got = int(data.hget(status, name) or 0)
        if got < batches and time.monotonic() > deadline:
            raise RuntimeError(
                f"{name} {got} of {batches} after {STAGE_TIMEOUT_SECONDS:.0f} s: {data.hgetall(status)}"
            )
        return got >= batches

    def ingest() -> None:
        for s in range(0, users, 1000):
            ingest_lines(rt.redis, rt.jobs, lines[s : s + 1000])

    def flush() -> None:
        deadline = time.monotonic() + STAGE_TIMEOUT_SECONDS
        while not reached("batches_submitted", deadline):
            flush_job(rt, job.id)

    def poll() -> None:
        key_hash = key_hash_of(rt, job)
        assert key_hash is not None
        deadline = time.monotonic() + STAGE_TIMEOUT_SECONDS
        while not reached("batches_completed", deadline):
            again_in = run_poller(rt, key_hash).again_in
            time.sleep(min(again_in or 0.0, 1.0))  # as the successor task's countdown would

    stages: dict[str, dict[str, float]] = {}
    http: dict[str, list[float]] = collections.defaultdict(list)
    trips = _RoundTrips()
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
    return stages, http


def measure(users: int = USERS, data_url: str = f"{REDIS_BASE}/8") -> dict[str, Any]:
    """The stages on ``users`` users in ``data_url``'s database (emptied), twice: for the figures,
    then with every command in the SLOWLOG for the cost of each script (logging costs Redis CPU)."""
    from bench.bench_cpu import reference_unit_ms
    from bench.bench_pipeline import _line, job_config
    from tests.sandboxproc import start_sandbox
    from worker.setup.crypto import generate_secret_key
    from worker.setup.jobconfig import parse_job_config

    if users < BATCH:
        raise ValueError(f"users must be at least one batch ({BATCH}), got {users}")
    users -= users % BATCH  # full batches only: every stage's work is then whole batches
    now = int(time.time() * 1000)
    lines = [_line(i, now, "aud", "aud-") for i in range(users)]
    config = parse_job_config(job_config("stages", "bench", ["aud"], 30))
    data = redis.Redis.from_url(data_url)
    named_url = f"{data_url}{'&' if '?' in data_url else '?'}client_name={CLIENT_NAME}"
    reference = [reference_unit_ms()]
    with start_sandbox(["bench-key"], processing_delay=0.0) as sandbox:
        env = {
            "REDIS_URL": named_url,  # the product's connections, counted apart from the harness's
            "ATTENTIVE_API_URL": sandbox.url,
            "EXPORT_SECRET_KEY": generate_secret_key(),
            "ATTENTIVE_FIRST_POLL_SECONDS": "0.01",
        }
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            stages, http = _run_stages(data_url, lines, config)
            reference.append(reference_unit_ms())
            slowlog = str(data.config_get("slowlog-log-slower-than")["slowlog-log-slower-than"])
            slowlog_len = str(data.config_get("slowlog-max-len")["slowlog-max-len"])
            with contextlib.ExitStack() as restore:  # each setting put back, whatever fails
                restore.callback(data.slowlog_reset)
                restore.callback(data.config_set, "slowlog-max-len", slowlog_len)
                restore.callback(data.config_set, "slowlog-log-slower-than", slowlog)
                data.config_set("slowlog-max-len", 1_000_000)
                data.config_set("slowlog-log-slower-than", 0)
                data.slowlog_reset()
                _run_stages(data_url, lines, config)
                data.config_set("slowlog-log-slower-than", 1_000_000_000)  # stop logging before reading it
                scripts = _slowlog_scripts(data)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return {
        "users": users,
        "batches": users // BATCH,
        "reference_ms": statistics.median(reference),
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
        "commands or pipelines this process sent. Reference (machine speed, `bench cpu`'s workload): "
        f"{m['reference_ms']:.1f} ms.",
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
    lines += [
        "",
        "Inside Redis, by script (a second run with every command in the SLOWLOG, which itself costs Redis "
        "time: read the shares, not the totals):",
        "",
    ]
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
        "Ingest in Python, step by step (what each step adds, run line by line over 20,000 lines, fastest of 5, garbage collection off):",
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
