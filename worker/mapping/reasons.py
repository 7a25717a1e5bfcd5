"""What mapping says when it leaves something out: stable reason codes, the limits, the drop verdict.

Why this module is shaped the way it is:

* **Reason codes are stable strings**: operators see counts by reason (``attentive-export status``),
  so a code, once shipped, keeps its spelling. A *skip* reason means the whole profile is not sent;
  a *drop* reason means one field is left out and the rest of the record is sent.
* **The limits live next to the codes they trigger**, so the numbers behind ``string_too_long`` or
  ``record_too_large`` are read in one place. :data:`MAX_RECORD_BYTES` stays below Attentive's
  1 MiB per-record limit, measured as ASCII-escaped JSON (the largest encoding).
* **A drop is a value, not an exception**: a converter returns a :class:`Drop` (one shared instance
  per code) and the mapper tells it apart with one ``type(out) is Drop`` check, so bad input costs
  no more than good input on the hot path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

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
WORST_BYTES_PER_CHAR: Final = 12


class Drop:
    """A converter's verdict that a value is dropped, with its reason (one shared instance per code)."""

    __slots__ = ("code",)

    def __init__(self, code: str) -> None:
        self.code = code


#: A converter returns the value to send, None to omit silently (null/empty), or a :class:`Drop`.
Converter = Callable[[Any], Any]
