"""Redis commands packed by hiredis in one call, not one Python step per argument.

redis-py (8.2) runs every argument of a command through a Python generator and its encoder before
hiredis packs them. The buffer script's ingest op sends six arguments per change, about 3,000 a
call, and that loop cost 3.25 µs per change where ``hiredis.pack_command`` on the same arguments
took 0.56 (measured, bench/RESULTS.md, issue 14). redis-py takes a packer per connection
(``command_packer``), so this one hands hiredis the whole command at once and leaves everything
else to redis-py.

hiredis writes the same bytes as redis-py for ``str``, ``bytes``, ``memoryview``, ``int`` and
``float`` arguments (tests/unit/test_packing.py compares them) and raises ``TypeError`` for any
other type. Such a command, and one whose name holds a space (``"CONFIG GET"``, which redis-py
splits into two words), goes to redis-py's own packer, which answers as it always did (``DataError``
for ``None`` or a bool).
"""

from __future__ import annotations

from typing import Any

import hiredis
from redis._parsers.encoders import Encoder
from redis.connection import HiredisRespSerializer, PythonRespSerializer

#: redis-py's default split point for large arguments in its pure-Python packer (the fallback's).
_BUFFER_CUTOFF = 6000


class HiredisPacker:
    """A ``command_packer`` for :class:`redis.Connection`: one hiredis call per command."""

    def __init__(self, encoding: str = "utf-8", encoding_errors: str = "strict") -> None:
        encode = Encoder(encoding, encoding_errors, False).encode  # type: ignore[no-untyped-call]
        python_packer = PythonRespSerializer(_BUFFER_CUTOFF, encode)
        # Typed Any: redis-py annotates ``pack(*args: List)``, which no caller's arguments match.
        self._fallback: Any = HiredisRespSerializer(python_packer.pack, encode)  # type: ignore[no-untyped-call]
        self._utf8 = encoding.lower().replace("-", "") == "utf8" and encoding_errors == "strict"

    def pack(self, *args: Any) -> list[bytes]:
        name = args[0]
        if self._utf8 and type(name) is str and " " not in name:
            try:
                return [hiredis.pack_command(args)]
            except TypeError:
                pass  # an argument hiredis does not take: redis-py packs it or says why not
        packed: list[bytes] = self._fallback.pack(*args)
        return packed
