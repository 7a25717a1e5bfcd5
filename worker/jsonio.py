"""Reading JSON that others wrote: orjson first (fast), the standard library for what orjson refuses.

orjson is strict: it refuses ``NaN``/``Infinity`` and integers beyond 64 bits, which the standard
library reads. A transition or a results line with one odd value is still worth reading, so only
the texts orjson refuses pay for the slower second parse; the hot path stays on orjson.

A leaf module: the standard library and orjson only, so every layer may use it.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def loads(text: str | bytes) -> Any:
    """Parse one JSON text (str, or bytes in UTF-8).

    Raises:
        ValueError: not JSON: a :class:`json.JSONDecodeError` (``msg``, ``lineno``, ``colno``,
            ``pos``), or a :class:`UnicodeDecodeError` for bytes that are not UTF-8. A text nested
            too deeply for either parser raises orjson's error rather than a ``RecursionError``.
    """
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as refused:
        try:
            return json.loads(text)
        except RecursionError:
            raise refused from None
