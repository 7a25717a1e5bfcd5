"""Value converters: one profile value in, the value Attentive accepts, nothing, or a drop verdict.

Why this module is shaped the way it is:

* **Attentive must never answer 400 to what we build** (DESIGN.md invariant 6). Every value is
  repaired (E.164 phones, ``YYYY-MM-DD`` dates, arrays joined with commas, numbers made strings where
  Attentive wants strings) or dropped with a reason code (:mod:`worker.mapping.reasons`). Nulls,
  empty and whitespace-only values are never sent.
* **A converter never raises** and is called once per mapped field, so each one tests the exact type
  first (``type(value) is str``) and handles subclasses and oddities last. It returns the value to
  send, None to leave the field out silently, or a shared :class:`~worker.mapping.reasons.Drop`.

Decisions (documented for users in the README's field reference):

* ``dateOfBirth`` accepts ``YYYY-MM-DD``, ISO datetimes (the *written* date is kept, never shifted to
  UTC: a birthday does not move with time zones), ``YYYY/MM/DD``, US ``MM/DD/YYYY`` (never
  ``DD/MM/YYYY``: ``25/12/1990`` is refused, not guessed), compact ``YYYYMMDD`` strings, and epoch
  seconds or milliseconds (numbers or numeric strings, ``abs >= 1e11`` means milliseconds, UTC).
  The date must exist and lie between 1900-01-01 and today (UTC, one day of slack).
* ``clientUserId`` longer than 100 characters is dropped, never truncated (truncation could bridge
  two users). Other identifiers are capped at 255 characters (our bound, not Attentive's).
* Strings are trimmed. Attribute strings over 10,000 characters are dropped.
"""

from __future__ import annotations

import calendar
import json
import math
import re
import time
from collections.abc import Mapping
from datetime import date
from typing import Any, Final

from worker.mapping.emails import normalize_email
from worker.mapping.phones import normalize_phone
from worker.mapping.reasons import (
    AGE_MAX,
    CLIENT_USER_ID_TOO_LONG,
    IDENTIFIER_TOO_LONG,
    INT64_MAX,
    INT64_MIN,
    INVALID_AGE,
    INVALID_CHARACTERS,
    INVALID_DATE,
    INVALID_EMAIL,
    INVALID_IDENTIFIER,
    INVALID_PHONE,
    MAX_ARRAY_ITEMS,
    MAX_CLIENT_USER_ID_CHARS,
    MAX_IDENTIFIER_CHARS,
    MAX_VALUE_CHARS,
    MIN_BIRTH_YEAR,
    NON_FINITE_NUMBER,
    NUMBER_OUT_OF_RANGE,
    STRING_TOO_LONG,
    UNSUPPORTED_ARRAY_VALUE,
    UNSUPPORTED_MAP_VALUE,
    UNSUPPORTED_NESTED_ARRAY,
    UNSUPPORTED_VALUE_TYPE,
    WORST_BYTES_PER_CHAR,
    Converter,
    Drop,
)

#: One shared verdict per drop reason (converters return these; nothing is allocated per value).
_D_PHONE = Drop(INVALID_PHONE)
_D_EMAIL = Drop(INVALID_EMAIL)
_D_CUID_LONG = Drop(CLIENT_USER_ID_TOO_LONG)
_D_ID_LONG = Drop(IDENTIFIER_TOO_LONG)
_D_ID = Drop(INVALID_IDENTIFIER)
_D_DATE = Drop(INVALID_DATE)
_D_AGE = Drop(INVALID_AGE)
_D_MAP = Drop(UNSUPPORTED_MAP_VALUE)
_D_ARRAY = Drop(UNSUPPORTED_ARRAY_VALUE)
_D_NESTED = Drop(UNSUPPORTED_NESTED_ARRAY)
_D_TYPE = Drop(UNSUPPORTED_VALUE_TYPE)
_D_NONFINITE = Drop(NON_FINITE_NUMBER)
_D_RANGE = Drop(NUMBER_OUT_OF_RANGE)
_D_LONG = Drop(STRING_TOO_LONG)
_D_CHARS = Drop(INVALID_CHARACTERS)

_SURROGATE = re.compile("[\ud800-\udfff]")


def _clean(value: str, max_chars: int, too_long: Drop) -> Any:
    """``value`` trimmed; None when blank; ``too_long`` past ``max_chars``; the drop for NUL and
    lone surrogates (JSON encoders and Attentive's storage choke on them).

    Every string a converter sends ends here: it runs for most fields, so the checks are inline.
    """
    s = value.strip()
    if not s:
        return None
    if len(s) > max_chars:
        return too_long
    if "\x00" in s or (not s.isascii() and _SURROGATE.search(s) is not None):
        return _D_CHARS
    return s


# --------------------------------------------------------------------------------------------------
# Identifiers
# --------------------------------------------------------------------------------------------------


def _id_text(value: Any, max_chars: int, too_long: Drop) -> Any:
    """A string identifier: trimmed strings, integers (and integral floats) as decimal strings."""
    t = type(value)
    if t is int:
        if value.bit_length() > 200:
            return _D_ID
        s = str(value)
    elif t is float:
        if not math.isfinite(value) or not value.is_integer() or abs(value) >= 2**53:
            return _D_ID
        s = str(int(value))
    elif t is bool:
        return _D_ID
    elif isinstance(value, str):
        s = str(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        return _id_text(int(value), max_chars, too_long)
    else:
        return _D_ID
    return _clean(s, max_chars, too_long)


def convert_client_user_id(value: Any) -> Any:
    if type(value) is str:  # the usual identifier: straight to _clean
        return _clean(value, MAX_CLIENT_USER_ID_CHARS, _D_CUID_LONG)
    return _id_text(value, MAX_CLIENT_USER_ID_CHARS, _D_CUID_LONG)


def convert_other_id(value: Any) -> Any:
    if type(value) is str:  # the usual identifier: straight to _clean
        return _clean(value, MAX_IDENTIFIER_CHARS, _D_ID_LONG)
    return _id_text(value, MAX_IDENTIFIER_CHARS, _D_ID_LONG)


def convert_email(value: Any) -> Any:
    if type(value) is not str:
        if isinstance(value, str):
            value = str(value)
        else:
            return _D_EMAIL
    s = value.strip()
    if not s:
        return None
    out = normalize_email(s)
    return _D_EMAIL if out is None else out


def make_phone_converter(region: str) -> Converter:
    def convert(value: Any) -> Any:
        t = type(value)
        if t is str:
            s = value.strip()
            if not s:
                return None
        elif t is int:
            if value < 0 or value.bit_length() > 64:
                return _D_PHONE
            s = str(value)
        elif isinstance(value, str):
            s = str(value).strip()
            if not s:
                return None
        else:
            return _D_PHONE
        out = normalize_phone(s, region)
        return _D_PHONE if out is None else out

    return convert


# --------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------


def convert_text(value: Any) -> Any:
    """A typed string attribute: trimmed strings; numbers as strings; no bools, arrays or maps."""
    t = type(value)
    if t is str:
        return _clean(value, MAX_VALUE_CHARS, _D_LONG)
    if t is int:
        return str(value) if INT64_MIN <= value <= INT64_MAX else _D_RANGE
    if t is float:
        return repr(value) if math.isfinite(value) else _D_NONFINITE
    return _other_type(value, convert_text)


def _other_type(value: Any, again: Converter) -> Any:
    """Shared tail of converters: containers, and subclasses of primitives (made plain, retried)."""
    if isinstance(value, list | tuple):
        return _D_ARRAY
    if isinstance(value, Mapping):
        return _D_MAP
    if isinstance(value, bool):
        return _D_TYPE
    if isinstance(value, str):
        return again(str(value))
    if isinstance(value, int):
        return again(int(value))
    if isinstance(value, float):
        return again(float(value))
    return _D_TYPE


# --------------------------------------------------------------------------------------------------
# Dates
# --------------------------------------------------------------------------------------------------


_ISO_DATE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})"
    r"(?:[Tt ](\d{2}):(\d{2})(?::(\d{2})(?:[.,]\d{1,9})?)?(?:[Zz]|[+-]\d{2}(?::?\d{2})?)?)?",
    re.ASCII,
)
_SLASH_YMD = re.compile(r"(\d{4})/(\d{1,2})/(\d{1,2})", re.ASCII)
_US_MDY = re.compile(r"(\d{1,2})/(\d{1,2})/(\d{4})", re.ASCII)
_COMPACT_YMD = re.compile(r"(\d{4})(\d{2})(\d{2})", re.ASCII)
_EPOCH = re.compile(r"-?\d{1,16}(?:\.\d{1,9})?", re.ASCII)
_DAYS_IN_MONTH = (0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_EPOCH_ORDINAL: Final = date(1970, 1, 1).toordinal()
_MIN_ORDINAL: Final = date(MIN_BIRTH_YEAR, 1, 1).toordinal()
#: Every ``MM-DD`` that exists in a leap year (the common ``YYYY-MM-DD`` shape is checked as text).
_MONTH_DAYS: Final = frozenset(
    f"{m:02d}-{d:02d}" for m in range(1, 13) for d in range(1, _DAYS_IN_MONTH[m] + 1)
)
_MIN_DATE_TEXT: Final = f"{MIN_BIRTH_YEAR:04d}-01-01"
#: (valid until (epoch s), latest birth date accepted as an ordinal, the same as ``YYYY-MM-DD``):
#: today (UTC) plus one day of slack. One tuple, replaced whole when the day changes.
_latest_birth: list[tuple[float, int, str]] = [(0.0, 0, "")]


def _latest_birth_day() -> tuple[float, int, str]:
    latest = _latest_birth[0]
    now = time.time()
    if now >= latest[0]:
        day = int(now // 86400)
        ordinal = _EPOCH_ORDINAL + day + 1
        latest = ((day + 1) * 86400.0, ordinal, date.fromordinal(ordinal).isoformat())
        _latest_birth[0] = latest
    return latest


def _ymd(y: int, m: int, d: int) -> Any:
    if not (1 <= m <= 12 and 1 <= d <= _DAYS_IN_MONTH[m]) or y < MIN_BIRTH_YEAR or y > 9999:
        return _D_DATE
    if m == 2 and d == 29 and not calendar.isleap(y):
        return _D_DATE
    text = f"{y:04d}-{m:02d}-{d:02d}"
    return _D_DATE if text > _latest_birth_day()[2] else text  # ISO dates compare as the days they name


def _epoch_date(seconds: float) -> Any:
    if not math.isfinite(seconds):
        return _D_DATE
    if abs(seconds) >= 1e11:
        seconds /= 1000.0
    ordinal = _EPOCH_ORDINAL + math.floor(seconds / 86400.0) if abs(seconds) < 1e13 else 0
    if not (_MIN_ORDINAL <= ordinal <= _latest_birth_day()[1]):
        return _D_DATE
    return date.fromordinal(ordinal).isoformat()


def convert_date(value: Any) -> Any:
    """``dateOfBirth`` as ``YYYY-MM-DD`` from the inputs listed in the module docstring."""
    t = type(value)
    if t is str:
        s = value.strip()
        if not s:
            return None
        if len(s) == 10 and s[4] == "-" and s.isascii() and s[:4].isdigit() and s[5:] in _MONTH_DAYS:
            # Fast path for the common shape, YYYY-MM-DD with a month and day that exist: it is its
            # own output, and ISO dates compare as text like the days they name, so _ymd's checks
            # need no ints or date objects. (isascii: isdigit also accepts "²".)
            if s < _MIN_DATE_TEXT or s > _latest_birth_day()[2]:
                return _D_DATE
            if s[5:] == "02-29" and not calendar.isleap(int(s[:4])):
                return _D_DATE
            return s
        return _date_text(s)
    if t is int:
        return _epoch_date(float(value)) if abs(value) < 10**15 else _D_DATE
    if t is float:
        return _epoch_date(value)
    if isinstance(value, date):  # datetime is a date too: keep its written date
        return _ymd(value.year, value.month, value.day)
    if isinstance(value, bool):
        return _D_DATE
    if isinstance(value, list | tuple):
        return _D_ARRAY
    if isinstance(value, Mapping):
        return _D_MAP
    if isinstance(value, str):
        return convert_date(str(value))
    if isinstance(value, int):
        return convert_date(int(value))
    if isinstance(value, float):
        return convert_date(float(value))
    return _D_DATE


def _date_text(s: str) -> Any:
    """``dateOfBirth`` from a stripped, non-empty string, by the general patterns."""
    if len(s) > 40:
        return _D_DATE
    m = _ISO_DATE.fullmatch(s)
    if m is not None:
        hh, mm, ss = m.group(4), m.group(5), m.group(6)
        if hh is not None and (int(hh) > 23 or int(mm) > 59 or (ss is not None and int(ss) > 60)):
            return _D_DATE
        return _ymd(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    m = _SLASH_YMD.fullmatch(s)
    if m is not None:
        return _ymd(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    m = _US_MDY.fullmatch(s)
    if m is not None:
        return _ymd(int(m.group(3)), int(m.group(1)), int(m.group(2)))
    m = _COMPACT_YMD.fullmatch(s)
    if m is not None:
        return _ymd(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    if _EPOCH.fullmatch(s) is not None:
        return _epoch_date(float(s))
    return _D_DATE


# --------------------------------------------------------------------------------------------------
# Age
# --------------------------------------------------------------------------------------------------


_AGE_TEXT = re.compile(r"\d{1,3}(?:\.0*)?", re.ASCII)


def convert_age(value: Any) -> Any:
    """``age`` as an integer 0..130; integral floats and numeric strings accepted."""
    t = type(value)
    if t is int:
        return value if 0 <= value <= AGE_MAX else _D_AGE
    if t is str:
        s = value.strip()
        if not s:
            return None
        if _AGE_TEXT.fullmatch(s) is None:
            return _D_AGE
        n = int(s.split(".", 1)[0])
        return n if n <= AGE_MAX else _D_AGE
    if t is float:
        if math.isfinite(value) and value.is_integer() and 0 <= value <= AGE_MAX:
            return int(value)
        return _D_AGE
    if isinstance(value, list | tuple):
        return _D_ARRAY
    if isinstance(value, Mapping):
        return _D_MAP
    if isinstance(value, bool):
        return _D_AGE
    if isinstance(value, str):
        return convert_age(str(value))
    if isinstance(value, int):
        return convert_age(int(value))
    if isinstance(value, float):
        return convert_age(float(value))
    return _D_AGE


# --------------------------------------------------------------------------------------------------
# Arrays and custom values
# --------------------------------------------------------------------------------------------------


def _array_text(items: list[Any] | tuple[Any, ...]) -> Any:
    """An array as a comma-separated string: nulls and blanks skipped, nested containers refused."""
    if len(items) > MAX_ARRAY_ITEMS:
        return _D_LONG
    parts: list[str] = []
    total = 0
    for item in items:
        t = type(item)
        if item is None:
            continue
        if t is str:
            part = item.strip()
            if not part:
                continue
        elif t is bool:
            part = "true" if item else "false"
        elif t is int:
            if not INT64_MIN <= item <= INT64_MAX:
                return _D_RANGE
            part = str(item)
        elif t is float:
            if not math.isfinite(item):
                return _D_NONFINITE
            part = repr(item)
        elif isinstance(item, list | tuple | Mapping):
            return _D_NESTED
        elif isinstance(item, str | int | float):  # subclasses (IntEnum, str enums...): made plain
            if isinstance(item, bool):
                part = "true" if item else "false"
            elif isinstance(item, str):
                part = str(item).strip()
                if not part:
                    continue
            elif isinstance(item, int):
                part = str(int(item))
            else:
                f = float(item)
                if not math.isfinite(f):
                    return _D_NONFINITE
                part = repr(f)
        else:
            return _D_TYPE
        total += len(part) + 1
        if total > MAX_VALUE_CHARS + 1:
            return _D_LONG
        parts.append(part)
    if not parts:
        return None
    # The parts are trimmed and not blank, and the total is within MAX_VALUE_CHARS: of _clean's
    # checks, only the one for characters can fail.
    return _clean(",".join(parts), MAX_VALUE_CHARS, _D_LONG)


def convert_custom(value: Any) -> Any:
    """A custom attribute: primitives kept (strings trimmed), arrays joined with commas, maps refused."""
    t = type(value)
    if t is str:
        return _clean(value, MAX_VALUE_CHARS, _D_LONG)
    if t is bool:
        return value
    if t is int:
        return value if INT64_MIN <= value <= INT64_MAX else _D_RANGE
    if t is float:
        return value if math.isfinite(value) else _D_NONFINITE
    if t is list or t is tuple:
        return _array_text(value)
    if isinstance(value, Mapping):
        return _D_MAP
    if isinstance(value, list | tuple):
        return _array_text(list(value))
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return convert_custom(str(value))
    if isinstance(value, int):
        return convert_custom(int(value))
    if isinstance(value, float):
        return convert_custom(float(value))
    return _D_TYPE


# --------------------------------------------------------------------------------------------------
# Size estimates
# --------------------------------------------------------------------------------------------------


def json_size(value: Any) -> int:
    """Exact size of ``value`` in ASCII-escaped JSON (only called when the cheap bound is too high)."""
    return len(json.dumps(value))


def worst_size(value: Any) -> int:
    """A cheap upper bound of ``value``'s size in JSON."""
    if type(value) is str:
        return len(value) * WORST_BYTES_PER_CHAR + 2
    return 32  # numbers (int64, float repr) and booleans
