"""Mapping rules, one behaviour per test: what is repaired, what is dropped and why."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest

from tests.contract.schema import contract_problems, schema_errors
from worker.mapping import reasons
from worker.mapping.mapper import Mapper, MapResult
from worker.setup.jobconfig import parse_job_config


def mapper(**overrides: Any) -> Mapper:
    data: dict[str, Any] = {
        "label": "job",
        "authorization": "auth",
        "audiences": ["vip_shoppers", "lapsed_buyers"],
        "identifier_mappings": {
            "phone_number": "phone",
            "email": "email",
            "user_id": "clientUserId",
            "shopify": "shopifyId",
            "klaviyo": "klaviyoId",
        },
        "extra_identifiers": ["loyalty_id"],
        "attribute_mappings": {
            "first_name": "firstName",
            "last_name": "lastName",
            "birthday": "dateOfBirth",
            "age": "age",
            "address.city": "city",
            "lat": "latitude",
            "lang": "locale.language",
        },
        "custom_attributes": ["ltv", "tags", "prefs", "is_vip"],
    }
    data.update(overrides)
    return Mapper(parse_job_config(data))


M = mapper()


def run(profile: dict[str, Any], audiences: dict[str, bool] | None = None, **kw: Any) -> MapResult:
    result = M.map(profile, audiences or {}, **kw)
    if result.record is not None:
        body = {"users": [result.record]}
        assert schema_errors("UserAttributes", body) == []
        assert contract_problems(body) == []
    return result


def record(profile: dict[str, Any], audiences: dict[str, bool] | None = None, **kw: Any) -> dict[str, Any]:
    result = run(profile, audiences, **kw)
    assert result.record is not None, result
    return result.record


def ids(profile: dict[str, Any]) -> dict[str, Any]:
    return dict(record({"user_id": "u1", **profile})["identifiers"])


def attrs(profile: dict[str, Any]) -> dict[str, Any]:
    return dict(record({"user_id": "u1", **profile}).get("attributes", {}))


def dropped(profile: dict[str, Any]) -> list[tuple[str, str]]:
    return run({"user_id": "u1", **profile}).dropped


# --- record shape ---------------------------------------------------------------------------------


def test_full_profile_maps_to_the_attentive_record_shape() -> None:
    rec = record(
        {
            "phone_number": "+12125551234",
            "email": "Jane@Example.com",
            "user_id": "u-1",
            "shopify": 345678901,
            "klaviyo": "a1b2",
            "loyalty_id": "L-7",
            "first_name": "Jane",
            "birthday": "1990-01-15",
            "address": {"city": "Brooklyn"},
            "lang": "fr",
            "ltv": 12.5,
            "tags": ["a", "b"],
        },
        {"vip_shoppers": True},
    )
    assert rec == {
        "identifiers": {
            "phone": "+12125551234",
            "email": "jane@example.com",
            "clientUserId": "u-1",
            "shopifyId": "345678901",
            "klaviyoId": "a1b2",
            "customIdentifiers": [{"key": "loyalty_id", "value": "L-7"}],
        },
        "attributes": {
            "firstName": "Jane",
            "demographic": {"dateOfBirth": "1990-01-15"},
            "location": {"city": "Brooklyn"},
            "locale": {"language": "fr"},
            "custom": {"ltv": 12.5, "tags": "a,b", "vip_shoppers": True},
        },
    }


def test_empty_sub_objects_are_omitted() -> None:
    assert record({"user_id": "u1"}) == {"identifiers": {"clientUserId": "u1"}}


def test_record_never_has_subscriptions() -> None:
    assert "subscriptions" not in record({"user_id": "u1", "subscriptions": [{"channel": "TEXT"}]})


def test_profile_without_usable_identifier_is_skipped_with_no_identifier() -> None:
    result = run({"first_name": "Jane", "phone_number": "12", "email": "nope"})
    assert result.record is None
    assert result.skip_reason == reasons.NO_IDENTIFIER
    assert ("phone_number", reasons.INVALID_PHONE) in result.dropped


def test_custom_identifiers_alone_are_not_enough_to_send() -> None:
    result = run({"loyalty_id": "L-7"})
    assert result.record is None and result.skip_reason == reasons.NO_IDENTIFIER


def test_non_mapping_profile_is_skipped_not_raised() -> None:
    assert M.map(None, {}).skip_reason == reasons.INVALID_PROFILE  # type: ignore[arg-type]
    assert M.map(["x"], {}).skip_reason == reasons.INVALID_PROFILE  # type: ignore[arg-type]
    assert M.user_key(None) is None  # type: ignore[arg-type]


def test_nested_profile_fields_are_reached_by_dotted_path() -> None:
    assert attrs({"address": {"city": "Paris"}})["location"] == {"city": "Paris"}


def test_flat_key_spelled_with_dots_is_read_too() -> None:
    assert attrs({"address.city": "Lyon"})["location"] == {"city": "Lyon"}


def test_dotted_path_through_a_non_mapping_is_treated_as_missing() -> None:
    assert attrs({"address": "Main street"}) == {}


# --- identifiers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw", ["+12125551234", "(212) 555-1234", "212-555-1234", "212.555.1234", "1 212 555 1234", "2125551234"]
)
def test_us_phone_formats_are_normalised_to_e164(raw: str) -> None:
    assert ids({"phone_number": raw})["phone"] == "+12125551234"


def test_phone_given_as_an_integer_is_normalised() -> None:
    assert ids({"phone_number": 12125551234})["phone"] == "+12125551234"


def test_international_phone_is_normalised_through_phonenumbers() -> None:
    assert ids({"phone_number": "+44 20 7183 8750"})["phone"] == "+442071838750"


def test_national_phone_uses_the_jobs_default_region() -> None:
    uk = mapper(default_phone_region="GB")
    result = uk.map({"phone_number": "020 7183 8750"}, {})
    assert result.record is not None and result.record["identifiers"]["phone"] == "+442071838750"


@pytest.mark.parametrize("raw", ["12", "555-1234", "+1 111 555 1234", "not a phone", "+999123", True, 1.5])
def test_invalid_phone_is_dropped_with_a_reason(raw: Any) -> None:
    assert "phone" not in ids({"phone_number": raw})
    assert dropped({"phone_number": raw}) == [("phone_number", reasons.INVALID_PHONE)]


def test_email_is_trimmed_and_lowercased() -> None:
    assert ids({"email": "  Jane.Doe+Tag@Example.COM "})["email"] == "jane.doe+tag@example.com"


def test_internationalised_email_is_validated_by_email_validator() -> None:
    assert ids({"email": "josé@Exämple.com"})["email"] == "josé@exämple.com"


@pytest.mark.parametrize(
    "raw", ["jane", "jane@", "@example.com", "a..b@example.com", "a@b.test", 42, ["a@b.co"]]
)
def test_invalid_email_is_dropped_with_a_reason(raw: Any) -> None:
    assert dropped({"email": raw}) == [("email", reasons.INVALID_EMAIL)]


def test_client_user_id_over_100_characters_is_dropped_not_truncated() -> None:
    result = run({"user_id": "x" * 101, "email": "a@b.co"})
    assert result.record is not None and "clientUserId" not in result.record["identifiers"]
    assert result.dropped == [("user_id", reasons.CLIENT_USER_ID_TOO_LONG)]
    assert ids({"user_id": "x" * 100})["clientUserId"] == "x" * 100


def test_numbers_for_string_identifiers_become_strings() -> None:
    got = ids({"user_id": 12345, "shopify": 345678901.0, "klaviyo": 7})
    assert got["clientUserId"] == "12345" and got["shopifyId"] == "345678901" and got["klaviyoId"] == "7"


@pytest.mark.parametrize("raw", [True, False, 1.5, {"a": 1}, [1]])
def test_bools_floats_and_containers_are_not_identifiers(raw: Any) -> None:
    assert dropped({"shopify": raw}) == [("shopify", reasons.INVALID_IDENTIFIER)]


def test_other_identifiers_over_255_characters_are_dropped() -> None:
    assert dropped({"klaviyo": "k" * 256}) == [("klaviyo", reasons.IDENTIFIER_TOO_LONG)]


@pytest.mark.parametrize("raw", [None, "", "   ", "\t\n"])
def test_null_empty_and_blank_values_are_omitted_silently(raw: Any) -> None:
    profile = {"email": raw, "first_name": raw, "ltv": raw, "loyalty_id": raw, "birthday": raw, "age": raw}
    assert record({"user_id": "u1", **profile}) == {"identifiers": {"clientUserId": "u1"}}
    assert dropped(profile) == []


def test_custom_identifier_values_are_strings_and_blank_ones_are_skipped() -> None:
    assert ids({"loyalty_id": 77})["customIdentifiers"] == [{"key": "loyalty_id", "value": "77"}]
    assert "customIdentifiers" not in ids({"loyalty_id": "  "})
    assert dropped({"loyalty_id": False}) == [("loyalty_id", reasons.INVALID_IDENTIFIER)]


def test_nul_characters_are_dropped_with_a_reason() -> None:
    assert dropped({"user_id": "a\x00b", "email": "a@b.co"}) == [("user_id", reasons.INVALID_CHARACTERS)]
    assert dropped({"first_name": "Ja\x00ne"}) == [("first_name", reasons.INVALID_CHARACTERS)]


def test_lone_surrogates_are_dropped_with_a_reason() -> None:
    assert dropped({"ltv": "bad \ud800 text"}) == [("ltv", reasons.INVALID_CHARACTERS)]


# --- user key -------------------------------------------------------------------------------------


def test_user_key_is_the_normalised_first_identifier_by_default() -> None:
    assert M.user_key({"phone_number": "(212) 555-1234"}) == "+12125551234"
    assert M.user_key({"phone_number": "bogus"}) is None
    assert M.user_key({}) is None


def test_user_key_field_can_point_at_an_email_or_any_field() -> None:
    assert mapper(user_key_field="email").user_key({"email": " A@B.CO "}) == "a@b.co"
    assert mapper(user_key_field="lytics.uid").user_key({"lytics": {"uid": 991}}) == "991"


# --- typed attributes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1990-01-15", "1990-01-15"),
        ("1990-01-15T23:30:00Z", "1990-01-15"),
        ("1990-01-15T00:00:00+02:00", "1990-01-15"),
        ("1990-01-15 08:00:00.123-05:00", "1990-01-15"),
        ("1990/1/5", "1990-01-05"),
        ("01/15/1990", "1990-01-15"),
        ("1/5/1990", "1990-01-05"),
        ("19900115", "1990-01-15"),
        (632361600, "1990-01-15"),
        (632361600000, "1990-01-15"),
        (632361600.5, "1990-01-15"),
        ("632361600", "1990-01-15"),
        (-315619200, "1960-01-01"),
        (dt.date(1990, 1, 15), "1990-01-15"),
        (dt.datetime(1990, 1, 15, 23, 0, tzinfo=dt.UTC), "1990-01-15"),
        ("2000-02-29", "2000-02-29"),
    ],
)
def test_date_of_birth_is_normalised_to_yyyy_mm_dd(raw: Any, expected: str) -> None:
    assert attrs({"birthday": raw})["demographic"] == {"dateOfBirth": expected}


@pytest.mark.parametrize(
    "raw",
    [
        "1990-02-30",
        "1900-02-29",
        "25/12/1990",
        "1899-12-31",
        "2999-01-01",
        "1990-13-01",
        "1990-01-15T25:00:00",
        "January 5th",
        "nan",
        float("nan"),
        float("inf"),
        10**20,
        True,
    ],
)
def test_unusable_date_of_birth_is_dropped_with_a_reason(raw: Any) -> None:
    assert dropped({"birthday": raw}) == [("birthday", reasons.INVALID_DATE)]


def test_date_of_birth_in_the_future_is_dropped() -> None:
    future = (dt.datetime.now(dt.UTC).date() + dt.timedelta(days=3)).isoformat()
    assert dropped({"birthday": future}) == [("birthday", reasons.INVALID_DATE)]


@pytest.mark.parametrize(
    ("raw", "expected"), [(29, 29), ("29", 29), (" 29 ", 29), (29.0, 29), ("29.0", 29), (0, 0)]
)
def test_age_is_an_integer(raw: Any, expected: int) -> None:
    assert attrs({"age": raw})["demographic"] == {"age": expected}


@pytest.mark.parametrize("raw", [-1, 131, 29.5, "29.5", "-3", "old", True, 10**40, float("inf")])
def test_negative_absurd_or_fractional_age_is_dropped(raw: Any) -> None:
    assert dropped({"age": raw}) == [("age", reasons.INVALID_AGE)]


def test_string_attributes_are_trimmed_and_numbers_become_strings() -> None:
    got = attrs({"first_name": "  Jane ", "last_name": 42, "lat": 40.73061})
    assert got["firstName"] == "Jane"
    assert got["lastName"] == "42"
    assert got["location"] == {"latitude": "40.73061"}


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (["Jane"], reasons.UNSUPPORTED_ARRAY_VALUE),
        ({"given": "Jane"}, reasons.UNSUPPORTED_MAP_VALUE),
        (True, reasons.UNSUPPORTED_VALUE_TYPE),
        (float("nan"), reasons.NON_FINITE_NUMBER),
        (10**30, reasons.NUMBER_OUT_OF_RANGE),
        ("J" * 10_001, reasons.STRING_TOO_LONG),
        (object(), reasons.UNSUPPORTED_VALUE_TYPE),
    ],
)
def test_string_attribute_refuses_arrays_maps_and_bools(raw: Any, reason: str) -> None:
    assert dropped({"first_name": raw}) == [("first_name", reason)]


# --- custom attributes and audience flags ---------------------------------------------------------


def test_custom_values_keep_their_primitive_type() -> None:
    got = attrs({"ltv": 10, "tags": 2.5, "prefs": " x ", "is_vip": False})["custom"]
    assert got == {"ltv": 10, "tags": 2.5, "prefs": "x", "is_vip": False}


def test_arrays_become_comma_separated_strings_skipping_nulls_and_blanks() -> None:
    got = attrs({"tags": ["shoes", None, "", " bags ", 3, 1.5, True]})["custom"]
    assert got == {"tags": "shoes,bags,3,1.5,true"}


def test_an_array_of_only_blanks_is_omitted() -> None:
    assert attrs({"tags": [None, " ", ""]}) == {}


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (["a", ["b"]], reasons.UNSUPPORTED_NESTED_ARRAY),
        (["a", {"b": 1}], reasons.UNSUPPORTED_NESTED_ARRAY),
        ({"a": 1}, reasons.UNSUPPORTED_MAP_VALUE),
        (float("inf"), reasons.NON_FINITE_NUMBER),
        (float("-inf"), reasons.NON_FINITE_NUMBER),
        ([1.0, float("nan")], reasons.NON_FINITE_NUMBER),
        (2**63, reasons.NUMBER_OUT_OF_RANGE),
        ("v" * 10_001, reasons.STRING_TOO_LONG),
        (["v" * 6000, "w" * 6000], reasons.STRING_TOO_LONG),
    ],
)
def test_unsendable_custom_values_are_dropped_with_a_reason(raw: Any, reason: str) -> None:
    assert dropped({"ltv": raw}) == [("ltv", reason)]


def test_audience_flags_are_written_as_custom_booleans() -> None:
    rec = record({"user_id": "u1"}, {"vip_shoppers": True, "lapsed_buyers": False})
    assert rec["attributes"]["custom"] == {"vip_shoppers": True, "lapsed_buyers": False}


def test_audience_flag_wins_over_a_same_named_custom_field() -> None:
    same = Mapper(
        parse_job_config(
            {
                "label": "j",
                "authorization": "a",
                "audiences": ["x"],
                "identifier_mappings": {"id": "clientUserId"},
            }
        )
    )
    same._custom = (("vip", None, "vip"),)  # config validation forbids this; the mapper still copes
    result = same.map({"id": "u", "vip": "no"}, {"vip": True})
    assert result.record is not None and result.record["attributes"]["custom"] == {"vip": True}


def test_exits_carry_only_identifiers_and_audience_flags() -> None:
    rec = record(
        {"user_id": "u1", "first_name": "Jane", "ltv": 3, "loyalty_id": "L"},
        {"vip_shoppers": False},
        include_attributes=False,
    )
    assert rec == {
        "identifiers": {"clientUserId": "u1", "customIdentifiers": [{"key": "loyalty_id", "value": "L"}]},
        "attributes": {"custom": {"vip_shoppers": False}},
    }


def test_dropped_values_on_exits_are_not_reported() -> None:
    assert (
        run({"user_id": "u1", "birthday": "bad"}, {"vip_shoppers": False}, include_attributes=False).dropped
        == []
    )


# --- size limit -----------------------------------------------------------------------------------


def test_record_never_exceeds_the_size_limit_values_that_do_not_fit_are_dropped() -> None:
    names = [f"c{i}" for i in range(98)]
    big = Mapper(
        parse_job_config(
            {
                "label": "j",
                "authorization": "a",
                "audiences": ["vip"],
                "identifier_mappings": {"id": "clientUserId"},
                "custom_attributes": names,
            }
        )
    )
    profile: dict[str, Any] = {"id": "u1", **{n: "\U0001f600" * 10_000 for n in names}}
    result = big.map(profile, {"vip": True})
    assert result.record is not None
    assert len(json.dumps(result.record)) <= reasons.MAX_RECORD_BYTES
    assert (names[-1], reasons.RECORD_TOO_LARGE) in result.dropped
    assert result.record["attributes"]["custom"]["vip"] is True


def test_mapping_never_raises_on_a_misbehaving_mapping() -> None:
    class Broken(dict[str, Any]):
        def get(self, *args: Any) -> Any:
            raise RuntimeError("boom")

    assert M.map(Broken(), {}).skip_reason == reasons.MAPPING_ERROR
    assert M.user_key(Broken()) is None


def test_reason_codes_are_short_snake_case_and_unique() -> None:
    codes = [*reasons.SKIP_REASONS, *reasons.DROP_REASONS]
    assert len(codes) == len(set(codes))
    assert all(c.replace("_", "").isalnum() and c == c.lower() and len(c) <= 32 for c in codes)
