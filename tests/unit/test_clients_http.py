"""What the HTTP clients share: reading ``Retry-After`` (delta-seconds or HTTP-date)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from worker.clients.http import parse_retry_after

NOW = datetime(2026, 11, 26, 17, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, None),
        ("", None),
        ("0", 0.0),
        ("30", 30.0),
        (" 1.5 ", 1.5),
        ("-3", None),
        ("inf", None),
        ("nan", None),
        ("soon", None),
        ("Thu, 26 Nov 2026 17:01:00 GMT", 60.0),
        ("Thu, 26 Nov 2026 16:00:00 GMT", 0.0),  # in the past: never negative
        ("Thursday, 26-Nov-26 17:00:30 GMT", 30.0),  # obsolete RFC 850 form
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == expected
