"""The sandbox's validation against the contract's own examples (CONTRACT.md §1, §7.3).

Every case accepted here is also checked against the published schema and the contract rules in
tests/contract/schema.py, so the sandbox can never be more lenient than the contract.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from sandbox.validation import (
    MAX_RECORD_BYTES,
    BodyError,
    check_users_array,
    is_date,
    is_e164,
    oversized_records,
    parse_body,
    record_problems,
    user_problems,
)
from tests.contract.schema import contract_problems, schema_errors


def user(**identifiers: Any) -> dict[str, Any]:
    return {"identifiers": identifiers or {"phone": "+19148440001"}}


def problems_of(u: Any) -> list[str]:
    return user_problems("users[0]", u)


def assert_valid_everywhere(u: dict[str, Any]) -> None:
    """Accepted by the sandbox, the published schema and the contract's extra rules."""
    assert problems_of(u) == []
    body = {"users": [u]}
    assert schema_errors("UserAttributes", body) == []
    assert [p for p in contract_problems(body) if "subscriptions" not in p] == []


@pytest.mark.parametrize("phone", ["+19148440001", "+442071838750", "+551155256325"])
def test_contract_valid_phones_are_accepted(phone: str) -> None:
    assert is_e164(phone)
    assert_valid_everywhere(user(phone=phone))


@pytest.mark.parametrize(
    "phone",
    [
        "19148440001",
        "+1---914---844---0001",
        "1 () 914 844 0001",
        "+0123456789",
        "+1",
        "+1234567890123456",  # 16 digits
        "+19148440001\n",  # $ would accept this; the sandbox must not
        "+" + "".join(chr(0xFF10 + int(d)) for d in "19148440001"),  # full-width digits match \d in Python
    ],
)
def test_invalid_phones_are_rejected_naming_index_and_field(phone: str) -> None:
    assert not is_e164(phone)
    problems = problems_of(user(phone=phone))
    assert problems == [f"users[0].identifiers.phone: not E.164: {phone!r}"]


@pytest.mark.parametrize("date", ["2022-11-08", "2024-02-29", "1900-01-01"])
def test_real_calendar_dates_are_accepted(date: str) -> None:
    assert is_date(date)
    assert_valid_everywhere({**user(), "attributes": {"demographic": {"dateOfBirth": date}}})


@pytest.mark.parametrize(
    "date",
    ["2023-02-29", "2022-13-01", "2022-11-31", "22-11-08", "2022/11/08", "2022-11-08T00:00:00", "0000-01-01"],
)
def test_invalid_dates_are_rejected(date: str) -> None:
    assert not is_date(date)
    problems = problems_of({**user(), "attributes": {"demographic": {"dateOfBirth": date}}})
    assert problems == [f"users[0].attributes.demographic.dateOfBirth: not a valid YYYY-MM-DD date: {date!r}"]


@pytest.mark.parametrize(
    ("identifiers", "fragment"),
    [
        (None, "identifiers: required"),
        ({}, "identifiers: must contain at least one identifier"),
        ({"phone": None}, "identifiers.phone: null"),
        ({"email": ""}, "identifiers.email: empty string"),
        ({"phone": "+19148440001", "email": None}, "identifiers.email: null"),
        ({"phone": "+19148440001", "shopifyId": ""}, "identifiers.shopifyId: empty string"),
        ({"phone": 19148440001}, "identifiers.phone: must be a string"),
        ({"klaviyoId": 12}, "identifiers.klaviyoId: must be a string"),
        ({"email": "not-an-email"}, "identifiers.email: not an email address"),
        ({"externalId": "x"}, "identifiers.externalId: unknown identifier"),
        ({"customIdentifiers": []}, "identifiers.customIdentifiers: empty array"),
        ({"customIdentifiers": [{"key": "loyalty"}]}, "customIdentifiers[0].value: required"),
        ({"customIdentifiers": [{"value": "A1"}]}, "customIdentifiers[0].key: required"),
        (
            {"customIdentifiers": [{"key": "loyalty", "value": 7}]},
            "customIdentifiers[0].value: must be a string",
        ),
        (
            {"customIdentifiers": [{"key": "loyalty", "value": ""}]},
            "customIdentifiers[0].value: empty string",
        ),
        (
            {"customIdentifiers": {"key": "a", "value": "b"}},
            "identifiers.customIdentifiers: must be an array",
        ),
    ],
)
def test_bad_identifiers_are_rejected(identifiers: Any, fragment: str) -> None:
    u: dict[str, Any] = {} if identifiers is None else {"identifiers": identifiers}
    problems = problems_of(u)
    assert any(fragment in p for p in problems), problems
    assert all(p.startswith("users[0].") for p in problems)


def test_only_null_or_empty_identifiers_means_no_usable_identifier() -> None:
    problems = problems_of({"identifiers": {"phone": None, "email": ""}})
    assert "users[0].identifiers: no usable identifier" in problems[-1]


def test_every_identifier_kind_is_accepted() -> None:
    assert_valid_everywhere(
        {
            "identifiers": {
                "email": "jsmith@attentive.com",
                "phone": "+15008675309",
                "shopifyId": "345678901",
                "klaviyoId": "a1b2c3d4e5f6a7b8c9d0e1f2",
                "clientUserId": "freeform-client-id",
                "customIdentifiers": [{"key": "loyalty_points_id", "value": "ADFK4D7D"}],
            }
        }
    )


def test_client_user_id_of_100_characters_is_the_limit() -> None:
    assert_valid_everywhere(user(clientUserId="c" * 100))
    assert problems_of(user(clientUserId="c" * 101)) == [
        "users[0].identifiers.clientUserId: longer than 100 characters (101)"
    ]


def test_custom_key_of_200_characters_is_the_limit() -> None:
    assert_valid_everywhere({**user(), "attributes": {"custom": {"k" * 200: True}}})
    problems = problems_of({**user(), "attributes": {"custom": {"k" * 201: True}}})
    assert len(problems) == 1 and "key longer than 200 characters (201)" in problems[0]


@pytest.mark.parametrize("value", ["green", 6, 2.5, True, False, ""])
def test_primitive_custom_values_are_accepted(value: Any) -> None:
    assert_valid_everywhere({**user(), "attributes": {"custom": {"favorite": value}}})


@pytest.mark.parametrize(
    ("value", "kind"), [(["New York City"], "array"), ({"favorite city": "Boston"}, "object"), (None, "null")]
)
def test_array_object_and_null_custom_values_are_rejected(value: Any, kind: str) -> None:
    problems = problems_of({**user(), "attributes": {"custom": {"favorite": value}}})
    assert problems == [
        f"users[0].attributes.custom['favorite']: must be a string, number or boolean, got {kind}"
    ]


@pytest.mark.parametrize(
    ("attributes", "fragment"),
    [
        ({"firstName": 5}, "attributes.firstName: must be a string, got integer"),
        ({"lastName": None}, "attributes.lastName: must be a string, got null"),
        ({"demographic": {"age": "29"}}, "demographic.age: must be an integer, got string"),
        ({"demographic": {"age": 29.5}}, "demographic.age: must be an integer, got number"),
        ({"demographic": {"age": True}}, "demographic.age: must be an integer, got boolean"),
        ({"demographic": {"dateOfBirth": 20221108}}, "demographic.dateOfBirth: must be a string"),
        ({"demographic": "x"}, "attributes.demographic: must be an object"),
        ({"location": {"latitude": 40.7}}, "location.latitude: must be a string, got number"),
        ({"location": {"planet": "Earth"}}, "location.planet: unknown field"),
        ({"locale": {"language": ["fr"]}}, "locale.language: must be a string, got array"),
        ({"city": "Brooklyn"}, "attributes.city: unknown field"),
        ({"custom": ["a"]}, "attributes.custom: must be an object"),
    ],
)
def test_typed_attributes_follow_the_schema(attributes: dict[str, Any], fragment: str) -> None:
    u = {**user(), "attributes": attributes}
    problems = problems_of(u)
    assert any(fragment in p for p in problems), problems
    # The published schema or the contract agrees the record is bad, or the sandbox documents why it is
    # stricter (unknown fields, which Attentive would silently drop).
    assert schema_errors("UserAttributes", {"users": [u]}) or "unknown field" in fragment


def test_a_full_record_like_the_contract_example_is_accepted() -> None:
    assert_valid_everywhere(
        {
            "identifiers": {"email": "jsmith@attentive.com", "phone": "+15008675309"},
            "attributes": {
                "firstName": "John",
                "lastName": "Smith",
                "demographic": {"language": "English/American", "dateOfBirth": "2022-11-08", "age": 29},
                "location": {"state": "NY", "zip": "11222", "latitude": "40.730610", "country": "US"},
                "locale": {"language": "French", "country": "CA"},
                "custom": {"lucky number": 6, "favorite color": "green", "has pets": True},
            },
        }
    )


def test_subscriptions_follow_the_schema() -> None:
    ok = {"signUpSourceId": "123", "channel": "TEXT", "subscriptionType": "MARKETING", "singleOptIn": True}
    assert problems_of({**user(), "subscriptions": [ok]}) == []
    assert schema_errors("UserAttributes", {"users": [{**user(), "subscriptions": [ok]}]}) == []
    missing = problems_of({**user(), "subscriptions": [{"channel": "SMS"}]})
    assert "users[0].subscriptions[0].signUpSourceId: required" in missing
    assert "users[0].subscriptions[0].subscriptionType: required" in missing
    assert any("channel: must be one of TEXT, EMAIL" in p for p in missing)


def test_unknown_user_fields_and_non_object_users_are_rejected() -> None:
    assert problems_of({**user(), "attributes": {}, "extra": 1}) == ["users[0].extra: unknown field"]
    assert problems_of("+19148440001") == ["users[0]: must be an object, got string"]


@pytest.mark.parametrize("size", [1, 256])
def test_users_array_of_1_to_256_items_is_accepted(size: int) -> None:
    body = {"users": [user(clientUserId=f"c{i}") for i in range(size)]}
    assert check_users_array(body) == body["users"]
    assert record_problems(body["users"]) == {}
    assert schema_errors("UserAttributes", body) == []


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"users": []}, "users: must contain at least 1 item, got 0"),
        ({"users": [user()] * 257}, "users: must contain at most 256 items, got 257"),
        ({}, "users: required"),
        ({"users": {"identifiers": {}}}, "users: must be an array, got object"),
        ({"users": [user()], "more": 1}, "unknown top-level field(s): 'more'"),
    ],
)
def test_structural_problems_are_body_errors(body: dict[str, Any], message: str) -> None:
    with pytest.raises(BodyError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_users_array(body)


@pytest.mark.parametrize(
    "raw", [b"", b"not json", b'{"users": [}', b"[1, 2]", b'{"users": NaN}', b'{"a": Infinity}', b'"\xff"']
)
def test_non_json_or_non_object_bodies_are_body_errors(raw: bytes) -> None:
    with pytest.raises(BodyError):
        parse_body(raw)


def test_problems_are_reported_per_index() -> None:
    users = [user(), user(phone="555"), user(), {"identifiers": {"email": ""}}]
    problems = record_problems(users)
    assert sorted(problems) == [1, 3]
    assert problems[1] == ["users[1].identifiers.phone: not E.164: '555'"]


def test_records_over_one_mib_are_found_only_in_large_bodies() -> None:
    small = [user()]
    assert oversized_records(len(json.dumps({"users": small})), small) == {}
    big = {**user(), "attributes": {"custom": {"blob": "x" * MAX_RECORD_BYTES}}}
    users = [user(), big]
    raw_len = len(json.dumps({"users": users}))
    found = oversized_records(raw_len, users)
    assert list(found) == [1] and found[1] > MAX_RECORD_BYTES
    just_under = {**user(), "attributes": {"custom": {"blob": "x" * (MAX_RECORD_BYTES - 200)}}}
    assert oversized_records(raw_len, [just_under]) == {}
