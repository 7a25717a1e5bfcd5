"""Last-writer-wins state: bytes per (user, audience) and ingest time, the old layout against buckets.

Runs on a private ``redis-server`` (worker/cli/localredis.py) with ``hash-max-listpack-entries 128``,
redis.conf's default (a server started without a config file has 512), so nothing else skews
``used_memory``. USERS users each enter AUDIENCES audiences (one transition per pair, audience by
audience, users shuffled), then a third of the pairs is replayed (half newer, half as old: stale).

* Ingest. The transitions go through :func:`worker.pipeline.ingest.ingest_lines` as JSON lines, 1,000
  per call like an inbox chunk (parse, map, route, then the buffer script 512 at a time). Reported:
  server time per EVALSHA (``INFO commandstats``: the buffer script) and wall time per transition of
  the whole call. With ``--before PATH`` an older buffer.lua (groups of 5 arguments, 13 keys) stands
  in for the script, with the same workload in alternating rounds, so machine noise hits both alike.
* Memory. After the ingest every key but the last-writer-wins state is deleted; per pair, the
  ``used_memory`` freed by then deleting that state too (what the allocator really held for it, size
  classes included), and the sum of ``MEMORY USAGE ... SAMPLES 0`` of its keys.
  The old layout is also written directly (one HASH ``audience|user`` -> ms, as the old script's HSET
  did) and then drained into buckets by :meth:`JobBuffer.migrate_last_writer`, as an upgraded job
  does: time per entry, bytes per pair afterwards, and a sample of pairs checked for their times.

Options: ``--users N``, ``--audiences N``, ``--rounds N``, ``--before PATH``, ``--quick``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import redis

from worker.cli.localredis import start_server
from worker.pipeline.buffer import Change, IngestOutcome, JobBuffer, now_ms
from worker.pipeline.ingest import ingest_lines
from worker.setup.jobconfig import parse_job_config
from worker.setup.jobs import JobStore
from worker.store import keys

AUDIENCES = ["vip_shoppers", "lapsed_buyers", "churn_risk", "newsletter", "high_value", "winback"]
LINES_PER_CALL = 1000  # an inbox chunk
# No slow log: it keeps copies of slow commands' arguments, which would count as memory here.
SERVER_ARGS = [
    "--hash-max-listpack-entries",
    "128",
    "--hash-max-listpack-value",
    "64",
    "--slowlog-max-len",
    "0",
]


def _used(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def _lww_keys(client: redis.Redis) -> list[bytes]:
    return list(client.scan_iter(match="*:lww*", count=1000))


def _keep_only_lww(client: redis.Redis) -> None:
    doomed = [k for k in client.scan_iter(match="*", count=1000) if b":lww" not in k]
    for s in range(0, len(doomed), 1000):
        client.delete(*doomed[s : s + 1000])


def _freed_by_deleting(client: redis.Redis, names: Sequence[bytes]) -> int:
    """``used_memory`` the keys ``names`` hold: how much it drops when they are deleted (synchronously).

    Measured this way rather than against the empty server, which would count what the load left
    behind elsewhere (client buffers, script cache), a few bytes per pair at this size.
    """
    before = _used(client)
    for s in range(0, len(names), 1000):
        client.delete(*names[s : s + 1000])
    return before - _used(client)


def _memory_usage(client: redis.Redis, names: Sequence[bytes]) -> int:
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.memory_usage(name, samples=0)
    return sum(int(v or 0) for v in pipe.execute())


def _workload(users: int, audiences: int, t0: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Transitions (as dicts) for the load and the replay."""
    rnd = random.Random(7)
    load: list[dict[str, Any]] = []
    for a in range(audiences):
        order = list(range(users))
        rnd.shuffle(order)
        for i in order:
            user = {"email": f"user{i:08d}@example.com", "first_name": "Ana"}
            load.append({"audience": AUDIENCES[a], "event": "enter", "at": t0 + len(load), "user": user})
    replay = []
    for t in rnd.sample(load, len(load) // 3):
        newer = rnd.random() < 0.5
        replay.append({**t, "event": "exit" if newer else "enter", "at": t["at"] + (1 if newer else 0)})
    return load, replay


@contextlib.contextmanager
def _before(client: redis.Redis, path: Path | None) -> Iterator[None]:
    """JobBuffer.ingest runs the older script at ``path`` meanwhile (nothing changes without one)."""
    if path is None:
        yield
        return
    script = client.register_script(path.read_text())
    original = JobBuffer.ingest

    def ingest(self: JobBuffer, changes: Sequence[Change], now: int | None = None) -> IngestOutcome:
        args: list[Any] = ["ingest", now or now_ms(), keys.batch(self.job_id, ""), self.batch_size]
        for c in changes:
            args += [c.user_key, c.audience, c.at_ms, c.record_json, c.identifiers]
        accepted, merged, queued, stale, sealed, shared = script(keys=self._keys[:13], args=args)
        return IngestOutcome(accepted, merged, queued, stale, [int(b) for b in sealed], shared)

    JobBuffer.ingest = ingest  # type: ignore[method-assign]
    try:
        yield
    finally:
        JobBuffer.ingest = original  # type: ignore[method-assign]


def _ingest(client: redis.Redis, jobs: JobStore, transitions: list[dict[str, Any]]) -> dict[str, float]:
    lines = [json.dumps(t) for t in transitions]
    client.config_resetstat()
    started = time.perf_counter()
    for s in range(0, len(lines), LINES_PER_CALL):
        ingest_lines(client, jobs, lines[s : s + LINES_PER_CALL])
    wall = time.perf_counter() - started
    stats = client.info("commandstats").get("cmdstat_evalsha", {})
    return {
        "server_us": float(stats.get("usec", 0)) / max(int(stats.get("calls", 0)), 1),
        "wall_us": wall / len(lines) * 1e6,
    }


def _round(
    client: redis.Redis, before: Path | None, load: list[dict[str, Any]], replay: list[dict[str, Any]]
) -> dict[str, Any]:
    client.flushall()
    audiences = sorted({t["audience"] for t in load})
    config = {
        "label": "bench",
        "authorization": "bench",
        "audiences": audiences,
        "identifier_mappings": {"email": "email"},
    }
    jobs = JobStore(client)
    jobs.create(parse_job_config(config))
    with _before(client, before):
        out: dict[str, Any] = {"load": _ingest(client, jobs, load), "replay": _ingest(client, jobs, replay)}
    _keep_only_lww(client)
    pairs = len(load)
    names = _lww_keys(client)
    out["usage_per_pair"] = _memory_usage(client, names) / pairs
    out["shape"] = _bucket_shape(client) if before is None else ""
    out["used_per_pair"] = _freed_by_deleting(client, names) / pairs
    return out


def _old_layout_and_drain(client: redis.Redis, load: list[dict[str, Any]]) -> dict[str, Any]:
    client.flushall()
    job = "bench"
    legacy = keys.last_writer(job)
    pipe = client.pipeline(transaction=False)
    for n, t in enumerate(load, 1):
        pipe.hset(legacy, f"{t['audience']}|{t['user']['email']}", f"{t['at']}")
        if n % 5000 == 0:
            pipe.execute()
    pipe.execute()
    pairs = len(load)
    encoding = client.object("encoding", legacy)
    out: dict[str, Any] = {
        "usage_per_pair": _memory_usage(client, [legacy.encode()]) / pairs,
        "encoding": encoding.decode() if isinstance(encoding, bytes) else str(encoding),
    }
    dump = client.dump(legacy)
    assert isinstance(dump, bytes)
    out["used_per_pair"] = _freed_by_deleting(client, [legacy.encode()]) / pairs
    client.restore(legacy, 0, dump)
    buf = JobBuffer(client, job)
    started = time.perf_counter()
    calls = 1
    while buf.migrate_last_writer():
        calls += 1
    out["drain_s"] = time.perf_counter() - started
    out["drain_calls"] = calls
    sample = random.Random(1).sample(load, min(5000, len(load)))
    got = buf.last_accepted([(t["user"]["email"], t["audience"]) for t in sample])
    out["drain_exact"] = all(g == t["at"] for g, t in zip(got, sample, strict=True))
    names = _lww_keys(client)
    out["after_usage_per_pair"] = _memory_usage(client, names) / pairs
    out["after_used_per_pair"] = _freed_by_deleting(client, names) / pairs
    return out


def _bucket_shape(client: redis.Redis) -> str:
    names = [n for n in _lww_keys(client) if n.rsplit(b":", 1)[-1].isdigit()]
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.object("encoding", name)
        pipe.hlen(name)
    got = pipe.execute()
    sizes = [int(n) for n in got[1::2]]
    others = sum(1 for e in got[0::2] if e not in (b"listpack", "listpack"))
    meta = next((client.hgetall(n) for n in _lww_keys(client) if n.endswith(b":lww:meta")), {})
    return (
        f"{len(names):,} buckets (linear hashing level {int(meta.get(b'level', 0))}, split pointer "
        f"{int(meta.get(b'split', 0)):,}), pairs per bucket median {statistics.median(sizes):.0f}, "
        f"max {max(sizes)}; {others} not listpack-encoded"
    )


def run(argv: Sequence[str] = ()) -> str:
    parser = argparse.ArgumentParser(prog="python -m bench lww")
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--audiences", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", type=Path, default=None, help="an older buffer.lua to run side by side")
    parser.add_argument("--quick", action="store_true", help="20,000 users, one round")
    opts = parser.parse_args(list(argv))
    if opts.quick:
        opts.users, opts.rounds = 20_000, 1
    load, replay = _workload(opts.users, opts.audiences, now_ms() - 10 * 86_400_000)
    pairs = len(load)
    variants: list[Path | None] = [opts.before, None] if opts.before else [None]
    results: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
    with start_server(args=SERVER_ARGS) as server:
        client = redis.Redis.from_url(server.url, socket_timeout=600)  # deleting a big HASH takes seconds
        old = _old_layout_and_drain(client, load)
        for _ in range(opts.rounds):
            for variant in variants:
                results["new" if variant is None else "old"].append(_round(client, variant, load, replay))
        version = client.info("server")["redis_version"]
        client.close()

    def med(variant: str, *path: str) -> float:
        values = []
        for r in results[variant]:
            v: Any = r
            for p in path:
                v = v[p]
            values.append(float(v))
        return statistics.median(values)

    rows = [("old", f"one HASH (`{opts.before.name}`)")] if opts.before else []
    rows.append(("new", "buckets"))
    lines = [
        "## Last-writer-wins state: bytes per (user, audience) and ingest time (`python -m bench lww`)",
        "",
        f"{opts.users:,} users x {opts.audiences} audiences = {pairs:,} (user, audience) pairs; replay "
        f"{len(replay):,} (half newer, half stale). redis-server {version}, hash-max-listpack-entries 128; "
        f"medians of {opts.rounds} round(s).",
        "",
        "| last-writer-wins layout | bytes per pair: `used_memory` freed by deleting it | bytes per pair: `MEMORY USAGE` |",
        "|---|---:|---:|",
        f"| one HASH `audience\\|user` -> ms, written directly ({old['encoding']}) | "
        f"{old['used_per_pair']:.1f} | {old['usage_per_pair']:.1f} |",
    ]
    if opts.before:
        lines.append(
            f"| one HASH: loaded through ingest with `{opts.before.name}` | {med('old', 'used_per_pair'):.1f} | "
            f"{med('old', 'usage_per_pair'):.1f} |"
        )
    lines += [
        f"| buckets: loaded through ingest | {med('new', 'used_per_pair'):.1f} | {med('new', 'usage_per_pair'):.1f} |",
        f"| buckets: the old HASH drained by `migrate_last_writer()` | {old['after_used_per_pair']:.1f} | "
        f"{old['after_usage_per_pair']:.1f} |",
        "",
        f"Buckets after the load: {results['new'][-1]['shape']}. Drain: {old['drain_calls']:,} calls, "
        f"{old['drain_s']:.1f} s ({old['drain_s'] / pairs * 1e6:.1f} µs per entry); 5,000 sampled pairs kept "
        f"their times: {'yes' if old['drain_exact'] else 'NO'}.",
        "",
        f"Ingest through `ingest_lines`, {LINES_PER_CALL:,} lines per call (the buffer script: µs per EVALSHA, "
        "512 transitions each, from `INFO commandstats`; whole call: µs per transition, wall):",
        "",
        "| script | load: script µs/call | load: µs/transition | replay: script µs/call | replay: µs/transition |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, label in rows:
        lines.append(
            f"| {label} | {med(key, 'load', 'server_us'):,.0f} | {med(key, 'load', 'wall_us'):.1f} | "
            f"{med(key, 'replay', 'server_us'):,.0f} | {med(key, 'replay', 'wall_us'):.1f} |"
        )
    if opts.before:

        def ratio(phase: str, what: str) -> str:
            return f"{med('new', phase, what) / med('old', phase, what):.2f}"

        lines += [
            "",
            f"Buckets / old: script time per call {ratio('load', 'server_us')} (load), "
            f"{ratio('replay', 'server_us')} (replay); whole ingest per transition {ratio('load', 'wall_us')} "
            f"(load), {ratio('replay', 'wall_us')} (replay).",
        ]
    return "\n".join(lines)
