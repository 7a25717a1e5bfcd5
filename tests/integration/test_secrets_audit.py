"""Secrets audit (DESIGN.md §2 invariant 5): a real workload with recognisable secrets and personal
data, then a search for them everywhere they must not be.

The workload: ``attentive-export auth add`` (the API key from an environment variable), ``jobs create``,
``ingest`` of a JSONL file, webhook deliveries to ``attentive-export serve`` (and to ``uvicorn
worker.webhook.receiver:app``) with the token as a bearer header, an ``X-Webhook-Token`` header, a
``?token=`` query parameter and a percent-encoded ``?tok%65n=`` one, real ``celery worker`` and ``celery
beat`` processes (at DEBUG) until the users are in the Attentive sandbox, then a batch Attentive keeps
failing (dead-lettered), a revoked key (job paused), and ``status``/``deadletters``/``auth list``/``jobs
show``. Flower runs throughout. The processes' logs stay in the test's ``tmp_path``.

What must not hold a secret (the API key, the webhook token, ``EXPORT_SECRET_KEY``): any line of the
worker, beat, receivers or Flower, any CLI output, the status (exception texts included), Flower's task
and worker APIs, any broker message, and the data database (the API key is there only encrypted). What
must not hold personal data (email, phone, first name): broker messages, Flower, and the process logs
(bodies and records are never logged). Personal data may be in the data database (that is the buffer)
and in CLI output meant for operators (``deadletters`` shows the records).

Broker messages are consumed as they go, so they are captured with ``MONITOR`` on the broker's server
(every command on the broker database, with its arguments) and the broker database is read once more at
the end. Kombu base64-encodes message bodies, so every captured value is searched raw, percent-decoded
and base64-decoded, and task messages are decoded to check that their arguments are ids.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import os
import random
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.celeryproc import ROOT, wait_for
from tests.conftest import TEST_BROKER_URL, TEST_REDIS_URL
from tests.sandboxproc import SandboxProcess, free_port
from worker.observe.status import job_status
from worker.setup.crypto import Cipher
from worker.store import keys

pytestmark = pytest.mark.integration

AUDIENCE = "audit_vip"
#: Task arguments are ids: job ids, chunk ids, batch numbers, attempts, backfill parts.
ID_ARG = re.compile(r"[A-Za-z0-9_.:-]{1,100}")


# --- the recognisable values ------------------------------------------------------------------------
@dataclass(frozen=True)
class Person:
    email: str
    phone: str  # as the producer sends it
    e164: str  # as it is sent to Attentive
    first_name: str

    def needles(self) -> list[str]:
        return [self.email, self.phone, self.e164, self.first_name]


@dataclass(frozen=True)
class Secrets:
    api_key: str
    webhook_token: str
    secret_key: str

    @classmethod
    def make(cls) -> Secrets:
        fernet_key = base64.urlsafe_b64encode(b"AUDIT" + os.urandom(27)).decode()  # "QVVESVQ..."
        return cls(f"sk-AUDIT-{secrets.token_hex(16)}", f"whk-AUDIT-{secrets.token_hex(16)}", fernet_key)

    def needles(self) -> dict[str, str]:
        """Each secret, and slices of its random part (a leak of most of a secret is a leak too).
        None of the slices is in the API key's masked hint, which shows its last 4 characters only."""
        out: dict[str, str] = {}
        for name, value, random_part in (
            ("API key", self.api_key, self.api_key[len("sk-AUDIT-") :]),
            ("webhook token", self.webhook_token, self.webhook_token[len("whk-AUDIT-") :]),
            ("EXPORT_SECRET_KEY", self.secret_key, self.secret_key[7:]),  # after base64("AUDIT")
        ):
            out[value] = name
            out[random_part[:16]] = f"{name} (start of its random part)"
            out[random_part[12:24]] = f"{name} (middle of its random part)"
        return out


def make_people(tag: str, n: int) -> list[Person]:
    lines = random.sample(range(100), n)  # 555-0100..0199: valid, fictional numbers
    return [
        Person(
            email=f"audit.person.{tag}.{i}@example.com",
            phone=f"(415) 555-01{line:02d}",
            e164=f"+141555501{line:02d}",
            first_name=f"Auditname{tag}x{i}",
        )
        for i, line in enumerate(lines)
    ]


def canonical(person: Person, at: str) -> str:
    user = {"email": person.email, "phone": person.phone, "first_name": person.first_name}
    return json.dumps({"audience": AUDIENCE, "event": "enter", "at": at, "user": user})


def lytics_trigger(person: Person, at: str) -> dict[str, Any]:
    return {
        "data": {
            "email": person.email,
            "phone": person.phone,
            "first_name": person.first_name,
            "segment_events": [{"id": "a1b2c3", "event": "enter", "slug": AUDIENCE, "enter": at}],
        }
    }


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- searching ----------------------------------------------------------------------------------------
_B64_RUN = re.compile(rb"[A-Za-z0-9+/_-]{16,}={0,2}")


def readable_forms(blob: bytes, depth: int = 2, how: str = "") -> Iterator[tuple[str, bytes]]:
    """``blob`` as is, percent-decoded, and every base64 run in it decoded (standard and url-safe
    alphabets, at each offset, ``depth`` levels deep): kombu base64-encodes message bodies. Each form
    comes with how it was read."""
    yield how or "as is", blob
    if b"%" in blob:
        yield f"{how}percent-decoded", urllib.parse.unquote_to_bytes(blob)
    if depth <= 0:
        return
    for run in _B64_RUN.findall(blob):
        run = run.rstrip(b"=").replace(b"-", b"+").replace(b"_", b"/")
        for offset in range(4):
            part = run[offset:]
            part = part[: len(part) - len(part) % 4]
            if len(part) < 12:
                continue
            with contextlib.suppress(ValueError):
                yield from readable_forms(base64.b64decode(part), depth - 1, f"{how}base64-decoded ")


def find(needles: dict[str, str], where: str, texts: list[bytes] | list[str]) -> list[str]:
    """``"<what> in <where> (<how read>): ...context..."``, once per needle, place and way of reading,
    for every needle found in any readable form of ``texts``."""
    found: dict[tuple[str, str], str] = {}
    encoded = {n.encode(): what for n, what in needles.items()}
    for text in texts:
        blob = text.encode("utf-8", "replace") if isinstance(text, str) else text
        for how, form in readable_forms(blob):
            for needle, what in encoded.items():
                at = form.find(needle)
                if at >= 0 and (what, how) not in found:
                    context = form[max(0, at - 80) : at + len(needle) + 40].decode("utf-8", "replace")
                    found[what, how] = f"{what} in {where} ({how.strip()}): ...{context!r}..."
    return sorted(found.values())


def redis_contents(client: redis.Redis) -> list[bytes]:
    """Every key name and value of the database, whatever the type."""
    out: list[bytes] = []
    r: Any = client  # decode_responses is off: bytes throughout
    for key in r.scan_iter(count=1000):
        out.append(key)
        kind = r.type(key)
        if kind == b"string":
            out.append(r.get(key) or b"")
        elif kind == b"hash":
            for k, v in r.hgetall(key).items():
                out += [k, v]
        elif kind == b"list":
            out += r.lrange(key, 0, -1)
        elif kind == b"set":
            out += list(r.smembers(key))
        elif kind == b"zset":
            out += [m for m, _score in r.zrange(key, 0, -1, withscores=True)]
        elif kind == b"stream":
            for _id, fields in r.xrange(key):
                for k, v in fields.items():
                    out += [k, v]
        else:
            raise AssertionError(f"unexpected Redis type {kind!r} for {key!r}")
    return out


# --- the broker tap -------------------------------------------------------------------------------------
def monitor_args(line: bytes) -> tuple[int, list[bytes]] | None:
    """(db, arguments) of one MONITOR line: ``1.2 [12 127.0.0.1:5000] "lpush" "q" "..."``."""
    m = re.match(rb"[\d.]+ \[(\d+) [^\]]*\] ", line)
    if m is None:
        return None
    rest, args, i = line[m.end() :], [], 0
    escapes = {ord(k): v for k, v in zip('nrtab\\"', b'\n\r\t\a\b\\"', strict=True)}
    while i < len(rest):
        if rest[i : i + 1] != b'"':
            i += 1
            continue
        buf, i = bytearray(), i + 1
        while i < len(rest) and rest[i : i + 1] != b'"':
            if rest[i : i + 1] == b"\\" and i + 1 < len(rest):
                if rest[i + 1 : i + 2] == b"x":
                    buf.append(int(rest[i + 2 : i + 4], 16))
                    i += 4
                    continue
                buf.append(escapes.get(rest[i + 1], rest[i + 1]))
                i += 2
                continue
            buf.append(rest[i])
            i += 1
        args.append(bytes(buf))
        i += 1
    return int(m.group(1)), args


class BrokerTap:
    """Records every command run on the broker database (``MONITOR``), from start to :meth:`stop`."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client = redis.Redis.from_url(url)
        self.db = int(self.client.connection_pool.connection_kwargs.get("db", 0))
        self.commands: list[list[bytes]] = []
        self._marker = f"audit-tap-end-{secrets.token_hex(4)}".encode()
        #: Whether the tap saw everything up to stop() (else ``failure`` says why not).
        self.complete = False
        self.failure = ""
        self._ready = threading.Event()
        self._done = threading.Event()
        self._monitor: Any = None
        self._thread = threading.Thread(target=self._run, name="broker-tap", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10) or self.failure:
            raise AssertionError(f"MONITOR on the broker ({self.url}) did not start: {self.failure}")

    def _run(self) -> None:
        try:
            with self.client.monitor() as monitor:  # type: ignore[no-untyped-call]
                self._monitor = monitor
                self._ready.set()
                while True:
                    line = monitor.connection.read_response()
                    parsed = monitor_args(line if isinstance(line, bytes) else str(line).encode())
                    if parsed is None or parsed[0] != self.db:
                        continue
                    if parsed[1][-1:] == [self._marker]:
                        self.complete = True
                        return
                    self.commands.append(parsed[1])
        except (redis.RedisError, OSError) as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
        finally:
            self._ready.set()
            self._done.set()

    def stop(self) -> list[list[bytes]]:
        """Wait until every command sent so far is recorded (a marker round trip), then stop; bounded."""
        with contextlib.suppress(redis.RedisError):
            self.client.echo(self._marker)
        if not self._done.wait(10) and self._monitor is not None:
            self.failure = self.failure or "the end marker did not come back within 10 s"
            self._monitor.connection.disconnect()
        self._thread.join(5)
        self.client.close()
        return self.commands


def kombu_envelopes(value: Any) -> Iterator[dict[str, Any]]:
    """Kombu message envelopes (``{"body", "properties", "headers", ...}``) anywhere in JSON ``value``:
    queue lists hold envelopes, the ``unacked`` hash holds ``[envelope, exchange, routing key]``."""
    if isinstance(value, dict):
        if "body" in value and "properties" in value:
            yield value
        else:
            for v in value.values():
                yield from kombu_envelopes(v)
    elif isinstance(value, list):
        for v in value:
            yield from kombu_envelopes(v)


@dataclass
class TaskCall:
    name: str
    args: list[Any]
    kwargs: dict[str, Any]


def task_calls(values: list[bytes]) -> list[TaskCall]:
    """Every Celery task message (protocol 2: the name in the headers, ``[args, kwargs, embed]`` body)."""
    calls: list[TaskCall] = []
    for value in values:
        if not value.startswith((b"{", b"[")):
            continue
        try:
            decoded = json.loads(value)
        except ValueError:
            continue
        for envelope in kombu_envelopes(decoded):
            name = (envelope.get("headers") or {}).get("task")
            if not name:
                continue  # an event or a control message
            body: Any = envelope["body"]
            if envelope["properties"].get("body_encoding") == "base64":
                body = base64.b64decode(body)
            args, kwargs, _embed = json.loads(body)
            calls.append(TaskCall(name, args, kwargs))
    return calls


# --- processes ------------------------------------------------------------------------------------------
def _cli_command() -> list[str]:
    script = Path(sys.executable).with_name("attentive-export")
    return [str(script)] if script.exists() else [sys.executable, "-m", "worker.cli.main"]


@dataclass
class Processes:
    """Every subprocess of the audit, each logging stdout and stderr to its own file."""

    workdir: Path
    env: dict[str, str]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    cli_outputs: list[tuple[str, str]] = field(default_factory=list)

    def spawn(self, name: str, argv: list[str], **extra_env: str) -> subprocess.Popen[bytes]:
        with (self.workdir / f"{name}.log").open("wb") as out:
            proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                env={**self.env, **extra_env},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs[name] = proc
        return proc

    def celery(self, name: str, *args: str, **extra_env: str) -> subprocess.Popen[bytes]:
        return self.spawn(name, [sys.executable, "-m", "celery", "-A", "worker.app", *args], **extra_env)

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self) -> dict[str, str]:
        return {name: self.log(name) for name in self.procs}

    def alive(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is not None:
            raise AssertionError(f"{name} exited with {proc.returncode}:\n{self.log(name)[-3000:]}")

    def cli(self, *args: str, stdin: str | None = None, **extra_env: str) -> str:
        """Run ``attentive-export ARGS``; returns stdout (stdout and stderr are kept for the audit)."""
        result = subprocess.run(
            [*_cli_command(), *args],
            cwd=ROOT,
            env={**self.env, **extra_env},
            input=stdin,
            capture_output=True,
            text=True,
            timeout=30,
        )
        output = result.stdout + result.stderr
        self.cli_outputs.append((" ".join(args), output))
        assert result.returncode == 0, f"attentive-export {' '.join(args)} failed:\n{output}"
        return result.stdout

    def cli_parallel(self, *commands: list[str]) -> list[str]:
        """Run several ``attentive-export`` commands at once (each start costs a second or two)."""
        with ThreadPoolExecutor(len(commands)) as pool:
            return list(pool.map(lambda args: self.cli(*args), commands))

    def stop(self) -> None:
        """TERM every process group, then KILL what is left; bounded."""
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


def http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def flower_tasks(url: str) -> dict[str, Any]:
    response = httpx.get(f"{url}/api/tasks", timeout=5)
    response.raise_for_status()
    tasks: dict[str, Any] = response.json()
    return tasks


JOB_FILE = """\
label: secrets audit
authorization: audit
audiences: [{audience}]
identifier_mappings: {{email: email, phone: phone}}
attribute_mappings: {{first_name: firstName}}
existing_users: false
flush_interval_seconds: 1
"""


# --- the audit ------------------------------------------------------------------------------------------
@pytest.fixture
def broker_db() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(TEST_BROKER_URL)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def test_no_secret_or_personal_data_leaks_anywhere(
    real_redis: redis.Redis, broker_db: redis.Redis, sandbox: SandboxProcess, tmp_path: Path
) -> None:
    tag = secrets.token_hex(4)
    secret = Secrets.make()
    people = make_people(tag, 8)
    file_people, hook_people, dead_person, paused_person = people[:2], people[2:6], people[6], people[7]
    sandbox.add_token(secret.api_key)

    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "REDIS_URL": TEST_REDIS_URL,
        "CELERY_BROKER_URL": TEST_BROKER_URL,
        "ATTENTIVE_API_URL": sandbox.url,
        "EXPORT_SECRET_KEY": secret.secret_key,
        "ATTENTIVE_FIRST_POLL_SECONDS": "0.3",
        "ATTENTIVE_POLL_CAP_SECONDS": "1",
        "SWEEP_INTERVAL_SECONDS": "0.5",
        "FLUSH_LEASE_SECONDS": "3",
    }
    for name in ("WEBHOOK_TOKEN", "AUDIT_ATTENTIVE_KEY"):
        env.pop(name, None)
    procs = Processes(tmp_path, env)
    tap = BrokerTap(TEST_BROKER_URL)
    tap.start()
    flower_port, serve_port, uvicorn_port = free_port(), free_port(), free_port()
    flower = f"http://127.0.0.1:{flower_port}"
    serve_url = f"http://127.0.0.1:{serve_port}"
    uvicorn_url = f"http://127.0.0.1:{uvicorn_port}"
    hook = {"Content-Type": "application/json"}
    chunks: list[str] = []
    try:
        procs.celery(
            "flower", "flower", f"--port={flower_port}", "--address=127.0.0.1", FLOWER_UNAUTHENTICATED_API="1"
        )
        procs.celery(
            "worker",
            "worker",
            "-n",
            f"audit-{tag}@%h",
            "-Q",
            "ingest,flush,poll,sweep,backfill",
            "-c",
            "2",
            "--without-gossip",
            "--without-mingle",
            "-l",
            "DEBUG",
            LOG_FORMAT="json",  # the worker and `uvicorn ...:app` log JSON lines, the others text
        )
        procs.celery("beat", "beat", "-s", str(tmp_path / "beat-schedule"), "-l", "DEBUG")
        procs.spawn(
            "serve",
            [*_cli_command(), "serve", "--host", "127.0.0.1", "--port", str(serve_port)],
            WEBHOOK_TOKEN=secret.webhook_token,
        )
        procs.spawn(
            "uvicorn",
            [
                sys.executable,
                "-m",
                "uvicorn",
                "worker.webhook.receiver:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(uvicorn_port),
                "--log-level",
                "debug",
            ],
            WEBHOOK_TOKEN=secret.webhook_token,
            LOG_FORMAT="json",
        )

        # Operators: the key comes from an environment variable, never from the command line.
        added = procs.cli(
            "auth",
            "add",
            "--label",
            "audit",
            "--api-key-env",
            "AUDIT_ATTENTIVE_KEY",
            AUDIT_ATTENTIVE_KEY=secret.api_key,
        )
        assert "••••" + secret.api_key[-4:] in added, added  # the masked hint, nothing more
        job_file = tmp_path / "job.yaml"
        job_file.write_text(JOB_FILE.format(audience=AUDIENCE))
        created = procs.cli("jobs", "create", str(job_file))
        job_id = re.search(r"created export job (\S+)", created).group(1)  # type: ignore[union-attr]

        # Flower must be listening to events before any task of interest is sent: wait until it has
        # seen the worker's event heartbeats (sweeps send no task events: tasks/sweep.py).
        def flower_sees_the_worker() -> bool:
            for name in ("flower", "worker", "beat", "serve", "uvicorn"):
                procs.alive(name)
            if not http_ok(f"{flower}/healthcheck"):
                return False
            alive = httpx.get(f"{flower}/api/workers", params={"status": "1"}, timeout=5).json()
            return any(up for name, up in alive.items() if name.startswith(f"audit-{tag}@"))

        wait_for(flower_sees_the_worker, 30, "Flower to see the worker's events", interval=0.2)
        wait_for(lambda: http_ok(f"{serve_url}/healthz"), 20, "attentive-export serve")
        wait_for(lambda: http_ok(f"{uvicorn_url}/healthz"), 20, "uvicorn worker.webhook.receiver:app")

        # A JSONL file: a canonical transition and a Lytics trigger body.
        jsonl = tmp_path / "transitions.jsonl"
        jsonl.write_text(
            canonical(file_people[0], now_iso())
            + "\n"
            + json.dumps(lytics_trigger(file_people[1], now_iso()))
            + "\n"
        )
        procs.cli("ingest", str(jsonl))

        # Webhooks, with the token in each place Lytics can put it.
        token = secret.webhook_token
        deliveries = [
            (f"{serve_url}/v1/transitions", {"Authorization": f"Bearer {token}"}),
            (f"{serve_url}/v1/transitions", {"X-Webhook-Token": token}),
            (f"{serve_url}/v1/transitions?token={token}", {}),
            (f"{serve_url}/v1/transitions?tok%65n={token}", {}),  # the name percent-encoded
        ]
        for person, (url, headers) in zip(hook_people, deliveries, strict=True):
            body = json.dumps(lytics_trigger(person, now_iso()))
            answer = httpx.post(url, content=body, headers={**hook, **headers}, timeout=10)
            assert answer.status_code == 202, (url.replace(token, "TOKEN"), answer.text)
            chunks.append(answer.json()["chunk"])
        # The module-level app (``uvicorn worker.webhook.receiver:app``) redacts the same way.
        again = json.dumps([lytics_trigger(p, now_iso()) for p in hook_people[:1]])
        answer = httpx.post(f"{uvicorn_url}/v1/transitions?tok%65n={token}", content=again, headers=hook)
        assert answer.status_code == 202, answer.text
        chunks.append(answer.json()["chunk"])
        # A name the receiver does not take (decoded once it is ``tok%65n``): refused, and still not logged.
        refused = httpx.post(f"{serve_url}/v1/transitions?tok%2565n={token}", content=again, headers=hook)
        assert refused.status_code == 401

        def delivered(person: Person) -> bool:
            user = sandbox.user(email=person.email)
            return bool(
                user
                and user["custom"].get(AUDIENCE) is True
                and user["attributes"].get("firstName") == person.first_name
                and user["identifiers"].get("phone") == person.e164
            )

        wait_for(
            lambda: all(delivered(p) for p in file_people + hook_people), 30, "every user in the sandbox"
        )

        # Attentive fails every job: the batch is sent 3 times, then dead-lettered.
        sandbox.set_options(fail_jobs=1.0)
        body = json.dumps(lytics_trigger(dead_person, now_iso()))
        answer = httpx.post(f"{serve_url}/v1/transitions?token={token}", content=body, headers=hook)
        assert answer.status_code == 202, answer.text
        chunks.append(answer.json()["chunk"])

        def dead_lettered() -> bool:
            return bool(real_redis.llen(keys.job_deadletters(job_id)))

        wait_for(dead_lettered, 30, "the failed batch to be dead-lettered")
        sandbox.set_options(fail_jobs=0.0)

        # The key is revoked in Attentive: the job pauses with the reason in its status.
        sandbox.revoke(secret.api_key)
        body = json.dumps(lytics_trigger(paused_person, now_iso()))
        answer = httpx.post(
            f"{serve_url}/v1/transitions", content=body, headers={**hook, "X-Webhook-Token": token}
        )
        assert answer.status_code == 202, answer.text
        chunks.append(answer.json()["chunk"])
        wait_for(lambda: job_status(real_redis, job_id)["state"] == "paused", 30, "the job to pause")

        everything, dead, _auths, _job = procs.cli_parallel(
            ["status", "--json"], ["deadletters", job_id], ["auth", "list"], ["jobs", "show", job_id]
        )
        status = next(j for j in json.loads(everything)["jobs"] if j["job"] == job_id)
        assert status["pause_reason"] and status["last_error"], status
        assert json.loads(dead), "a dead letter was expected"

        # Flower: wait until every webhook chunk was ingested (by drains) and Flower lists each kind
        # of task that carried them, then read its task and worker APIs.
        def flower_has_everything() -> dict[str, Any] | None:
            if any(real_redis.zscore(keys.inbox_pending(), c) is not None for c in chunks):
                return None
            tasks = flower_tasks(flower)
            listed = {t.get("name") for t in tasks.values()}
            return (
                tasks
                if listed >= {"export.ingest", "export.drain", "export.flush", "export.poll_key"}
                else None
            )

        flower_task_list = wait_for(flower_has_everything, 15, "Flower to list every kind of task")
        listed = {t["name"] for t in flower_task_list.values()}  # type: ignore[attr-defined]
        assert "export.sweep" not in listed  # sweeps run, but send no task events

        def flower_workers() -> str | None:  # refreshed: stats, queues, registered tasks, configuration
            answer = httpx.get(f"{flower}/api/workers", params={"refresh": "1"}, timeout=15)
            answer.raise_for_status()
            return answer.text if f"audit-{tag}@" in answer.text and '"conf"' in answer.text else None

        workers = wait_for(flower_workers, 15, "Flower to show the worker and its configuration")
        flower_texts = [json.dumps(flower_task_list), str(workers)]
    finally:
        procs.stop()
        commands = tap.stop()
        sandbox.reset()

    logs = procs.logs()
    secret_needles = secret.needles()
    personal = {n: f"personal data ({n})" for p in people for n in p.needles()}

    # The tap saw the traffic: every task the workload needs, each with ids for arguments.
    assert tap.complete, f"the broker tap stopped early: {tap.failure}"
    broker_values = [arg for command in commands for arg in command[1:]]
    broker_values += redis_contents(broker_db)  # and whatever is left in the broker at the end
    calls = task_calls(broker_values)
    assert {c.name for c in calls} >= {"export.ingest", "export.drain", "export.flush", "export.poll_key"}
    assert "export.sweep" in {c.name for c in calls}
    # The file's chunks travel as ids; the webhooks' as nothing at all (a drain takes what is pending).
    assert {a for c in calls if c.name == "export.ingest" for a in c.args}, "the tap missed ingest tasks"
    assert all(c.args == [] for c in calls if c.name == "export.drain")
    not_ids = [
        c
        for c in calls
        if c.kwargs
        or not all(isinstance(a, int) or (isinstance(a, str) and ID_ARG.fullmatch(a)) for a in c.args)
    ]
    assert not_ids == [], f"task arguments that are not ids: {not_ids[:5]}"

    leaks: list[str] = []
    for name, text in logs.items():  # personal data neither: bodies and records are never logged
        leaks += find({**secret_needles, **personal}, f"the {name} log", [text])
    for command, output in procs.cli_outputs:
        leaks += find(secret_needles, f"the output of `attentive-export {command}`", [output])
    leaks += find({**secret_needles, **personal}, "broker messages", broker_values)
    leaks += find({**secret_needles, **personal}, "Flower's API", flower_texts)
    data = redis_contents(real_redis)
    leaks += find(secret_needles, "the data database", data)
    assert leaks == [], "\n".join(leaks)

    # LOG_FORMAT=json took: the worker's and uvicorn's lines are JSON objects (audited above as text).
    assert '"event": "worker_ready"' in logs["worker"] and '"logger": "uvicorn.access"' in logs["uvicorn"]
    # The access logs are on, and show the percent-encoded name redacted.
    assert "tok%65n=***" in logs["serve"] and "tok%65n=***" in logs["uvicorn"], logs["serve"][-2000:]
    assert logs["serve"].count("POST /v1/transitions") >= 6
    assert 'POST /v1/transitions?*** HTTP/1.1" 401' in logs["serve"]  # tok%2565n: refused, hidden whole

    # The API key is in the data database, encrypted with EXPORT_SECRET_KEY.
    stored = [json.loads(v) for v in real_redis.hgetall(keys.authorizations()).values()]
    assert [Cipher(secret.secret_key).decrypt(a["encrypted_key"]) for a in stored] == [secret.api_key]
