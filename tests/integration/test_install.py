"""The production distribution installs and runs from any directory, and carries no sandbox.

Once per session a fresh virtual environment gets ``pip install <repository root>``: non-editable, as
in the Dockerfile, with pip's cache reused. Then, from a directory outside the checkout, each test runs
the installed commands: a ``celery -A worker.app worker`` executes a task sent by name,
``attentive-export status`` answers, and ``import sandbox`` fails (the sandbox is its own distribution,
``sandbox/pyproject.toml``).

The wheel is built with setuptools' ``build``/``egg_info`` directories redirected to the session's
temporary directory (``DIST_EXTRA_CONFIG``): nothing is written into the checkout, and a stale
``build/lib`` left there by an earlier build cannot slip old files (say, a sandbox) into the wheel.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import redis

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
#: Creating the environment and installing every dependency (from pip's cache once it is warm).
INSTALL_TIMEOUT = 600
#: Bound on each command run in the installed environment.
COMMAND_TIMEOUT = 60
#: Environment variables of this process that must not leak into the installed environment's.
_LEAKY_PREFIXES = ("PYTHON", "VIRTUAL_ENV", "CELERY_", "REDIS_", "ATTENTIVE_", "EXPORT_", "LYTICS_")


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without anything that could point the subprocess at the checkout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LEAKY_PREFIXES)}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def _redis_url(client: redis.Redis) -> str:
    """The URL of the Redis behind ``client`` (the ``real_redis`` fixture's, wherever that one lives)."""
    kwargs = client.connection_pool.connection_kwargs
    password = kwargs.get("password")
    auth = f"{quote(kwargs.get('username') or '', safe='')}:{quote(password, safe='')}@" if password else ""
    db = kwargs.get("db") or 0
    if kwargs.get("path"):
        return f"unix://{auth}{kwargs['path']}?db={db}"
    scheme = "rediss" if "SSL" in client.connection_pool.connection_class.__name__ else "redis"
    return f"{scheme}://{auth}{kwargs.get('host') or '127.0.0.1'}:{kwargs.get('port') or 6379}/{db}"


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``bin/`` of a fresh virtual environment holding the production install of this checkout."""
    base = tmp_path_factory.mktemp("install")
    venv = base / "venv"
    build = base / "build"
    build.mkdir()
    config = build / "build.cfg"
    config.write_text(f"[build]\nbuild_base = {build / 'build'}\n\n[egg_info]\negg_base = {build}\n")
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", str(ROOT)],
    ]
    for cmd in steps:
        try:
            done = subprocess.run(
                cmd,
                cwd=base,
                env=_clean_env(DIST_EXTRA_CONFIG=str(config)),
                capture_output=True,
                text=True,
                timeout=INSTALL_TIMEOUT,
            )
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"{' '.join(cmd)} did not finish within {exc.timeout}s")
        if done.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} exited with {done.returncode}:\n{_tail(done.stdout + done.stderr)}")
    return venv / "bin"


def _run(bin_dir: Path, args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(bin_dir / args[0]), *args[1:]],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
    )


@contextlib.contextmanager
def _process(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process in its own group, always stopped on exit: TERM, then KILL after 15 s."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield proc
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=15)
                break
            except subprocess.TimeoutExpired:
                continue
        # Pool children or anything else left in the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def _wait_for_log(proc: subprocess.Popen[bytes], log: Path, pattern: str, timeout: float) -> str:
    """Wait until the log matches ``pattern`` (regex); fail if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text(errors="replace")
        if re.search(pattern, text):
            return text
        if proc.poll() is not None:
            pytest.fail(f"process exited with {proc.returncode} before {pattern!r}:\n{_tail(text)}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {pattern!r} within {timeout}s:\n{_tail(text)}")
        time.sleep(0.1)


@pytest.mark.timeout(INSTALL_TIMEOUT + 300)
def test_installed_worker_executes_a_task_from_outside_the_checkout(
    installed: Path, real_redis: redis.Redis, tmp_path: Path
) -> None:
    url = _redis_url(real_redis)
    # A queue of its own, so no other worker on this Redis can take the task.
    queue = f"install-check-{uuid.uuid4().hex[:12]}"
    # As the README says: a worker needs a secret key, and the installed CLI makes one.
    made = _run(installed, ["attentive-export", "secret-key"], tmp_path, _clean_env())
    assert made.returncode == 0, made.stdout + made.stderr
    env = _clean_env(REDIS_URL=url, CELERY_BROKER_URL=url, EXPORT_SECRET_KEY=made.stdout.strip())
    log = tmp_path / "worker.log"
    worker = [
        str(installed / "celery"),
        "-A",
        "worker.app",
        "worker",
        "-Q",
        queue,
        "-n",
        f"{queue}@%h",
        "-P",
        "solo",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "-l",
        "INFO",
    ]
    with _process(worker, tmp_path, env, log) as proc:
        _wait_for_log(proc, log, r"\bready\.", COMMAND_TIMEOUT)
        sent = _run(
            installed, ["celery", "-A", "worker.app", "call", "export.sweep", "--queue", queue], tmp_path, env
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr
        task_id = sent.stdout.strip().splitlines()[-1]
        assert re.fullmatch(r"[0-9a-f-]{36}", task_id), sent.stdout
        text = _wait_for_log(proc, log, rf"Task export\.sweep\[{task_id}\] succeeded", COMMAND_TIMEOUT)
    # Every task module of the installed package registered (the banner's task list).
    assert all(f". export.{name}" in text for name in ("ingest", "flush", "poll", "sweep", "backfill")), text


@pytest.mark.timeout(INSTALL_TIMEOUT + 120)
def test_installed_cli_reports_status_from_outside_the_checkout(
    installed: Path, real_redis: redis.Redis, tmp_path: Path
) -> None:
    url = _redis_url(real_redis)
    done = _run(installed, ["attentive-export", "status", "--json"], tmp_path, _clean_env(REDIS_URL=url))
    assert done.returncode == 0, done.stdout + done.stderr
    status = json.loads(done.stdout)
    assert status["jobs"] == []  # the test database is empty
    assert "ingest" in status


@pytest.mark.timeout(INSTALL_TIMEOUT + 120)
def test_installed_distribution_is_the_product_without_the_sandbox(installed: Path, tmp_path: Path) -> None:
    env = _clean_env()
    no_sandbox = _run(installed, ["python", "-c", "import sandbox"], tmp_path, env)
    assert no_sandbox.returncode != 0
    assert "No module named 'sandbox'" in no_sandbox.stderr

    probe = (
        "import importlib.metadata as m, json, worker, tasks; "
        "print(json.dumps({'worker': worker.__file__, 'tasks': tasks.__file__, "
        "'files': [str(f) for f in m.files('attentive-audience-export') or []]}))"
    )
    done = _run(installed, ["python", "-c", probe], tmp_path, env)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    venv = installed.parent.resolve()
    # Imported from the environment's site-packages, not from the checkout.
    for module in ("worker", "tasks"):
        assert Path(found[module]).resolve().is_relative_to(venv), found[module]
    files = found["files"]
    tops = {f.split("/", 1)[0] for f in files if not f.startswith(("..", "attentive_audience_export-"))}
    assert tops == {"worker", "tasks"}, tops
    # The Lua scripts travel as package data.
    lua = sorted(f for f in files if f.endswith(".lua"))
    expected = sorted(f"worker/store/lua/{p.name}" for p in (ROOT / "worker" / "store" / "lua").glob("*.lua"))
    assert expected and lua == expected
