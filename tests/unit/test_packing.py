"""Commands packed by hiredis in one call (worker.store.packing): the same bytes and the same
errors as redis-py's own packer, and every single-server client of the service uses it."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
import redis
from redis._parsers.encoders import Encoder
from redis.connection import HiredisRespSerializer, PythonRespSerializer

from tests.conftest import TEST_REDIS_URL
from worker.store.connection import connect
from worker.store.packing import HiredisPacker


def _redis_py() -> Any:
    """redis-py's packer as a connection builds it by default (hiredis installed); typed Any, as
    redis-py annotates ``pack(*args: List)``."""
    encode = Encoder("utf-8", "strict", False).encode  # type: ignore[no-untyped-call]
    return HiredisRespSerializer(PythonRespSerializer(6000, encode).pack, encode)  # type: ignore[no-untyped-call]


def _bytes(chunks: list[bytes] | list[bytes | memoryview]) -> bytes:
    return b"".join(bytes(c) for c in chunks)


ODD_VALUES = [
    "",
    "plain",
    "é ü 中文 🙂",
    "tab\tnew\nline",
    b"",
    b"\x00\xff\r\n",
    memoryview(b"viewed"),
    bytearray(b"mutable"),
    0,
    -1,
    2**63,
    -(10**30),
    0.1,
    -0.0,
    1e20,
    1e-7,
    math.inf,
    -math.inf,
    123456789.123456789,
]


@pytest.mark.parametrize("value", ODD_VALUES, ids=repr)
def test_every_argument_type_packs_to_the_bytes_redis_py_writes(value: object) -> None:
    ours, theirs = HiredisPacker(), _redis_py()
    args = ("EVALSHA", "f" * 40, 2, "k1", "k2", value, "tail")
    assert _bytes(ours.pack(*args)) == _bytes(theirs.pack(*args))


def test_random_floats_and_a_long_script_call_pack_alike() -> None:
    rng = random.Random(7)
    args: list[object] = ["EVALSHA", "f" * 40, 1, "key"]
    for i in range(3000):
        args += [f"user{i}@example.com", rng.random() * 10 ** rng.randint(-12, 20), b'{"a":1}', i]
    assert _bytes(HiredisPacker().pack(*args)) == _bytes(_redis_py().pack(*args))


def test_a_command_name_of_two_words_is_split_as_redis_py_splits_it() -> None:
    for name in ("CONFIG GET", b"CONFIG GET"):
        packed = _bytes(HiredisPacker().pack(name, "maxmemory"))
        assert packed == _bytes(_redis_py().pack(name, "maxmemory"))
        assert packed.startswith(b"*3\r\n$6\r\nCONFIG\r\n$3\r\nGET\r\n")


@pytest.mark.parametrize("bad", [None, True, False, object()], ids=repr)
def test_a_value_redis_py_refuses_is_refused_with_its_error(bad: object) -> None:
    with pytest.raises(redis.DataError):
        _redis_py().pack("SET", "k", bad)
    with pytest.raises(redis.DataError):
        HiredisPacker().pack("SET", "k", bad)


def test_text_that_is_not_utf8_encodable_fails_as_with_redis_py() -> None:
    lone_surrogate = "\ud800"
    with pytest.raises(UnicodeEncodeError):
        _redis_py().pack("SET", "k", lone_surrogate)
    with pytest.raises(UnicodeEncodeError):
        HiredisPacker().pack("SET", "k", lone_surrogate)


def test_another_encoding_is_left_to_redis_py() -> None:
    latin = HiredisPacker(encoding="latin-1")
    assert _bytes(latin.pack("SET", "k", "é")) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n\xe9\r\n"


def test_single_server_clients_pack_with_it_and_round_trip_on_a_real_redis(real_redis: redis.Redis) -> None:
    client = connect(TEST_REDIS_URL)
    try:
        connection = client.connection_pool.get_connection()
        try:
            assert isinstance(connection._command_packer, HiredisPacker)
        finally:
            client.connection_pool.release(connection)
        key = "aex:test:packing"
        values = [v for v in ODD_VALUES if not isinstance(v, float) or math.isfinite(v)]
        with client.pipeline(transaction=False) as pipe:
            pipe.delete(key)
            pipe.rpush(key, *values)  # type: ignore[arg-type]
            pipe.lrange(key, 0, -1)
            stored = pipe.execute()[-1]
        assert stored == [
            bytes(v) if isinstance(v, bytes | bytearray | memoryview) else str(v).encode() for v in values
        ]
        echo = client.register_script("return ARGV")
        assert echo(keys=[key], args=["é", 2**63, b"\x00"]) == ["é".encode(), b"9223372036854775808", b"\x00"]
    finally:
        client.close()


def test_ordinary_commands_never_reach_redis_pys_per_argument_loop() -> None:
    class Refuse:
        def pack(self, *args: object) -> list[bytes]:
            raise AssertionError(f"fell back for {args[0]!r}")

    packer = HiredisPacker()
    packer._fallback = Refuse()
    args = ["EVALSHA", "f" * 40, 1, "key", *["é", b"\x00", 7, 0.5, memoryview(b"m")] * 600]
    assert _bytes(packer.pack(*args)) == _bytes(_redis_py().pack(*args))
