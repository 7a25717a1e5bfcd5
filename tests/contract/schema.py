"""Validate payloads against the schemas in Attentive's OpenAPI v2 document.

The spec is copied into the repository so CI does not depend on a sibling folder. Schemas are used
exactly as published, quirks included (CONTRACT.md §1); the contract's extra rules that the spec does
not express (E.164 regex, 200-char custom keys, no null/array/object custom values...) are checked by
:func:`contract_problems`.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
from jsonschema import Draft202012Validator, FormatChecker

SPEC_PATH = Path(__file__).with_name("openapi-v2.json")
E164 = re.compile(r"^\+[1-9]\d{1,14}$")


@cache
def spec() -> dict[str, Any]:
    return json.loads(SPEC_PATH.read_text())


@cache
def validator(schema_name: str) -> Draft202012Validator:
    """A validator for ``#/components/schemas/<schema_name>`` with ``$ref``s resolved inside the spec."""
    doc = spec()
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": doc["components"]}
    return Draft202012Validator(schema, format_checker=FormatChecker())


def schema_errors(schema_name: str, instance: Any) -> list[str]:
    """Every schema violation of ``instance``, as readable strings (empty when valid)."""
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in validator(schema_name).iter_errors(instance)
    ]


def assert_valid(schema_name: str, instance: Any) -> None:
    errors = schema_errors(schema_name, instance)
    if errors:
        raise jsonschema.ValidationError("; ".join(errors))


def contract_problems(body: dict[str, Any]) -> list[str]:
    """Rules of CONTRACT.md §1/§7.3 beyond the JSON schema, for a bulk user attributes body."""
    problems: list[str] = []
    for i, user in enumerate(body.get("users") or []):
        ids = user.get("identifiers")
        if not isinstance(ids, dict) or not any(v not in (None, "", []) for v in ids.values()):
            problems.append(f"users/{i}/identifiers: missing or empty")
            continue
        for name, value in ids.items():
            if value is None or value == "":
                problems.append(f"users/{i}/identifiers/{name}: null or empty")
        phone = ids.get("phone")
        if phone is not None and not (isinstance(phone, str) and E164.match(phone)):
            problems.append(f"users/{i}/identifiers/phone: not E.164: {phone!r}")
        cuid = ids.get("clientUserId")
        if isinstance(cuid, str) and len(cuid) > 100:
            problems.append(f"users/{i}/identifiers/clientUserId: over 100 characters")
        for j, ci in enumerate(ids.get("customIdentifiers") or []):
            if not isinstance(ci.get("key"), str) or not isinstance(ci.get("value"), str) or not ci["value"]:
                problems.append(f"users/{i}/identifiers/customIdentifiers/{j}: key and value must be strings")
        custom = (user.get("attributes") or {}).get("custom") or {}
        for key, value in custom.items():
            if len(key) > 200:
                problems.append(f"users/{i}/attributes/custom: key over 200 characters")
            if value is None or isinstance(value, list | dict):
                problems.append(f"users/{i}/attributes/custom/{key}: must be a primitive, got {value!r}")
        if "subscriptions" in user:
            problems.append(f"users/{i}/subscriptions: membership export must never send subscriptions")
    return problems
