"""Redis replies as text, whichever way the client was built (``decode_responses`` or not).

Workers use byte replies (cheaper on the hot path); tests and tools may pass decoding clients.
"""

from __future__ import annotations

from typing import Any


def text(value: Any) -> str:
    """One reply value (bytes or str; redis-py's stubs type replies loosely) as ``str``."""
    return value.decode() if isinstance(value, bytes) else str(value)


def decode_hash(raw: Any) -> dict[str, str]:
    """A Redis hash (``HGETALL`` reply) as text."""
    return {text(k): text(v) for k, v in raw.items()}
