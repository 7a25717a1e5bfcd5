"""Emails trimmed, checked and lowercased, or None when invalid.

Why this module is shaped the way it is:

* **Emails are lowercased entirely, local part included**: sources disagree on case, and two
  Attentive profiles for one person (or an unstable user key) are worse than the theoretical
  case-sensitive mailbox.
* **Validation is** ``email-validator``'s **syntax check without DNS** (mapping does no I/O).
* **It is on the hot path**: a strict ASCII pattern accepts the common shapes at once; anything it
  does not accept goes to ``email-validator`` behind an LRU cache (:func:`email_slow`). The property
  tests check that the fast path agrees with ``email-validator``.
"""

from __future__ import annotations

import re
from functools import lru_cache

from email_validator import EmailNotValidError, validate_email

_EMAIL_FAST = re.compile(
    r"([A-Za-z0-9_%+\-]+(?:\.[A-Za-z0-9_%+\-]+)*)@((?:[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*\.)+([A-Za-z]{2,63}))",
    re.ASCII,
)
_SPECIAL_USE_TLDS = frozenset({"arpa", "invalid", "local", "localhost", "onion", "test"})


@lru_cache(maxsize=65_536)
def email_slow(raw: str) -> str | None:
    """email-validator's normalised form of ``raw`` (syntax only, no DNS), lowercased; None if invalid."""
    try:
        result = validate_email(raw, check_deliverability=False)
    except EmailNotValidError:
        return None
    except Exception:
        return None
    normalized: str = result.normalized.lower()
    return normalized


def normalize_email(raw: str) -> str | None:
    """Lowercased valid email for a stripped non-empty string, or None. ASCII fast path, then cache."""
    if len(raw) <= 254:
        m = _EMAIL_FAST.fullmatch(raw)
        if (
            m is not None
            and len(m.group(1)) <= 64
            and m.group(3).lower() not in _SPECIAL_USE_TLDS
            and all(len(label) <= 63 for label in m.group(2).split("."))
        ):
            return raw.lower()
    return email_slow(raw)
