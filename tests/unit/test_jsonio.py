"""``worker.jsonio.loads``: orjson's speed, the standard library's leniency, one kind of error."""

from __future__ import annotations

import json
import math

import pytest

from worker.jsonio import loads


def test_what_orjson_reads_comes_back_as_is() -> None:
    assert loads(b'{"a":[1,2.5,"x",null,true]}') == {"a": [1, 2.5, "x", None, True]}
    assert loads('"zoë"') == "zoë"


def test_what_only_the_standard_library_reads_is_still_read() -> None:
    data = loads(b'{"ltv": NaN, "max": Infinity, "big": 123456789012345678901234567890}')
    assert math.isnan(data["ltv"]) and data["max"] == math.inf
    assert data["big"] == 123456789012345678901234567890


@pytest.mark.parametrize("text", [b"", b"{", b"not json", '{"a": 1,}', b'{"a":1} trailing'])
def test_not_json_is_a_decode_error_with_a_position(text: str | bytes) -> None:
    with pytest.raises(json.JSONDecodeError) as info:
        loads(text)
    assert info.value.lineno >= 1 and info.value.colno >= 1


def test_bytes_that_are_not_utf8_are_a_value_error() -> None:
    with pytest.raises(UnicodeDecodeError):
        loads(b'{"a": "\xff"}')


def test_nesting_too_deep_for_both_parsers_is_a_decode_error_not_a_crash() -> None:
    with pytest.raises(json.JSONDecodeError):
        loads("[" * 100_000 + "]" * 100_000)
