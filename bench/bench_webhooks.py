"""One user per webhook: CPU per transition when every request carries a single transition.

Lytics' audience triggers send one user per request unless the webhook's batching is on, and the
receiver stores each request as one inbox chunk. This measures what a transition then costs the
workers, side by side in one run, for the two ways a chunk can be ingested:

* ``task``: an ``export.ingest`` task per chunk (what the receiver queued before drains);
* ``drain``: what the receiver does now (``inbox.put_chunk_for_drain``: the chunk and, unless one
  is queued, a drain's mark in one round trip; one ``export.drain`` at a time, a quarter second
  after the request that queued it, ingesting the pending chunks a group at a time, and asking for
  a helper in another process when more than a group waits).

Each run: a fresh Redis database, the sandbox (one token, Attentive's 100 requests/s, jobs complete
after 0.5 s), one ``celery worker`` with 2 prefork processes plus beat, one job. ``--users`` users
(whole batches of 256) are written as one-line chunks exactly as the receiver writes them
(``inbox.put_chunk``, then the mode's dispatch), either all at once while the workers idle
(*burst*) or at a steady pace of requests per second. CPU (pool + main + beat + Redis, as in
``bench_cpu``) runs from the first chunk until every batch was confirmed complete; transitions/s
from the first chunk until every transition was received by its job.

``python -m bench webhooks [--users N] [--reps N] [--paces burst,300,1000]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

REDIS_BASE = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379").rstrip("/")
USERS = 4096
REPETITIONS = 3
PACES = ("burst", "300", "1000")
MODES = ("task", "drain")
BATCH = 256


def measure_once(
    mode: str,
    pace: str,
    users: int,
    data_url: str = f"{REDIS_BASE}/8",
    broker_url: str = f"{REDIS_BASE}/7",
) -> dict[str, Any]:
    """One run of ``mode`` at ``pace`` ("burst" or requests/s) with its data and broker in the given
    Redis databases (both emptied); figures as a dict."""
    from bench import bench_pipeline as helpers
    from bench.bench_cpu import _tasks_run
    from tests.celeryproc import CeleryProcesses, wait_for
    from tests.sandboxproc import start_sandbox
    from worker.dispatch import CeleryDispatcher
    from worker.pipeline import inbox
    from worker.setup.authorizations import AuthorizationStore
    from worker.setup.jobconfig import parse_job_config
    from worker.setup.jobs import JobStore
    from worker.store import keys

    with start_sandbox(["bench-key"], processing_delay=0.5) as sandbox:
        data, env = helpers.fresh_run(data_url, broker_url, sandbox.url)
        AuthorizationStore(data, env["EXPORT_SECRET_KEY"]).create("bench", "bench-key")
        job = JobStore(data).create(parse_job_config(helpers.job_config("bench", "bench", ["vip"], 30)))
        status = keys.job_status(job.id)
        now = int(time.time() * 1000)
        lines = [helpers._line(i, now) for i in range(users)]
        procs = CeleryProcesses(env)
        try:
            procs.worker("bench", concurrency=2)
            procs.beat()
            wait_for(lambda: "ready" in procs.log("bench"), 60, "the worker to start")
            groups = helpers.worker_groups(procs, "bench", data)
            dispatcher = CeleryDispatcher()

            def dispatch(chunk: str) -> None:
                if mode == "task":
                    dispatcher.ingest(chunk)
                else:
                    inbox.request_drain(data, dispatcher)

            def receive(line: str) -> None:
                """One request as the receiver stores it in this mode."""
                if mode == "task":
                    dispatch(inbox.put_chunk(data, [line]))
                else:
                    _chunk, send = inbox.put_chunk_for_drain(data, [line])
                    if send:
                        inbox.send_drain(data, dispatcher, inbox.DRAIN_GATHER_SECONDS)

            # A burst is written first and dispatched after, so the workers find it all at once.
            written = [inbox.put_chunk(data, [line]) for line in lines] if pace == "burst" else []
            before = helpers._cpu_seconds(groups)
            start = time.monotonic()
            if pace == "burst":
                for chunk in written:
                    dispatch(chunk)
            else:
                interval = 1.0 / float(pace)
                for i, line in enumerate(lines):
                    receive(line)
                    time.sleep(max(0.0, start + (i + 1) * interval - time.monotonic()))
            wait_for(lambda: int(data.hget(status, "received") or 0) >= users, 900, "every transition", 0.05)
            received = time.monotonic() - start
            wait_for(
                lambda: int(data.hget(status, "batches_completed") or 0) >= users // BATCH,
                900,
                "every batch to be confirmed complete",
                0.1,
            )
            cpu = {name: v - before[name] for name, v in helpers._cpu_seconds(groups).items()}
            tasks = _tasks_run()
        finally:
            procs.stop()
    per_t = {k: 1e6 * v / users for k, v in cpu.items()}
    return {
        "mode": mode,
        "pace": pace,
        "tps": users / received,
        "us_per_t": {**per_t, "ours": sum(per_t.values())},
        "tasks": tasks.get("export.ingest", 0) + tasks.get("export.drain", 0),
    }


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench webhooks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=USERS, help=f"users per run (default {USERS})")
    parser.add_argument("--reps", type=int, default=REPETITIONS, help="repetitions, modes alternated")
    parser.add_argument("--paces", default=",".join(PACES), help="burst and/or requests per second")
    args = parser.parse_args(argv)
    args.users -= args.users % BATCH
    args.paces = args.paces.split(",")
    return args


def run(argv: list[str] | None = None) -> str:
    from bench.bench_cpu import reference_unit_ms

    args = _parse(argv or [])
    refs = [reference_unit_ms()]
    runs: list[dict[str, Any]] = []
    for rep in range(args.reps):
        for pace in args.paces:
            for mode in MODES if rep % 2 == 0 else MODES[::-1]:
                result = measure_once(mode, pace, args.users)
                runs.append(result)
                print(json.dumps(result), flush=True)
        refs.append(reference_unit_ms())
    lines = [
        "## One user per webhook: a task per request against drains",
        "",
        f"{args.users:,} users, each its own request (one-line inbox chunk, as Lytics' unbatched",
        "audience triggers arrive), one job, one `celery worker` with 2 prefork processes plus beat,",
        "the sandbox completing jobs after 0.5 s. *task*: an `export.ingest` task per request (before",
        "drains); *drain*: what the receiver does now (`put_chunk_for_drain`; a burst is written first and",
        "drained after). CPU µs per transition: pool + main +",
        "beat + Redis, from the first request until every batch was confirmed complete; transitions/s",
        "until every transition was received by its job; tasks: ingest and drain tasks run. Medians",
        f"of {args.reps} runs, modes alternated; reference {statistics.median(refs):.1f} ms (bench cpu).",
        "",
        "| pace (requests/s) | mode | transitions/s | ours µs/t | pool | main | Redis | tasks |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for pace in args.paces:
        medians = {}
        for mode in MODES:
            mine = [r for r in runs if r["pace"] == pace and r["mode"] == mode]
            m = {
                "tps": statistics.median(r["tps"] for r in mine),
                "tasks": statistics.median(r["tasks"] for r in mine),
                **{
                    k: statistics.median(r["us_per_t"][k] for r in mine)
                    for k in ("ours", "pool", "main", "redis")
                },
            }
            medians[mode] = m
            lines.append(
                f"| {pace} | {mode} | {m['tps']:,.0f} | {m['ours']:,.0f} | {m['pool']:,.0f} | {m['main']:,.0f} "
                f"| {m['redis']:,.0f} | {m['tasks']:,.0f} |"
            )
        ratio = medians["drain"]["ours"] / medians["task"]["ours"]
        lines.append(f"| {pace} | drain/task | | {ratio:.2f}x | | | | |")
    return "\n".join(lines)
