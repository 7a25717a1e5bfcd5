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

#: The common ASCII shapes, with every limit inside the pattern so that one match decides: a local
#: part of at most 64 characters, domain labels of at most 63 (each lookahead sees at most 63 label
#: characters before the label's dot), no special-use top-level domain (RFC 6761, any case).
#: Possessive repeats (``++``, ``*+``) never backtrack: a run of characters can only end where
#: the next part starts (a dot, ``@`` or a hyphen), so giving characters back never helps a match.
_EMAIL_FAST = re.compile(
    r"(?=[^@]{1,64}@)[A-Za-z0-9_%+\-]++(?:\.[A-Za-z0-9_%+\-]++)*+"
    r"@(?:(?=[A-Za-z0-9\-]{1,63}\.)[A-Za-z0-9]++(?:-[A-Za-z0-9]++)*+\.)++"
    r"(?!(?i:arpa|invalid|local|localhost|onion|test)\Z)[A-Za-z]{2,63}",
    re.ASCII,
)


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
    if len(raw) <= 254 and _EMAIL_FAST.fullmatch(raw) is not None:
        return raw.lower()
    return email_slow(raw)
