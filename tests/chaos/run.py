"""One chaos run: start everything, send the workload under faults, turn faults off, wait, judge.

Layout (all on 127.0.0.1, free ports, one work directory with every log and the AOF)::

    CLI ingest / backfill ─┐                      ┌─ celery worker w1 (-c 2) ─┐
    webhook POSTs ─> attentive-export serve ─> Redis (AOF) <─ w2, w3, beat(s)  ├─> proxy ─> sandbox
                                                  └───────────────────────────┘

The harness never writes product state itself: transitions go in through ``attentive-export ingest``
and the webhook receiver, the backfill through ``attentive-export backfill``, the authorization and
jobs through ``attentive-export auth add`` / ``jobs create``; it only reads Redis to know when
everything settled and, at the end, what the jobs recorded.
"""

from __future__ import annotations

import base64
import heapq
import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx
import redis

from tests.chaos import procs
from tests.chaos.config import ChaosConfig
from tests.chaos.procs import AofRedis, Fleet, wait_http
from tests.chaos.verdict import STARTUP_GIVE_UP, Evidence, Verdict, judge
from tests.chaos.workload import JOB_A, Delivery, Workload, job_configs, make_workload
from worker.cli.localredis import free_port
from worker.observe.status import job_status
from worker.setup.crypto import generate_secret_key
from worker.store import keys

API_KEY = "chaos-key"
AUTH_LABEL = "chaos"
QUEUES = "ingest,flush,poll,sweep,backfill"
#: At most this many ``attentive-export ingest`` processes at once (each costs a Python start-up).
MAX_CLI = 2


def say(message: str) -> None:
    print(f"chaos {time.strftime('%H:%M:%S')} {message}", flush=True)


def sandbox_supports(flag: str) -> bool:
    """Whether ``python -m sandbox --help`` lists ``flag`` (the drop-after-accept fault is recent)."""
    out = subprocess.run(
        [sys.executable, "-m", "sandbox", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    return flag in out.stdout


def last_writer_times(client: redis.Redis, job_id: str) -> dict[str, int]:
    """A job's last-writer-wins times by digest (:func:`worker.store.keys.lww_digest`, as text): every
    bucket, and the old layout's HASH if the job still has one (the verdict looks pairs up by digest)."""
    times: dict[str, int] = {}

    def keep(digest: bytes, at: int) -> None:
        times[digest.decode()] = max(at, times.get(digest.decode(), at))

    def entries(name: bytes | str) -> dict[bytes, bytes]:
        return cast("dict[bytes, bytes]", client.hgetall(name))

    meta = keys.last_writer_meta(job_id).encode()
    for name in client.scan_iter(match=f"{keys.last_writer(job_id)}:*", count=1000):
        if name != meta:
            for digest, at in entries(name).items():
                keep(digest, int(at))
    for pair, at in entries(keys.last_writer(job_id)).items():
        audience, _, user = pair.partition(b"|")
        keep(keys.lww_digest(user, audience), int(at))
    return times


@dataclass
class Result:
    passed: bool
    table: str
    summary: dict[str, Any]
    workdir: Path


@dataclass
class Journal:
    """What the harness did and when (time.time() seconds), for the verdict."""

    kills: list[dict[str, Any]] = field(default_factory=list)
    beat2: list[float] = field(default_factory=list)
    latency: list[tuple[float, float]] = field(default_factory=list)
    faults_on: float = 0.0
    faults_off: float = 0.0
    send_start: float = 0.0
    send_end: float = 0.0
    settled_at: float | None = None
    backfill: tuple[float, float] | None = None
    backfill_attempts: int = 0
    restarts: int = 0
    notes: list[str] = field(default_factory=list)
    #: held changes (the jobs' waiting hashes), sampled every few seconds
    held_samples: int = 0
    held_max_total: int = 0
    #: (changes held for one user and audience, job, user key, audience, time)
    held_max_pair: tuple[int, str, str, str, float] = (0, "", "", "", 0.0)
    #: (changes held for one user, job, user key, time)
    held_max_user: tuple[int, str, str, float] = (0, "", "", 0.0)
    #: the last sample: (most changes held for one user, changes held in all, time)
    held_last: tuple[int, int, float] = (0, 0, 0.0)
    #: broker messages sampled (queued and unacknowledged) and those carrying personal data or a secret
    broker_sampled: int = 0
    broker_leaks: dict[str, int] = field(default_factory=dict)
    #: Redis used_memory at its highest sample (bytes, time)
    redis_peak: tuple[int, float] = (0, 0.0)


class Run:
    def __init__(self, cfg: ChaosConfig) -> None:
        self.cfg = cfg
        self.t_start = time.monotonic()
        self.deadline = self.t_start + cfg.minutes * 60
        self.workdir = cfg.workdir or Path(tempfile.mkdtemp(prefix=f"aex-chaos-seed{cfg.seed}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        (self.workdir / "input").mkdir(exist_ok=True)
        self.rng = random.Random(cfg.seed * 1_000_003 + 17)
        self.journal = Journal()
        self.worker_names = [f"w{i + 1}" for i in range(len(cfg.workers))]
        self.concurrency = dict(zip(self.worker_names, cfg.workers, strict=True))
        self.job_ids: dict[str, str] = {}
        self.redis_server: AofRedis | None = None
        self.fleet: Fleet | None = None
        self.http = httpx.Client(timeout=30.0)
        self.webhook_token = "chaos-webhook-" + "x" * 24
        bin_dir = Path(sys.executable).parent
        script = bin_dir / "attentive-export"
        self.cli_cmd = [str(script)] if script.exists() else [sys.executable, "-m", "worker.cli.main"]
        #: dynamic events: (monotonic time, seq, kind, data)
        self.pending: list[tuple[float, int, str, Any]] = []
        self.seq = itertools.count()
        self.cli_running: dict[str, tuple[Delivery | None, float, subprocess.Popen[bytes]]] = {}
        self.cli_queue: list[Delivery | None] = []  # None stands for the backfill
        self.restart_due: dict[str, float] = {}
        self.redis_down_until: float | None = None
        self.last_held = 0.0

    # ------------------------------------------------------------------ helpers
    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def later(self, delay: float, kind: str, data: Any = None) -> None:
        heapq.heappush(self.pending, (time.monotonic() + delay, next(self.seq), kind, data))

    def cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.cli_cmd, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=procs.ROOT,
            check=False,
        )

    @property
    def rclient(self) -> redis.Redis:
        assert self.redis_server is not None
        return redis.Redis.from_url(self.redis_server.url(0), socket_timeout=10, socket_connect_timeout=2)

    def sandbox(self, method: str, path: str, **kw: Any) -> Any:
        response = self.http.request(method, f"{self.sandbox_url}/_sandbox/{path}", timeout=120.0, **kw)
        response.raise_for_status()
        return response.json()

    def proxy(self, method: str, path: str, **kw: Any) -> Any:
        response = self.http.request(method, f"{self.proxy_url}/_proxy/{path}", timeout=60.0, **kw)
        response.raise_for_status()
        return response.json()

    # ------------------------------------------------------------------ the run
    def execute(self) -> Result:
        cfg = self.cfg
        say(
            f"seed {cfg.seed}: {cfg.users:,} users, {cfg.transitions:,} transitions, "
            f"{cfg.send_seconds:.0f}s of faults, bound {cfg.minutes:g} min; work dir {self.workdir}"
        )
        workload = make_workload(
            cfg.seed, cfg.users, cfg.transitions, backfill_fraction=cfg.backfill_fraction
        )
        say(
            f"workload: {len(workload.lines):,} lines ({workload.transitions:,} transitions with "
            f"redeliveries) in {len(workload.deliveries)} deliveries; backfill of "
            f"{len(workload.backfill_users):,} profiles"
        )
        evidence: Evidence | None = None
        error = ""
        try:
            self.start(workload)
            self.send(workload)
            self.faults_off()
            self.settle(workload)
            evidence = self.collect(workload)
        except Exception as exc:  # the verdict still reports what was reached
            error = f"{type(exc).__name__}: {exc}"
            say(f"run aborted: {error}")
            try:
                evidence = self.collect(workload)
            except Exception as exc2:
                error += f"; collecting evidence failed too: {type(exc2).__name__}: {exc2}"
        finally:
            self.stop()
        if evidence is not None:
            self.dump(evidence, workload)
        verdict: Verdict = judge(cfg, workload, evidence, self.journal, error)
        table = verdict.render(self.header())
        (self.workdir / "verdict.md").write_text(table + "\n")
        (self.workdir / "summary.json").write_text(json.dumps(verdict.summary, indent=2, default=str))
        result = Result(verdict.passed, table, verdict.summary, self.workdir)
        if verdict.passed and not cfg.keep:
            shutil.rmtree(self.workdir / "redis", ignore_errors=True)
            shutil.rmtree(self.workdir / "input", ignore_errors=True)
            (self.workdir / "evidence.json.gz").unlink(missing_ok=True)
        return result

    def header(self) -> str:
        cfg = self.cfg
        took = time.monotonic() - self.t_start
        return (
            f"seed {cfg.seed}: {cfg.users:,} users, {cfg.transitions:,} transitions, "
            f"{len(cfg.workers)} workers x {'/'.join(map(str, cfg.workers))} processes, "
            f"appendfsync {cfg.appendfsync}, run took {took:.0f}s (bound {cfg.minutes * 60:.0f}s)"
        )

    # ------------------------------------------------------------------ start
    def start(self, workload: Workload) -> None:
        cfg = self.cfg
        self.backfill_at_ms = workload.backfill_at
        self.redis_server = AofRedis(self.workdir, cfg.appendfsync)
        self.redis_server.start()
        say(f"redis-server (AOF, appendfsync {cfg.appendfsync}) on port {self.redis_server.port}")
        self.sandbox_port, self.proxy_port, self.webhook_port = free_port(), free_port(), free_port()
        self.sandbox_url = f"http://127.0.0.1:{self.sandbox_port}"
        self.proxy_url = f"http://127.0.0.1:{self.proxy_port}"
        self.webhook_url = f"http://127.0.0.1:{self.webhook_port}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("TEST_", "DEMO_"))},
            "REDIS_URL": self.redis_server.url(0),
            "CELERY_BROKER_URL": self.redis_server.url(1),
            "ATTENTIVE_API_URL": self.proxy_url,
            "EXPORT_SECRET_KEY": generate_secret_key(),
            "ATTENTIVE_UNCERTAIN_HOLD_SECONDS": str(cfg.hold_seconds),
            "ATTENTIVE_FIRST_POLL_SECONDS": "0.5",
            "ATTENTIVE_POLL_CAP_SECONDS": "3",
            "SWEEP_INTERVAL_SECONDS": "1",
            "FLUSH_LEASE_SECONDS": "10",
            "WEBHOOK_TOKEN": self.webhook_token,
            "CHAOS_API_KEY": API_KEY,
            "PYTHONUNBUFFERED": "1",
        }
        self.fleet = Fleet(self.workdir / "logs", self.env)
        self.drop_after_accept = sandbox_supports("--drop-after-accept")
        if not self.drop_after_accept:
            self.journal.notes.append("the sandbox has no --drop-after-accept: that fault was not injected")
        self.fleet.spawn(
            "sandbox",
            [
                sys.executable,
                "-m",
                "sandbox",
                "--port",
                str(self.sandbox_port),
                "--token",
                API_KEY,
                "--processing-delay",
                str(cfg.processing_delay),
                "--completion-order",
                "random",
                "--seed",
                str(cfg.seed),
            ],
        )
        self.fleet.spawn(
            "proxy",
            [
                sys.executable,
                "-m",
                "tests.chaos.proxy",
                "--port",
                str(self.proxy_port),
                "--upstream",
                f"127.0.0.1:{self.sandbox_port}",
                "--seed",
                str(cfg.seed),
                "--slow-min",
                str(cfg.slow_seconds[0]),
                "--slow-max",
                str(cfg.slow_seconds[1]),
            ],
        )
        self.fleet.spawn(
            "receiver",
            [
                *self.cli_cmd,
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.webhook_port),
                "--no-access-log",
            ],
        )
        for name in self.worker_names:
            self.start_worker(name)
        self.fleet.spawn("beat", self.beat_cmd("beat-schedule"))
        self.wait_http(f"{self.sandbox_url}/_sandbox/health", "the sandbox")
        self.wait_http(f"{self.proxy_url}/_proxy/health", "the proxy")
        self.wait_http(f"{self.webhook_url}/healthz", "the webhook receiver")

        out = self.cli("auth", "add", "--label", AUTH_LABEL, "--api-key-env", "CHAOS_API_KEY")
        if out.returncode:
            raise RuntimeError(f"auth add failed: {out.stderr or out.stdout}")
        for name, config in job_configs(AUTH_LABEL).items():
            path = self.workdir / "input" / f"job-{name}.json"
            path.write_text(json.dumps(config))
            out = self.cli("jobs", "create", str(path))
            found = re.search(r"created export job (\S+)", out.stdout)
            if out.returncode or not found:
                raise RuntimeError(f"jobs create {name} failed: {out.stderr or out.stdout}")
            self.job_ids[name] = found.group(1)
        say(f"jobs {self.job_ids}; {len(self.worker_names)} workers {cfg.workers}, beat; faults on")
        for delivery in workload.deliveries:
            if delivery.channel == "cli":
                (self.workdir / "input" / f"cli-{delivery.seq}.jsonl").write_bytes(delivery.body())
        (self.workdir / "input" / "backfill.jsonl").write_text(workload.backfill_file())
        self.faults_on()

    def wait_http(self, url: str, what: str) -> None:
        wait_http(url, what, min(60.0, self.remaining()))

    def start_worker(self, name: str) -> None:
        assert self.fleet is not None
        self.fleet.spawn(
            name,
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "worker.app",
                "worker",
                "-n",
                f"{name}@%h",
                "-Q",
                QUEUES,
                "-c",
                str(self.concurrency[name]),
                "--pool",
                "prefork",
                "--without-gossip",
                "--without-mingle",
                "-l",
                "WARNING",
            ],
        )

    def beat_cmd(self, schedule: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker.app",
            "beat",
            "-s",
            str(self.workdir / schedule),
            "-l",
            "WARNING",
        ]

    def sandbox_faults(self, on: bool, latency_ms: float = 0.0) -> None:
        cfg = self.cfg
        options: dict[str, Any] = {
            "fault_429": cfg.fault_429 if on else 0.0,
            "fault_5xx": cfg.fault_5xx if on else 0.0,
            "drop_connections": cfg.drop_connections if on else 0.0,
            "fail_jobs": cfg.fail_jobs if on else 0.0,
            "latency_ms": latency_ms if on else 0.0,
        }
        if self.drop_after_accept:
            options["drop_after_accept"] = cfg.drop_after_accept if on else 0.0
        self.sandbox("PUT", "options", json=options)

    def faults_on(self) -> None:
        self.sandbox_faults(True)
        self.proxy("PUT", "options", json={"slow_fraction": self.cfg.slow_fraction})
        self.journal.faults_on = time.time()

    # ------------------------------------------------------------------ send phase
    def plan(self, workload: Workload) -> list[tuple[float, str, Any]]:
        cfg = self.cfg
        rng = random.Random(cfg.seed * 31 + 5)
        span = cfg.send_seconds
        events: list[tuple[float, str, Any]] = [
            (d.when * span * 0.97, "deliver", d) for d in workload.deliveries
        ]
        events.append((cfg.backfill_at * span, "backfill", None))
        t = rng.uniform(*cfg.kill_gap)
        while t < span - 2:
            if t < cfg.group_kills_until * span:
                kinds = ["midflush-group", "midflush-child", "random-group", "random-child"]
            else:
                kinds = ["midflush-child", "random-child"]
            events.append((t, "kill", rng.choice(kinds)))
            t += rng.uniform(*cfg.kill_gap)
        for k in range(cfg.redis_kills):
            at = (k + 1) / (cfg.redis_kills + 1) * span + rng.uniform(-0.05, 0.05) * span
            events.append((at, "redis-kill", rng.uniform(*cfg.redis_down)))
        events.append((cfg.second_beat[0] * span, "beat2-start", None))
        events.append((cfg.second_beat[1] * span, "beat2-stop", None))
        t = 0.0
        while t < span:
            events.append((t, "latency", rng.choice(cfg.latencies_ms)))
            t += rng.uniform(10, 25)
        events.sort(key=lambda e: e[0])
        return events

    def send(self, workload: Workload) -> None:
        cfg = self.cfg
        events = self.plan(workload)
        start = time.monotonic()
        self.journal.send_start = time.time()
        last_report = 0.0
        i = 0
        while i < len(events) or time.monotonic() - start < cfg.send_seconds:
            now = time.monotonic()
            if self.remaining() < cfg.reserve_seconds + 30:
                self.journal.notes.append("send phase cut short by the time bound")
                break
            while i < len(events) and start + events[i][0] <= now:
                _at, kind, data = events[i]
                i += 1
                self.act(kind, data)
            self.tick()
            if now - last_report > 10:
                last_report = now
                self.report(workload, "sending")
            if now - self.last_held > 5:
                self.sample_held()
            time.sleep(0.02)
        self.journal.send_end = time.time()

    def act(self, kind: str, data: Any) -> None:
        if kind == "deliver":
            self.deliver(data)
        elif kind == "backfill":
            self.cli_queue.append(None)
        elif kind == "kill":
            self.kill(data)
        elif kind == "redis-kill":
            self.kill_redis(data)
        elif kind == "beat2-start":
            assert self.fleet is not None
            self.fleet.spawn("beat2", self.beat_cmd("beat2-schedule"))
            self.journal.beat2.append(time.time())
        elif kind == "beat2-stop":
            self.stop_beat2()
        elif kind == "latency":
            try:
                self.sandbox_faults(True, data)
                self.journal.latency.append((time.time(), data))
            except httpx.HTTPError as exc:
                self.journal.notes.append(f"latency change failed: {exc}")

    def stop_beat2(self) -> None:
        assert self.fleet is not None
        if self.fleet.alive("beat2"):
            self.fleet.kill_group("beat2", signal.SIGTERM)
            self.journal.beat2.append(time.time())

    def tick(self) -> None:
        """Due retries and restarts, finished CLI commands, crashed processes."""
        assert self.fleet is not None
        now = time.monotonic()
        while self.pending and self.pending[0][0] <= now:
            _t, _s, kind, data = heapq.heappop(self.pending)
            if kind == "retry":
                self.deliver(data)
            elif kind == "redis-start":
                self.start_redis()
        for name, due in list(self.restart_due.items()):
            if due <= now:
                del self.restart_due[name]
                self.start_worker(name)
                self.journal.restarts += 1
        self.poll_cli()
        for name in self.fleet.reap_crashes([*self.worker_names, "beat", "receiver"]):
            code = self.fleet.procs[name].popen.returncode
            self.journal.notes.append(f"{name} exited by itself (code {code}); restarted")
            say(f"{name} exited by itself (code {code}); restarting it")
            if name in self.worker_names:
                self.start_worker(name)
            elif name == "beat":
                self.fleet.spawn("beat", self.beat_cmd("beat-schedule"))
            else:
                self.fleet.spawn("receiver", self.fleet.procs[name].argv)
        for name in ("sandbox", "proxy"):
            if not self.fleet.alive(name):
                raise RuntimeError(f"the {name} exited; see {self.workdir / 'logs' / (name + '.log')}")

    # ------------------------------------------------------------------ producers
    def deliver(self, delivery: Delivery) -> None:
        if delivery.accepted is not None:
            return
        if delivery.channel == "cli":
            self.cli_queue.append(delivery)
            return
        started = time.time()
        ndjson = delivery.channel == "webhook-ndjson"
        try:
            response = self.http.post(
                f"{self.webhook_url}/v1/transitions",
                content=delivery.body(),
                headers={
                    "Authorization": f"Bearer {self.webhook_token}",
                    "Content-Type": "application/x-ndjson" if ndjson else "application/json",
                },
                timeout=15.0,
            )
            outcome = str(response.status_code)
            ok = response.status_code == 202 or (
                response.status_code == 400 and "no_usable_transitions" in response.text
            )
        except httpx.HTTPError as exc:
            outcome, ok = type(exc).__name__, False
        delivery.attempts.append((started, time.time(), outcome))
        if ok:
            delivery.accepted = (started, time.time())
        else:
            self.later(0.5, "retry", delivery)

    def poll_cli(self) -> None:
        for key, (delivery, started, popen) in list(self.cli_running.items()):
            code = popen.poll()
            if code is None:
                continue
            del self.cli_running[key]
            ended = time.time()
            if delivery is None:
                self.journal.backfill_attempts += 1
                if code == 0:
                    self.journal.backfill = (started, ended)
                else:
                    self.cli_queue.append(None)
                continue
            delivery.attempts.append((started, ended, f"exit {code}"))
            if code == 0:
                delivery.accepted = (started, ended)
            else:
                self.later(1.0, "retry", delivery)
        assert self.fleet is not None
        while self.cli_queue and len(self.cli_running) < MAX_CLI:
            item = self.cli_queue.pop(0)
            if item is None:
                args = [
                    "backfill",
                    self.job_ids[JOB_A],
                    "--audience",
                    "vip",
                    "--at",
                    str(self.backfill_at_ms),
                    str(self.workdir / "input" / "backfill.jsonl"),
                ]
                key = f"backfill-{self.journal.backfill_attempts}"
            else:
                if item.accepted is not None:
                    continue
                args = ["ingest", str(self.workdir / "input" / f"cli-{item.seq}.jsonl")]
                key = f"ingest-{item.seq}-{len(item.attempts)}"
            proc = self.fleet.spawn(key, [*self.cli_cmd, *args], log_name="cli")
            self.cli_running[key] = (item, time.time(), proc.popen)

    # ------------------------------------------------------------------ faults
    def worker_pids(self) -> dict[int, str]:
        """Every live process of every worker (main and pool) -> worker name."""
        assert self.fleet is not None
        out: dict[int, str] = {}
        for name in self.worker_names:
            if self.fleet.alive(name):
                main = self.fleet.procs[name].popen.pid
                out[main] = name
                for child in procs.children(main):
                    out[child] = name
        return out

    def worker_pids_of(self, worker: str) -> list[int]:
        return [pid for pid, name in self.worker_pids().items() if name == worker]

    def flushing_pid(self, wait: float = 1.5) -> tuple[int, str, float] | None:
        """A worker process with a bulk POST in flight (pid, worker, since), waiting up to ``wait``."""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                inflight = self.proxy("GET", "inflight")["inflight"]
            except httpx.HTTPError:
                return None
            pids = self.worker_pids()
            for item in sorted(inflight, key=lambda x: x["since"]):
                inode = procs.socket_inode(item["port"], self.proxy_port)
                pid = procs.pid_holding(inode, list(pids)) if inode is not None else None
                if pid is not None:
                    return pid, pids[pid], item["since"]
            time.sleep(0.03)
        return None

    def kill(self, kind: str) -> None:
        assert self.fleet is not None
        alive = [w for w in self.worker_names if self.fleet.alive(w) and w not in self.restart_due]
        if not alive:
            return
        record: dict[str, Any] = {"t": time.time(), "planned": kind, "midflush": False}
        pid: int | None = None
        worker: str | None = None
        if kind.startswith("midflush"):
            found = self.flushing_pid()
            if found is not None:
                pid, worker, since = found
                record.update(midflush=True, post_since=since)
        if worker is None:
            worker = self.rng.choice(alive)
            kids = procs.children(self.fleet.procs[worker].popen.pid)
            pid = self.rng.choice(kids) if kids else None
        whole = kind.endswith("group") and len([w for w in alive if w != worker]) >= 1
        if not whole and pid is None:
            return  # a worker still starting has no pool process yet
        targets = list(self.worker_pids_of(worker)) if whole else [pid]
        ports = procs.ports_to([p for p in targets if p is not None], self.proxy_port)
        record.update(kind="group" if whole else "child", worker=worker, pid=pid, ports=ports, t=time.time())
        if whole:
            self.fleet.kill_group(worker, signal.SIGKILL)
            self.restart_due[worker] = time.monotonic() + self.rng.uniform(0.5, 2.5)
        else:
            assert pid is not None
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                return
        self.journal.kills.append(record)

    def kill_redis(self, down: float) -> None:
        assert self.redis_server is not None
        if self.redis_down_until is not None:
            return
        self.redis_server.kill()
        self.redis_down_until = time.monotonic() + down
        say(f"redis-server killed (SIGKILL); restarting from its AOF in {down:.1f}s")
        self.later(down, "redis-start")

    def start_redis(self) -> None:
        assert self.redis_server is not None
        if self.redis_down_until is None:
            return
        t0 = time.monotonic()
        self.redis_server.start()
        self.redis_down_until = None
        say(
            f"redis-server back from its AOF ({self.redis_server.aof_bytes() / 1e6:.0f} MB) in {time.monotonic() - t0:.1f}s"
        )

    # ------------------------------------------------------------------ faults off, settle
    def faults_off(self) -> None:
        assert self.fleet is not None
        self.start_redis()
        self.sandbox_faults(False)
        self.proxy("PUT", "options", json={"slow_fraction": 0.0})
        self.proxy("POST", "release")
        self.stop_beat2()
        for name in list(self.restart_due):
            del self.restart_due[name]
            self.start_worker(name)
            self.journal.restarts += 1
        self.journal.faults_off = time.time()
        say("all faults off; waiting for every job to have nothing outstanding")

    def product_settled(self, workload: Workload) -> tuple[bool, str]:
        if any(d.accepted is None for d in workload.deliveries) or self.journal.backfill is None:
            waiting = sum(1 for d in workload.deliveries if d.accepted is None)
            return False, f"{waiting} deliveries not accepted yet"
        client = self.rclient
        try:
            if client.zcard("aex:inbox:pending"):
                return False, "inbox chunks pending"
            for name, job_id in self.job_ids.items():
                st = job_status(client, job_id)
                busy = {k: v for k, v in st["buffer"].items() if v}
                if busy:
                    return False, f"job {name}: {busy}"
                backfill = st.get("backfill")
                if backfill and not backfill.get("finished"):
                    return False, f"job {name}: backfill not finished"
        finally:
            client.close()
        waiting = self.proxy("GET", "pinned")["waiting"]
        if waiting:
            return False, f"{len(waiting)} slow jobs still pinned"
        unfinished = [
            j for j in self.sandbox("GET", "jobs")["jobs"] if j["status"] in ("IN_PROGRESS", "PENDING")
        ]
        if unfinished:
            return False, f"{len(unfinished)} sandbox jobs unfinished"
        return True, "settled"

    def settle(self, workload: Workload) -> None:
        cfg = self.cfg
        last_report = 0.0
        stable = 0
        while True:
            self.tick()
            try:
                done, why = self.product_settled(workload)
            except (redis.RedisError, httpx.HTTPError) as exc:
                done, why = False, f"{type(exc).__name__}"
            stable = stable + 1 if done else 0
            if stable >= 2:
                self.journal.settled_at = time.time()
                say(f"settled {self.journal.settled_at - self.journal.faults_off:.0f}s after faults off")
                return
            if time.monotonic() - last_report > 10:
                last_report = time.monotonic()
                self.report(workload, f"settling ({why})")
            if time.monotonic() - self.last_held > 5:
                self.sample_held()
            if self.remaining() < cfg.reserve_seconds:
                self.journal.notes.append(f"not settled within the time bound: {why}")
                say(f"not settled within the time bound: {why}")
                return
            time.sleep(1.0)

    def sample_held(self) -> None:
        """Measure the changes held behind unfinished batches (DESIGN.md invariants 2 and 8: while held, a
        user's changes for one audience coalesce to the newest; a held user keeps at most its newest
        change per audience)."""
        self.last_held = time.monotonic()
        if self.redis_down_until is not None:
            return
        j = self.journal
        last_user: tuple[int, str, str] = (0, "", "")
        last_total = 0
        try:
            client = self.rclient
            try:
                used = int(client.info("memory")["used_memory"])
                if used > j.redis_peak[0]:
                    j.redis_peak = (used, time.time())
                for name, job_id in self.job_ids.items():
                    # HSCAN, not HGETALL: the hash may hold tens of MB of changes; Redis stays responsive.
                    for user, raw in client.hscan_iter(f"aex:{{job:{job_id}}}:waiting", count=500):
                        lines = [line for line in raw.split(b"\n") if line]
                        last_total += len(lines)
                        if len(lines) > last_user[0]:
                            last_user = (len(lines), name, user.decode())
                        per_audience: dict[bytes, int] = {}
                        for line in lines:
                            audience = line.split(b"\t", 1)[0]
                            per_audience[audience] = per_audience.get(audience, 0) + 1
                        for audience, n in per_audience.items():
                            if n > j.held_max_pair[0]:
                                j.held_max_pair = (n, name, user.decode(), audience.decode(), time.time())
            finally:
                client.close()
        except (redis.RedisError, OSError):
            return
        self.sample_broker()
        now = time.time()
        j.held_samples += 1
        j.held_last = (last_user[0], last_total, now)
        j.held_max_total = max(j.held_max_total, last_total)
        if last_user[0] > j.held_max_user[0]:
            j.held_max_user = (last_user[0], last_user[1], last_user[2], now)

    def sample_broker(self) -> None:
        """DESIGN.md invariant 5: task messages carry ids only. Reads queued and unacknowledged messages
        (countdown polls wait there) from the broker database and looks for an email, a phone, a user
        id, the API key or the webhook token in them (headers and decoded body)."""
        assert self.redis_server is not None
        patterns = {
            "email": re.compile(rb"chaos\d+@example\.com"),
            "phone": re.compile(rb"\+1\d{10}|\(\d{3}\) \d{3}-\d{4}"),
            "user id": re.compile(rb"\bu\d{6}\b"),
            "API key": re.compile(re.escape(API_KEY.encode())),
            "webhook token": re.compile(re.escape(self.webhook_token.encode())),
        }
        client = redis.Redis.from_url(self.redis_server.url(1), socket_timeout=5, socket_connect_timeout=1)
        try:
            raw: list[bytes] = []
            for queue in QUEUES.split(","):
                raw += client.lrange(queue, 0, 99)
            for n, (_tag, message) in enumerate(client.hscan_iter("unacked", count=200)):
                raw.append(message)
                if n >= 500:
                    break
        except (redis.RedisError, OSError):
            return
        finally:
            client.close()
        j = self.journal
        for message in raw:
            texts = [message]
            try:
                payload = json.loads(message)
                if isinstance(payload, list):  # unacked: [message, exchange, routing key]
                    payload = payload[0]
                body = payload.get("body", "")
                if payload.get("properties", {}).get("body_encoding") == "base64":
                    texts.append(base64.b64decode(body))
            except (ValueError, AttributeError, TypeError, IndexError):
                pass
            j.broker_sampled += 1
            for name, pattern in patterns.items():
                if any(pattern.search(t) for t in texts):
                    j.broker_leaks[name] = j.broker_leaks.get(name, 0) + 1

    def report(self, workload: Workload, phase: str) -> None:
        accepted = sum(len(d.lines) for d in workload.deliveries if d.accepted is not None)
        parts = [
            f"{phase}: lines accepted {accepted:,}/{len(workload.lines):,}",
            f"kills {len(self.journal.kills)}",
        ]
        try:
            client = self.rclient
            try:
                for name, job_id in self.job_ids.items():
                    st = job_status(client, job_id)
                    c, b = st["counters"], st["buffer"]
                    parts.append(
                        f"{name}: accepted {c['accepted']:,} delivered {c['users_delivered']:,} "
                        f"sent {c['batches_submitted']} at-attentive {b['batches_at_attentive']} "
                        f"waiting {b['batches_waiting_to_send']}"
                    )
            finally:
                client.close()
        except (redis.RedisError, OSError):
            parts.append("redis down")
        say("; ".join(parts))

    # ------------------------------------------------------------------ evidence
    def freeze(self) -> None:
        """Not settled: stop the product (workers, beats, receiver) so what is read next is consistent,
        and give the sandbox's last jobs a few seconds to finish."""
        assert self.fleet is not None
        for name in [*self.worker_names, "beat", "beat2", "receiver"]:
            if self.fleet.alive(name):
                self.fleet.kill_group(name, signal.SIGKILL)
        self.restart_due.clear()
        self.start_redis()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                self.proxy("POST", "release")
                jobs = self.sandbox("GET", "jobs")["jobs"]
            except httpx.HTTPError:
                break
            if not any(j["status"] in ("IN_PROGRESS", "PENDING") for j in jobs):
                break
            time.sleep(0.5)

    def collect(self, workload: Workload) -> Evidence:
        assert self.redis_server is not None and self.fleet is not None
        rss = {
            name: procs.tree_rss(self.fleet.procs[name].popen.pid)
            for name in self.worker_names
            if self.fleet.alive(name)
        }
        if self.journal.settled_at is None:
            say("not settled: stopping the workers before reading what they left")
            self.freeze()
        self.sample_held()
        say("collecting evidence: sandbox store, request log, jobs, proxy log, Redis, dead letters")
        ev = Evidence()
        ev.collected_at = time.time()
        ev.job_ids = dict(self.job_ids)
        ev.users = self.sandbox("GET", "users")["users"]
        ev.requests = self.sandbox("GET", "requests", params={"bodies": 1})["requests"]
        ev.jobs = self.sandbox("GET", "jobs")["jobs"]
        ev.counters = self.sandbox("GET", "counters")["tokens"].get(API_KEY, {})
        ev.wire = self.proxy("GET", "log")
        client = self.rclient
        try:
            for name, job_id in self.job_ids.items():
                ev.status[name] = job_status(client, job_id)
                ev.status_raw[name] = {
                    k.decode(): v.decode() for k, v in client.hgetall(f"aex:{{job:{job_id}}}:status").items()
                }
                queued: set[bytes] = set()
                for part in ("waiting", "outstanding", "open:entries"):
                    queued.update(client.hkeys(f"aex:{{job:{job_id}}}:{part}"))
                ev.queued_users[name] = sorted(k.decode() for k in queued)
                ev.holds[name] = self.unanswered_holds(client, job_id)
                ev.lww[name] = last_writer_times(client, job_id)
            ev.ingest = {k.decode(): int(v) for k, v in client.hgetall("aex:ingest:status").items()}
            ev.redis_memory = client.info("memory")
            ev.redis_keys = int(client.dbsize())
        finally:
            client.close()
        for name, job_id in self.job_ids.items():
            out = self.cli("deadletters", job_id, "--limit", "10000000")
            ev.deadletters[name] = json.loads(out.stdout) if out.returncode == 0 else []
        ev.aof_bytes = self.redis_server.aof_bytes()
        ev.outages = [tuple(o) for o in self.redis_server.outages]
        ev.worker_rss = rss
        ev.crashes = list(self.fleet.crashes)
        ev.log_errors = self.scan_logs()
        ev.deliveries = [
            (d.seq, d.channel, [line.lid for line in d.lines], d.accepted, len(d.attempts))
            for d in workload.deliveries
        ]
        return ev

    @staticmethod
    def unanswered_holds(client: redis.Redis, job_id: str) -> list[tuple[int, int, int]]:
        """(batch id, users, held until ms) of every send whose answer never came and whose hold runs."""
        out = []
        for raw_bid in client.zrange(f"aex:{{job:{job_id}}}:polls", 0, -1):
            bid = int(raw_bid)
            batch = {
                k.decode(): v.decode() for k, v in client.hgetall(f"aex:{{job:{job_id}}}:batch:{bid}").items()
            }
            for sub in json.loads(batch.get("attentive_jobs") or "[]"):
                jid = sub["id"]
                if jid.startswith("unknown:") and f"done:{jid}" not in batch and f"ended:{jid}" not in batch:
                    out.append((bid, len(sub.get("idx", [])), int(sub.get("until") or 0)))
        return out

    def dump(self, evidence: Evidence, workload: Workload) -> None:
        """Everything the verdict read, for a post-mortem (``evidence.json.gz`` in the work directory)."""
        import dataclasses
        import gzip

        data = {
            "evidence": dataclasses.asdict(evidence),
            "journal": dataclasses.asdict(self.journal),
            "config": dataclasses.asdict(self.cfg),
            "workload_now_ms": workload.now_ms,
        }
        with gzip.open(self.workdir / "evidence.json.gz", "wt", compresslevel=1) as out:
            json.dump(data, out, default=str)

    def scan_logs(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for path in (self.workdir / "logs").glob("*.log"):
            text = path.read_text(errors="replace")
            for pattern in (
                "Unrecoverable error",
                STARTUP_GIVE_UP,
                "Traceback",
                "lease lost during submit",
                "no answer to a send",
            ):
                n = text.count(pattern)
                if n:
                    counts[f"{path.stem}: {pattern}"] = n
        return counts

    def stop(self) -> None:
        if self.fleet is not None:
            self.fleet.stop_all()
        if self.redis_server is not None:
            self.redis_server.stop()
        self.http.close()


def run(cfg: ChaosConfig) -> Result:
    chaos = Run(cfg)
    return chaos.execute()
