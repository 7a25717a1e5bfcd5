"""Run the Attentive sandbox as a real subprocess for tests and benchmarks.

Usage::

    from tests.sandboxproc import start_sandbox

    with start_sandbox(["test-key", "readonly-key:readonly"], processing_delay=0.2) as sb:
        httpx.post(f"{sb.url}/v2/bulk/user/attributes", headers=sb.auth("test-key"), json=body)
        sb.set_faults(fault_429=0.5)          # runtime change, any option of /_sandbox/options
        sb.users(phone="+19148440001")        # what the store holds after jobs completed
        sb.requests()                         # accepted bulk requests, in arrival order
        sb.reset()                            # clear state, restore start-up options

Pytest fixtures (tests/conftest.py): ``sandbox_server`` (session: one process with tokens ``test-key``
and ``readonly-key:readonly``, processing delay 0.2 s) and ``sandbox`` (per test: the same object,
reset before the test). Point the client under test at ``sandbox.url``; it speaks Attentive's paths
(``/v2/bulk/user/attributes``, ``/v2/bulk/job/{id}``, ``/v2/me``...).

Keyword options of :func:`start_sandbox` are the CLI flags with underscores (``processing_delay=0.2``,
``completion_order="random"``, ``validation="per_record"``, ``rate_limit=0``, ``retry_after=True``,
``fault_429=0.1``, ``fault_5xx``, ``latency_ms``, ``drop_connections``, ``fail_jobs``, ``drop_jobs``,
``seed``). Admin responses are documented on each helper.

The sandbox is its own distribution (``sandbox/src/sandbox``, not in the production wheel): it must be
installed in the test environment, ``pip install -e ./sandbox`` (``make install`` does it).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
#: How long a sandbox may take to answer after being started.
START_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class SandboxProcess:
    """A running sandbox: ``url``, the subprocess, and helpers for its ``/_sandbox/`` admin API."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._http = httpx.Client(base_url=self.url, timeout=10.0)

    # -- generic

    def admin(self, method: str, path: str, json: Any = None, params: dict[str, Any] | None = None) -> Any:
        """Call ``/_sandbox/<path>`` and return its JSON; raises on a non-2xx answer."""
        response = self._http.request(method, f"/_sandbox/{path.lstrip('/')}", json=json, params=params)
        response.raise_for_status()
        return response.json()

    @staticmethod
    def auth(token: str) -> dict[str, str]:
        """The Authorization header for ``token``."""
        return {"Authorization": f"Bearer {token}"}

    # -- state

    def reset(self) -> None:
        """Clear store, jobs, logs, counters, rate buckets and clock; restore start-up options."""
        self.admin("POST", "reset")

    def options(self) -> dict[str, Any]:
        """Current options: processing_delay, completion_order, validation, rate_limit, faults..."""
        result: dict[str, Any] = self.admin("GET", "options")
        return result

    def set_options(self, **changes: Any) -> dict[str, Any]:
        """Change options at runtime (e.g. ``validation="per_record"``); returns all options."""
        result: dict[str, Any] = self.admin("PUT", "options", json=changes)
        return result

    set_faults = set_options

    def users(self, **criteria: str) -> list[dict[str, Any]]:
        """Stored users (all, or by ``phone=``/``email=``/``clientUserId=``). Each is
        ``{"id", "identifiers", "attributes", "custom", "history": [{"jobId", "completedOrder", "custom"}]}``."""
        result: list[dict[str, Any]] = self.admin("GET", "users", params=criteria)["users"]
        return result

    def user(self, **criteria: str) -> dict[str, Any] | None:
        """The one stored user matching, or None."""
        found = self.users(**criteria)
        return found[0] if found else None

    def counters(self, token: str | None = None) -> dict[str, Any]:
        """Per token: ``{"requests": {endpoint: {status: n}}, "users_per_request": {n: count},
        "max_requests_per_second": {endpoint or "budgeted": peak}}`` (status 0 = dropped connection).
        With ``token``, only that token's counters (empty dict if it made no request)."""
        tokens: dict[str, Any] = self.admin("GET", "counters")["tokens"]
        return tokens.get(token, {}) if token is not None else tokens

    def requests(self, bodies: bool = False) -> list[dict[str, Any]]:
        """Accepted bulk requests in arrival order: ``{"seq", "time", "token", "batchJobId", "users",
        "identifiers": [...], "droppedJob"}`` (+ ``"body"`` when ``bodies``)."""
        result: list[dict[str, Any]] = self.admin("GET", "requests", params={"bodies": int(bodies)})[
            "requests"
        ]
        return result

    def rejected(self) -> list[dict[str, Any]]:
        """The last rejected (400) bulk requests: ``{"time", "token", "status", "message"}``."""
        result: list[dict[str, Any]] = self.admin("GET", "requests")["rejected"]
        return result

    def jobs(self) -> list[dict[str, Any]]:
        """All jobs: ``{"bulkJobId", "status", "totalRecords", "completedOrder", "applied", ...}``."""
        result: list[dict[str, Any]] = self.admin("GET", "jobs")["jobs"]
        return result

    def set_job_status(self, job_id: str, status: str) -> dict[str, Any]:
        """Pin a job at PENDING/NEEDS_REVIEW/COMPLETED/FAILED/CANCELLED (IN_PROGRESS resumes it)."""
        result: dict[str, Any] = self.admin("POST", f"jobs/{job_id}/status", json={"status": status})
        return result

    def revoke(self, token: str) -> None:
        """Revoke a key at runtime: its requests get 401 from now on (``reset`` restores it)."""
        self.admin("DELETE", f"tokens/{token}")

    def add_token(self, spec: str) -> None:
        """Add a key at runtime, ``KEY[:readonly][,company=NAME]``."""
        self.admin("POST", "tokens", json={"token": spec})

    def advance_clock(self, seconds: float) -> None:
        """Move the sandbox clock forward (jobs fall due; records expire after 14 days)."""
        self.admin("POST", "clock", json={"advance_seconds": seconds})

    def wait_jobs_done(self, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Poll until no job is IN_PROGRESS (deadline ``timeout``); returns the jobs."""
        deadline = time.monotonic() + timeout
        while True:
            jobs = self.jobs()
            if all(j["status"] != "IN_PROGRESS" for j in jobs):
                return jobs
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs still in progress after {timeout}s")
            time.sleep(0.02)

    def log(self) -> str:
        """What the process printed so far (empty once stopped)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        self._http.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log_path.unlink(missing_ok=True)


def sandbox_command(tokens: Sequence[str], port: int, options: dict[str, Any]) -> list[str]:
    """The ``python -m sandbox`` command line for ``tokens`` and keyword ``options``."""
    cmd = [sys.executable, "-m", "sandbox", "--port", str(port)]
    for token in tokens:
        cmd += ["--token", token]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            cmd.append(flag)
        elif value is not False and value is not None:
            cmd += [flag, str(value)]
    return cmd


def _wait_ready(sb: SandboxProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sb.proc.poll() is not None:
            raise RuntimeError(f"sandbox exited with {sb.proc.returncode}:\n{sb.log()}")
        try:
            if httpx.get(f"{sb.url}/_sandbox/health", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.02)
    raise TimeoutError(f"sandbox did not answer within {timeout}s:\n{sb.log()}")


def require_sandbox() -> None:
    """Fail clearly when the sandbox distribution is not installed: from the checkout root, ``sandbox/``
    would otherwise import as an empty namespace package and ``python -m sandbox`` fail obscurely."""
    try:
        found = importlib.util.find_spec("sandbox.__main__") is not None
    except ImportError:
        found = False
    if not found:
        raise RuntimeError(
            f"the Attentive sandbox is not installed for {sys.executable}: "
            f"run `make install` or `pip install -e {ROOT / 'sandbox'}`"
        )


def launch(tokens: Sequence[str] = ("test-key",), port: int | None = None, **options: Any) -> SandboxProcess:
    """Start a sandbox subprocess and wait until it answers; the caller must ``stop()`` it."""
    require_sandbox()
    for _attempt in range(3):
        chosen = port or free_port()
        log = Path(tempfile.mkstemp(prefix="sandbox-", suffix=".log")[1])
        with log.open("wb") as out:
            proc = subprocess.Popen(
                sandbox_command(tokens, chosen, options),
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        sb = SandboxProcess(proc, chosen, log)
        try:
            _wait_ready(sb, START_TIMEOUT)
            return sb
        except (RuntimeError, TimeoutError) as exc:
            sb.stop()
            # Another process may have grabbed the free port between our probe and the bind.
            if port is not None or "address already in use" not in str(exc).lower():
                raise
    raise RuntimeError("could not find a free port for the sandbox")


@contextlib.contextmanager
def start_sandbox(
    tokens: Sequence[str] = ("test-key",), port: int | None = None, **options: Any
) -> Iterator[SandboxProcess]:
    """Context manager around :func:`launch` that always stops the process."""
    sb = launch(tokens, port, **options)
    try:
        yield sb
    finally:
        sb.stop()
