"""Saving authorizations against the local Attentive sandbox over real HTTP, stored in a real Redis.

``readonly-key`` passes ``/v2/me`` too: ``/me`` does not report permissions (CONTRACT.md §3), so a key
without write access cannot be refused at save time. It surfaces as a 403 on the first bulk write, which
pauses the export job.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis

from tests.sandboxproc import SandboxProcess
from worker.clients.attentive import AttentiveClient
from worker.setup.authorizations import AuthorizationRejected, AuthorizationStore
from worker.setup.crypto import generate_secret_key
from worker.store import keys

pytestmark = pytest.mark.integration


def factory(sandbox: SandboxProcess) -> Callable[[str], AttentiveClient]:
    return lambda api_key: AttentiveClient(api_key, base_url=sandbox.url, max_attempts=1)


def test_valid_key_is_saved_with_the_company_name(real_redis: redis.Redis, sandbox: SandboxProcess) -> None:
    store = AuthorizationStore(real_redis, generate_secret_key(), client_factory=factory(sandbox))
    auth = store.create("sandbox", "test-key", description="local sandbox")
    assert auth.company_name == "Sandbox Company"
    assert auth.key_hint == "••••ey"  # a short (8-character) key shows only a quarter of itself
    assert store.api_key("sandbox") == "test-key"
    raw = real_redis.hget(keys.authorizations(), auth.id)
    assert raw is not None and b"test-key" not in raw


def test_unknown_key_is_refused_with_401_and_nothing_stored(
    real_redis: redis.Redis, sandbox: SandboxProcess
) -> None:
    store = AuthorizationStore(real_redis, generate_secret_key(), client_factory=factory(sandbox))
    with pytest.raises(AuthorizationRejected) as info:
        store.create("sandbox", "no-such-key")
    assert str(info.value) == "Attentive rejected the API key (401 Unauthorized): check the key"
    assert real_redis.hlen(keys.authorizations()) == 0


def test_readonly_key_passes_me_because_me_does_not_report_permissions(
    real_redis: redis.Redis, sandbox: SandboxProcess
) -> None:
    store = AuthorizationStore(real_redis, generate_secret_key(), client_factory=factory(sandbox))
    auth = store.create("readonly", "readonly-key")
    assert auth.company_name == "Sandbox Company"
