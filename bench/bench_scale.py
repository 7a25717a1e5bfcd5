"""Scale: a large Existing Users backfill at Attentive's real pace, with real-time changes throughout.

``make bench-scale`` (``python -m bench scale [--users N | --quick] [options]``; ``--help`` lists them).

Everything is a real process on 127.0.0.1, on free ports, in one work directory (logs, the backfill
file, Redis' append-only file): its own ``redis-server`` (append-only file on, ``noeviction``, as in
docker-compose; never the shared server on 6379), the sandbox with Attentive's 100 requests/s per
key and a job-processing model, ``--workers`` Celery workers on every queue, beat, and the webhook
receiver. The harness writes no product state itself: the authorization, the job (3 audiences,
Existing Users on) and the backfill go in through ``attentive-export``; real-time changes arrive as
Lytics audience-trigger webhooks.

The run, on the clock of the first real-time webhook:

1. Real-time changes at ``--realtime-rate`` (200/s) start and go on until the backfill is confirmed
   complete: each is a new user (``r<N>@rt.scale.example``) entering one of the three audiences, so
   none is held behind an earlier Attentive job of its own (ordering, DESIGN.md invariant 2). They
   are POSTed ten times a second as JSON arrays of triggers (Lytics' batched delivery).
2. After ``--warmup`` seconds, ``attentive-export backfill JOB FILE`` loads ``--users`` users
   (``b<N>@bf.scale.example``), each a member of all three audiences (one line per audience, user by
   user, so a user's three enters share one record).
3. Done when every backfilled (user, audience) flag was accepted by the sandbox and every Attentive
   job carrying one was confirmed complete (the sandbox saw its results file downloaded, which the
   worker does when a poll finds the job COMPLETED). Flags, not users: a user whose lines were split
   over two batches is held behind its first job and sent again with the rest (ordering). Real-time changes stop; the harness waits for the last ones to
   arrive and for the job to have nothing left at Attentive (``--settle`` seconds at most), then
   reads memory "afterwards".

Time compression: Attentive takes hours per job (CONTRACT.md §6); the sandbox takes
``--processing-delay`` seconds (median; lognormal spread ``--processing-spread``, the same delay per
job number in every run with the same seed). ``--time-compression F`` says how many real seconds one
sandbox second stands for (default 60: 120 s is 2 hours), and the worker's poll settings
(``ATTENTIVE_FIRST_POLL_SECONDS``, ``ATTENTIVE_POLL_CAP_SECONDS``, from their defaults) are divided by
the same factor, so a batch is checked as many times over its life as in production.
``ATTENTIVE_POLL_SHARE`` (the share of the key's rate polls may use while sends wait) is passed
through when set (``--poll-share`` or the environment); workers that do not know it ignore it. The
flush interval and the real-time rate are not compressed: they are the product's own pace.

Measured: per-second bulk POSTs and job-status GETs answered by the sandbox (its ``timeline``; a
second counts as "batches wait" when the samples on both sides show batches waiting to be sent);
every ``--sample`` seconds Redis ``used_memory``, each worker's resident memory (main plus pool
processes), and the job's status (batches waiting to be sent, at Attentive, ...); per real-time user,
the sandbox's receipt time of the request carrying it minus the time the webhook was sent.
"""

from __future__ import annotations

import argparse
import array
import bisect
import contextlib
import dataclasses
import datetime as dt
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_fixed

from tests.chaos.procs import AofRedis, Fleet, children, tree_rss, wait_http, wait_until
from worker.cli.localredis import free_port

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "scale-bench-key"
AUTH_LABEL = "scale"
AUDIENCES = ("vip", "lapsed", "winback")
BACKFILL_DOMAIN = "bf.scale.example"
REALTIME_DOMAIN = "rt.scale.example"
QUEUES = "ingest,flush,poll,sweep,backfill"
#: The worker groups of deploy/kubernetes (worker-ingest, worker-delivery, worker-backfill): a
#: backfill's steps never take the processes real-time ingest and the sends need.
WORKER_GROUPS = {"ingest": "ingest,sweep", "delivery": "flush,poll,sweep", "backfill": "backfill"}
POST = "POST /v2/bulk/user/attributes"
GET = "GET /v2/bulk/job/{bulkJobId}"
#: Attentive's limit per key on each of the bulk and job-status endpoints; the workers' default target.
ATTENTIVE_LIMIT = 100
DEFAULT_RATE_LIMIT = 90.0
#: The workers' target as a share of the sandbox's limit (90 of 100), kept when --rate-limit scales it.
WORKER_RATE_SHARE = DEFAULT_RATE_LIMIT / ATTENTIVE_LIMIT
DEFAULT_POLL_SHARE = 0.1
#: Targets from the issue: sends while batches wait, real-time latency over the flush interval.
TARGET_SENDS = 85.0
TARGET_LATENCY_MARGIN = 5.0
#: Worker poll settings divided by the time compression: variable -> (Settings field, fallback default).
TIME_SCALED = {
    "ATTENTIVE_FIRST_POLL_SECONDS": ("first_poll_seconds", 2.0),
    "ATTENTIVE_POLL_CAP_SECONDS": ("poll_cap_seconds", 60.0),
}
#: What the harness reads from ``attentive-export status`` (worker.observe.status) under ``buffer``.
STATUS_BUFFER_FIELDS = (
    "batches_waiting_to_send",
    "batches_at_attentive",
    "users_in_open_batch",
    "users_in_unfinished_batches",
    "users_waiting_for_earlier_change",
)
WEBHOOK_TOKEN = "scale-bench-webhook-token-0123456789"
#: Real-time webhooks per second (each carries the changes due since the previous one).
POSTS_PER_SECOND = 10


@dataclass
class ScaleConfig:
    users: int = 1_000_000
    realtime_rate: float = 200.0
    processing_delay: float = 120.0
    processing_spread: float = 0.5
    time_compression: float = 60.0
    flush_interval: int = 30
    #: "groups": one worker per group of WORKER_GROUPS (the Kubernetes layout); "shared": ``workers``
    #: workers on every queue (docker-compose's single worker service; runs before 2026-12-04).
    layout: str = "groups"
    workers: int = 2
    concurrency: int = 2
    warmup: float = 20.0
    sample: float = 5.0
    #: Longest wait, once real-time changes stop, for the job to have nothing left at Attentive.
    settle: float = 600.0
    #: Bound on the whole run (setup included); figures so far are reported when it is reached.
    minutes: float = 120.0
    poll_share: float | None = None
    #: Requests/s per key the sandbox allows (Attentive: 100); the workers target 90% of it.
    rate_limit: int = ATTENTIVE_LIMIT
    seed: int = 1
    workdir: Path | None = None
    keep: bool = False
    #: Print a progress line this often (seconds); 0: never.
    progress: float = 30.0

    @property
    def pairs(self) -> int:
        return self.users * len(AUDIENCES)

    @property
    def worker_rate(self) -> float:
        return self.rate_limit * WORKER_RATE_SHARE

    @property
    def target_sends(self) -> float:
        """The sends target (85 of Attentive's 100/s), scaled with --rate-limit."""
        return TARGET_SENDS * self.rate_limit / ATTENTIVE_LIMIT


# --- what a run produces ------------------------------------------------------------------------------------
@dataclass
class Sample:
    t: float  # seconds since the first real-time webhook
    used_memory: int
    waiting: int  # batches sealed, waiting to be sent
    at_attentive: int  # batches sent, not yet confirmed complete
    open_users: int
    unfinished_users: int
    held_users: int
    submitted: int
    completed: int
    backfill_members: int
    backfill_chunks_waiting: int
    worker_rss: dict[str, int]
    realtime_sent: int


@dataclass
class Outcome:
    cfg: ScaleConfig
    env_poll: dict[str, str] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    #: epoch second -> (POSTs accepted, POSTs refused with 429, GETs answered 200, GETs refused with 429)
    seconds: dict[int, list[int]] = field(default_factory=dict)
    #: (seconds since start when received, latency seconds) per real-time user received
    latencies: list[tuple[float, float]] = field(default_factory=list)
    t0: float = 0.0  # epoch time of the first real-time webhook
    backfill_started: float | None = None  # seconds since t0
    backfill_command_seconds: float | None = None
    backfill_ingested: float | None = None  # the file part finished (seconds since t0)
    backfill_accepted: float | None = None  # every backfilled user accepted by the sandbox
    backfill_confirmed: float | None = None  # every job carrying one confirmed complete
    realtime_stopped: float | None = None
    settled: float | None = None
    ended: float = 0.0
    backfill_received: int = 0  # backfilled users in accepted requests (a user split over two counts twice)
    backfill_pairs_received: int = 0  # (user, audience) flags they carried
    backfill_jobs: int = 0
    realtime_sent: int = 0
    realtime_received: int = 0
    webhook_failures: int = 0
    memory_baseline: int = 0
    memory_at_confirmed: int | None = None
    memory_end: int = 0
    memory_peak_info: int = 0
    dbsize_end: int = 0
    worker_rss_end: dict[str, int] = field(default_factory=dict)
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    processing_seconds: list[float] = field(default_factory=list)
    counters: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str = ""
    workdir: Path = Path()
    revision: str = ""

    @property
    def complete(self) -> bool:
        return self.backfill_confirmed is not None


# --- helpers ------------------------------------------------------------------------------------------------
def say(message: str) -> None:
    print(f"scale {time.strftime('%H:%M:%S')} {message}", flush=True)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of ``values``; nan when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def scaled_poll_env(compression: float) -> dict[str, str]:
    """The worker's poll settings (from their defaults) divided by the time compression."""
    try:
        from worker.settings import Settings

        fields: dict[str, Any] = dict(Settings.model_fields)
    except Exception:  # an older or newer settings module: fall back to the documented defaults
        fields = {}
    out: dict[str, str] = {}
    for variable, (name, fallback) in TIME_SCALED.items():
        info = fields.get(name)
        default = info.default if info is not None and isinstance(info.default, int | float) else fallback
        out[variable] = f"{float(default) / compression:.6g}"
    return out


def revision() -> str:
    """The code measured: ``git describe`` of this checkout, else ``BENCH_REVISION``, else unknown."""
    try:
        found = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except OSError:
        found = ""
    return found or os.environ.get("BENCH_REVISION", "") or "unknown"


def cpu_seconds(pids: Iterable[int]) -> float:
    """CPU seconds (user + system) used so far by ``pids`` (Linux /proc)."""
    hz = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        total += int(fields[11]) + int(fields[12])
    return total / hz


def lytics_trigger(n: int, at: float) -> dict[str, Any]:
    """Real-time user ``n`` entering one audience, as a Lytics audience trigger."""
    audience = AUDIENCES[n % len(AUDIENCES)]
    stamp = dt.datetime.fromtimestamp(at, dt.UTC).isoformat(timespec="milliseconds")
    return {
        "id": f"lytics-r{n}",
        "data": {
            "email": f"r{n}@{REALTIME_DOMAIN}",
            "phone": f"+1628{2_000_000 + n % 7_000_000:07d}",
            "user_id": f"r{n}",
            "first_name": "Rae",
            "segment_events": [{"id": f"seg-{audience}", "event": "enter", "slug": audience, "enter": stamp}],
        },
        "meta": {},
    }


def write_backfill(path: Path, users: int, at_ms: int) -> int:
    """The backfill file: every user enters all three audiences, one line each, user by user."""
    size = 0
    with path.open("w") as out:
        for i in range(users):
            user = (
                f'{{"email":"b{i}@{BACKFILL_DOMAIN}","phone":"+1415{2_000_000 + i % 8_000_000:07d}",'
                f'"user_id":"b{i}","first_name":"Ada"}}'
            )
            lines = "".join(
                f'{{"audience":"{a}","event":"enter","at":{at_ms},"user":{user}}}\n' for a in AUDIENCES
            )
            size += out.write(lines)
    return size


def job_config(cfg: ScaleConfig) -> dict[str, Any]:
    return {
        "label": "scale bench: three audiences",
        "authorization": AUTH_LABEL,
        "audiences": list(AUDIENCES),
        "identifier_mappings": {"email": "email", "phone": "phone", "user_id": "clientUserId"},
        "attribute_mappings": {"first_name": "firstName"},
        "existing_users": True,
        "flush_interval_seconds": cfg.flush_interval,
    }


class Feeder(threading.Thread):
    """Real-time changes at a steady rate as webhooks; remembers when each user's change was sent."""

    def __init__(self, url: str, rate: float) -> None:
        super().__init__(name="realtime-feeder", daemon=True)
        self.url = url
        self.rate = rate
        self.sent_at = array.array("d")  # index: real-time user number
        self.failures = 0
        self.stop_event = threading.Event()
        self.started_at = 0.0
        self.error = ""

    @property
    def sent(self) -> int:
        return len(self.sent_at)

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # reported by the harness; the run then ends with what it has
            self.error = f"{type(exc).__name__}: {exc}"

    def _run(self) -> None:
        client = httpx.Client(timeout=30.0, headers={"Authorization": f"Bearer {WEBHOOK_TOKEN}"})
        start = time.monotonic()
        self.started_at = time.time()
        retry: list[dict[str, Any]] = []
        tick = 0
        try:
            while not self.stop_event.is_set():
                due = int(self.rate * (time.monotonic() - start)) - self.sent
                body = retry
                if due > 0:
                    now = time.time()
                    first = self.sent
                    body = retry + [lytics_trigger(n, now) for n in range(first, first + due)]
                    self.sent_at.extend([now] * due)
                if body:
                    try:
                        response = client.post(self.url, json=body)
                        ok = response.status_code == 202
                    except httpx.HTTPError:
                        ok = False
                    if not ok:
                        self.failures += 1
                    retry = [] if ok else body
                tick += 1
                pause = start + tick / POSTS_PER_SECOND - time.monotonic()
                if pause > 0:
                    self.stop_event.wait(pause)
        finally:
            client.close()


def workers_text(cfg: ScaleConfig) -> str:
    """The workers as the report states them."""
    if cfg.layout == "groups":
        groups = ", ".join(f"{name} ({queues})" for name, queues in WORKER_GROUPS.items())
        return (
            f"{len(WORKER_GROUPS)} workers, one per queue group: {groups}; {cfg.concurrency} processes each"
        )
    return f"{cfg.workers} workers x {cfg.concurrency} processes on every queue"


# --- the run ------------------------------------------------------------------------------------------------
class ScaleRun:
    def __init__(self, cfg: ScaleConfig) -> None:
        self.cfg = cfg
        self.t_start = time.monotonic()
        self.deadline = self.t_start + cfg.minutes * 60
        self.workdir = cfg.workdir or Path(tempfile.mkdtemp(prefix="aex-scale-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        self.out = Outcome(cfg, workdir=self.workdir, revision=revision())
        self.redis_server: AofRedis | None = None
        self.fleet: Fleet | None = None
        self.http = httpx.Client(timeout=120.0)
        self.worker_queues = (
            dict(WORKER_GROUPS)
            if cfg.layout == "groups"
            else {f"w{i + 1}": QUEUES for i in range(cfg.workers)}
        )
        self.worker_names = list(self.worker_queues)
        self.job_id = ""
        self.backfill_proc: subprocess.Popen[bytes] | None = None
        self.feeder: Feeder | None = None
        # incremental reads of the sandbox
        self.receipts_after = 0
        self.results_after = 0
        self.timeline_since = 0
        self.rt_seen = bytearray()
        self.bf_jobs: set[str] = set()
        self.confirmed: dict[str, float] = {}
        self.last_progress = 0.0

    # -- plumbing
    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def since_t0(self, epoch: float) -> float:
        return epoch - self.out.t0

    def rclient(self) -> redis.Redis:
        assert self.redis_server is not None
        return redis.Redis.from_url(self.redis_server.url(0), socket_timeout=30, socket_connect_timeout=5)

    def sandbox(self, path: str, **params: Any) -> Any:
        """GET one of the sandbox's read-only views. Retried on a dropped connection: a kept-alive
        connection the server closed just as it was reused ended a 1 M-user run after 7 minutes."""
        for attempt in Retrying(
            retry=retry_if_exception_type(httpx.TransportError),
            stop=stop_after_attempt(3),
            wait=wait_fixed(0.5),
            reraise=True,
        ):
            with attempt:
                response = self.http.get(f"{self.sandbox_url}/_sandbox/{path}", params=params)
        response.raise_for_status()
        return response.json()

    def cli(self, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "worker.cli.main", *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    # -- phases
    def execute(self) -> Outcome:
        try:
            self.start()
            self.measure()
        except Exception as exc:  # report what was reached
            self.out.error = f"{type(exc).__name__}: {exc}"
            say(f"run aborted: {self.out.error}")
        finally:
            try:
                self.finish()
            except Exception as exc:
                self.out.notes.append(f"collecting the end figures failed: {type(exc).__name__}: {exc}")
            self.stop()
        return self.out

    def start(self) -> None:
        cfg = self.cfg
        say(f"work dir {self.workdir}; writing the backfill file ({cfg.users:,} users x {len(AUDIENCES)})")
        self.backfill_file = self.workdir / "backfill.jsonl"
        size = write_backfill(self.backfill_file, cfg.users, int(time.time() * 1000))
        say(f"backfill file: {size / 1e6:,.0f} MB")
        self.redis_server = AofRedis(self.workdir)
        self.redis_server.start()
        self.sandbox_port, self.webhook_port = free_port(), free_port()
        self.sandbox_url = f"http://127.0.0.1:{self.sandbox_port}"
        self.webhook_url = f"http://127.0.0.1:{self.webhook_port}"
        from worker.setup.crypto import generate_secret_key

        self.out.env_poll = scaled_poll_env(cfg.time_compression)
        share = cfg.poll_share if cfg.poll_share is not None else os.environ.get("ATTENTIVE_POLL_SHARE")
        if share not in (None, ""):
            self.out.env_poll["ATTENTIVE_POLL_SHARE"] = str(share)
        if cfg.rate_limit != ATTENTIVE_LIMIT:
            self.out.env_poll["ATTENTIVE_RATE_LIMIT"] = f"{cfg.worker_rate:g}"
        inherited = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("TEST_", "DEMO_", "ATTENTIVE_", "REDIS_", "CELERY_", "WEBHOOK_", "FLUSH_"))
        }
        self.env = {
            **inherited,
            "PYTHONPATH": str(ROOT),  # the checkout this bench runs from, also for console scripts
            "PYTHONUNBUFFERED": "1",
            "REDIS_URL": self.redis_server.url(0),
            "CELERY_BROKER_URL": self.redis_server.url(1),
            "ATTENTIVE_API_URL": self.sandbox_url,
            "EXPORT_SECRET_KEY": generate_secret_key(),
            "WEBHOOK_TOKEN": WEBHOOK_TOKEN,
            "SCALE_API_KEY": API_KEY,
            **self.out.env_poll,
        }
        self.fleet = Fleet(self.workdir / "logs", self.env)
        python = [sys.executable, "-m"]
        sandbox = (
            f"sandbox --port {self.sandbox_port} --token {API_KEY} --seed {cfg.seed} "
            f"--rate-limit {cfg.rate_limit}"
        )
        model = f"--processing-delay {cfg.processing_delay} --processing-spread {cfg.processing_spread}"
        self.fleet.spawn("sandbox", [*python, *sandbox.split(), *model.split()])
        serve = f"worker.cli.main serve --host 127.0.0.1 --port {self.webhook_port} --no-access-log"
        self.fleet.spawn("receiver", [*python, *serve.split()])
        for name, queues in self.worker_queues.items():
            worker = (
                f"celery -A worker.app worker -n {name}@%h -Q {queues} -c {cfg.concurrency} "
                "--pool prefork --without-gossip --without-mingle -l WARNING"
            )
            self.fleet.spawn(name, [*python, *worker.split()])
        schedule = str(self.workdir / "beat-schedule")
        beat = [*python, "celery", "-A", "worker.app", "beat", "-l", "WARNING", "-s", schedule]
        self.fleet.spawn("beat", beat)
        self.wait_http(f"{self.sandbox_url}/_sandbox/health", "the sandbox")
        self.wait_http(f"{self.webhook_url}/healthz", "the webhook receiver")
        out = self.cli("auth", "add", "--label", AUTH_LABEL, "--api-key-env", "SCALE_API_KEY")
        if out.returncode:
            raise RuntimeError(f"auth add failed: {out.stderr or out.stdout}")
        job_file = self.workdir / "job.json"
        job_file.write_text(json.dumps(job_config(cfg), indent=2))
        out = self.cli("jobs", "create", str(job_file))
        found = re.search(r"created export job (\S+)", out.stdout)
        if out.returncode or not found:
            raise RuntimeError(f"jobs create failed: {out.stderr or out.stdout}")
        self.job_id = found.group(1)
        wait_until(self.workers_ready, min(120.0, self.remaining()), "the workers to start", 0.5)
        client = self.rclient()
        try:
            self.out.memory_baseline = int(client.info("memory")["used_memory"])
        finally:
            client.close()
        say(
            f"job {self.job_id}; {workers_text(cfg)}, beat, receiver; "
            f"sandbox delay {cfg.processing_delay:g} s (spread {cfg.processing_spread:g}), "
            f"compression {cfg.time_compression:g}x: {' '.join(f'{k}={v}' for k, v in self.out.env_poll.items())}"
        )

    def workers_ready(self) -> bool:
        assert self.fleet is not None
        for name in [*self.worker_names, "beat", "sandbox", "receiver"]:
            if not self.fleet.alive(name):
                raise RuntimeError(f"{name} exited; see {self.workdir / 'logs' / (name + '.log')}")
        return all(children(self.fleet.procs[n].popen.pid) for n in self.worker_names)

    def wait_http(self, url: str, what: str) -> None:
        wait_http(url, what, min(60.0, self.remaining()))

    def measure(self) -> None:
        cfg, out = self.cfg, self.out
        self.rt_seen = bytearray(int(cfg.realtime_rate * cfg.minutes * 60 * 1.1) + 1024)
        self.feeder = Feeder(f"{self.webhook_url}/v1/transitions", cfg.realtime_rate)
        self.feeder.start()
        wait_until(lambda: self.feeder is not None and self.feeder.started_at, 10, "the feeder", 0.01)
        out.t0 = self.feeder.started_at
        say(f"real-time changes at {cfg.realtime_rate:g}/s; backfill in {cfg.warmup:g} s")
        next_sample = time.monotonic()
        while True:
            now = time.monotonic()
            if self.backfill_proc is None and time.time() - out.t0 >= cfg.warmup:
                self.start_backfill()
            if now >= next_sample:
                next_sample = now + cfg.sample
                self.sample()
                if self.done():
                    break
            if self.remaining() <= 0:
                out.notes.append(
                    f"the {cfg.minutes:g}-minute bound ended the run before the backfill completed"
                )
                say("time bound reached")
                return
            if self.feeder.error:
                raise RuntimeError(f"the real-time feeder failed: {self.feeder.error}")
            time.sleep(min(0.2, max(0.0, next_sample - time.monotonic())))
        self.stop_realtime()
        self.settle()

    def start_backfill(self) -> None:
        assert self.fleet is not None
        self.out.backfill_started = self.since_t0(time.time())
        proc = self.fleet.spawn(
            "backfill-cli",
            [sys.executable, "-m", "worker.cli.main", "backfill", self.job_id, str(self.backfill_file)],
        )
        self.backfill_proc = proc.popen
        say(f"attentive-export backfill started ({self.cfg.users:,} users)")

    def done(self) -> bool:
        """Every backfilled user accepted by the sandbox and every job carrying one confirmed complete."""
        out = self.out
        proc = self.backfill_proc
        if proc is None:
            return False
        code = proc.poll()
        if code is None:
            return False
        if out.backfill_command_seconds is None:
            assert out.backfill_started is not None
            out.backfill_command_seconds = self.since_t0(time.time()) - out.backfill_started
            say(f"backfill command done (exit {code}) in {out.backfill_command_seconds:.0f} s")
            if code:
                raise RuntimeError(f"attentive-export backfill exited {code}; see logs/backfill-cli.log")
        # Pairs, not users: a user whose three lines were split across two batches (a batch filled up,
        # or a chunk of the file ended) is held behind its first Attentive job and sent again later
        # with the rest of its audiences (ordering), so it arrives in two requests.
        if out.backfill_pairs_received < self.cfg.pairs:
            return False
        unconfirmed = [j for j in self.bf_jobs if j not in self.confirmed]
        if unconfirmed:
            return False
        last = max(self.confirmed[j] for j in self.bf_jobs)
        out.backfill_confirmed = self.since_t0(last)
        out.backfill_jobs = len(self.bf_jobs)
        say(f"every backfill batch confirmed complete at t={out.backfill_confirmed:.0f} s")
        return True

    def stop_realtime(self) -> None:
        assert self.feeder is not None
        self.feeder.stop_event.set()
        self.feeder.join(timeout=30)
        self.out.realtime_stopped = self.since_t0(time.time())
        client = self.rclient()
        try:
            self.out.memory_at_confirmed = int(client.info("memory")["used_memory"])
        finally:
            client.close()

    def settle(self) -> None:
        """Wait for the last real-time changes to arrive and for nothing to be left at Attentive."""
        cfg, out = self.cfg, self.out
        assert self.feeder is not None
        began = time.monotonic()
        bounded = self.remaining() < cfg.settle
        limit = began + min(cfg.settle, max(self.remaining(), 0.0))
        while time.monotonic() < limit:
            time.sleep(cfg.sample)
            sample = self.sample()
            arrived = out.realtime_received >= self.feeder.sent
            if (
                arrived
                and sample is not None
                and not (sample.open_users or sample.waiting or sample.at_attentive)
            ):
                out.settled = self.since_t0(time.time())
                say(f"settled at t={out.settled:.0f} s")
                return
        why = f"the run's {cfg.minutes:g}-minute bound" if bounded else f"--settle {cfg.settle:g}"
        out.notes.append(
            f"the job still had work at Attentive {time.monotonic() - began:.0f} s after real-time changes "
            f"stopped, when {why} ended the wait: the end figures include it"
        )

    # -- sampling
    def sample(self) -> Sample | None:
        assert self.fleet is not None and self.feeder is not None
        out = self.out
        self.read_sandbox()
        client = self.rclient()
        try:
            from worker.observe.status import job_status

            used = int(client.info("memory")["used_memory"])
            st = job_status(client, self.job_id)
        except (redis.RedisError, OSError) as exc:
            out.notes.append(f"a sample failed: {type(exc).__name__}")
            return None
        finally:
            client.close()
        buffer, counters = st.get("buffer", {}), st.get("counters", {})
        if not out.samples:
            missing = sorted(set(STATUS_BUFFER_FIELDS) - set(buffer))
            if missing:
                out.notes.append(f"job status has no {', '.join(missing)}: those figures read 0")
        backfill = (st.get("backfill") or {}).get("file") or {}
        if out.backfill_ingested is None and backfill.get("finished") and self.backfill_proc is not None:
            finished_ms = backfill.get("finished_at_ms")
            out.backfill_ingested = self.since_t0(finished_ms / 1000 if finished_ms else time.time())
        rss = {
            name: tree_rss(self.fleet.procs[name].popen.pid)
            for name in self.worker_names
            if self.fleet.alive(name)
        }
        sample = Sample(
            t=self.since_t0(time.time()),
            used_memory=used,
            waiting=int(buffer.get("batches_waiting_to_send", 0)),
            at_attentive=int(buffer.get("batches_at_attentive", 0)),
            open_users=int(buffer.get("users_in_open_batch", 0)),
            unfinished_users=int(buffer.get("users_in_unfinished_batches", 0)),
            held_users=int(buffer.get("users_waiting_for_earlier_change", 0)),
            submitted=int(counters.get("batches_submitted", 0)),
            completed=int(counters.get("batches_completed", 0)),
            backfill_members=int(backfill.get("members", 0)),
            backfill_chunks_waiting=int(backfill.get("chunks_waiting", 0)),
            worker_rss=rss,
            realtime_sent=self.feeder.sent,
        )
        out.samples.append(sample)
        out.counters = counters
        if self.cfg.progress and time.monotonic() - self.last_progress >= self.cfg.progress:
            self.last_progress = time.monotonic()
            recent = [v for s, v in out.seconds.items() if s >= time.time() - 11]
            say(
                f"t={sample.t:.0f}s backfill {sample.backfill_members:,}/{self.cfg.pairs:,} lines, "
                f"{out.backfill_pairs_received:,} pairs accepted; batches waiting {sample.waiting}, "
                f"at Attentive {sample.at_attentive}; last 10 s: "
                f"{sum(v[0] for v in recent) / 10:.0f} sends/s, {sum(v[2] for v in recent) / 10:.0f} polls/s; "
                f"real-time {out.realtime_received:,}/{sample.realtime_sent:,} received; "
                f"Redis {used / 1e6:,.0f} MB"
            )
        return sample

    def read_sandbox(self) -> None:
        out = self.out
        timeline = self.sandbox("timeline", token=API_KEY, since=self.timeline_since)
        now_second = int(timeline["now"])
        for second, per in timeline["seconds"].items():
            sec = int(second)
            if sec >= now_second:
                continue  # still filling: read again next time
            posts, gets = per.get(POST, {}), per.get(GET, {})
            out.seconds[sec] = [
                int(posts.get("202", 0)),
                int(posts.get("429", 0)),
                int(gets.get("200", 0)),
                int(gets.get("429", 0)),
            ]
        self.timeline_since = now_second
        while True:
            got = self.sandbox(
                "receipts",
                after=self.receipts_after,
                results_after=self.results_after,
                email_domain=REALTIME_DOMAIN,
                count_domain=BACKFILL_DOMAIN,
            )
            for job_id, at in got["results"]:
                self.confirmed.setdefault(job_id, at)
            self.results_after += len(got["results"])
            for req in got["requests"]:
                self.receipts_after = req["seq"]
                bf = req.get("counts", {}).get(BACKFILL_DOMAIN)
                if bf and bf["users"]:
                    self.bf_jobs.add(req["batchJobId"])
                    out.backfill_received += bf["users"]
                    out.backfill_pairs_received += bf["customAttributes"]
                    if out.backfill_pairs_received >= self.cfg.pairs and out.backfill_accepted is None:
                        out.backfill_accepted = self.since_t0(req["time"])
                for email in req.get("emails", {}).get(REALTIME_DOMAIN, []):
                    self.realtime_receipt(email, req["time"])
            if not got["requests"] or self.receipts_after >= got["accepted_total"]:
                break

    def realtime_receipt(self, email: str, at: float) -> None:
        assert self.feeder is not None
        n = int(email[1 : email.index("@")])
        if n >= len(self.rt_seen):
            self.rt_seen.extend(bytes(n + 1 - len(self.rt_seen)))
        if self.rt_seen[n] or n >= self.feeder.sent:
            return
        self.rt_seen[n] = 1
        self.out.realtime_received += 1
        self.out.latencies.append((self.since_t0(at), at - self.feeder.sent_at[n]))

    # -- the end
    def finish(self) -> None:
        out = self.out
        out.ended = self.since_t0(time.time()) if out.t0 else 0.0
        if self.feeder is not None:
            self.feeder.stop_event.set()
            self.feeder.join(timeout=30)
            out.realtime_sent = self.feeder.sent
            out.webhook_failures = self.feeder.failures
        if self.fleet is None or self.redis_server is None:
            return
        with contextlib.suppress(httpx.HTTPError, redis.RedisError, OSError):
            self.read_sandbox()
        out.backfill_jobs = len(self.bf_jobs)
        out.worker_rss_end = {
            name: tree_rss(self.fleet.procs[name].popen.pid)
            for name in self.worker_names
            if self.fleet.alive(name)
        }
        groups: dict[str, list[int]] = {"workers": [], "beat": [], "receiver": [], "sandbox": []}
        for name, proc in self.fleet.procs.items():
            group = "workers" if name in self.worker_names else name
            if group in groups and self.fleet.alive(name):
                groups[group] += [proc.popen.pid, *children(proc.popen.pid)]
        if self.redis_server.proc is not None:
            groups["redis"] = [self.redis_server.proc.pid]
        out.cpu_seconds = {name: cpu_seconds(pids) for name, pids in groups.items()}
        client = self.rclient()
        try:
            info = client.info("memory")
            out.memory_end = int(info["used_memory"])
            out.memory_peak_info = int(info["used_memory_peak"])
            out.dbsize_end = int(client.dbsize())
        finally:
            client.close()
        with contextlib.suppress(httpx.HTTPError):
            jobs = self.sandbox("jobs")["jobs"]
            out.processing_seconds = [float(j.get("processingSeconds", 0.0)) for j in jobs]
        if self.job_id:
            (self.workdir / "status.json").write_text(json.dumps(self.job_status(), indent=2, default=str))

    def job_status(self) -> dict[str, Any]:
        from worker.observe.status import job_status

        client = self.rclient()
        try:
            return job_status(client, self.job_id)
        finally:
            client.close()

    def stop(self) -> None:
        if self.fleet is not None:
            self.fleet.stop_all()
        if self.redis_server is not None:
            self.redis_server.stop()
        self.http.close()
        data = dataclasses.asdict(self.out)
        (self.workdir / "samples.json").write_text(json.dumps(data, default=str))
        if not self.cfg.keep and not self.out.error:
            shutil.rmtree(self.workdir / "redis", ignore_errors=True)
            (self.workdir / "backfill.jsonl").unlink(missing_ok=True)


def load(path: Path) -> Outcome:
    """An :class:`Outcome` read back from a run's ``samples.json`` (to render it again)."""
    data = json.loads(Path(path).read_text())
    cfg = data.pop("cfg")
    cfg["workdir"] = Path(cfg["workdir"]) if cfg.get("workdir") else None
    cfg.setdefault("layout", "shared")  # runs before the layout option had every worker on every queue
    out = Outcome(ScaleConfig(**cfg))
    known = {f.name for f in dataclasses.fields(Outcome)}
    for name, value in data.items():
        if name in known:
            setattr(out, name, value)
    out.samples = [Sample(**s) for s in data.get("samples", [])]
    out.seconds = {int(k): v for k, v in data.get("seconds", {}).items()}
    out.latencies = [(t, x) for t, x in data.get("latencies", [])]
    out.workdir = Path(data.get("workdir") or ".")
    return out


def measure(cfg: ScaleConfig) -> Outcome:
    """Run the scale benchmark once and return what it measured (nothing is written to RESULTS.md)."""
    return ScaleRun(cfg).execute()


# --- figures ------------------------------------------------------------------------------------------------
@dataclass
class Figures:
    """The headline numbers of an :class:`Outcome`."""

    waiting_seconds: int
    sends_waiting: float
    sends_waiting_p10: float
    #: Polls per second over all the seconds batches waited (a poller takes its share in bursts of
    #: POLL_SHARE_BURST, so a per-second median says little: 4, 0, 4, 4, 0 is 2.4/s). A second is
    #: "waiting" when the samples on both sides say so, so it may hold moments with none waiting,
    #: when checks take spare tokens: the busiest second is not bound by the share.
    polls_waiting: float
    polls_waiting_busiest: int
    polls_idle: float
    polls_idle_p99: float
    posts_429: int
    gets_429: int
    latency_n: int
    latency_p50: float
    latency_p99: float
    latency_max: float
    latency_p99_backfill: float
    poll_budget: float
    sends_peak_10s: float
    rss_peak: dict[str, int]
    memory_peak_sampled: int
    bytes_per_pair: float
    pairs: int


def waiting_flags(out: Outcome) -> dict[int, bool]:
    """Per epoch second: were batches waiting to be sent (the samples on both sides say so)?"""
    times = [s.t for s in out.samples]
    flags: dict[int, bool] = {}
    for sec in out.seconds:
        t = sec - out.t0
        before = bisect.bisect_right(times, t) - 1  # the last sample at or before the second
        after = bisect.bisect_left(times, t + 1)  # the first sample at or after its end
        flags[sec] = (
            before >= 0
            and after < len(times)
            and out.samples[before].waiting > 0
            and out.samples[after].waiting > 0
        )
    return flags


def _rate_scaled(cfg: ScaleConfig) -> str:
    """The report's words for a run with the key's rate scaled down (``--rate-limit``), else ''."""
    if cfg.rate_limit == ATTENTIVE_LIMIT:
        return ""
    return (
        f" (scaled down from Attentive's {ATTENTIVE_LIMIT} with `--rate-limit {cfg.rate_limit}`, the "
        f"workers' `ATTENTIVE_RATE_LIMIT` with it to {cfg.worker_rate:g}: on a machine too small for "
        "ingest to outpace Attentive's limit, this is how a backlog forms and the sender becomes the "
        f"bound, as ingest on more cores makes it at 100/s; the sends target scales to {cfg.target_sends:g})"
    )


def figures(out: Outcome) -> Figures:
    cfg = out.cfg
    flags = waiting_flags(out)
    waiting = [v for s, v in out.seconds.items() if flags.get(s)]
    idle = [v for s, v in out.seconds.items() if not flags.get(s)]
    share = float(out.env_poll.get("ATTENTIVE_POLL_SHARE", DEFAULT_POLL_SHARE))
    lat = [x for _t, x in out.latencies]
    bf_start = out.backfill_started if out.backfill_started is not None else math.inf
    bf_end = out.backfill_confirmed if out.backfill_confirmed is not None else out.ended
    during = [x for t, x in out.latencies if bf_start <= t <= bf_end]
    rss_peak: dict[str, int] = {}
    for s in out.samples:
        for name, value in s.worker_rss.items():
            rss_peak[name] = max(rss_peak.get(name, 0), value)
    pairs = cfg.pairs + out.realtime_received
    grown = out.memory_end - out.memory_baseline
    sends = {sec: v[0] for sec, v in out.seconds.items()}
    peak = max((sum(sends.get(sec + i, 0) for i in range(10)) / 10 for sec in sends), default=math.nan)
    return Figures(
        waiting_seconds=len(waiting),
        sends_waiting=median([v[0] for v in waiting]),
        sends_waiting_p10=percentile([v[0] for v in waiting], 10),
        polls_waiting=sum(v[2] for v in waiting) / len(waiting) if waiting else math.nan,
        polls_waiting_busiest=max((v[2] for v in waiting), default=0),
        polls_idle=median([v[2] for v in idle]),
        polls_idle_p99=percentile([v[2] for v in idle], 99),
        posts_429=sum(v[1] for v in out.seconds.values()),
        gets_429=sum(v[3] for v in out.seconds.values()),
        latency_n=len(lat),
        latency_p50=median(lat),
        latency_p99=percentile(lat, 99),
        latency_max=max(lat) if lat else math.nan,
        latency_p99_backfill=percentile(during, 99),
        poll_budget=share * cfg.worker_rate,
        sends_peak_10s=peak,
        rss_peak=rss_peak,
        memory_peak_sampled=max((s.used_memory for s in out.samples), default=0),
        bytes_per_pair=grown / pairs if pairs else math.nan,
        pairs=pairs,
    )


def fmt(value: float | None, spec: str = ".0f", unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:{spec}}{unit}"


def mb(value: float) -> str:
    return f"{value / 1e6:,.0f} MB"


def timeline_rows(out: Outcome) -> list[str]:
    """One row per minute (five when the run is longer than an hour) since the first webhook."""
    span = max(out.ended, 1.0)
    width = 60 if span <= 3600 else 300
    flags = waiting_flags(out)
    rows = []
    for start in range(0, int(span) + 1, width):
        end = start + width
        secs = [(s, v) for s, v in out.seconds.items() if start <= s - out.t0 < end]
        samples = [s for s in out.samples if start <= s.t < end]
        lat = [x for t, x in out.latencies if start <= t < end]
        if not secs and not samples:
            continue
        phase = []
        if out.backfill_started is not None and start <= out.backfill_started < end:
            phase.append("backfill starts")
        if out.backfill_ingested is not None and start <= out.backfill_ingested < end:
            phase.append("file ingested")
        if out.backfill_accepted is not None and start <= out.backfill_accepted < end:
            phase.append("all users sent")
        if out.backfill_confirmed is not None and start <= out.backfill_confirmed < end:
            phase.append("all confirmed")
        waiting_share = sum(1 for s, _v in secs if flags.get(s)) / max(len(secs), 1)
        rss = max((sum(s.worker_rss.values()) for s in samples), default=0)
        rows.append(
            f"| {start // 60:.0f} | {fmt(median([v[0] for _s, v in secs]))} "
            f"| {fmt(median([v[2] for _s, v in secs]))} | {fmt(percentile([v[2] for _s, v in secs], 99))} "
            f"| {sum(v[1] + v[3] for _s, v in secs)} | {waiting_share:.0%} "
            f"| {max((s.waiting for s in samples), default=0)} | {max((s.at_attentive for s in samples), default=0)} "
            f"| {len(lat)} | {fmt(median(lat), '.1f')} | {fmt(percentile(lat, 99), '.1f')} "
            f"| {max((s.used_memory for s in samples), default=0) / 1e6:,.0f} | {rss / 1e6:,.0f} "
            f"| {', '.join(phase)} |"
        )
    return rows


def render(out: Outcome) -> str:
    cfg = out.cfg
    f = figures(out)
    target_latency = cfg.flush_interval + TARGET_LATENCY_MARGIN
    real_delay = cfg.processing_delay * cfg.time_compression / 3600
    share = out.env_poll.get("ATTENTIVE_POLL_SHARE")
    proc = out.processing_seconds
    rate = out.realtime_sent / max((out.realtime_stopped or out.ended) or 1.0, 1.0)
    lines = [
        "## Scale: Existing Users backfill at Attentive's pace, real-time changes throughout",
        "",
        f"{cfg.users:,} users backfilled from a file into a job with {len(AUDIENCES)} audiences (each user "
        f"in all three: {cfg.pairs:,} (user, audience) pairs), while new users enter at "
        f"{cfg.realtime_rate:g}/s through the webhook receiver on the same API key. The sandbox enforces "
        f"{cfg.rate_limit} requests/s per key per endpoint{_rate_scaled(cfg)} and completes each Attentive job after a "
        f"lognormal delay (median {cfg.processing_delay:g} s, sigma {cfg.processing_spread:g}, seed {cfg.seed}); "
        f"time is compressed {cfg.time_compression:g}x (the median stands for {real_delay:.1f} h), and the "
        f"workers' poll settings with it: {', '.join(f'`{k}={v}`' for k, v in out.env_poll.items())}"
        f"{'' if share else ' (`ATTENTIVE_POLL_SHARE` not set)'}. {workers_text(cfg)}, "
        f"beat, Redis with AOF; flush interval {cfg.flush_interval} s. "
        f"Code: `{out.revision or 'unknown'}`. `make bench-scale`; how it runs: `bench/bench_scale.py`.",
        "",
    ]
    if out.error or out.notes:
        lines += [f"**Note:** {n}" for n in ([out.error] if out.error else []) + out.notes] + [""]
    confirmed = (
        f"{out.backfill_confirmed - out.backfill_started:,.0f} s after the backfill started"
        if out.backfill_confirmed is not None and out.backfill_started is not None
        else "**not reached**"
    )
    few = ": too few to judge" if f.waiting_seconds < 30 else ""
    lines += [
        "| figure | value | target |",
        "|---|---:|---|",
        f"| sends/s while batches wait (median, p10; {f.waiting_seconds} s{few}) | {fmt(f.sends_waiting)}, "
        f"{fmt(f.sends_waiting_p10)} | median >= {cfg.target_sends:g} |",
        f"| sends/s, best 10 s | {fmt(f.sends_peak_10s)} | |",
        f"| polls/s while batches wait (mean; busiest second) | {fmt(f.polls_waiting, '.1f')}; "
        f"{f.polls_waiting_busiest} | mean at most their share, {f.poll_budget:g}/s (more only in "
        f"moments with no batch waiting, on spare tokens) |",
        f"| polls/s otherwise (median, p99) | {fmt(f.polls_idle)}, {fmt(f.polls_idle_p99)} | spare rate |",
        f"| 429s (sends, polls) | {f.posts_429}, {f.gets_429} | 0 |",
        f"| real-time latency p50 / p99 / max ({f.latency_n:,} users) | {fmt(f.latency_p50, '.1f')} / "
        f"{fmt(f.latency_p99, '.1f')} / {fmt(f.latency_max, '.1f')} s | p99 <= {target_latency:g} s |",
        f"| real-time latency p99 during the backfill | {fmt(f.latency_p99_backfill, '.1f')} s "
        f"| <= {target_latency:g} s |",
        f"| every backfill batch confirmed complete | {confirmed} | |",
        f"| Redis used_memory peak (sampled; Redis' own peak) | {mb(f.memory_peak_sampled)}; "
        f"{mb(out.memory_peak_info)} | grows with users only |",
        f"| bytes per (user, audience) afterwards | {fmt(f.bytes_per_pair)} "
        f"({mb(out.memory_end - out.memory_baseline)} over {f.pairs:,} pairs) | a few dozen |",
        f"| worker RSS peak (main + pool) | "
        f"{', '.join(f'{k} {mb(v)}' for k, v in sorted(f.rss_peak.items())) or 'n/a'} | |",
        "",
        "Milestones (seconds since the first real-time webhook): backfill command started "
        f"{fmt(out.backfill_started)} and returned after {fmt(out.backfill_command_seconds)} s (it streams "
        f"the file into Redis, waiting while BACKFILL_FILE_MAX_STAGED_LINES are there); file ingested {fmt(out.backfill_ingested)}; every backfilled flag accepted "
        f"by the sandbox {fmt(out.backfill_accepted)}; every job carrying one confirmed complete "
        f"{fmt(out.backfill_confirmed)} ({out.backfill_jobs:,} Attentive jobs); real-time stopped "
        f"{fmt(out.realtime_stopped)}; nothing left at Attentive {fmt(out.settled)}; end {fmt(out.ended)}.",
        "",
        f"Real-time: {out.realtime_sent:,} changes sent ({rate:.0f}/s achieved, {out.webhook_failures} "
        f"webhook POSTs failed and were resent), {out.realtime_received:,} received by the sandbox. "
        f"Backfill: {out.backfill_pairs_received:,} of {cfg.pairs:,} (user, audience) flags accepted by "
        f"the sandbox, in {out.backfill_received:,} user records for {cfg.users:,} users (a user split "
        "over two batches is held behind the first and sent twice). Memory: baseline "
        f"{mb(out.memory_baseline)}, when the backfill was confirmed {mb(out.memory_at_confirmed or 0)}, "
        f"at the end {mb(out.memory_end)} ({out.dbsize_end:,} keys). Worker RSS at the end: "
        f"{', '.join(f'{k} {mb(v)}' for k, v in sorted(out.worker_rss_end.items())) or 'n/a'}. "
        f"Processing delays given: median {fmt(median(proc), '.0f')} s, p90 {fmt(percentile(proc, 90), '.0f')} s, "
        f"max {fmt(max(proc) if proc else None, '.0f')} s over {len(proc):,} jobs. CPU seconds: "
        f"{', '.join(f'{k} {v:,.0f}' for k, v in out.cpu_seconds.items())} over {fmt(out.ended)} s "
        f"on {os.cpu_count()} cores.",
        "",
        "Job counters at the end: "
        + ", ".join(
            f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}"
            for k, v in out.counters.items()
            if v and (k.startswith(("batches_", "polls_", "users_", "responses_", "dead")) or k == "received")
        )
        + ".",
        "",
        "Per minute: sends and polls are the sandbox's answered POSTs (202) and job-status GETs (200) per "
        "second (median, p99), *waiting* the share of seconds with batches waiting to be sent, "
        "*latency* over the real-time users received in that minute.",
        "",
        "| min | sends/s | polls/s | polls p99 | 429s | waiting | batches waiting | at Attentive "
        "| rt received | latency p50 | latency p99 | Redis MB | worker RSS MB | |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        *timeline_rows(out),
    ]
    return "\n".join(lines)


# --- command line -------------------------------------------------------------------------------------------
QUICK_USERS = 100_000


def build_parser() -> argparse.ArgumentParser:
    d = ScaleConfig()
    p = argparse.ArgumentParser(prog="python -m bench scale", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--users", type=int, help=f"users backfilled (default {d.users:,}; --quick {QUICK_USERS:,})"
    )
    p.add_argument("--quick", action="store_true", help=f"{QUICK_USERS:,} users, a 30-minute bound")
    p.add_argument("--realtime-rate", type=float, default=d.realtime_rate, help="real-time changes/s")
    p.add_argument(
        "--rate-limit",
        type=int,
        default=d.rate_limit,
        help="requests/s per key the sandbox allows (the workers target 90%% of it; sends target 85%%)",
    )
    p.add_argument(
        "--processing-delay", type=float, default=d.processing_delay, help="sandbox seconds (median)"
    )
    p.add_argument("--processing-spread", type=float, default=d.processing_spread, help="lognormal sigma")
    p.add_argument(
        "--time-compression",
        type=float,
        default=d.time_compression,
        help="real seconds per sandbox second; the workers' poll settings are divided by it",
    )
    p.add_argument(
        "--poll-share", type=float, help="ATTENTIVE_POLL_SHARE for the workers (when they know it)"
    )
    p.add_argument(
        "--flush-interval", type=int, default=d.flush_interval, help="the job's flush interval (s)"
    )
    p.add_argument(
        "--layout",
        choices=("groups", "shared"),
        default=d.layout,
        help="groups: a worker per queue group, as deploy/kubernetes runs them (ingest+sweep, "
        "flush+poll+sweep, backfill); shared: --workers workers on every queue",
    )
    p.add_argument("--workers", type=int, default=d.workers, help="celery worker instances (--layout shared)")
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="pool processes per worker")
    p.add_argument("--warmup", type=float, default=d.warmup, help="real-time only, before the backfill (s)")
    p.add_argument("--sample", type=float, default=d.sample, help="seconds between samples")
    p.add_argument("--settle", type=float, default=d.settle, help="longest wait for the job to empty (s)")
    p.add_argument(
        "--minutes", type=float, help=f"bound on the whole run (default {d.minutes:g}; --quick 30)"
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--workdir", type=Path, help="logs, samples.json, status.json (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the backfill file and Redis' AOF")
    p.add_argument(
        "--render-from", type=Path, metavar="SAMPLES_JSON", help="no run: render a past run's samples.json"
    )
    return p


def config_from(argv: Sequence[str]) -> ScaleConfig:
    args = build_parser().parse_args(list(argv))
    users = args.users or (QUICK_USERS if args.quick else ScaleConfig.users)
    minutes = args.minutes or (30.0 if args.quick else ScaleConfig.minutes)
    if users < 1 or args.workers < 1 or args.concurrency < 1 or args.time_compression <= 0:
        raise SystemExit("--users, --workers, --concurrency and --time-compression must be positive")
    if not 0 < args.rate_limit <= ATTENTIVE_LIMIT:
        raise SystemExit(f"--rate-limit must be from 1 to {ATTENTIVE_LIMIT}")
    return ScaleConfig(
        users=users,
        rate_limit=args.rate_limit,
        realtime_rate=args.realtime_rate,
        processing_delay=args.processing_delay,
        processing_spread=args.processing_spread,
        time_compression=args.time_compression,
        flush_interval=args.flush_interval,
        layout=args.layout,
        workers=args.workers,
        concurrency=args.concurrency,
        warmup=args.warmup,
        sample=args.sample,
        settle=args.settle,
        minutes=minutes,
        poll_share=args.poll_share,
        seed=args.seed,
        workdir=args.workdir,
        keep=args.keep,
    )


def section(argv: Sequence[str] = ()) -> str:
    """The RESULTS.md section a run with these options records: ``scale`` at Attentive's rate,
    ``scale-backlog`` with the key's rate scaled down (a different measurement: the sender is the bound)."""
    rendered = build_parser().parse_args(list(argv)).render_from
    cfg = load(rendered).cfg if rendered is not None else config_from(argv)
    return "scale" if cfg.rate_limit == ATTENTIVE_LIMIT else "scale-backlog"


def run(argv: Sequence[str] = ()) -> str:
    rendered = build_parser().parse_args(list(argv)).render_from
    if rendered is not None:
        return render(load(rendered))
    cfg = config_from(argv)
    out = measure(cfg)
    say(f"logs, samples.json and status.json in {out.workdir}")
    return render(out)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.bench_scale [options]``: run and print the section (RESULTS.md untouched)."""
    print(run(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
