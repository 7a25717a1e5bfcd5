"""Turn one profile plus audience changes into one Attentive user record, or a reason not to send it.

Why this module is shaped the way it is:

* **Attentive must never answer 400 to what we build** (DESIGN.md invariant 6). Every value is
  repaired (E.164 phones, ``YYYY-MM-DD`` dates, arrays joined with commas, numbers made strings where
  Attentive wants strings) or dropped with a short, stable reason code that operators see as counts.
  Nulls, empty and whitespace-only values are never sent. No record ever carries ``subscriptions``.
* **Mapping never raises.** Any JSON-like input (and then some) yields a record or a skip reason;
  a last-resort guard turns an unexpected exception into :data:`MAPPING_ERROR` rather than a crash.
* **It is the hot path** of ingest and backfill (targets: 50,000 profiles/s with E.164 phones and
  25,000/s with national-format phones, one core). :class:`Mapper` compiles the job configuration
  once into plain tuples; :meth:`Mapper.map` uses no pydantic and raises no exceptions for bad input.
  Phones take an exact fast path for North American numbers (the NANP, ``+1``) that re-implements
  ``phonenumbers``' validity verdict with precompiled patterns from its own metadata (tests check
  it agrees with ``phonenumbers`` property-based); everything else goes through ``phonenumbers``
  behind an LRU cache. Emails take a strict ASCII fast path and fall back to ``email-validator``
  (also cached, also checked for agreement).

Decisions (documented for users in the README's field reference):

* Emails are trimmed and lowercased entirely, local part included: sources disagree on case, and
  two Attentive profiles for one person (or an unstable user key) are worse than the theoretical
  case-sensitive mailbox. Validation is ``email-validator``'s syntax check without DNS.
* ``dateOfBirth`` accepts ``YYYY-MM-DD``, ISO datetimes (the *written* date is kept, never shifted to
  UTC: a birthday does not move with time zones), ``YYYY/MM/DD``, US ``MM/DD/YYYY`` (never
  ``DD/MM/YYYY``: ``25/12/1990`` is refused, not guessed), compact ``YYYYMMDD`` strings, and epoch
  seconds or milliseconds (numbers or numeric strings, ``abs >= 1e11`` means milliseconds, UTC).
  The date must exist and lie between 1900-01-01 and today (UTC, one day of slack).
* ``clientUserId`` longer than 100 characters is dropped, never truncated (truncation could bridge
  two users). Other identifiers are capped at 255 characters (our bound, not Attentive's).
* A record needs at least one *standard* identifier (phone, email, clientUserId, shopifyId,
  klaviyoId); custom identifiers alone are not enough for Attentive to match a subscriber.
* Strings are trimmed. Attribute strings over 10,000 characters are dropped; values that would take
  the record past :data:`MAX_RECORD_BYTES` (below Attentive's 1 MiB per-record limit, measured as
  ASCII-escaped JSON, the largest encoding) are dropped, typed attributes before custom ones.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date
from functools import lru_cache
from typing import Any, Final

import phonenumbers
from email_validator import EmailNotValidError, validate_email
from phonenumbers.phonemetadata import PhoneMetadata

from worker.setup.jobconfig import ExportJobConfig

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Reason codes (stable: operators see counts by reason)
# --------------------------------------------------------------------------------------------------

#: Skip reasons: the whole profile is not sent.
NO_IDENTIFIER: Final = "no_identifier"
INVALID_PROFILE: Final = "invalid_profile"
MAPPING_ERROR: Final = "mapping_error"
#: Drop reasons: one field is left out, the rest of the record is sent.
INVALID_PHONE: Final = "invalid_phone"
INVALID_EMAIL: Final = "invalid_email"
CLIENT_USER_ID_TOO_LONG: Final = "client_user_id_too_long"
IDENTIFIER_TOO_LONG: Final = "identifier_too_long"
INVALID_IDENTIFIER: Final = "invalid_identifier"
INVALID_DATE: Final = "invalid_date"
INVALID_AGE: Final = "invalid_age"
UNSUPPORTED_MAP_VALUE: Final = "unsupported_map_value"
UNSUPPORTED_ARRAY_VALUE: Final = "unsupported_array_value"
UNSUPPORTED_NESTED_ARRAY: Final = "unsupported_nested_array"
UNSUPPORTED_VALUE_TYPE: Final = "unsupported_value_type"
NON_FINITE_NUMBER: Final = "non_finite_number"
NUMBER_OUT_OF_RANGE: Final = "number_out_of_range"
STRING_TOO_LONG: Final = "string_too_long"
INVALID_CHARACTERS: Final = "invalid_characters"
RECORD_TOO_LARGE: Final = "record_too_large"

SKIP_REASONS: Final = (NO_IDENTIFIER, INVALID_PROFILE, MAPPING_ERROR)
DROP_REASONS: Final = (
    INVALID_PHONE,
    INVALID_EMAIL,
    CLIENT_USER_ID_TOO_LONG,
    IDENTIFIER_TOO_LONG,
    INVALID_IDENTIFIER,
    INVALID_DATE,
    INVALID_AGE,
    UNSUPPORTED_MAP_VALUE,
    UNSUPPORTED_ARRAY_VALUE,
    UNSUPPORTED_NESTED_ARRAY,
    UNSUPPORTED_VALUE_TYPE,
    NON_FINITE_NUMBER,
    NUMBER_OUT_OF_RANGE,
    STRING_TOO_LONG,
    INVALID_CHARACTERS,
    RECORD_TOO_LARGE,
)

# --------------------------------------------------------------------------------------------------
# Limits
# --------------------------------------------------------------------------------------------------

#: Attentive rejects records over 1 MiB (1,048,576 bytes) with a 413; we stay under this bound.
MAX_RECORD_BYTES: Final = 1_000_000
MAX_CLIENT_USER_ID_CHARS: Final = 100
MAX_IDENTIFIER_CHARS: Final = 255
MAX_VALUE_CHARS: Final = 10_000
MAX_ARRAY_ITEMS: Final = 10_000
AGE_MAX: Final = 130
MIN_BIRTH_YEAR: Final = 1900
#: Attentive runs on the JVM: integers outside a signed 64-bit long would not deserialise.
INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1
#: Bytes a string value can take at most per character in ASCII-escaped JSON (astral: two \\uXXXX).
_WORST_BYTES_PER_CHAR: Final = 12


@dataclass(slots=True)
class MapResult:
    """One profile's outcome: a record to send, or ``record=None`` with a ``skip_reason``.

    ``dropped`` lists ``(profile field path, reason code)`` for values left out of the record.
    """

    record: dict[str, Any] | None
    skip_reason: str | None = None
    dropped: list[tuple[str, str]] = field(default_factory=list)
    #: :meth:`Mapper.user_key` of the profile, set with a record (found while mapping, so ingest
    #: does not normalise the key field a second time).
    user_key: str | None = None


#: Section marker of custom attributes in Mapper._all_attributes (never a real section name).
_CUSTOM = "\x00custom"


class _Drop:
    """A converter's verdict that a value is dropped, with its reason (one shared instance per code)."""

    __slots__ = ("code",)

    def __init__(self, code: str) -> None:
        self.code = code


_D_PHONE = _Drop(INVALID_PHONE)
_D_EMAIL = _Drop(INVALID_EMAIL)
_D_CUID_LONG = _Drop(CLIENT_USER_ID_TOO_LONG)
_D_ID_LONG = _Drop(IDENTIFIER_TOO_LONG)
_D_ID = _Drop(INVALID_IDENTIFIER)
_D_DATE = _Drop(INVALID_DATE)
_D_AGE = _Drop(INVALID_AGE)
_D_MAP = _Drop(UNSUPPORTED_MAP_VALUE)
_D_ARRAY = _Drop(UNSUPPORTED_ARRAY_VALUE)
_D_NESTED = _Drop(UNSUPPORTED_NESTED_ARRAY)
_D_TYPE = _Drop(UNSUPPORTED_VALUE_TYPE)
_D_NONFINITE = _Drop(NON_FINITE_NUMBER)
_D_RANGE = _Drop(NUMBER_OUT_OF_RANGE)
_D_LONG = _Drop(STRING_TOO_LONG)
_D_CHARS = _Drop(INVALID_CHARACTERS)

#: A converter returns the value to send, None to omit silently (null/empty), or a _Drop.
Converter = Callable[[Any], Any]

_MISSING: Final = object()
_SURROGATE = re.compile("[\ud800-\udfff]")


def _bad_chars(s: str) -> bool:
    """NUL and lone surrogates: JSON encoders and Attentive's storage choke on them."""
    return "\x00" in s or (not s.isascii() and _SURROGATE.search(s) is not None)


# --------------------------------------------------------------------------------------------------
# Phones
# --------------------------------------------------------------------------------------------------


def _compile_nanp() -> tuple[tuple[re.Pattern[str] | None, re.Pattern[str] | None], ...]:
    """Per NANP region, in phonenumbers' order: (leading-digits pattern, "type is known" pattern).

    Mirrors ``phonenumbers.is_valid_number`` for a 10-digit national number with country code 1:
    ``region_code_for_number`` walks the regions (a region with leading digits claims the number on a
    prefix match, others when the number has a known type) and the number is valid when its type is
    known for that region. A type is known when the number matches the general pattern and one of
    the type patterns; only patterns whose possible lengths allow 10 digits can match, so each
    region's check compiles to one alternation.
    """

    def usable(desc: Any) -> str | None:
        if desc is None or not desc.national_number_pattern:
            return None
        lengths = desc.possible_length
        if lengths and 10 not in lengths:
            return None
        return f"(?:{desc.national_number_pattern})"

    regions = []
    for code in phonenumbers.COUNTRY_CODE_TO_REGION_CODE[1]:
        md = PhoneMetadata.metadata_for_region(code, None)
        if md is None:
            continue
        general = usable(md.general_desc)
        names = [
            "premium_rate",
            "toll_free",
            "shared_cost",
            "voip",
            "personal_number",
            "pager",
            "uan",
            "voicemail",
            "fixed_line",
        ]
        if not md.same_mobile_and_fixed_line_pattern:
            names.append("mobile")
        types = [p for p in (usable(getattr(md, n)) for n in names) if p]
        known = re.compile(f"(?={general}$)(?:{'|'.join(types)})") if general and types else None
        leading = re.compile(md.leading_digits) if md.leading_digits else None
        regions.append((leading, known))
    return tuple(regions)


_NANP = _compile_nanp()
_NANP_REGIONS: Final = frozenset(phonenumbers.COUNTRY_CODE_TO_REGION_CODE[1])


def nanp_valid(nsn: str) -> bool:
    """phonenumbers' validity verdict for ``+1`` + ``nsn`` (10 ASCII digits), without parsing."""
    for leading, known in _NANP:
        if leading is not None:
            if leading.match(nsn):
                return known is not None and known.fullmatch(nsn) is not None
        elif known is not None and known.fullmatch(nsn) is not None:
            return True
    return False


#: Characters of the phone shapes the fast path handles: digits and ( ) . - space, '+' first.
_PHONE_FAST_SHAPE = re.compile(r"\+?[0-9 ().\-]{10,24}", re.ASCII)
_PHONE_SEPARATORS = str.maketrans("", "", " ().-+")
_NSN_FIRST = frozenset("23456789")


@lru_cache(maxsize=131_072)
def phone_slow(raw: str, region: str) -> str | None:
    """E.164 form of ``raw`` parsed by phonenumbers with ``region`` as default, None when invalid."""
    try:
        number = phonenumbers.parse(raw, region)
        if not phonenumbers.is_valid_number(number):
            return None
        return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    except Exception:  # NumberParseException, and anything odd phonenumbers may raise on junk
        return None


def normalize_phone(raw: str, region: str) -> str | None:
    """E.164 form of a (stripped, non-empty) phone string, or None when phonenumbers says invalid.

    Fast path for North American shapes (``+1 555 123 4567``, ``(555) 123-4567``, ``1-555-123-4567``
    in a NANP default region); everything else goes to :func:`phone_slow` (cached).
    """
    if len(raw) <= 24 and _PHONE_FAST_SHAPE.fullmatch(raw) is not None:
        digits = raw.translate(_PHONE_SEPARATORS)
        nsn = None
        if raw[0] == "+":
            if len(digits) == 11 and digits[0] == "1" and digits[1] in _NSN_FIRST:
                nsn = digits[1:]
        elif region in _NANP_REGIONS:
            if len(digits) == 10 and digits[0] in _NSN_FIRST:
                nsn = digits
            elif len(digits) == 11 and digits[0] == "1" and digits[1] in _NSN_FIRST:
                nsn = digits[1:]
        if nsn is not None:
            return "+1" + nsn if nanp_valid(nsn) else None
    return phone_slow(raw, region)


# --------------------------------------------------------------------------------------------------
# Emails
# --------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------
# Value converters
# --------------------------------------------------------------------------------------------------


def _id_text(value: Any, max_chars: int, too_long: _Drop) -> Any:
    """A string identifier: trimmed strings, integers (and integral floats) as decimal strings."""
    t = type(value)
    if t is str:
        s = value.strip()
    elif t is int:
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
        s = str(value).strip()
    elif isinstance(value, int) and not isinstance(value, bool):
        return _id_text(int(value), max_chars, too_long)
    else:
        return _D_ID
    if not s:
        return None
    if len(s) > max_chars:
        return too_long
    if _bad_chars(s):
        return _D_CHARS
    return s


def _conv_client_user_id(value: Any) -> Any:
    return _id_text(value, MAX_CLIENT_USER_ID_CHARS, _D_CUID_LONG)


def _conv_other_id(value: Any) -> Any:
    return _id_text(value, MAX_IDENTIFIER_CHARS, _D_ID_LONG)


def _conv_email(value: Any) -> Any:
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


def _make_phone_converter(region: str) -> Converter:
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


def _clean_text(value: str) -> Any:
    """A trimmed string; None when blank; the drop for an over-long or unsafe one."""
    s = value.strip()
    if not s:
        return None
    if len(s) > MAX_VALUE_CHARS:
        return _D_LONG
    if _bad_chars(s):
        return _D_CHARS
    return s


def _text(value: Any) -> Any:
    """A typed string attribute: trimmed strings; numbers as strings; no bools, arrays or maps."""
    t = type(value)
    if t is str:
        return _clean_text(value)
    if t is int:
        return str(value) if INT64_MIN <= value <= INT64_MAX else _D_RANGE
    if t is float:
        return repr(value) if math.isfinite(value) else _D_NONFINITE
    return _other_type(value, _text)


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
_today_cache: list[float | int] = [0.0, 0]  # [valid until (epoch s), today's ordinal + 1 day of slack]


def _max_birth_ordinal() -> int:
    now = time.time()
    if now >= _today_cache[0]:
        day = int(now // 86400)
        _today_cache[0] = (day + 1) * 86400.0
        _today_cache[1] = _EPOCH_ORDINAL + day + 1
    return int(_today_cache[1])


def _ymd(y: int, m: int, d: int) -> Any:
    if not (1 <= m <= 12 and 1 <= d <= _DAYS_IN_MONTH[m]) or y < MIN_BIRTH_YEAR or y > 9999:
        return _D_DATE
    if m == 2 and d == 29 and not (y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)):
        return _D_DATE
    if date(y, m, d).toordinal() > _max_birth_ordinal():
        return _D_DATE
    return f"{y:04d}-{m:02d}-{d:02d}"


def _epoch_date(seconds: float) -> Any:
    if not math.isfinite(seconds):
        return _D_DATE
    if abs(seconds) >= 1e11:
        seconds /= 1000.0
    ordinal = _EPOCH_ORDINAL + math.floor(seconds / 86400.0) if abs(seconds) < 1e13 else 0
    if not (_MIN_ORDINAL <= ordinal <= _max_birth_ordinal()):
        return _D_DATE
    return date.fromordinal(ordinal).isoformat()


def _conv_date(value: Any) -> Any:
    """``dateOfBirth`` as ``YYYY-MM-DD`` from the inputs listed in the module docstring."""
    t = type(value)
    if t is str:
        s = value.strip()
        if not s:
            return None
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
        return _conv_date(str(value))
    if isinstance(value, int):
        return _conv_date(int(value))
    if isinstance(value, float):
        return _conv_date(float(value))
    return _D_DATE


_AGE_TEXT = re.compile(r"\d{1,3}(?:\.0*)?", re.ASCII)


def _conv_age(value: Any) -> Any:
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
        return _conv_age(str(value))
    if isinstance(value, int):
        return _conv_age(int(value))
    if isinstance(value, float):
        return _conv_age(float(value))
    return _D_AGE


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
    joined = ",".join(parts)
    return _D_CHARS if _bad_chars(joined) else joined


def _conv_custom(value: Any) -> Any:
    """A custom attribute: primitives kept (strings trimmed), arrays joined with commas, maps refused."""
    t = type(value)
    if t is str:
        return _clean_text(value)
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
        return _conv_custom(str(value))
    if isinstance(value, int):
        return _conv_custom(int(value))
    if isinstance(value, float):
        return _conv_custom(float(value))
    return _D_TYPE


def _json_size(value: Any) -> int:
    """Exact size of ``value`` in ASCII-escaped JSON (only called when the cheap bound is too high)."""
    return len(json.dumps(value))


def _worst_size(value: Any) -> int:
    """A cheap upper bound of ``value``'s size in JSON."""
    if type(value) is str:
        return len(value) * _WORST_BYTES_PER_CHAR + 2
    return 32  # numbers (int64, float repr) and booleans


# --------------------------------------------------------------------------------------------------
# Field access
# --------------------------------------------------------------------------------------------------


def _accessor(path: str) -> tuple[str, tuple[str, ...] | None]:
    """(literal key, dotted segments or None). A flat key spelled with dots wins over nesting."""
    segments = tuple(path.split("."))
    return path, (segments if len(segments) > 1 else None)


def _walk(profile: Mapping[str, Any], segments: tuple[str, ...]) -> Any:
    current: Any = profile
    for segment in segments:
        if type(current) is not dict and not isinstance(current, Mapping):
            return None
        current = current.get(segment)
        if current is None:
            return None
    return current


_SECTIONS: Final = ("demographic", "location", "locale")


# --------------------------------------------------------------------------------------------------
# The mapper
# --------------------------------------------------------------------------------------------------


class Mapper:
    """A job's mapping, compiled once; :meth:`map` turns profiles into Attentive user records."""

    def __init__(self, config: ExportJobConfig) -> None:
        self.config = config
        region = config.default_phone_region
        phone = _make_phone_converter(region)
        by_target: dict[str, Converter] = {
            "phone": phone,
            "email": _conv_email,
            "clientUserId": _conv_client_user_id,
            "shopifyId": _conv_other_id,
            "klaviyoId": _conv_other_id,
        }
        # (literal key, segments, identifier name, converter, field path)
        self._identifiers: tuple[tuple[str, tuple[str, ...] | None, str, Converter, str], ...] = tuple(
            (*_accessor(src), target, by_target[target], src)
            for src, target in config.identifier_mappings.items()
        )
        #: Whether the user key field is one of the identifiers (then mapping finds the key itself).
        self._key_field = config.key_field
        self._key_is_identifier = self._key_field in config.identifier_mappings
        self._extra: tuple[tuple[str, tuple[str, ...] | None, str], ...] = tuple(
            (*_accessor(src), src) for src in config.extra_identifiers
        )
        # (literal key, segments, section or None, leaf, converter, field path)
        attributes = []
        for src, target in config.attribute_mappings.items():
            section, _, leaf = target.rpartition(".")
            conv = _conv_date if leaf == "dateOfBirth" else _conv_age if leaf == "age" else _text
            attributes.append((*_accessor(src), section or None, leaf, conv, src))
        self._attributes: tuple[tuple[str, tuple[str, ...] | None, str | None, str, Converter, str], ...] = (
            tuple(attributes)
        )
        self._custom: tuple[tuple[str, tuple[str, ...] | None, str], ...] = tuple(
            (*_accessor(src), src) for src in config.custom_attributes
        )
        #: Typed attributes then custom ones, as (key, segments, section, leaf, converter, path);
        #: custom ones have section _CUSTOM and their field path as leaf.
        self._all_attributes: tuple[
            tuple[str, tuple[str, ...] | None, str | None, str, Converter, str], ...
        ] = self._attributes + tuple(
            (key, seg, _CUSTOM, src, _conv_custom, src) for key, seg, src in self._custom
        )
        key_field = config.key_field
        key_conv = next(
            (conv for _, _, _, conv, src in self._identifiers if src == key_field), _conv_other_id
        )
        self._key: tuple[str, tuple[str, ...] | None, Converter] = (*_accessor(key_field), key_conv)
        # Worst-case JSON size of everything but attribute values: keys, identifiers (bounded by the
        # converters), punctuation. Attribute values are then added as they are mapped.
        per_key = _WORST_BYTES_PER_CHAR
        base = 200
        base += sum(16 + per_key * (len(t) + MAX_IDENTIFIER_CHARS) for _, _, t, _, _ in self._identifiers)
        base += sum(40 + per_key * (len(src) + MAX_IDENTIFIER_CHARS) for _, _, src in self._extra)
        base += sum(16 + len(leaf) for _, _, _, leaf, _, _ in self._attributes)
        base += sum(8 + per_key * len(src) for _, _, src in self._custom)
        self._base_size = base

    def user_key(self, profile: Mapping[str, Any]) -> str | None:
        """The user's stable key: the ``user_key_field`` value normalised like its identifier."""
        try:
            key, segments, conv = self._key
            value = profile.get(key)
            if value is None and segments is not None:
                value = _walk(profile, segments)
            if value is None:
                return None
            out = conv(value)
            return out if type(out) is str else None
        except Exception:  # a Mapping with a misbehaving .get(), a non-Mapping profile
            return None

    def map(
        self, profile: Mapping[str, Any], audiences: Mapping[str, bool], *, include_attributes: bool = True
    ) -> MapResult:
        """One Attentive user record for ``profile`` with ``audiences`` flags (``slug -> member``).

        ``include_attributes=False`` (exits) sends identifiers and audience flags only. Never raises.
        """
        try:
            return self._map(profile, audiences, include_attributes)
        except Exception as exc:  # last resort; the property tests assert it never happens
            log.error("mapping failed unexpectedly: %s", type(exc).__name__)
            return MapResult(None, MAPPING_ERROR, [])

    def _map(self, profile: Any, audiences: Any, include_attributes: bool) -> MapResult:
        if type(profile) is not dict and not isinstance(profile, Mapping):
            return MapResult(None, INVALID_PROFILE, [])
        get = profile.get
        dropped: list[tuple[str, str]] = []
        identifiers: dict[str, Any] = {}
        key_field = self._key_field
        user_key: str | None = None
        for key, segments, target, conv, src in self._identifiers:
            value = get(key, _MISSING)
            if value is _MISSING:
                value = _walk(profile, segments) if segments is not None else None
            if value is None:
                continue
            out = conv(value)
            if out is None:
                continue
            if type(out) is _Drop:
                dropped.append((src, out.code))
            else:
                identifiers[target] = out
                if src == key_field:
                    user_key = out
        if not identifiers:
            return MapResult(None, NO_IDENTIFIER, dropped)
        if not self._key_is_identifier:
            user_key = self.user_key(profile)
        if self._extra:
            custom_ids = []
            for key, segments, src in self._extra:
                value = get(key, _MISSING)
                if value is _MISSING:
                    value = _walk(profile, segments) if segments is not None else None
                if value is None:
                    continue
                out = _conv_other_id(value)
                if out is None:
                    continue
                if type(out) is _Drop:
                    dropped.append((src, out.code))
                else:
                    custom_ids.append({"key": src, "value": out})
            if custom_ids:
                identifiers["customIdentifiers"] = custom_ids

        size = self._base_size
        flags: dict[str, bool] = {}
        if audiences:
            for slug, member in audiences.items():
                if type(slug) is str and 0 < len(slug) <= 200:
                    flags[slug] = member is True or (member is not False and bool(member))
                    size += 16 + _WORST_BYTES_PER_CHAR * len(slug)

        attributes: dict[str, Any] = {}
        custom: dict[str, Any] = {}
        if include_attributes:
            # One loop over typed and custom attributes with the value checks inline: this runs for
            # every transition, and a call per field cost about a fifth of mapping time.
            for key, segments, section, leaf, conv, src in self._all_attributes:
                value = get(key, _MISSING)
                if value is _MISSING:
                    value = _walk(profile, segments) if segments is not None else None
                if value is None:
                    continue
                out = conv(value)
                if out is None:
                    continue
                if type(out) is _Drop:
                    dropped.append((src, out.code))
                    continue
                worst = len(out) * _WORST_BYTES_PER_CHAR + 2 if type(out) is str else 32
                if size + worst <= MAX_RECORD_BYTES:
                    size += worst
                else:
                    size, fits = self._fits(size, out)
                    if not fits:
                        dropped.append((src, RECORD_TOO_LARGE))
                        continue
                if section is None:
                    attributes[leaf] = out
                elif section is _CUSTOM:
                    custom[leaf] = out
                else:
                    sub = attributes.get(section)
                    if sub is None:
                        attributes[section] = sub = {}
                    sub[leaf] = out
        if flags:
            custom.update(flags)
        if custom:
            attributes["custom"] = custom
        record: dict[str, Any] = {"identifiers": identifiers}
        if attributes:
            record["attributes"] = attributes
        return MapResult(record, None, dropped, user_key)

    @staticmethod
    def _fits(size: int, value: Any) -> tuple[int, bool]:
        """Add ``value`` to the running size bound; measure exactly only when the bound is too high."""
        worst = _worst_size(value)
        if size + worst <= MAX_RECORD_BYTES:
            return size + worst, True
        exact = _json_size(value)
        if size + exact <= MAX_RECORD_BYTES:
            return size + exact, True
        return size, False


#: Compiled mappings per job id, with the configuration each was compiled from.
_compiled: dict[str, tuple[ExportJobConfig, Mapper]] = {}


def compiled_mapper(job_id: str, config: ExportJobConfig) -> Mapper:
    """The job's mapping, compiled once per process and configuration (a changed job recompiles).

    Called per transition on the hot path: the job table keeps an unchanged configuration as the
    same object across reloads, so the usual check is one identity comparison.
    """
    hit = _compiled.get(job_id)
    if hit is None or (hit[0] is not config and hit[0] != config):
        hit = (config, Mapper(config))
        _compiled[job_id] = hit
    return hit[1]
