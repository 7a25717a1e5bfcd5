"""The Lua script registry: each script read once, registered once per client, NOSCRIPT-safe."""

from __future__ import annotations

import fakeredis

from worker.store import scripts


def test_a_script_is_registered_once_per_client() -> None:
    one, other = fakeredis.FakeRedis(), fakeredis.FakeRedis()
    first = scripts.script(one, "ratelimit_acquire")
    assert scripts.script(one, "ratelimit_acquire") is first
    assert scripts.script(other, "ratelimit_acquire") is not first
    assert scripts.script(one, "buffer") is not first
    assert first.script == scripts.source("ratelimit_acquire")


def test_a_script_runs_again_after_redis_forgets_it() -> None:
    client = fakeredis.FakeRedis()
    acquire = scripts.script(client, "ratelimit_acquire")
    keys = ["aex:{rl:t}:tat", "aex:{rl:t}:backoff"]
    assert int(acquire(keys=keys, args=[1_000_000, 2, 0])[0]) == 0
    client.script_flush()  # a Redis restart or failover empties the script cache
    assert int(scripts.script(client, "ratelimit_acquire")(keys=keys, args=[1_000_000, 2, 0])[0]) == 0
