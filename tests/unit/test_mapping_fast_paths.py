"""Mapping's fast paths agree with the slow paths they skip, on the inputs most likely to part them.

Each fast path handles the common shape of a value with a cheaper check (an ISO date checked as text,
one pattern for an E.164 phone or an ASCII email, the record size bound not kept when it cannot be
reached, an epoch-milliseconds time taken as it is). Every test here compares the fast path with the
general one, or with the library the fast path stands in for, on tricky inputs: non-ASCII digits,
upper case, whitespace, control characters, dates that do not exist, years out of range, limits
plus or minus one.
"""

from __future__ import annotations

import datetime as dt
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.mapping import reasons
from worker.mapping.emails import email_slow, normalize_email
from worker.mapping.mapper import Mapper
from worker.mapping.phones import _FIRST_REGION_E164, nanp_valid, normalize_phone, phone_slow
from worker.mapping.reasons import MAX_RECORD_BYTES, MAX_VALUE_CHARS, Drop
from worker.mapping.transitions import MAX_FUTURE_MS, MIN_EVENT_MS, read_time_ms
from worker.mapping.values import (
    _date_text,
    convert_age,
    convert_client_user_id,
    convert_custom,
    convert_date,
    convert_other_id,
    convert_text,
)
from worker.setup.jobconfig import parse_job_config

EXAMPLES = settings(derandomize=True, database=None, deadline=None)


def code(out: Any) -> Any:
    """A converter's output with a drop shown as its reason code (drops are shared instances)."""
    return out.code if type(out) is Drop else out


# --- dateOfBirth: YYYY-MM-DD checked as text --------------------------------------------------------


def general_date(raw: str) -> Any:
    """What convert_date gives without its fast path: the general patterns on the trimmed text."""
    s = raw.strip()
    return code(_date_text(s)) if s else None


def _utc_today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


TRICKY_DATES = [
    "1990-07-04",
    " 1990-07-04 ",
    "\t1990-07-04\n",
    "2023-02-29",  # not a leap year
    "2024-02-29",
    "2000-02-29",  # divisible by 400: leap
    "1900-02-29",  # divisible by 100: not leap
    "2100-02-29",
    "1899-12-31",  # before MIN_BIRTH_YEAR
    "1900-01-01",
    "0000-01-01",
    "9999-12-31",  # in the future
    "1990-13-01",
    "1990-00-10",
    "1990-01-00",
    "1990-04-31",
    "1990-04-30",
    "1990-12-31",
    "1990-1-01",
    "199-07-04",
    "19900-7-04",
    "1990_07-04",
    "1990-07_04",
    "+990-07-04",
    "-990-07-04",
    "19\u06690-07-04",  # Arabic-Indic digit: isdigit() is True, the patterns are ASCII
    "\uff11\uff19\uff19\uff10-07-04",  # fullwidth digits
    "1990-\uff107-04",
    "19\u00b20-07-04",  # superscript two: isdigit() is True
    "1990/07/04",
    "07/04/1990",
    "19900704",
    "1990-07-04T10:00:00Z",
    "1990-07-04 23:59",
    "1990-07-0\uff14",
    (_utc_today() + dt.timedelta(days=1)).isoformat(),  # the last day accepted (one day of slack)
    (_utc_today() + dt.timedelta(days=2)).isoformat(),
    _utc_today().isoformat(),
]


@pytest.mark.parametrize("raw", TRICKY_DATES)
def test_iso_date_fast_path_agrees_with_the_general_patterns(raw: str) -> None:
    assert code(convert_date(raw)) == general_date(raw)


def test_iso_date_fast_path_keeps_the_bounds() -> None:
    assert convert_date("2024-02-29") == "2024-02-29"
    assert code(convert_date("2023-02-29")) == reasons.INVALID_DATE
    assert code(convert_date("1899-12-31")) == reasons.INVALID_DATE
    assert convert_date("1900-01-01") == "1900-01-01"
    tomorrow = _utc_today() + dt.timedelta(days=1)
    assert convert_date(tomorrow.isoformat()) == tomorrow.isoformat()
    assert code(convert_date((tomorrow + dt.timedelta(days=1)).isoformat())) == reasons.INVALID_DATE


@EXAMPLES
@given(
    y=st.integers(min_value=0, max_value=9999),
    m=st.integers(min_value=0, max_value=99),
    d=st.integers(min_value=0, max_value=99),
)
def test_any_iso_shaped_date_agrees_with_the_general_patterns(y: int, m: int, d: int) -> None:
    raw = f"{y:04d}-{m:02d}-{d:02d}"
    assert code(convert_date(raw)) == general_date(raw)


@EXAMPLES
@given(raw=st.text(alphabet="0123456789-/ T:Z\u0669\u00b2\uff11", min_size=8, max_size=12))
def test_any_date_like_text_agrees_with_the_general_patterns(raw: str) -> None:
    assert code(convert_date(raw)) == general_date(raw)


# --- email: one ASCII pattern with the limits inside --------------------------------------------------

TRICKY_EMAILS = [
    "jane@example.com",
    "Jane.Doe+Tag@Example.COM",
    "a" * 64 + "@example.com",  # longest local part
    "a" * 65 + "@example.com",
    "a@" + "b" * 63 + ".com",  # longest label
    "a@" + "b" * 64 + ".com",
    "a@" + "b" * 63 + "." + "c" * 64 + ".com",
    "a@b." + "c" * 63,  # longest top-level domain
    "a@b." + "c" * 64,
    "a@" + ".".join(["b" * 60] * 4) + ".com",  # near the 254 total
    "a@" + ".".join(["b" * 62] * 4) + ".com",
    "a@b.test",
    "a@b.TEST",
    "a@b.Local",
    "a@b.localhost",
    "a@b.LOCALHOST",
    "a@b.locals",
    "a@b.testing",
    "a@b.onion",
    "a@b.arpa",
    "a@b.invalid",
    "a@b.co",
    "a@b.c",
    "a@b.c0",
    "a@b.co.",
    "a..b@x.co",
    ".a@x.co",
    "a.@x.co",
    "a@-x.co",
    "a@x-.co",
    "a@x--y.co",
    "a@x-y.co",
    "a@@x.co",
    "a@x",
    "a@x.co\n",
    "a b@x.co",
    "josé@x.co",
    "a@exämple.com",
    "\uff41@x.co",  # fullwidth letter
    "a\u200b@x.co",
    "a\x00@x.co",
    "%_+-@x.co",
]


@pytest.mark.parametrize("raw", TRICKY_EMAILS)
def test_email_fast_path_agrees_with_email_validator_on_tricky_inputs(raw: str) -> None:
    assert normalize_email(raw) == email_slow.__wrapped__(raw)


# --- phone: NANP numbers in E.164 ---------------------------------------------------------------------

TRICKY_PHONES = [
    "+12125551234",
    "+14155550123",
    "+12045551234",  # Canada: not the first region
    "+18765551234",  # Jamaica
    "+16495551234",  # Turks and Caicos
    "+17875551234",  # Puerto Rico
    "+19005551234",  # premium rate
    "+18005551234",  # toll free
    "+15555551234",
    "+12125550100",
    "+11125551234",
    "+10125551234",
    "+1212555123",
    "+121255512345",
    "+1\uff12125551234",  # fullwidth digit
    "+1212555123\u0664",  # Arabic-Indic digit
    "+1212555 234",
    "+2125551234",
    "+44207183875",
    "12125551234",
    "1+2125551234",
]


@pytest.mark.parametrize("region", ["US", "CA", "JM", "GB"])
@pytest.mark.parametrize("raw", TRICKY_PHONES)
def test_e164_phone_fast_path_agrees_with_phonenumbers(raw: str, region: str) -> None:
    assert normalize_phone(raw, region) == phone_slow.__wrapped__(raw, region)


@EXAMPLES
@given(
    area=st.sampled_from(["212", "415", "204", "876", "649", "787", "800", "900", "555", "340"])
    | st.text(alphabet="0123456789", min_size=3, max_size=3),
    rest=st.text(alphabet="0123456789", min_size=7, max_size=7),
)
def test_first_region_pattern_agrees_with_the_walk_over_the_regions(area: str, rest: str) -> None:
    nsn = area + rest
    fast = _FIRST_REGION_E164.fullmatch("+1" + nsn) is not None
    if fast:  # what the pattern accepts, nanp_valid calls valid
        assert nanp_valid(nsn)
    expected = "+1" + nsn if nsn[0] in "23456789" and nanp_valid(nsn) else phone_slow("+1" + nsn, "US")
    assert normalize_phone("+1" + nsn, "US") == expected


def test_first_region_pattern_takes_most_us_numbers() -> None:
    rnd = random.Random(7)
    numbers = [
        f"+1{rnd.choice(['212', '415', '646', '972'])}{rnd.randint(2000000, 9999999)}" for _ in range(200)
    ]
    assert sum(_FIRST_REGION_E164.fullmatch(n) is not None for n in numbers) == len(numbers)


# --- strings: trimmed, bounded, no NUL or lone surrogates ---------------------------------------------

TEXT_CASES: list[tuple[Any, Any]] = [
    ("Ada", "Ada"),
    ("  Ada  ", "Ada"),
    ("\u3000Ada\x85", "Ada"),  # Unicode whitespace is trimmed
    ("", None),
    (" \t\n ", None),
    ("García", "García"),
    ("\U0001f600", "\U0001f600"),
    ("a\x01b", "a\x01b"),  # control characters other than NUL are kept (JSON escapes them)
    ("a\x00b", reasons.INVALID_CHARACTERS),
    ("\x00", reasons.INVALID_CHARACTERS),
    ("a\ud800", reasons.INVALID_CHARACTERS),
    ("é\udfff", reasons.INVALID_CHARACTERS),
    ("x" * MAX_VALUE_CHARS, "x" * MAX_VALUE_CHARS),
    (" " + "x" * MAX_VALUE_CHARS + " ", "x" * MAX_VALUE_CHARS),  # trimmed before the bound
    ("x" * (MAX_VALUE_CHARS + 1), reasons.STRING_TOO_LONG),
]


@pytest.mark.parametrize(("raw", "expected"), TEXT_CASES)
def test_text_and_custom_strings_are_cleaned(raw: str, expected: Any) -> None:
    assert code(convert_text(raw)) == expected
    assert code(convert_custom(raw)) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (" u-1 ", "u-1"),
        ("", None),
        ("x" * 100, "x" * 100),
        ("x" * 101, reasons.CLIENT_USER_ID_TOO_LONG),
        ("u\x00", reasons.INVALID_CHARACTERS),
        ("u\ud800", reasons.INVALID_CHARACTERS),
        (12345, "12345"),
        (12.0, "12"),
        (True, reasons.INVALID_IDENTIFIER),
        (10**60, "1" + "0" * 60),
        (10**61, reasons.INVALID_IDENTIFIER),  # over 200 bits
    ],
)
def test_client_user_id_strings_and_numbers_are_cleaned(raw: Any, expected: Any) -> None:
    assert code(convert_client_user_id(raw)) == expected


def test_other_identifiers_are_bounded_at_255() -> None:
    assert convert_other_id("x" * 255) == "x" * 255
    assert code(convert_other_id("x" * 256)) == reasons.IDENTIFIER_TOO_LONG
    assert code(convert_other_id(" x ")) == "x"


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        (["a", " b ", "", None, 1, True, 1.5], "a,b,1,true,1.5"),
        ([" ", None], None),
        (["a\x00"], reasons.INVALID_CHARACTERS),
        (["\ud800", "b"], reasons.INVALID_CHARACTERS),
        (["x" * 5000, "y" * 4999], "x" * 5000 + "," + "y" * 4999),  # exactly MAX_VALUE_CHARS
        (["x" * 5000, "y" * 5000], reasons.STRING_TOO_LONG),
    ],
)
def test_arrays_are_joined_and_checked(items: list[Any], expected: Any) -> None:
    assert code(convert_custom(items)) == expected


# --- the record size bound is not kept when no record can reach the limit ---------------------------

SMALL_JOB = {
    "label": "small",
    "authorization": "a",
    "audiences": ["vip_shoppers"],
    "identifier_mappings": {"phone": "phone", "email": "email", "user_id": "clientUserId"},
    "attribute_mappings": {
        "first_name": "firstName",
        "last_name": "lastName",
        "birthday": "dateOfBirth",
        "address.city": "city",
    },
    "custom_attributes": ["ltv", "tags", "note"],
}
UNMEASURED = Mapper(parse_job_config(SMALL_JOB))
MEASURED = Mapper(parse_job_config(SMALL_JOB))
MEASURED._attributes_worst = MAX_RECORD_BYTES  # every value is measured, as before the fast path

huge = st.builds(
    lambda ch, n: ch * n,
    st.sampled_from(["a", "é", "\U0001f600", "\x01", '"', "\\", " "]),
    st.integers(min_value=0, max_value=12_000),
)
huge_values = huge | st.lists(huge, max_size=4) | st.integers() | st.floats() | st.none()


def test_the_small_job_is_not_measured_and_the_forced_one_is() -> None:
    audiences_worst = 16 + reasons.WORST_BYTES_PER_CHAR * len("vip_shoppers")
    assert UNMEASURED._base_size + audiences_worst + UNMEASURED._attributes_worst <= MAX_RECORD_BYTES
    assert MEASURED._base_size + MEASURED._attributes_worst > MAX_RECORD_BYTES


@settings(EXAMPLES, max_examples=400)
@given(
    profile=st.fixed_dictionaries(
        {"email": st.just("a@b.co")},
        optional={
            f: huge_values
            for f in ["first_name", "last_name", "birthday", "address.city", "ltv", "tags", "note"]
        },
    ),
    include=st.booleans(),
)
def test_unmeasured_records_equal_measured_ones(profile: dict[str, Any], include: bool) -> None:
    fast = UNMEASURED.map(profile, {"vip_shoppers": True}, include_attributes=include)
    slow = MEASURED.map(profile, {"vip_shoppers": True}, include_attributes=include)
    assert (fast.record, fast.skip_reason, fast.dropped, fast.user_key) == (
        slow.record,
        slow.skip_reason,
        slow.dropped,
        slow.user_key,
    )


@settings(EXAMPLES, max_examples=400)
@given(value=huge_values | st.lists(st.integers() | st.floats() | huge, max_size=3000))
def test_no_converter_sends_a_string_longer_than_the_value_bound(value: Any) -> None:
    """The premise of not measuring: an attribute value is at most MAX_VALUE_CHARS characters."""
    for convert in (convert_text, convert_custom, convert_date, convert_age):
        out = convert(value)
        assert type(out) is not str or len(out) <= MAX_VALUE_CHARS


def test_a_present_null_flat_key_wins_over_a_nested_value() -> None:
    profile = {"email": "a@b.co", "address.city": None, "address": {"city": "Paris"}}
    result = UNMEASURED.map(profile, {})
    assert result.record is not None and "attributes" not in result.record
    result = UNMEASURED.map({"email": "a@b.co", "address": {"city": "Paris"}}, {})
    assert result.record is not None and result.record["attributes"] == {"location": {"city": "Paris"}}


# --- event times: epoch milliseconds in the window are taken as they are ----------------------------


class Int(int):
    """An int subclass: read_time_ms takes its general path for it (the fast path wants exact ints)."""


NOW = 1_795_712_400_000


@pytest.mark.parametrize(
    ("value", "now"),
    [
        (MIN_EVENT_MS - 1, NOW),
        (MIN_EVENT_MS, NOW),
        (MIN_EVENT_MS + 1, NOW),
        (NOW, NOW),
        (NOW + MAX_FUTURE_MS, NOW),
        (NOW + MAX_FUTURE_MS + 1, NOW),
        (10**11 - 1, NOW),  # seconds band
        (10**14 - 1, 10**15),  # the milliseconds band's last value, with a clock far ahead
        (10**14, 10**15),  # microseconds band
        (0, NOW),
        (-1, NOW),
        (2**63, NOW),
    ],
)
def test_epoch_ms_fast_path_agrees_with_the_general_path(value: int, now: int) -> None:
    assert read_time_ms(value, now) == read_time_ms(Int(value), now)


def test_a_bool_time_is_not_taken_for_a_number() -> None:
    assert not isinstance(read_time_ms(True, NOW), int)
