"""A fake Redis that notes what a Redis Cluster would refuse: MULTI blocks, commands in a pipeline and
script calls whose keys span hash slots (CROSSSLOT there; outside a pipeline redis-py's cluster client
splits a multi-key DEL or EXISTS by slot itself). Unit tests get it as ``fake_redis`` (tests/conftest.py), which
fails a test that caused one, so every code path the unit tests run is checked for Cluster without
a cluster. Keys a script derives inside Lua are checked by the cluster test instead
(tests/integration/test_redis_cluster.py, which watches every command scripts run).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import fakeredis
import redis
from redis.cluster import key_slot

#: Commands with no key (or none that decides a slot).
_KEYLESS = frozenset({"MULTI", "EXEC", "DISCARD", "UNWATCH", "TIME", "PING", "ECHO", "SCRIPT LOAD"})
#: Commands whose every argument is a key.
_ALL_KEYS = frozenset({"DEL", "UNLINK", "EXISTS", "TOUCH", "WATCH", "MGET"})


def command_keys(args: Sequence[Any]) -> list[bytes]:
    """The keys of one command as the service sends them (its first argument, or all of them)."""
    name = str(args[0]).upper()
    if name in _KEYLESS or len(args) < 2:
        return []
    if name in _ALL_KEYS:
        picked = list(args[1:])
    elif name in ("RENAME", "RENAMENX", "SMOVE", "LMOVE", "RPOPLPUSH"):
        picked = list(args[1:3])
    elif name in ("MSET", "MSETNX"):
        picked = list(args[1::2])
    else:
        picked = [args[1]]
    return [k if isinstance(k, bytes) else str(k).encode() for k in picked]


def _slots(found: list[bytes]) -> set[int]:
    return {key_slot(k) for k in found}


def _check_command(notes: list[str], args: Sequence[Any]) -> None:
    """Note a pipelined command whose own keys span slots (``DEL a b`` with ``a`` and ``b`` apart):
    redis-py's cluster pipeline refuses it."""
    keys = command_keys(args)
    if len(_slots(keys)) > 1:
        notes.append(f"{str(args[0]).upper()} on {len(_slots(keys))} slots: {sorted(set(keys))}")


class SlotCheckedPipeline(redis.client.Pipeline):
    """A pipeline that, when transactional, notes a WATCH/MULTI block touching several slots."""

    def __init__(self, notes: list[str], *args: Any, **kwargs: Any) -> None:
        self._notes = notes
        self._block_keys: list[bytes] = []
        super().__init__(*args, **kwargs)

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        _check_command(self._notes, args)
        if self.transaction:
            self._block_keys += command_keys(args)
        return super().execute_command(*args, **kwargs)

    def reset(self) -> None:
        keys = getattr(self, "_block_keys", [])
        if len(_slots(keys)) > 1:
            self._notes.append(f"MULTI/WATCH block on {len(_slots(keys))} slots: {sorted(set(keys))}")
        self._block_keys = []
        super().reset()


class SlotCheckedRedis(fakeredis.FakeRedis):
    """``fakeredis.FakeRedis`` whose :attr:`cross_slot` lists what a Redis Cluster would refuse."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cross_slot: list[str] = []

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> SlotCheckedPipeline:
        return SlotCheckedPipeline(
            self.cross_slot, self.connection_pool, self.response_callbacks, transaction, shard_hint
        )

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:  # type: ignore[override]
        self._check_script(keys_and_args[:numkeys])
        return super().evalsha(sha, numkeys, *keys_and_args)

    def eval(self, script: str, numkeys: int, *keys_and_args: Any) -> Any:  # type: ignore[override]
        self._check_script(keys_and_args[:numkeys])
        return super().eval(script, numkeys, *keys_and_args)

    def _check_script(self, declared: Sequence[Any]) -> None:
        keys = command_keys(["EXISTS", *declared])
        if len(_slots(keys)) > 1:
            self.cross_slot.append(f"script call with keys on {len(_slots(keys))} slots: {keys}")
