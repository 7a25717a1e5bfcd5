"""``attentive-export demo``: the whole product on one machine, checked end to end.

Starts the local Attentive sandbox, a Celery worker and beat, saves an authorization, creates the
example export job, sends a realistic stream of enters and exits (including bad data), waits until
every change has reached the sandbox or been set aside with a reason, then compares each user's
audience attributes in the sandbox with what the transitions say they must be.

It uses its own Redis database (``DEMO_REDIS_URL``, default ``redis://127.0.0.1:6379/9``), which it
empties first, so it never touches the data of a real deployment on database 0. When nothing answers
there it runs on a private server started for the demo alone (``worker/cli/localredis.py``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import redis

from worker.cli.localredis import LocalRedisError, Server, ensure_redis
from worker.observe.status import job_status
from worker.pipeline import inbox
from worker.setup.authorizations import AuthorizationStore
from worker.setup.crypto import generate_secret_key
from worker.setup.jobconfig import parse_job_config
from worker.setup.jobs import JobStore

DEMO_TOKEN = "demo-key"
AUDIENCES = ("vip_shoppers", "lapsed_buyers")
JOB_CONFIG: dict[str, Any] = {
    "label": "Demo: VIP shoppers to Attentive",
    "authorization": "demo",
    "audiences": list(AUDIENCES),
    "identifier_mappings": {"email": "email", "phone_number": "phone", "user_id": "clientUserId"},
    "extra_identifiers": ["loyalty_id"],
    "attribute_mappings": {
        "first_name": "firstName",
        "last_name": "lastName",
        "birthday": "dateOfBirth",
        "city": "city",
    },
    "custom_attributes": ["lifetime_value", "favorite_categories", "is_member"],
    "flush_interval_seconds": 3,
}


def _free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, *args],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def make_transitions(users: int, seed: int = 7) -> tuple[list[str], dict[str, dict[str, bool]]]:
    """JSON lines for ``users`` users and the final audience flags each user must end with."""
    rng = random.Random(seed)
    t0 = int(time.time() * 1000) - 60_000
    lines: list[str] = []
    expected: dict[str, dict[str, bool]] = {}
    for i in range(users):
        email = f"shopper{i}@example.com"
        profile: dict[str, Any] = {
            "email": email,
            "phone_number": f"(415) 555-{i % 10000:04d}" if i % 3 else f"+1415555{i % 10000:04d}",
            "user_id": f"u-{i}",
            "loyalty_id": f"L{i:06d}",
            "first_name": rng.choice(["Ada", "Bo", "Cy", "Di", "Ed"]),
            "last_name": rng.choice(["Lovelace", "Hopper", "Turing"]),
            "birthday": rng.choice(["1990-07-04", "1985-01-31T00:00:00Z", 631152000, "not a date"]),
            "city": rng.choice(["Oakland", "Boston", "Austin"]),
            "lifetime_value": round(rng.uniform(10, 5000), 2),
            "favorite_categories": rng.sample(["shoes", "bags", "hats", "coats"], 2),
            "is_member": rng.random() < 0.5,
        }
        if i % 97 == 5:
            profile["phone_number"] = "call me maybe"  # dropped as an identifier, still sent by email
        changes: list[tuple[str, bool, int, dict[str, Any]]] = [("vip_shoppers", True, t0 + i, profile)]
        if rng.random() < 0.3:
            changes.append(("lapsed_buyers", True, t0 + i + 1, profile))
        if rng.random() < 0.2:
            changes.append(
                ("vip_shoppers", False, t0 + i + 2, {"email": email})
            )  # exits right after entering
        flags = expected.setdefault(email, {})
        for audience, enter, at, user in changes:
            event = "enter" if enter else "exit"
            lines.append(json.dumps({"audience": audience, "event": event, "at": at, "user": user}))
            flags[audience] = enter
    lines.append(
        json.dumps({"audience": "vip_shoppers", "event": "enter", "at": t0, "user": {"first_name": "No id"}})
    )
    lines.append('{"audience": "vip_shoppers", "event": "join"}')
    lines.append("this is not JSON")
    return lines, expected


def run_demo(users: int = 1000, port: int = 8787) -> None:
    configured = os.environ.get("DEMO_REDIS_URL", "redis://127.0.0.1:6379/9")
    if importlib.util.find_spec("sandbox") is None:  # its own distribution, not in the production wheel
        raise SystemExit(
            "demo: the Attentive sandbox is not installed: `make install`, or `pip install ./sandbox`"
        )
    if not _free(port):
        raise SystemExit(f"demo: port {port} is busy; pass --port to use another one")

    def started(server: Server) -> None:
        name, url = os.path.basename(server.binary), server.url_for(configured)
        print(f"demo: nothing answers at {configured}; started a private {name} at {url} for this run")

    try:
        with ensure_redis(configured, on_start=started) as redis_url:
            _run(redis_url, users, port)
    except LocalRedisError as exc:
        raise SystemExit(f"demo: no Redis at {configured} and none could be started: {exc}") from None


def _run(redis_url: str, users: int, port: int) -> None:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    workdir = Path(tempfile.mkdtemp(prefix="attentive-demo-"))
    api_url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "CELERY_BROKER_URL": redis_url,
        "ATTENTIVE_API_URL": api_url,
        "EXPORT_SECRET_KEY": os.environ.get("EXPORT_SECRET_KEY") or generate_secret_key(),
        "ATTENTIVE_FIRST_POLL_SECONDS": "1",
        "SWEEP_INTERVAL_SECONDS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    os.environ.update(
        {k: env[k] for k in ("REDIS_URL", "CELERY_BROKER_URL", "ATTENTIVE_API_URL", "EXPORT_SECRET_KEY")}
    )
    print(f"demo: logs in {workdir}")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(
            _spawn(
                ["-m", "sandbox", "--port", str(port), "--token", DEMO_TOKEN, "--processing-delay", "1"],
                env,
                workdir / "sandbox.log",
            )
        )
        _wait_http(f"{api_url}/_sandbox/health", 20)
        print(f"demo: Attentive sandbox on {api_url}")
        celery = ["-m", "celery", "-A", "worker.app"]
        procs.append(
            _spawn(
                [
                    *celery,
                    "worker",
                    "-c",
                    "2",
                    "-Q",
                    "ingest,flush,poll,sweep,backfill",
                    "-l",
                    "INFO",
                    "--without-gossip",
                    "--without-mingle",
                ],
                env,
                workdir / "worker.log",
            )
        )
        procs.append(
            _spawn(
                [*celery, "beat", "-s", str(workdir / "beat-schedule"), "-l", "INFO"],
                env,
                workdir / "beat.log",
            )
        )
        print("demo: celery worker (2 processes) and beat started")

        auth = AuthorizationStore(client, env["EXPORT_SECRET_KEY"]).create(
            "demo", DEMO_TOKEN, "local sandbox"
        )
        print(
            f"demo: authorization saved: {auth.id} for {auth.company_name} {auth.key_hint} (validated with /v2/me)"
        )
        job = JobStore(client).create(parse_job_config(JOB_CONFIG))
        print(f"demo: export job {job.id} running for audiences {', '.join(AUDIENCES)}")

        lines, expected = make_transitions(users)
        from worker.dispatch import CeleryDispatcher

        dispatcher = CeleryDispatcher()
        started = time.monotonic()
        for start in range(0, len(lines), 500):
            dispatcher.ingest(inbox.put_chunk(client, lines[start : start + 500]))
        print(f"demo: queued {len(lines)} transitions for {users} users")
        status = _wait_settled(client, job.id, timeout=120)
        elapsed = time.monotonic() - started
        _report(status, elapsed)
        _verify(api_url, expected)
    finally:
        _stop(procs)


def _wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"demo: {url} did not answer within {timeout}s")


def _wait_settled(client: redis.Redis, job_id: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        status = job_status(client, job_id)
        c, b = status["counters"], status["buffer"]
        line = (
            f"  accepted {c['accepted']}  delivered {c['users_delivered']}  batches sent {c['batches_submitted']}"
            f"  done {c['batches_completed']}  open {b['users_in_open_batch']}  at Attentive {b['batches_at_attentive']}"
        )
        if line != last:
            print(line, flush=True)
            last = line
        settled = not any(b.values()) and c["accepted"] > 0 and not client.zcard("aex:inbox:pending")
        if settled:
            return status
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: not settled after {timeout}s; status:\n{json.dumps(status, indent=2)}")
        time.sleep(0.5)


def _report(status: dict[str, Any], elapsed: float) -> None:
    c = status["counters"]
    print(f"demo: settled in {elapsed:.1f}s")
    print(
        f"  transitions accepted {c['accepted']}, merged into a pending entry {c['merged']}, "
        f"held behind an unfinished batch {c['queued_behind_unfinished']}, stale {c['stale']}"
    )
    print(
        f"  users delivered {c['users_delivered']} in {c['batches_completed']} batches; dead-lettered {c['deadlettered_users']}"
    )
    print(f"  skipped: {status['skips'] or 'none'}; fields dropped: {status['field_drops'] or 'none'}")


def _verify(api_url: str, expected: dict[str, dict[str, bool]]) -> None:
    users = httpx.get(f"{api_url}/_sandbox/users", timeout=30).json()["users"]
    by_email = {u["identifiers"].get("email"): u for u in users}
    wrong = []
    for email, flags in expected.items():
        got = by_email.get(email, {}).get("custom", {})
        if any(got.get(aud) is not value for aud, value in flags.items()):
            wrong.append((email, flags, {a: got.get(a) for a in flags}))
    sample = by_email.get("shopper0@example.com")
    if sample:
        print("demo: shopper0 in Attentive (sandbox):")
        print(json.dumps({k: sample[k] for k in ("identifiers", "attributes", "custom")}, indent=2))
    if wrong:
        for email, want, got in wrong[:10]:
            print(f"  MISMATCH {email}: expected {want}, sandbox has {got}")
        raise SystemExit(
            f"demo: FAILED: {len(wrong)} of {len(expected)} users have wrong audience attributes"
        )
    print(f"demo: OK: all {len(expected)} users have the expected audience attributes in Attentive")
