"""Shared fixtures: a real Redis (flushed per test) and a fake one for fast unit tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import fakeredis
import pytest
import redis

#: Tests use their own database so they never touch data on db 0. Override with TEST_REDIS_URL.
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def _redis_or_none() -> redis.Redis | None:
    client = redis.Redis.from_url(TEST_REDIS_URL, decode_responses=False)
    try:
        client.ping()
    except redis.RedisError:
        return None
    return client


@pytest.fixture
def real_redis() -> Iterator[redis.Redis]:
    """A real Redis, emptied before and after the test. In CI a missing Redis is a failure, not a skip."""
    client = _redis_or_none()
    if client is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI requires a real Redis at {TEST_REDIS_URL}")
        pytest.skip(f"no Redis at {TEST_REDIS_URL}")
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def fake_redis() -> Iterator[fakeredis.FakeRedis]:
    """An in-process fake Redis with Lua support, for unit tests of logic."""
    client = fakeredis.FakeRedis()
    yield client
    client.close()


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
