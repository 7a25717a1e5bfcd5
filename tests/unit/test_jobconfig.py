"""Export job configuration: valid files load and round-trip; every refusal names its field path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from worker.setup.jobconfig import (
    ExportJobConfig,
    JobConfigError,
    JobState,
    load_job_config,
    parse_job_config,
)

EXAMPLE_YAML = """\
label: VIP shoppers to Attentive
description: Optional free text
authorization: my-attentive
audiences: [vip_shoppers, lapsed_buyers]
identifier_mappings:
  phone_number: phone
  email: email
extra_identifiers: [loyalty_id]
attribute_mappings:
  first_name: firstName
  birthday: dateOfBirth
  home_city: location.city
custom_attributes: [lifetime_value, favorite_categories]
existing_users: true
default_phone_region: US
user_key_field: null
flush_interval_seconds: 30
batch_size: 256
"""


def minimal(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "label": "job",
        "authorization": "auth",
        "audiences": ["vip_shoppers"],
        "identifier_mappings": {"email": "email"},
    }
    data.update(overrides)
    return data


def problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(JobConfigError) as info:
        parse_job_config(data)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def test_example_yaml_file_loads_with_canonical_attribute_targets(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(EXAMPLE_YAML)
    config = load_job_config(path)
    assert config.label == "VIP shoppers to Attentive"
    assert config.audiences == ["vip_shoppers", "lapsed_buyers"]
    assert config.attribute_mappings == {
        "first_name": "firstName",
        "birthday": "demographic.dateOfBirth",
        "home_city": "location.city",
    }
    assert config.key_field == "phone_number"


def test_json_file_loads_and_defaults_apply(tmp_path: Path) -> None:
    path = tmp_path / "job.json"
    path.write_text(json.dumps(minimal()))
    config = load_job_config(path)
    assert config.existing_users is True
    assert config.default_phone_region == "US"
    assert config.flush_interval_seconds == 30
    assert config.batch_size == 256
    assert config.extra_identifiers == [] and config.custom_attributes == []
    assert config.description is None and config.user_key_field is None


def test_dump_has_the_file_shape_and_parses_back_to_an_equal_config(tmp_path: Path) -> None:
    path = tmp_path / "job.yml"
    path.write_text(EXAMPLE_YAML)
    config = load_job_config(path)
    dumped = config.model_dump(mode="json")
    assert set(dumped) == set(ExportJobConfig.model_fields)
    assert parse_job_config(json.loads(json.dumps(dumped))) == config


def test_flat_attribute_names_are_accepted_when_unambiguous() -> None:
    config = parse_job_config(
        minimal(attribute_mappings={"c": "city", "z": "zip", "t": "timezone", "a": "age"})
    )
    assert config.attribute_mappings == {
        "c": "location.city",
        "z": "location.zip",
        "t": "location.timezone",
        "a": "demographic.age",
    }


def test_user_key_field_defaults_to_the_first_identifier_source() -> None:
    config = parse_job_config(minimal(identifier_mappings={"cuid": "clientUserId", "email": "email"}))
    assert config.key_field == "cuid"
    assert parse_job_config(minimal(user_key_field="lytics.uid")).key_field == "lytics.uid"


def test_phone_region_is_normalised_to_upper_case() -> None:
    assert parse_job_config(minimal(default_phone_region="gb")).default_phone_region == "GB"


def test_job_states_are_the_six_lifecycle_states() -> None:
    assert [s.value for s in JobState] == [
        "created",
        "backfilling",
        "running",
        "paused",
        "stopping",
        "stopped",
    ]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"identifier_mappings": {}}, "identifier_mappings: at least one identifier mapping is required"),
        ({"audiences": []}, "audiences: at least one audience is required"),
        ({"label": "   "}, "label: must not be empty"),
        ({"authorization": ""}, "authorization: must not be empty"),
        (
            {"identifier_mappings": {"foo": "fone"}},
            "identifier_mappings.foo: unknown identifier 'fone'; expected one of phone, email, clientUserId, "
            "shopifyId, klaviyoId",
        ),
        (
            {"identifier_mappings": {"a": "email", "b": "email"}},
            "identifier_mappings.b: identifier 'email' is already mapped from 'a'; each identifier can be used once",
        ),
        (
            {"audiences": ["vip_shoppers"], "custom_attributes": ["x", "y", "VIP_Shoppers"]},
            "custom_attributes[2]: 'VIP_Shoppers' collides with audience 'vip_shoppers' "
            "(names are compared case-insensitively)",
        ),
        (
            {"custom_attributes": ["ltv", "LTV"]},
            "custom_attributes[1]: 'LTV' collides with custom attribute 'ltv' (names are compared case-insensitively)",
        ),
        ({"audiences": ["a", "a"]}, "audiences[1]: audience 'a' is listed twice"),
        ({"audiences": ["vip shoppers!"]}, "audiences[0]: audience slug 'vip shoppers!' may only contain"),
        ({"audiences": ["a" * 201]}, "audiences[0]: audience slug is longer than Attentive's 200 characters"),
        (
            {"custom_attributes": ["c" * 201]},
            "custom_attributes[0]: name is 201 characters long; Attentive allows",
        ),
        ({"extra_identifiers": ["x", "x"]}, "extra_identifiers[1]: 'x' is listed twice"),
        ({"extra_identifiers": ["a..b"]}, "extra_identifiers[0]: profile field 'a..b' has an empty segment"),
        (
            {"attribute_mappings": {"lang": "language"}},
            "attribute_mappings.lang: attribute 'language' is ambiguous; use the dotted path: "
            "demographic.language or locale.language",
        ),
        (
            {"attribute_mappings": {"c": "country"}},
            "attribute_mappings.c: attribute 'country' is ambiguous; use the dotted path: "
            "location.country or locale.country",
        ),
        ({"attribute_mappings": {"x": "shoeSize"}}, "attribute_mappings.x: unknown attribute 'shoeSize'"),
        (
            {"attribute_mappings": {"a": "city", "b": "location.city"}},
            "attribute_mappings.b: attribute 'location.city' is already mapped from 'a'",
        ),
        (
            {"default_phone_region": "XX"},
            "default_phone_region: 'XX' is not a region code phonenumbers knows",
        ),
        ({"flush_interval_seconds": 0}, "flush_interval_seconds: input should be greater than or equal to 1"),
        (
            {"flush_interval_seconds": 301},
            "flush_interval_seconds: input should be less than or equal to 300",
        ),
        ({"batch_size": 257}, "batch_size: input should be less than or equal to 256"),
        ({"batch_size": 0}, "batch_size: input should be greater than or equal to 1"),
        ({"lable": "typo"}, "lable: unknown key (a typo?); expected one of label, description"),
        ({"identifier_mappings": {" phone": "phone"}}, "has leading or trailing spaces"),
        ({"identifier_mappings": {"": "phone"}}, "a profile field name must not be empty"),
        ({"extra_identifiers": [3]}, "extra_identifiers[0]: input should be a valid string"),
        ({"existing_users": "maybe"}, "existing_users: input should be a valid boolean"),
    ],
)
def test_each_refusal_rule_names_its_field_path(overrides: dict[str, Any], expected: str) -> None:
    found = problems(minimal(**overrides))
    assert any(expected in p for p in found), found


def test_missing_required_keys_are_each_listed() -> None:
    found = problems({})
    for key in ("label", "authorization", "audiences", "identifier_mappings"):
        assert f"{key}: is required" in found


def test_more_than_100_custom_attributes_counting_audience_flags_is_refused() -> None:
    audiences = [f"aud_{i}" for i in range(40)]
    customs = [f"field_{i}" for i in range(61)]
    found = problems(minimal(audiences=audiences, custom_attributes=customs))
    assert found == [
        "custom_attributes: 61 custom attributes plus 40 audience flags make 101; "
        "Attentive allows at most 100 custom attributes"
    ]
    parse_job_config(minimal(audiences=audiences, custom_attributes=customs[:60]))


def test_a_broken_file_lists_every_problem_at_once() -> None:
    data = minimal(
        lable="typo",
        audiences=["vip_shoppers", "bad slug"],
        identifier_mappings={"foo": "fone", "a": "phone", "b": "phone"},
        attribute_mappings={"l": "language"},
        custom_attributes=["VIP_SHOPPERS"],
        batch_size=1000,
    )
    found = problems(data)
    expected_prefixes = [
        "lable:",
        "audiences[1]:",
        "identifier_mappings.foo:",
        "identifier_mappings.b:",
        "attribute_mappings.l:",
        "custom_attributes[0]:",
        "batch_size:",
    ]
    for prefix in expected_prefixes:
        assert any(p.startswith(prefix) for p in found), (prefix, found)
    assert len(found) == len(expected_prefixes)


def test_user_values_with_braces_are_quoted_verbatim() -> None:
    found = problems(minimal(identifier_mappings={"f": "{x}"}))
    assert found[0].startswith("identifier_mappings.f: unknown identifier '{x}'")


def test_file_errors_are_reported_without_a_traceback(tmp_path: Path) -> None:
    with pytest.raises(JobConfigError, match="cannot read the file"):
        load_job_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("label: [unclosed\n")
    with pytest.raises(JobConfigError, match="not valid YAML"):
        load_job_config(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(JobConfigError, match="the file is empty"):
        load_job_config(empty)
    listy = tmp_path / "list.json"
    listy.write_text("[1, 2]")
    with pytest.raises(JobConfigError, match="must be a mapping"):
        load_job_config(listy)
    broken_json = tmp_path / "broken.json"
    broken_json.write_text("{")
    with pytest.raises(JobConfigError, match="not valid JSON"):
        load_job_config(broken_json)


def test_config_is_immutable() -> None:
    config = parse_job_config(minimal())
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen-instance error
        config.label = "other"  # type: ignore[misc]
