"""Shared fixtures: a real Redis (flushed per test), a fake one, and both in turn for logic tests."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import fakeredis
import pytest
import redis

from tests.slotcheck import SlotCheckedRedis
from worker.cli.localredis import LocalRedisError, Server, answers, ensure_redis

#: Tests use their own databases so they never touch data on db 0: data on 15, the Celery broker of
#: integration tests on 12. Override with TEST_REDIS_URL and TEST_BROKER_URL. When nothing answers
#: there, the session gets a private server (worker/cli/localredis.py). That is decided here, at
#: import, and written back to the environment, so every process the tests start (celery workers,
#: spawned helpers that import this module again) uses the same URLs and starts no server of its own.
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
TEST_BROKER_URL = os.environ.get("TEST_BROKER_URL", "redis://127.0.0.1:6379/12")
_servers = contextlib.ExitStack()  # closed by pytest_unconfigure (and at exit, by localredis)
_started: list[Server] = []
_no_redis = ""  # why no Redis could be had, if so

try:
    _configured = TEST_REDIS_URL
    TEST_REDIS_URL = _servers.enter_context(ensure_redis(TEST_REDIS_URL, on_start=_started.append))
    if _started and not answers(TEST_BROKER_URL):
        TEST_BROKER_URL = _started[0].url_for(TEST_BROKER_URL)  # db 12 on the same private server
    else:
        TEST_BROKER_URL = _servers.enter_context(ensure_redis(TEST_BROKER_URL, on_start=_started.append))
    os.environ.update(TEST_REDIS_URL=TEST_REDIS_URL, TEST_BROKER_URL=TEST_BROKER_URL)
except LocalRedisError as exc:
    _no_redis = f"no Redis at {_configured} and none could be started: {exc}"


def pytest_report_header() -> str:
    if _no_redis:
        return f"redis: {_no_redis}"
    how = (
        f"a private {os.path.basename(_started[0].binary)}, nothing answered" if _started else "as configured"
    )
    return f"redis: data {TEST_REDIS_URL}, broker {TEST_BROKER_URL} ({how})"


def pytest_unconfigure() -> None:
    _servers.close()


@pytest.fixture
def real_redis() -> Iterator[redis.Redis]:
    """A real Redis, emptied before and after the test. Without one (no server and none could be
    started) the test is skipped locally and fails in CI (``CI`` set)."""
    client = redis.Redis.from_url(TEST_REDIS_URL, decode_responses=False)
    try:
        client.ping()
    except redis.RedisError as exc:
        why = _no_redis or f"no Redis at {TEST_REDIS_URL}: {exc}"
        if os.environ.get("CI"):
            pytest.fail(f"CI requires a real Redis: {why}")
        pytest.skip(why)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def fake_redis() -> Iterator[fakeredis.FakeRedis]:
    """An in-process fake Redis with Lua support, for unit tests of logic. It fails the test if the
    code under test ran a MULTI block or a script on keys of several hash slots, which a Redis
    Cluster refuses (tests/slotcheck.py)."""
    client = SlotCheckedRedis()
    yield client
    client.close()
    assert not client.cross_slot, f"would fail on Redis Cluster (CROSSSLOT): {client.cross_slot[:3]}"


@pytest.fixture(params=["fake", "real"])
def any_redis(request: pytest.FixtureRequest) -> redis.Redis:
    """The fake, then the real Redis: logic runs on both, so fakeredis cannot hide a difference."""
    client: redis.Redis = request.getfixturevalue("fake_redis" if request.param == "fake" else "real_redis")
    return client


# --- Attentive sandbox (see tests/sandboxproc.py) -------------------------------------------------

from tests.sandboxproc import SandboxProcess, start_sandbox  # noqa: E402


@pytest.fixture(scope="session")
def sandbox_server() -> Iterator[SandboxProcess]:
    """One real sandbox process for the session: tokens ``test-key`` (read/write) and ``readonly-key``
    (403 on writes), jobs complete 0.2 s after submission, rate limit 100/s per token and endpoint."""
    with start_sandbox(["test-key", "readonly-key:readonly"], processing_delay=0.2) as server:
        yield server


@pytest.fixture
def sandbox(sandbox_server: SandboxProcess) -> SandboxProcess:
    """The session sandbox with its state and faults reset before this test; ``.url`` for the client."""
    sandbox_server.reset()
    return sandbox_server
