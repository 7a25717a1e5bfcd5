"""Property tests: mapping never raises and never builds a record Attentive would refuse.

Deterministic in CI (``derandomize=True``, no example database). Examples per run:

* arbitrary profiles through a rich job: 6,000 (``test_any_profile_maps_to_a_contract_valid_record``)
* arbitrary profiles through a minimal job, exits included: 3,000
* profiles with values near the size limits: 1,000
* phone fast path vs phonenumbers: 2,500 NANP-shaped + 1,500 arbitrary phone-ish strings
* email fast path vs email-validator: 2,000

That is 10,000 generated profiles checked against the schema and the contract, plus 6,000 agreement
checks, in roughly 30-60 s on one core.
"""

from __future__ import annotations

import json
import math
import random
from typing import Any

import phonenumbers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.contract.schema import contract_problems, schema_errors
from worker.mapping.emails import email_slow, normalize_email
from worker.mapping.mapper import Mapper
from worker.mapping.phones import normalize_phone, phone_slow
from worker.mapping.reasons import MAPPING_ERROR, MAX_RECORD_BYTES
from worker.setup.jobconfig import parse_job_config

PROFILES = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

RICH = Mapper(
    parse_job_config(
        {
            "label": "rich",
            "authorization": "a",
            "audiences": ["vip_shoppers", "lapsed_buyers"],
            "identifier_mappings": {
                "phone": "phone",
                "email": "email",
                "user_id": "clientUserId",
                "shop.id": "shopifyId",
                "kid": "klaviyoId",
            },
            "extra_identifiers": ["loyalty_id", "crm.id"],
            "attribute_mappings": {
                "first_name": "firstName",
                "last_name": "lastName",
                "birthday": "dateOfBirth",
                "age": "age",
                "address.city": "city",
                "lat": "latitude",
                "lang": "locale.language",
                "org": "organization",
            },
            "custom_attributes": ["ltv", "tags", "prefs", "score", "note"],
        }
    )
)
MINIMAL = Mapper(
    parse_job_config(
        {
            "label": "min",
            "authorization": "a",
            "audiences": ["vip"],
            "identifier_mappings": {"email": "email"},
        }
    )
)

FIELDS = [
    "phone",
    "email",
    "user_id",
    "shop",
    "kid",
    "loyalty_id",
    "crm",
    "first_name",
    "last_name",
    "birthday",
    "age",
    "address",
    "lat",
    "lang",
    "org",
    "ltv",
    "tags",
    "prefs",
    "score",
    "note",
]


def _pool(seed: int = 20261126) -> list[str]:
    """Tricky strings, generated once (hypothesis' regex strategies are too slow for 10,000 profiles)."""
    rnd = random.Random(seed)
    digits = "0123456789"

    def d(n: int) -> str:
        return "".join(rnd.choice(digits) for _ in range(n))

    pool: list[str] = []
    for _ in range(400):  # phones: E.164, national formats, junk
        area, exch, line = rnd.choice("23456789") + d(2), rnd.choice("23456789") + d(2), d(4)
        pool += [
            f"+1{area}{exch}{line}",
            f"({area}) {exch}-{line}",
            f"1-{area}-{exch}-{line}",
            f"{area}.{exch}.{line}",
            f"+{rnd.randint(1, 999)}{d(rnd.randint(4, 13))}",
            f"+44 20 {d(4)} {d(4)}",
            d(rnd.randint(1, 16)),
            f"{area}{exch}{line} ext. {d(3)}",
        ]
    for _ in range(300):  # emails, valid and not
        local = "".join(rnd.choice("abcXYZ019._+-") for _ in range(rnd.randint(0, 12)))
        dom = "".join(rnd.choice("abc-019.") for _ in range(rnd.randint(0, 10)))
        pool += [
            f"{local}@{dom}.{rnd.choice(['com', 'io', 'test', 'c', 'COM', '1'])}",
            f" {local}@example.com ",
        ]
    for _ in range(300):  # dates in every accepted shape, and near misses
        y, m, dd = rnd.randint(1850, 2100), rnd.randint(0, 13), rnd.randint(0, 32)
        pool += [
            f"{y:04d}-{m:02d}-{dd:02d}",
            f"{y:04d}-{m:02d}-{dd:02d}T{rnd.randint(0, 25):02d}:{rnd.randint(0, 61):02d}:00Z",
            f"{y:04d}-{m:02d}-{dd:02d} 10:00:00+05:30",
            f"{m}/{dd}/{y}",
            f"{y}/{m}/{dd}",
            f"{y:04d}{m:02d}{dd:02d}",
            str(rnd.randint(-3 * 10**12, 3 * 10**12)),
            f"{rnd.uniform(-3e9, 3e9):.3f}",
        ]
    pool += [
        "",
        " ",
        "\t\n",
        "\u00a0",
        "\x00",
        "a\x00b",
        "null",
        "NaN",
        "inf",
        "-0",
        "0",
        "1e400",
        "29",
        "29.0",
    ]
    pool += ["\U0001f600" * 9, "é" * 300, "x" * 20_000, "Ünïcödé", "\u202e", " padded "]
    return pool


POOL = _pool()
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(POOL),
    st.sampled_from(POOL),
)
nested = st.lists(scalars, max_size=4) | st.dictionaries(
    st.sampled_from(["id", "city", "x", ""]), scalars, max_size=3
)
values = st.one_of(
    scalars,
    scalars,
    scalars,
    nested,
    st.lists(nested | scalars, max_size=3),
    st.dictionaries(st.sampled_from(["id", "city"]), nested, max_size=2),
)
profiles = st.dictionaries(st.sampled_from(FIELDS), values, max_size=12) | st.dictionaries(
    st.text(max_size=8), values, max_size=4
)
#: Most profiles of the rich job carry one usable identifier, so attributes are exercised too.
identified_profiles = st.builds(
    lambda base, extra: {**base, **extra},
    st.sampled_from([{}, {"user_id": "u-1"}, {"kid": 42}, {"email": "A@B.co"}, {"phone": "+12125551234"}]),
    profiles,
)
audience_changes = st.dictionaries(st.sampled_from(["vip_shoppers", "lapsed_buyers", "vip"]), st.booleans())


def _check(mapper: Mapper, profile: Any, audiences: dict[str, bool], include: bool) -> None:
    result = mapper.map(profile, audiences, include_attributes=include)
    assert result.skip_reason != MAPPING_ERROR
    if result.record is None:
        assert result.skip_reason
        return
    record = result.record
    body = {"users": [record]}
    assert schema_errors("UserAttributes", body) == []
    assert contract_problems(body) == []
    standard = {"phone", "email", "clientUserId", "shopifyId", "klaviyoId"}
    assert standard & set(record["identifiers"])
    assert "subscriptions" not in record
    encoded = json.dumps(record)
    assert len(encoded) < MAX_RECORD_BYTES
    assert len(json.dumps(record, ensure_ascii=False).encode("utf-8")) < MAX_RECORD_BYTES
    for section in record.get("attributes", {}).values():
        assert section not in ({}, None, "")
    if not include:
        assert set(record.get("attributes", {})) <= {"custom"}
    key = mapper.user_key(profile)
    assert key is None or isinstance(key, str)
    assert result.user_key == key  # ingest keys users by what mapping found, so they must agree


@settings(PROFILES, max_examples=6000)
@given(profile=identified_profiles, audiences=audience_changes)
def test_any_profile_maps_to_a_contract_valid_record(
    profile: dict[str, Any], audiences: dict[str, bool]
) -> None:
    _check(RICH, profile, audiences, True)


@settings(PROFILES, max_examples=3000)
@given(profile=profiles, audiences=audience_changes, include=st.booleans())
def test_minimal_job_and_exits_map_to_contract_valid_records(
    profile: dict[str, Any], audiences: dict[str, bool], include: bool
) -> None:
    _check(MINIMAL, profile, audiences, include)
    _check(RICH, profile, audiences, include)


big_strings = st.builds(
    lambda ch, n: ch * n,
    st.sampled_from(["a", "é", "\U0001f600", "\x01", '"', "\\"]),
    st.integers(min_value=0, max_value=12_000),
)


@settings(PROFILES, max_examples=1000)
@given(
    profile=st.fixed_dictionaries(
        {"email": st.just("a@b.co")},
        optional={f: big_strings | st.lists(big_strings, max_size=3) for f in FIELDS if f != "email"},
    )
)
def test_large_values_never_make_a_record_over_the_limit(profile: dict[str, Any]) -> None:
    _check(RICH, profile, {"vip_shoppers": True}, True)


def test_a_weird_non_mapping_profile_never_raises() -> None:
    for profile in (None, [], "x", 3, object(), {"email": object()}, {"address": ["not", "a", "map"]}):
        _check(RICH, profile, {}, True)


# --- Fast paths agree with the libraries -------------------------------------------------------

NANP_REGIONS = ["US", "CA", "PR", "AG", "BS", "JM", "GU", "DO"]
OTHER_REGIONS = ["GB", "DE", "FR", "BR", "IN", "AU", "IT"]
separators = st.lists(
    st.sampled_from(["", "", "", " ", "-", ".", "(", ")", " (", ") "]), min_size=13, max_size=13
)


@st.composite
def nanp_shaped(draw: st.DrawFn) -> str:
    """Strings the NANP fast path handles, and near misses: +1/1 prefixes, 10-11 digits, separators."""
    prefix = draw(st.sampled_from(["", "", "1", "+1", "+", "+ 1", "1-", "+1 ", "0", "11"]))
    digits = draw(st.text(alphabet="0123456789", min_size=9, max_size=11))
    if draw(st.booleans()):  # bias towards real-looking area codes and exchanges
        digits = (
            draw(st.sampled_from("23456789")) + digits[1:3] + draw(st.sampled_from("23456789")) + digits[4:]
        )
    seps = draw(separators)
    out = prefix
    for i, ch in enumerate(digits):
        out += seps[i] + ch
    return out + seps[-1]


@settings(max_examples=2500, derandomize=True, database=None, deadline=None)
@given(raw=nanp_shaped(), region=st.sampled_from(NANP_REGIONS + OTHER_REGIONS))
def test_phone_fast_path_agrees_with_phonenumbers(raw: str, region: str) -> None:
    stripped = raw.strip()
    if not stripped:
        return
    assert normalize_phone(stripped, region) == phone_slow.__wrapped__(stripped, region)


@settings(max_examples=1500, derandomize=True, database=None, deadline=None)
@given(
    raw=st.text(alphabet="0123456789+ ().-/x#", min_size=1, max_size=30) | st.text(min_size=1, max_size=20),
    region=st.sampled_from(NANP_REGIONS + OTHER_REGIONS),
)
def test_phone_normalisation_agrees_with_phonenumbers_on_any_string(raw: str, region: str) -> None:
    stripped = raw.strip()
    if not stripped:
        return
    assert normalize_phone(stripped, region) == phone_slow.__wrapped__(stripped, region)


def test_every_valid_example_number_of_every_nanp_region_is_accepted_by_the_fast_path() -> None:
    for region in phonenumbers.COUNTRY_CODE_TO_REGION_CODE[1]:
        for kind in (phonenumbers.PhoneNumberType.FIXED_LINE, phonenumbers.PhoneNumberType.MOBILE):
            example = phonenumbers.example_number_for_type(region, kind)
            if example is None:
                continue
            e164 = phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.E164)
            assert normalize_phone(e164, "US") == e164
            national = phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.NATIONAL)
            assert normalize_phone(national, region) == phone_slow.__wrapped__(national, region)


emails = st.one_of(
    st.from_regex(r"[A-Za-z0-9_%+.-]{1,70}@[A-Za-z0-9.-]{1,30}\.[A-Za-z0-9]{1,8}", fullmatch=True),
    st.from_regex(
        r"[a-z0-9]{1,10}@([a-z0-9-]{1,64}\.){1,3}(com|test|local|onion|arpa|io|c|x1)", fullmatch=True
    ),
    st.text(min_size=1, max_size=40),
)


@settings(max_examples=2000, derandomize=True, database=None, deadline=None)
@given(raw=emails)
def test_email_fast_path_agrees_with_email_validator(raw: str) -> None:
    stripped = raw.strip()
    if not stripped:
        return
    assert normalize_email(stripped) == email_slow.__wrapped__(stripped)


def test_floats_are_finite_in_records() -> None:
    result = RICH.map({"email": "a@b.co", "ltv": math.inf, "score": 1.5}, {})
    assert result.record is not None
    assert result.record["attributes"]["custom"] == {"score": 1.5}
