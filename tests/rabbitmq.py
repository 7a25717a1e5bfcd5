"""A private RabbitMQ virtual host per test, for integration tests that run Celery on RabbitMQ.

The server is the one on ``TEST_AMQP_URL`` (default ``amqp://guest:guest@127.0.0.1:5672//``, the
machine's RabbitMQ, also in CI). Each test gets a virtual host of its own, created before and deleted
after (with every queue, exchange and message in it), so tests never see each other's messages and
never touch anything else on the server. The vhost is made with the management API when it answers
(``TEST_RABBITMQ_API_URL``, default port 15672 of the AMQP host, same credentials), else with
``rabbitmqctl`` when it is installed and allowed. When neither works the tests use the vhost of
``TEST_AMQP_URL`` itself and delete the service's queues before and after each test: point
``TEST_AMQP_URL`` at a vhost kept for tests then.

No RabbitMQ answering: the test is skipped locally and fails in CI (``CI`` set), as with Redis.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import httpx
import pytest
from kombu import Connection

#: The service's queues (worker/celeryconfig.py).
QUEUES = ("ingest", "flush", "poll", "backfill", "sweep")
TEST_AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def _parts(url: str) -> tuple[str, str, str, str]:
    """``(host, user, password, vhost)`` of an AMQP URL (kombu's defaults: guest, guest, ``/``)."""
    parts = urlsplit(url)
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    return parts.hostname or "127.0.0.1", parts.username or "guest", parts.password or "guest", vhost


def with_vhost(url: str, vhost: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + quote(vhost, safe=""), "", ""))


def unreachable(url: str = TEST_AMQP_URL) -> str:
    """Why RabbitMQ at ``url`` cannot be used ("" when it can)."""
    try:
        with Connection(url, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1, timeout=5)
    except Exception as exc:  # refused, bad credentials, unknown vhost...
        return f"no RabbitMQ at {urlsplit(url).hostname}:{urlsplit(url).port or 5672}: {type(exc).__name__}: {exc}"
    return ""


def require_rabbitmq(url: str = TEST_AMQP_URL) -> None:
    """Skip the calling test without RabbitMQ; fail it in CI."""
    why = unreachable(url)
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI requires RabbitMQ: {why}")
        pytest.skip(why)


class _Management:
    def __init__(self, url: str) -> None:
        host, user, password, _ = _parts(url)
        base = os.environ.get("TEST_RABBITMQ_API_URL", f"http://{host}:15672")
        self.http = httpx.Client(base_url=base, auth=(user, password), timeout=5.0)
        self.user = user

    def create(self, vhost: str) -> None:
        name = quote(vhost, safe="")
        self.http.put(f"/api/vhosts/{name}").raise_for_status()
        self.http.put(
            f"/api/permissions/{name}/{quote(self.user, safe='')}",
            json={"configure": ".*", "write": ".*", "read": ".*"},
        ).raise_for_status()

    def delete(self, vhost: str) -> None:
        self.http.delete(f"/api/vhosts/{quote(vhost, safe='')}")


class _Ctl:
    def __init__(self, url: str) -> None:
        self.user = _parts(url)[1]
        self.binary = shutil.which("rabbitmqctl") or ""
        if not self.binary:
            raise FileNotFoundError("rabbitmqctl")

    def _run(self, *args: str) -> None:
        subprocess.run([self.binary, "-q", *args], check=True, capture_output=True, timeout=30)

    def create(self, vhost: str) -> None:
        self._run("add_vhost", vhost)
        self._run("set_permissions", "-p", vhost, self.user, ".*", ".*", ".*")

    def delete(self, vhost: str) -> None:
        self._run("delete_vhost", vhost)


def _admin(url: str) -> _Management | _Ctl | None:
    """Whatever can create a vhost on this server, or None."""
    probe = f"aex-probe-{secrets.token_hex(4)}"
    for make in (_Management, _Ctl):
        try:
            admin = make(url)
            admin.create(probe)
        except Exception:
            continue
        with contextlib.suppress(Exception):
            admin.delete(probe)
        return admin
    return None


_admin_found: list[_Management | _Ctl | None] = []


def delete_queues(url: str) -> None:
    """Delete the service's queues (and with them their messages) in the vhost of ``url``."""
    with Connection(url, connect_timeout=5) as conn:
        channel = conn.channel()
        for name in QUEUES:
            channel.queue_delete(name)


@contextlib.contextmanager
def private_vhost(base_url: str = TEST_AMQP_URL) -> Iterator[str]:
    """An AMQP URL for a vhost of this test's own (see the module docstring); skips or fails the test
    without RabbitMQ."""
    require_rabbitmq(base_url)
    if not _admin_found:
        _admin_found.append(_admin(base_url))
    admin = _admin_found[0]
    if admin is None:
        delete_queues(base_url)
        try:
            yield base_url
        finally:
            delete_queues(base_url)
        return
    vhost = f"aex-test-{os.getpid()}-{secrets.token_hex(4)}"
    admin.create(vhost)
    try:
        yield with_vhost(base_url, vhost)
    finally:
        admin.delete(vhost)
