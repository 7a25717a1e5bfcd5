"""Processes of a chaos run: a Redis that can be killed and restarted from its append-only file, and a
fleet of subprocesses (sandbox, proxy, webhook receiver, celery workers and beats, CLI commands), each
in its own process group so a kill reaches a worker's pool processes too, all stopped in ``finally``.

Linux only (``/proc``): the harness maps a worker's TCP port to its process to kill the one whose
flush holds a batch in flight, and reads each process's resident memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

from worker.cli.localredis import free_port, server_binary

ROOT = Path(__file__).resolve().parents[2]


def _die_with_parent() -> Callable[[], None] | None:
    """The child gets SIGKILL when the harness dies (even by SIGKILL): nothing outlives a run."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return lambda: prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.1) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def require_harness() -> None:
    """Skip (fail in CI) a test of these harnesses where they cannot run: they read /proc and
    start their own redis-server."""
    import pytest

    from worker.cli.localredis import LocalRedisError, server_binary

    if not sys.platform.startswith("linux"):
        pytest.skip("the harness reads /proc (Linux)")
    try:
        server_binary()
    except LocalRedisError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI requires a Redis server binary: {exc}")
        pytest.skip(str(exc))


def wait_http(url: str, what: str, timeout: float) -> None:
    """Wait until ``url`` answers 200 (a process's health route)."""

    def up() -> bool:
        try:
            return httpx.get(url, timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(up, timeout, what, 0.1)


class AofRedis:
    """A private redis-server with the append-only file on, killed with SIGKILL and started again on
    the same port from the same directory."""

    def __init__(self, workdir: Path, appendfsync: str = "everysec") -> None:
        self.binary = server_binary()
        self.dir = workdir / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        if self.port == 6379:  # never the shared Redis
            self.port = free_port()
        self.appendfsync = appendfsync
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        #: (killed at, answering again at) per kill, time.time() seconds
        self.outages: list[list[float]] = []

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self, timeout: float = 30.0) -> None:
        self.starts += 1
        args = [
            self.binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.dir),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            self.appendfsync,
            "--maxmemory-policy",
            "noeviction",
        ]
        with (self.dir / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent(),
            )
        wait_until(self.ready, timeout, f"redis-server on port {self.port} (start {self.starts})")
        if self.outages and self.outages[-1][1] == 0.0:
            self.outages[-1][1] = time.time()

    def ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"redis-server exited with {self.proc.returncode}; see {self.dir / 'redis.log'}"
            )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            return bool(client.ping()) and client.info("persistence")["loading"] == 0
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown, nothing saved beyond what the append-only file already holds."""
        if self.proc is not None and self.proc.poll() is None:
            self.outages.append([time.time(), 0.0])
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)

    def aof_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.dir.rglob("*.aof"))


@dataclass
class Proc:
    name: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    started: float
    #: set when the harness killed or stopped it on purpose
    expected_exit: bool = False


@dataclass
class Fleet:
    """Every subprocess of the run, by name; logs in ``logdir``."""

    logdir: Path
    env: dict[str, str]
    procs: dict[str, Proc] = field(default_factory=dict)
    #: every process group ever started (for the final sweep)
    groups: set[int] = field(default_factory=set)
    #: unexpected exits: (name, time, return code)
    crashes: list[tuple[str, float, int]] = field(default_factory=list)

    def spawn(
        self, name: str, argv: Sequence[str], env: dict[str, str] | None = None, log_name: str | None = None
    ) -> Proc:
        log = (self.logdir / f"{log_name or name}.log").open("ab")
        log.write(f"\n==== {time.strftime('%H:%M:%S')} start {' '.join(argv)}\n".encode())
        log.flush()
        popen = subprocess.Popen(
            list(argv),
            cwd=ROOT,
            env=env or self.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent(),
        )
        log.close()
        self.groups.add(popen.pid)
        proc = Proc(name, list(argv), popen, time.time())
        self.procs[name] = proc
        return proc

    def alive(self, name: str) -> bool:
        proc = self.procs.get(name)
        return proc is not None and proc.popen.poll() is None

    def kill_group(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.get(name)
        if proc is None:
            return
        proc.expected_exit = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.popen.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=15)

    def reap_crashes(self, names: Sequence[str]) -> list[str]:
        """Names among ``names`` whose process ended without the harness asking; recorded once."""
        ended = []
        for name in names:
            proc = self.procs.get(name)
            if proc is None or proc.expected_exit or proc.popen.poll() is None:
                continue
            proc.expected_exit = True
            self.crashes.append((name, time.time(), proc.popen.returncode))
            ended.append(name)
        return ended

    def stop_all(self) -> None:
        """SIGTERM every group, then SIGKILL what is left; safe to call twice."""
        for proc in self.procs.values():
            proc.expected_exit = True
        for pgid in self.groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + 8
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        for pgid in self.groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=5)


# --- /proc helpers ---------------------------------------------------------------------------------------
def children(pid: int) -> list[int]:
    """Direct children of ``pid``."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(p) for p in path.read_text().split()]
    except (OSError, ValueError):
        pass
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            out.append(int(entry.name))
    return out


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def tree_rss(pid: int) -> int:
    return rss_bytes(pid) + sum(rss_bytes(c) for c in children(pid))


def socket_inode(local_port: int, remote_port: int) -> int | None:
    """Inode of the 127.0.0.1 TCP socket from ``local_port`` to ``remote_port``."""
    want_local = f":{local_port:04X}"
    want_remote = f":{remote_port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9 and parts[1].endswith(want_local) and parts[2].endswith(want_remote):
                return int(parts[9])
    return None


def pid_holding(inode: int, candidates: Sequence[int]) -> int | None:
    target = f"socket:[{inode}]"
    for pid in candidates:
        fd_dir = Path(f"/proc/{pid}/fd")
        try:
            for fd in fd_dir.iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) == target:
                        return pid
        except OSError:
            continue
    return None


def ports_to(pids: Sequence[int], remote_port: int) -> list[int]:
    """Local ports of the TCP connections that ``pids`` hold to 127.0.0.1:``remote_port``."""
    inodes: set[int] = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    link = os.readlink(fd)
                    if link.startswith("socket:["):
                        inodes.add(int(link[8:-1]))
        except OSError:
            continue
    want_remote = f":{remote_port:04X}"
    ports = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9 and parts[2].endswith(want_remote) and int(parts[9]) in inodes:
                ports.append(int(parts[1].rsplit(":", 1)[1], 16))
    return ports
