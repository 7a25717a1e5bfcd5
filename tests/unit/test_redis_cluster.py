"""Redis Cluster without a cluster: which keys share a slot, how a cluster URL is read and refused,
and the fake Redis that fails unit tests on a cross-slot MULTI or script (tests/slotcheck.py).
The pipeline on a real three-master cluster: tests/integration/test_redis_cluster.py."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest
import redis
from redis.cluster import key_slot

from tests.slotcheck import SlotCheckedRedis
from worker.backfill import steps as backfill
from worker.settings import SettingsError, load_settings
from worker.store import keys
from worker.store.connection import connect, is_cluster

from .test_backfill import Dispatcher

#: Job ids, including ones with the characters that delimit a hash tag.
JOB_IDS = ["1a2b3c4d", "x", "a}b", "{c}", "d{e", ""]


def slot(key: str) -> int:
    return key_slot(key.encode())


def per_job_keys(job_id: str) -> dict[str, str]:
    """Every key function of ``worker.store.keys`` that takes a job id, applied to ``job_id``."""
    out = {}
    for name, fn in inspect.getmembers(keys, inspect.isfunction):
        params = list(inspect.signature(fn).parameters)
        if name.startswith("_") or not params or params[0] != "job_id" or name.endswith("_match"):
            continue
        extra: list[Any] = {"part": ["vip"], "batch_id": [7], "bucket": [3], "chunk_id": ["c1"]}.get(
            params[1] if len(params) > 1 else "", []
        )
        out[name] = fn(job_id, *extra)
    return out


@pytest.mark.parametrize("job_id", JOB_IDS)
def test_every_key_of_a_job_is_on_the_slot_of_its_tag(job_id: str) -> None:
    found = per_job_keys(job_id)
    assert {"job_status", "batch", "last_writer_bucket", "backfill_due", "backfill_part"} <= set(found)
    assert {slot(k) for k in found.values()} == {slot(keys.job_status(job_id))}, found


def test_jobs_spread_over_slots() -> None:
    assert len({slot(keys.job_status(f"{n:08x}")) for n in range(200)}) > 190


def test_the_job_table_and_its_version_counter_share_a_slot_and_the_table_keeps_its_name() -> None:
    assert keys.jobs() == "aex:jobs"  # existing deployments' jobs stay where they are
    assert slot(keys.jobs_version()) == slot(keys.jobs())
    assert keys.jobs_version().startswith(f"{keys.PREFIX}:")


def test_an_api_keys_limiter_streak_and_poller_share_a_slot() -> None:
    names: list[Callable[[str], str]] = [
        keys.ratelimit,
        keys.ratelimit_backoff,
        keys.ratelimit_streak,
        keys.poller_lock,
        keys.poller_queued,
    ]
    assert len({slot(fn("0123456789abcdef")) for fn in names}) == 1


# --- the fake that fails unit tests on what a cluster refuses ---------------------------------------


def test_the_fake_notes_a_multi_across_slots_and_lets_one_slot_through() -> None:
    client = SlotCheckedRedis()
    pipe = client.pipeline(transaction=True)
    pipe.hset(keys.job_status("a"), "x", 1)
    pipe.zadd(keys.leases("a"), {"1": 1})
    pipe.execute()
    assert client.cross_slot == []
    with client.pipeline(transaction=True) as pipe:
        pipe.watch(keys.jobs())
        pipe.hvals(keys.jobs())
        pipe.multi()
        pipe.hset(keys.jobs(), "j", "{}")
        pipe.incr("aex:jobs:version")  # the counter's name before it shared the table's slot
        pipe.execute()
    assert len(client.cross_slot) == 1 and "2 slots" in client.cross_slot[0]
    nontransactional = client.pipeline(transaction=False)
    nontransactional.get(keys.open_since("a"))
    nontransactional.get(keys.open_since("b"))
    nontransactional.execute()  # a cluster client splits these by node
    assert len(client.cross_slot) == 1
    nontransactional.delete(keys.inbox_chunk("c1"), keys.inbox_claim("c1"))  # one slot by design
    nontransactional.execute()
    assert len(client.cross_slot) == 1
    nontransactional.delete(keys.inbox_chunk("c1"), keys.inbox_chunk("c2"))
    nontransactional.execute()  # but not one command of a pipeline on two slots
    assert len(client.cross_slot) == 2 and "DEL on 2 slots" in client.cross_slot[1]


def test_the_fake_notes_a_script_declaring_keys_of_two_slots() -> None:
    client = SlotCheckedRedis()
    client.eval("return 1", 2, keys.job_status("a"), keys.leases("a"))
    assert client.cross_slot == []
    client.eval("return 1", 2, keys.job_status("a"), keys.job_status("b"))
    assert len(client.cross_slot) == 1


# --- the re-drive schedule, per job since Redis Cluster support -------------------------------------


def test_the_sweep_moves_the_old_shared_schedule_into_the_jobs_own(fake_redis: redis.Redis) -> None:
    fake_redis.hset(keys.jobs(), mapping={"j1": "{}", "j2": "{}"})  # (only the ids are read)
    fake_redis.zadd(
        keys.legacy_backfill_due(), {"j1|vip": 100, "j2|@file": 5_000, "j2|@ops": 50, "gone|vip": 1}
    )
    dispatch = Dispatcher()
    assert backfill.redrive_stalled(fake_redis, dispatch, now=1_000) == 2
    assert sorted(dispatch.backfills) == [("j1", "vip", 0.0), ("j2", "@ops", 0.0)]
    assert not fake_redis.exists(keys.legacy_backfill_due())
    assert fake_redis.zscore(keys.backfill_due("j2"), "@file") == 5_000  # kept its time
    assert fake_redis.zscore(keys.backfill_due("j1"), "vip") == 1_000 + backfill.STALL_MS  # pushed on
    assert not fake_redis.exists(keys.backfill_due("gone"))  # a deleted job's entry just goes
    assert backfill.redrive_stalled(fake_redis, dispatch, now=2_000) == 0


# --- connecting -------------------------------------------------------------------------------------


def test_a_single_server_url_gets_a_plain_client_lazily() -> None:
    client = connect("redis://127.0.0.1:1/3", socket_timeout=1.0, health_check_interval=30)
    assert type(client) is redis.Redis and not is_cluster(client)
    assert client.connection_pool.connection_kwargs["db"] == 3


def test_a_cluster_that_cannot_be_reached_is_a_connection_error() -> None:
    """So tasks retry it like any Redis outage (worker.runtime.REDIS_DOWN)."""
    with pytest.raises(redis.ConnectionError, match="Redis Cluster cannot be connected"):
        connect("redis+cluster://127.0.0.1:1", socket_connect_timeout=0.5, health_check_interval=30)


@pytest.mark.parametrize(
    ("env", "says"),
    [
        (
            {"REDIS_URL": "redis+cluster://cache:7000"},
            "CELERY_BROKER_URL: must be set when REDIS_URL is a Redis Cluster",
        ),
        (
            {"REDIS_URL": "redis://cache:6379/0", "CELERY_BROKER_URL": "redis+cluster://cache:7000"},
            "CELERY_BROKER_URL: cannot be a Redis Cluster",
        ),
        (
            {"REDIS_URL": "redis+cluster://cache:7000/2", "CELERY_BROKER_URL": "redis://b:6379/0"},
            "REDIS_URL: a Redis Cluster has database 0 only",
        ),
        (
            {"REDIS_URL": "redis+cluster:///x", "CELERY_BROKER_URL": "redis://b:6379/0"},
            "REDIS_URL: a Redis Cluster URL must name a node",
        ),
    ],
)
def test_a_cluster_url_that_cannot_work_is_one_line(env: dict[str, str], says: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(env)
    assert str(info.value).startswith(says)


@pytest.mark.parametrize("url", ["redis+cluster://cache:7000", "rediss+cluster://:pw@cache:7000/0"])
def test_a_cluster_url_with_its_own_broker_is_accepted(url: str) -> None:
    settings = load_settings({"REDIS_URL": url, "CELERY_BROKER_URL": "amqp://guest:guest@mq:5672//"})
    assert (settings.redis_url, settings.broker_url) == (url, "amqp://guest:guest@mq:5672//")
