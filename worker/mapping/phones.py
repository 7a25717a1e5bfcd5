"""Phones to E.164 (``+14155550142``), or None when phonenumbers would call the number invalid.

Why this module is shaped the way it is:

* **It is on the hot path** of ingest and backfill (targets: 50,000 profiles/s with E.164 phones and
  25,000/s with national-format phones, one core).
* **North American numbers (the NANP, ``+1``) take an exact fast path**: :func:`nanp_valid`
  re-implements ``phonenumbers``' validity verdict with patterns precompiled from its own metadata
  (the property tests check that it agrees with ``phonenumbers``).
* **Everything else goes through** ``phonenumbers`` with the job's default region, behind an LRU
  cache (:func:`phone_slow`): re-sends of the same users hit the cache.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Final

import phonenumbers
from phonenumbers.phonemetadata import PhoneMetadata


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


def _compile_first_region_e164(
    leading: re.Pattern[str] | None, known: re.Pattern[str] | None
) -> re.Pattern[str]:
    """``+1`` numbers in E.164 that the first NANP region (the US) claims and knows, in one pattern.

    :func:`nanp_valid` calls these valid at its first step, and they are most numbers: one match
    spares the shape check, the slice and the walk over the regions.
    """
    if known is None:
        return re.compile("(?!)")  # matches nothing: every number takes the general path
    claims = f"(?={leading.pattern})" if leading is not None else ""
    return re.compile(rf"\+1(?=[2-9][0-9]{{9}}\Z){claims}{known.pattern}", re.ASCII)


_NANP = _compile_nanp()
_NANP_REGIONS: Final = frozenset(phonenumbers.COUNTRY_CODE_TO_REGION_CODE[1])
_FIRST_REGION_E164 = _compile_first_region_e164(*_NANP[0])


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
_PHONE_SEPARATORS = b" ().-+"
_NSN_FIRST = frozenset("23456789")
#: A NANP number in E.164, the shape most profiles carry.
_NANP_E164 = re.compile(r"\+1[2-9][0-9]{9}", re.ASCII)


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
    if len(raw) == 12 and raw[0] == "+":
        # E.164, the most common input: what the general fast path below would find, without its
        # digit extraction.
        if _FIRST_REGION_E164.fullmatch(raw) is not None:
            return raw
        if _NANP_E164.fullmatch(raw) is not None:
            return raw if nanp_valid(raw[2:]) else None
    if len(raw) <= 24 and _PHONE_FAST_SHAPE.fullmatch(raw) is not None:
        # The shape is ASCII, and bytes.translate deletes characters at half str.translate's cost.
        digits = raw.encode().translate(None, _PHONE_SEPARATORS).decode()
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
