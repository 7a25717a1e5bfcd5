"""Hand-written validation of Attentive bulk user attribute bodies (CONTRACT.md §1, §7.3).

Hand-written rather than jsonschema at runtime because the sandbox must accept 200+ requests of 256
users per second on two cores. The rules are the published schema (types, required keys, enums) plus
the contract's extra rules (E.164 phones, real calendar dates, no null or empty identifiers, 100-char
clientUserId, 200-char custom keys, primitive custom values).

Where the contract is silent the sandbox chooses the *stricter* reading, because it judges our client:
unknown fields are rejected (Attentive's Java DTOs would most likely drop them silently, which for our
client means data loss), floats are not integers, NaN/Infinity are not JSON, and the phone regex uses
ASCII digits and a real end-of-string anchor. Every message names the user index and the field, e.g.
``users[3].identifiers.phone: not E.164: '555'``.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any, Final

import orjson

MAX_USERS: Final = 256
MIN_USERS: Final = 1
MAX_CLIENT_USER_ID: Final = 100
MAX_CUSTOM_KEY: Final = 200
#: "Each individual record must not exceed 1 MiB" (CONTRACT §1): such records get 413 in the results.
MAX_RECORD_BYTES: Final = 1024 * 1024
#: Bodies shorter than this cannot hold a record whose compact re-encoding exceeds 1 MiB (re-encoding
#: grows a number by at most ~4.5x, e.g. ``1e15`` -> ``1000000000000000.0``), so sizes are only
#: measured above it; this keeps the common path free of per-record ``json.dumps``.
SIZE_CHECK_THRESHOLD: Final = MAX_RECORD_BYTES // 8

# [0-9] rather than \d: \d matches non-ASCII digits. fullmatch rather than $: $ accepts a trailing \n.
_E164: Final = re.compile(r"\+[1-9][0-9]{1,14}")
_DATE: Final = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_EMAIL: Final = re.compile(r"[^@\s]+@[^@\s]+")

STRING_IDENTIFIERS: Final = ("phone", "email", "clientUserId", "shopifyId", "klaviyoId")
IDENTIFIER_KEYS: Final = frozenset((*STRING_IDENTIFIERS, "customIdentifiers"))
USER_KEYS: Final = frozenset(("identifiers", "attributes", "subscriptions"))
ATTRIBUTE_KEYS: Final = frozenset(("firstName", "lastName", "demographic", "location", "locale", "custom"))
DEMOGRAPHIC_STRINGS: Final = frozenset(("language", "dateOfBirth", "organization", "title", "website"))
DEMOGRAPHIC_KEYS: Final = DEMOGRAPHIC_STRINGS | {"age"}
LOCATION_KEYS: Final = frozenset(
    ("address1", "address2", "city", "state", "zip", "latitude", "longitude", "country", "region", "timezone")
)
LOCALE_KEYS: Final = frozenset(("language", "country"))
# The schema's subscription item requires subscriptionType without defining it; S1 defines it as an enum
# and the V21 text adds ``locale``. Required keys follow the schema exactly (strictest reading).
SUBSCRIPTION_KEYS: Final = frozenset(
    ("signUpSourceId", "channel", "singleOptIn", "subscriptionType", "locale")
)
SUBSCRIPTION_REQUIRED: Final = ("signUpSourceId", "channel", "subscriptionType")
CHANNELS: Final = frozenset(("TEXT", "EMAIL"))
SUBSCRIPTION_TYPES: Final = frozenset(("MARKETING", "TRANSACTIONAL"))


class BodyError(ValueError):
    """The request as a whole is unusable (not JSON, ``users`` missing/not an array/wrong size).

    Always a synchronous 400, whatever the validation mode.
    """


def parse_body(raw: bytes) -> dict[str, Any]:
    """Parse a request body as strict JSON and require a JSON object.

    orjson is both fast and strict: it rejects NaN/Infinity, invalid UTF-8 and lone surrogates, which
    Python's json module would accept.
    """
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BodyError(f"body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BodyError(f"body must be a JSON object, got {_type_name(body)}")
    return body


def check_users_array(body: dict[str, Any]) -> list[Any]:
    """The structural checks that stay synchronous in every mode; returns ``body['users']``."""
    unknown = body.keys() - {"users"}
    if unknown:
        raise BodyError(f"unknown top-level field(s): {', '.join(sorted(map(repr, unknown)))}")
    if "users" not in body:
        raise BodyError("users: required")
    users = body["users"]
    if not isinstance(users, list):
        raise BodyError(f"users: must be an array, got {_type_name(users)}")
    if len(users) < MIN_USERS:
        raise BodyError("users: must contain at least 1 item, got 0")
    if len(users) > MAX_USERS:
        raise BodyError(f"users: must contain at most {MAX_USERS} items, got {len(users)}")
    return users


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _unknown(where: str, obj: dict[str, Any], allowed: frozenset[str], out: list[str]) -> None:
    if not allowed.issuperset(obj):
        for key in sorted(set(obj) - allowed):
            out.append(f"{where}.{key}: unknown field")


def _strings(where: str, obj: dict[str, Any], keys: frozenset[str], out: list[str]) -> None:
    for key, value in obj.items():
        if key in keys and type(value) is not str:
            out.append(f"{where}.{key}: must be a string, got {_type_name(value)}")


def is_e164(phone: object) -> bool:
    """True when ``phone`` is an E.164 string (``+`` then 2-15 ASCII digits, no leading 0)."""
    return type(phone) is str and _E164.fullmatch(phone) is not None


def is_date(value: object) -> bool:
    """True when ``value`` is ``YYYY-MM-DD`` and a real calendar date (no 2023-02-30)."""
    if type(value) is not str or _DATE.fullmatch(value) is None:
        return False
    try:
        dt.date(int(value[0:4]), int(value[5:7]), int(value[8:10]))
    except ValueError:
        return False
    return True


def check_identifiers(where: str, ids: Any, out: list[str]) -> None:
    """Identifier rules: an object with at least one usable identifier, no null/empty values."""
    if ids is None:
        out.append(f"{where}: required")
        return
    if type(ids) is not dict:
        out.append(f"{where}: must be an object, got {_type_name(ids)}")
        return
    if not ids:
        out.append(f"{where}: must contain at least one identifier")
        return
    usable = False
    for key, value in ids.items():
        # Field names are only formatted on the error paths: this loop runs ~1,000 times per request.
        if type(value) is str and value:
            if key == "phone":
                if _E164.fullmatch(value) is None:
                    out.append(f"{where}.phone: not E.164: {value!r}")
            elif key == "email":
                if _EMAIL.fullmatch(value) is None:
                    out.append(f"{where}.email: not an email address: {value!r}")
            elif key == "clientUserId":
                if len(value) > MAX_CLIENT_USER_ID:
                    out.append(
                        f"{where}.clientUserId: longer than {MAX_CLIENT_USER_ID} characters ({len(value)})"
                    )
            elif key not in IDENTIFIER_KEYS or key == "customIdentifiers":
                _bad_identifier(where, key, value, out)
                continue
            usable = True
        elif key == "customIdentifiers" and type(value) is list:
            if _check_custom_identifiers(f"{where}.customIdentifiers", value, out):
                usable = True
        else:
            _bad_identifier(where, key, value, out)
    if not usable:
        out.append(f"{where}: no usable identifier (only null, empty, unknown or invalid values)")


def _bad_identifier(where: str, key: str, value: Any, out: list[str]) -> None:
    field = f"{where}.{key}"
    if key not in IDENTIFIER_KEYS:
        out.append(f"{field}: unknown identifier")
    elif value is None:
        out.append(f"{field}: null (omit the field instead)")
    elif key == "customIdentifiers":
        out.append(f"{field}: must be an array, got {_type_name(value)}")
    elif type(value) is not str:
        out.append(f"{field}: must be a string, got {_type_name(value)}")
    else:
        out.append(f"{field}: empty string (omit the field instead)")


def _check_custom_identifiers(field: str, items: Any, out: list[str]) -> bool:
    if type(items) is not list:
        out.append(f"{field}: must be an array, got {_type_name(items)}")
        return False
    if not items:
        out.append(f"{field}: empty array (omit the field instead)")
        return False
    ok = True
    for j, item in enumerate(items):
        here = f"{field}[{j}]"
        if type(item) is not dict:
            out.append(f"{here}: must be an object, got {_type_name(item)}")
            ok = False
            continue
        for name in ("key", "value"):
            if name not in item:
                out.append(f"{here}.{name}: required")
                ok = False
            elif type(item[name]) is not str:
                out.append(f"{here}.{name}: must be a string, got {_type_name(item[name])}")
                ok = False
            elif not item[name]:
                out.append(f"{here}.{name}: empty string")
                ok = False
        if len(item) > 2:
            for extra in sorted(set(item) - {"key", "value"}):
                out.append(f"{here}.{extra}: unknown field")
                ok = False
    return ok


def check_attributes(where: str, attrs: Any, out: list[str]) -> None:
    """Typed attributes per the schema, and custom attributes per the contract."""
    if type(attrs) is not dict:
        out.append(f"{where}: must be an object, got {_type_name(attrs)}")
        return
    for key, value in attrs.items():
        if key == "custom":
            check_custom(f"{where}.custom", value, out)
        elif key == "firstName" or key == "lastName":
            if type(value) is not str:
                out.append(f"{where}.{key}: must be a string, got {_type_name(value)}")
        elif key == "demographic":
            _check_group(where, key, value, DEMOGRAPHIC_KEYS, out)
        elif key == "location":
            _check_group(where, key, value, LOCATION_KEYS, out)
        elif key == "locale":
            _check_group(where, key, value, LOCALE_KEYS, out)
        else:
            out.append(f"{where}.{key}: unknown field")


def _check_group(where: str, name: str, group: Any, keys: frozenset[str], out: list[str]) -> None:
    """A typed attribute group: known keys only, string values (demographic: integer age, real date)."""
    if type(group) is not dict:
        out.append(f"{where}.{name}: must be an object, got {_type_name(group)}")
        return
    for key, value in group.items():
        if type(value) is str:
            if key == "dateOfBirth" and name == "demographic":
                if not is_date(value):
                    out.append(f"{where}.{name}.dateOfBirth: not a valid YYYY-MM-DD date: {value!r}")
                continue
            if key in keys and key != "age":
                continue
        elif key == "age" and name == "demographic":
            if type(value) is not int:
                out.append(f"{where}.{name}.age: must be an integer, got {_type_name(value)}")
            continue
        if key not in keys:
            out.append(f"{where}.{name}.{key}: unknown field")
        else:
            out.append(
                f"{where}.{name}.{key}: must be {'an integer' if key == 'age' else 'a string'}, "
                f"got {_type_name(value)}"
            )


def check_custom(field: str, custom: Any, out: list[str]) -> None:
    """Custom attributes: keys 1-200 characters, values string/number/boolean (no null/array/object)."""
    if type(custom) is not dict:
        out.append(f"{field}: must be an object, got {_type_name(custom)}")
        return
    for key, value in custom.items():
        if not key:
            out.append(f"{field}: empty key")
        elif len(key) > MAX_CUSTOM_KEY:
            out.append(f"{field}: key longer than {MAX_CUSTOM_KEY} characters ({len(key)}): {key[:40]!r}...")
        kind = type(value)
        if kind is not str and kind is not bool and kind is not int and kind is not float:
            out.append(f"{field}[{key[:60]!r}]: must be a string, number or boolean, got {_type_name(value)}")


def check_subscriptions(where: str, subs: Any, out: list[str]) -> None:
    """Subscription items per the schema: required keys, channel and subscriptionType enums."""
    if type(subs) is not list:
        out.append(f"{where}: must be an array, got {_type_name(subs)}")
        return
    for k, item in enumerate(subs):
        here = f"{where}[{k}]"
        if type(item) is not dict:
            out.append(f"{here}: must be an object, got {_type_name(item)}")
            continue
        _unknown(here, item, SUBSCRIPTION_KEYS, out)
        for name in SUBSCRIPTION_REQUIRED:
            if name not in item:
                out.append(f"{here}.{name}: required")
        if "signUpSourceId" in item and type(item["signUpSourceId"]) is not str:
            out.append(f"{here}.signUpSourceId: must be a string")
        if "channel" in item and item["channel"] not in CHANNELS:
            out.append(f"{here}.channel: must be one of TEXT, EMAIL, got {item['channel']!r}")
        if "subscriptionType" in item and item["subscriptionType"] not in SUBSCRIPTION_TYPES:
            out.append(f"{here}.subscriptionType: must be MARKETING or TRANSACTIONAL")
        if "singleOptIn" in item and type(item["singleOptIn"]) is not bool:
            out.append(f"{here}.singleOptIn: must be a boolean")
        if "locale" in item:
            loc = item["locale"]
            if type(loc) is not dict:
                out.append(f"{here}.locale: must be an object")
            else:
                _unknown(f"{here}.locale", loc, LOCALE_KEYS, out)
                _strings(f"{here}.locale", loc, LOCALE_KEYS, out)


def user_problems(where: str, user: Any) -> list[str]:
    """Every problem of one user record; an empty list means the record is valid."""
    out: list[str] = []
    if type(user) is not dict:
        out.append(f"{where}: must be an object, got {_type_name(user)}")
        return out
    if not USER_KEYS.issuperset(user):
        _unknown(where, user, USER_KEYS, out)
    check_identifiers(f"{where}.identifiers", user.get("identifiers"), out)
    if "attributes" in user:
        check_attributes(f"{where}.attributes", user["attributes"], out)
    if "subscriptions" in user:
        check_subscriptions(f"{where}.subscriptions", user["subscriptions"], out)
    return out


def record_problems(users: list[Any]) -> dict[int, list[str]]:
    """Problems per user index (only indexes with problems appear)."""
    problems: dict[int, list[str]] = {}
    for i, user in enumerate(users):
        found = user_problems(f"users[{i}]", user)
        if found:
            problems[i] = found
    return problems


def record_size(user: Any) -> int:
    """The size of a record as Attentive would measure it: compact UTF-8 JSON (a [SANDBOX] choice)."""
    return len(orjson.dumps(user))


def oversized_records(raw_len: int, users: list[Any]) -> dict[int, int]:
    """Indexes of records over 1 MiB mapped to their size; free when the body is small."""
    if raw_len <= SIZE_CHECK_THRESHOLD:
        return {}
    sizes = {i: record_size(u) for i, u in enumerate(users)}
    return {i: n for i, n in sizes.items() if n > MAX_RECORD_BYTES}
