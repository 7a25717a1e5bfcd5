"""CPU per transition and scaling: 1, 2 and 4 API keys (one job each) with 2 worker processes.

Machines differ, so each figure stands beside a machine-speed reference measured in the same run:
a fixed pure-Python workload (stdlib only, the same in every tree), timed in CPU seconds before
and after each measurement. CPU per transition divided by that reference compares machines.

One measurement (``--measure``, run as its own process from the tree under test, so an older
commit in a git worktree is measured by this same harness): a fresh Redis database, a sandbox with
one token per key (Attentive's 100 requests/s each, jobs completing after 0.5 s), one ``celery
worker`` with 2 prefork processes plus beat, one export job per key with an audience of its own,
``--users-per-key`` users entering it, queued as ingest tasks of 1,000 lines while the workers
idle. Transitions/s runs from queueing until the sandbox accepted every full batch; CPU runs from
queueing until every batch was confirmed complete by a poll (the whole hot path: ingest, mapping,
buffer script, seal, flush, POST, poll, results). *Ours* is the pool processes, the worker's main
process, beat and Redis (which is also the broker); the sandbox, which shares the machine, is
counted apart.

``python -m bench cpu --redis-url redis://127.0.0.1:6451 --before /tmp/perf-before`` alternates
this checkout (AFTER) with another tree (BEFORE, its own ``.venv``), never two at once, and reports
medians and ratios. Without ``--before`` only this checkout is measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
KEY_COUNTS = (1, 2, 4)
USERS_PER_KEY = 30_000
REPETITIONS = 3
ROUNDS = 3
#: Iterations of the reference workload per timed unit (about 20 ms of CPU on a 2026 cloud core).
REFERENCE_ITERATIONS = 4_000


def reference_unit_ms(units: int = 15) -> float:
    """Median CPU milliseconds of one unit of a fixed pure-Python workload (JSON, strings, dicts,
    sorting): the machine-speed reference. Uses the standard library only, so every tree runs the
    same code."""
    times = []
    for _ in range(units):
        start = time.process_time()
        table: dict[str, str] = {}
        for i in range(REFERENCE_ITERATIONS):
            name = f"user{i}@example.com"
            table[name.upper()] = json.dumps({"i": i, "name": name, "tags": [i % 7, i % 11]})
        decoded = [json.loads(v) for v in sorted(table.values())]
        if sum(d["i"] for d in decoded) != REFERENCE_ITERATIONS * (REFERENCE_ITERATIONS - 1) // 2:
            raise AssertionError("reference workload computed a wrong sum")
        times.append((time.process_time() - start) * 1000)
    return statistics.median(times)


def _pipeline_helpers() -> Any:
    """``bench_pipeline`` beside this file: a tree measured with ``--before`` runs this harness with
    its own code first on the path, and its ``bench`` package may predate these helpers."""
    spec = importlib.util.spec_from_file_location(
        "_bench_pipeline_helpers", HERE.parent / "bench_pipeline.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure_once(server: str, keys_n: int, users_per_key: int) -> dict[str, Any]:
    """One run with ``keys_n`` API keys, one job each; figures as a dict (see the module doc)."""

    from tests.celeryproc import CeleryProcesses, wait_for
    from tests.sandboxproc import start_sandbox
    from worker.dispatch import CeleryDispatcher
    from worker.pipeline import inbox
    from worker.setup.authorizations import AuthorizationStore
    from worker.setup.jobconfig import parse_job_config
    from worker.setup.jobs import JobStore
    from worker.store import keys

    helpers = _pipeline_helpers()

    data_url, broker_url = f"{server}/8", f"{server}/7"
    tokens = [f"bench-key-{k}" for k in range(keys_n)]
    with start_sandbox(tokens, processing_delay=0.5) as sandbox:
        data, env = helpers.fresh_run(data_url, broker_url, sandbox.url)
        auths = AuthorizationStore(data, env["EXPORT_SECRET_KEY"])
        jobs: list[tuple[str, str]] = []  # (job id, audience)
        for k, token in enumerate(tokens):
            auths.create(f"bench{k}", token)
            audience = f"aud{k}"
            config = helpers.job_config(f"bench{k}", f"bench{k}", [audience], 30)
            jobs.append((JobStore(data).create(parse_job_config(config)).id, audience))
        procs = CeleryProcesses(env)
        try:
            procs.worker("bench", concurrency=2)
            procs.beat()
            wait_for(lambda: "ready" in procs.log("bench"), 60, "the worker to start")
            now = int(time.time() * 1000)
            chunks = []
            for _job, audience in jobs:
                lines = [helpers._line(i, now, audience, f"{audience}-") for i in range(users_per_key)]
                chunks += [inbox.put_chunk(data, lines[s : s + 1000]) for s in range(0, users_per_key, 1000)]
            # Interleave the jobs' chunks, as several producers would send them.
            per_job = len(chunks) // keys_n
            order = [chunks[j * per_job + c] for c in range(per_job) for j in range(keys_n)]
            groups = {**helpers.worker_groups(procs, "bench", data), "sandbox": [sandbox.proc.pid]}
            before = helpers._cpu_seconds(groups)
            dispatcher = CeleryDispatcher()
            start = time.monotonic()
            for chunk in order:
                dispatcher.ingest(chunk)
            batches = users_per_key // 256
            full = batches * 256

            def accepted() -> bool:
                per_token = sandbox.counters()
                return all(
                    sum(int(n) * c for n, c in per_token.get(t, {}).get("users_per_request", {}).items())
                    >= full
                    for t in tokens
                )

            wait_for(accepted, 600, "the sandbox to accept every full batch", 0.1)
            sent = time.monotonic() - start
            wait_for(
                lambda: all(
                    int(data.hget(keys.job_status(j), "batches_completed") or 0) >= batches for j, _a in jobs
                ),
                600,
                "every batch to be confirmed complete",
                0.1,
            )
            completed = time.monotonic() - start
            cpu = {name: v - before[name] for name, v in helpers._cpu_seconds(groups).items()}
            tasks = _tasks_run()
        finally:
            procs.stop()
    transitions = full * keys_n
    ours = cpu["pool"] + cpu["main"] + cpu["beat"] + cpu["redis"]
    return {
        "keys": keys_n,
        "transitions": transitions,
        "tps": transitions / sent,
        "completed_s": completed,
        "tasks": tasks,
        "us_per_t": {**{k: 1e6 * v / transitions for k, v in cpu.items()}, "ours": 1e6 * ours / transitions},
    }


def _tasks_run() -> dict[str, int]:
    """Tasks each name ran in the worker so far (its ``inspect stats``), or {} if it does not answer:
    each task costs the worker's main process about 1.5-3 ms whatever it does."""
    from worker.app import app

    try:
        stats = app.control.inspect(timeout=5).stats() or {}
    except Exception:  # a figure for the report, never a reason to fail the measurement
        return {}
    totals: dict[str, int] = {}
    for worker in stats.values():
        for name, n in worker.get("total", {}).items():
            totals[name] = totals.get(name, 0) + int(n)
    return totals


def measure(server: str, key_counts: list[int], users_per_key: int, reps: int) -> dict[str, Any]:
    """Every key count ``reps`` times, with the reference workload timed before and after each."""
    refs = [reference_unit_ms()]
    runs = []
    for _rep in range(reps):
        for n in key_counts:
            runs.append(measure_once(server, n, users_per_key))
            refs.append(reference_unit_ms())
    return {"reference_ms": statistics.median(refs), "runs": runs}


def _run_tree(tree: Path, python: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Measure one tree in a process of its own (its virtualenv, its code, this harness)."""
    load_start = os.getloadavg()
    out = subprocess.run(
        [
            str(python),
            str(HERE),
            "--measure",
            "--redis-url",
            args.redis_url,
            "--keys",
            ",".join(map(str, args.keys)),
            "--users-per-key",
            str(args.users_per_key),
            "--reps",
            str(args.reps),
        ],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"measurement in {tree} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    result["load"] = [load_start, os.getloadavg()]
    result["commit"] = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return result


def _medians(results: list[dict[str, Any]], n: int) -> dict[str, float]:
    runs = [r for res in results for r in res["runs"] if r["keys"] == n]
    out = {"tps": statistics.median(r["tps"] for r in runs)}
    for part in ("ours", "pool", "main", "beat", "redis", "sandbox"):
        out[part] = statistics.median(r["us_per_t"][part] for r in runs)
    out["reference_ms"] = statistics.median(res["reference_ms"] for res in results)
    out["completed_s"] = statistics.median(r["completed_s"] for r in runs)
    for name in ("flush", "poll_key", "ingest"):
        out[f"{name}_tasks"] = statistics.median(r.get("tasks", {}).get(f"export.{name}", 0) for r in runs)
    return out


def _table(label: str, results: list[dict[str, Any]], key_counts: list[int]) -> list[str]:
    rows = []
    for n in key_counts:
        m = _medians(results, n)
        rows.append(
            f"| {label} | {n} | {m['tps']:,.0f} | {m['ours']:.1f} | {m['pool']:.1f} | {m['main']:.1f} "
            f"| {m['beat']:.1f} | {m['redis']:.1f} | {m['sandbox']:.1f} | {m['reference_ms']:.1f} "
            f"| {m['ours'] / m['reference_ms']:.2f} | {m['completed_s']:.1f} "
            f"| {m['ingest_tasks']:.0f} / {m['flush_tasks']:.0f} / {m['poll_key_tasks']:.0f} |"
        )
    return rows


def _report(args: argparse.Namespace, after: list[dict[str, Any]], before: list[dict[str, Any]]) -> str:
    lines = [
        "## CPU per transition and scaling",
        "",
        f"{args.users_per_key:,} users per API key entering their job's audience, one job per key, one",
        "`celery worker` with 2 prefork processes plus beat; the sandbox allows 100 requests/s per key and",
        "completes jobs after 0.5 s; our limiter targets 90/s per key (23,040 transitions/s per key at",
        "256 users a request). CPU µs per transition from queueing until every batch was confirmed",
        "complete: *ours* = pool + main + beat + Redis (also the broker); the sandbox apart. *Reference*",
        "is the CPU ms of a fixed pure-Python workload timed in the same run (machine speed);",
        "*ours/ref* = µs per transition divided by it, comparable across machines. *Tasks*: ingest /",
        "flush / poller tasks the worker ran (each costs its main process about 1.5-3 ms). Medians of "
        f"{args.reps} repetitions per run and of {len(after)} run(s) per tree.",
        "",
        "| tree | keys | transitions/s | ours µs/t | pool | main | beat | Redis | sandbox µs/t "
        "| reference ms | ours/ref | completed (s) | tasks |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *_table(f"AFTER {after[0]['commit']}", after, args.keys),
    ]
    if before:
        lines += _table(f"BEFORE {before[0]['commit']}", before, args.keys)
        lines += [
            "",
            "| keys | ours µs/t AFTER/BEFORE | ours/ref AFTER/BEFORE | transitions/s AFTER/BEFORE |",
        ]
        lines += ["|---:|---:|---:|---:|"]
        for n in args.keys:
            a, b = _medians(after, n), _medians(before, n)
            lines.append(
                f"| {n} | {a['ours'] / b['ours']:.2f}x | "
                f"{(a['ours'] / a['reference_ms']) / (b['ours'] / b['reference_ms']):.2f}x "
                f"| {a['tps'] / b['tps']:.2f}x |"
            )
        lines += ["", "Runs in order (tree, 1-minute load average at start and end, reference ms):", ""]
        for res in _interleave(after, before):
            (l1, _l5, _l15), (e1, _e5, _e15) = res["load"]
            lines.append(
                f"- {res['commit']}: load {l1:.2f} → {e1:.2f}, reference {res['reference_ms']:.1f} ms"
            )
    return "\n".join(lines)


def _interleave(after: list[dict[str, Any]], before: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(after + before, key=lambda r: r["order"])


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379"),
        help="Redis server (no database; db 8 and 7 are emptied and used)",
    )
    parser.add_argument(
        "--before", type=Path, help="another tree (with its own .venv) to measure side by side"
    )
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="runs per tree when --before is given")
    parser.add_argument("--keys", type=lambda s: [int(x) for x in s.split(",")], default=list(KEY_COUNTS))
    parser.add_argument("--users-per-key", type=int, default=USERS_PER_KEY)
    parser.add_argument("--reps", type=int, default=REPETITIONS)
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.redis_url = args.redis_url.rstrip("/")
    return args


def run(argv: list[str] | None = None) -> str:
    args = _parse(argv or [])
    after: list[dict[str, Any]] = []
    before: list[dict[str, Any]] = []
    rounds = args.rounds if args.before else 1
    for r in range(rounds):
        trees = [("after", ROOT), ("before", args.before)] if args.before else [("after", ROOT)]
        for name, tree in trees if r % 2 == 0 else trees[::-1]:
            python = tree / ".venv" / "bin" / "python" if name == "before" else Path(sys.executable)
            result = _run_tree(tree, python, args)
            result["order"] = len(after) + len(before)
            (after if name == "after" else before).append(result)
            print(f"{name} round {r + 1}: {json.dumps(result)}", flush=True)
    return _report(args, after, before)


def _measure_main(argv: list[str]) -> None:
    args = _parse(argv)
    sys.path.insert(0, os.getcwd())
    print(json.dumps(measure(args.redis_url, args.keys, args.users_per_key, args.reps)))


if __name__ == "__main__":
    _measure_main(sys.argv[1:])
