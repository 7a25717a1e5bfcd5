"""An export job's configuration: the product's configuration steps as a validated file.

Users write a YAML or JSON file that mirrors the Lytics job form (label, authorization, audiences,
the four field mappings, Existing Users) plus a few operational knobs. Why it is strict:

* A typo must never be silently ignored, so unknown keys are refused (``extra="forbid"``).
* Every problem is reported at once, by field path, in plain words (DESIGN.md invariant 6): a user
  fixing a file should not have to play whack-a-mole, and must never see a stack trace.
* What would make Attentive answer 400 later is refused here, up front: custom attribute names over
  200 characters, more than 100 custom attributes (audience flags count too), two names Attentive
  users would confuse (compared case-insensitively), an unknown identifier or attribute target.

:func:`parse_job_config` and :func:`load_job_config` are the entry points; both raise a single
:class:`JobConfigError`. The model dumps back to the same shape (``model_dump(mode="json")``) with
attribute targets in their canonical dotted form, so a stored job can be shown and re-parsed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import phonenumbers
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

# --------------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------------

IdentifierTarget = Literal["phone", "email", "clientUserId", "shopifyId", "klaviyoId"]
#: Attentive's standard identifiers, in the order the product lists them.
IDENTIFIER_TARGETS: tuple[str, ...] = ("phone", "email", "clientUserId", "shopifyId", "klaviyoId")

#: Attentive's well-known typed attributes (CreateUserAttributesRequestDtoV21.attributes), dotted.
WELL_KNOWN_ATTRIBUTES: tuple[str, ...] = (
    "firstName",
    "lastName",
    "demographic.language",
    "demographic.dateOfBirth",
    "demographic.age",
    "demographic.organization",
    "demographic.title",
    "demographic.website",
    "location.address1",
    "location.address2",
    "location.city",
    "location.state",
    "location.zip",
    "location.latitude",
    "location.longitude",
    "location.country",
    "location.region",
    "location.timezone",
    "locale.language",
    "locale.country",
)


def _flat_aliases() -> tuple[dict[str, str], frozenset[str]]:
    leaves: dict[str, list[str]] = {}
    for path in WELL_KNOWN_ATTRIBUTES:
        leaves.setdefault(path.rsplit(".", 1)[-1], []).append(path)
    unique = {leaf: paths[0] for leaf, paths in leaves.items() if len(paths) == 1}
    ambiguous = frozenset(leaf for leaf, paths in leaves.items() if len(paths) > 1)
    return unique, ambiguous


#: Flat names accepted for an attribute target when unambiguous (``city`` -> ``location.city``).
FLAT_ATTRIBUTE_ALIASES, AMBIGUOUS_ATTRIBUTE_NAMES = _flat_aliases()

#: Attentive: custom attribute names at most 200 characters; at most 100 custom attributes.
MAX_CUSTOM_NAME_CHARS = 200
MAX_CUSTOM_ATTRIBUTES = 100
#: Our own sanity bounds (not Attentive's): keep records small and configs readable.
MAX_FIELD_PATH_CHARS = 200
MAX_EXTRA_IDENTIFIERS = 20
MAX_LABEL_CHARS = 200
MAX_DESCRIPTION_CHARS = 2000

#: Lytics audience slugs: letters, digits, ``_`` and ``-``; starting with a letter or digit.
AUDIENCE_SLUG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*", re.ASCII)
#: Lytics segment ids (hex in practice); kept to URL-path-safe characters since they go into a path.
SEGMENT_ID = re.compile(r"[A-Za-z0-9_-]{1,128}", re.ASCII)
#: Environment variable names (POSIX portable set).
ENV_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)
#: Variables holding this service's own secrets: never sent to Lytics as a token.
RESERVED_ENV_VARS = frozenset({"EXPORT_SECRET_KEY"})
#: Lytics' largest segment scan page.
MAX_SCAN_PAGE_SIZE = 100


class JobState(StrEnum):
    """Lifecycle of an export job (storage and transitions are the job store's business)."""

    CREATED = "created"
    BACKFILLING = "backfilling"
    RUNNING = "running"
    PAUSED = "paused"  # buffers but does not send; the job records why (shown by status)
    #: ``jobs stop --teardown``: takes no more changes, sends every current member's audience flags
    #: as ``false``, then becomes ``stopped`` once Attentive has them all.
    STOPPING = "stopping"
    STOPPED = "stopped"  # final: never resumed; `jobs delete` then removes the job and its data


# --------------------------------------------------------------------------------------------------
# Item validators (each error lands at the item's own path, e.g. custom_attributes[2])
# --------------------------------------------------------------------------------------------------


def _err(code: str, message: str, **ctx: Any) -> PydanticCustomError:
    # Format here: pydantic's own templating ignores conversions such as {value!r}.
    return PydanticCustomError(code, message.format(**ctx))


def _field_path(value: str) -> str:
    """A profile field, possibly a dotted path into a nested profile (``address.city``)."""
    if not value.strip():
        raise _err("field_path", "a profile field name must not be empty")
    if value != value.strip():
        raise _err("field_path", "profile field {value!r} has leading or trailing spaces", value=value)
    if len(value) > MAX_FIELD_PATH_CHARS:
        raise _err("field_path", "profile field name is longer than {n} characters", n=MAX_FIELD_PATH_CHARS)
    if any(not part.strip() for part in value.split(".")):
        raise _err(
            "field_path", "profile field {value!r} has an empty segment in its dotted path", value=value
        )
    return value


def _custom_name(value: str) -> str:
    if len(value) > MAX_CUSTOM_NAME_CHARS:
        raise _err(
            "name_too_long",
            "name is {length} characters long; Attentive allows at most {n}",
            length=len(value),
            n=MAX_CUSTOM_NAME_CHARS,
        )
    return _field_path(value)


def _audience_slug(value: str) -> str:
    if not value:
        raise _err("audience_slug", "an audience slug must not be empty")
    if len(value) > MAX_CUSTOM_NAME_CHARS:
        raise _err(
            "audience_slug",
            "audience slug is longer than Attentive's {n} characters for a custom attribute name",
            n=MAX_CUSTOM_NAME_CHARS,
        )
    if not AUDIENCE_SLUG.fullmatch(value):
        raise _err(
            "audience_slug",
            "audience slug {value!r} may only contain letters, digits, '_' and '-', "
            "and must start with a letter or digit",
            value=value,
        )
    return value


def _identifier_target(value: Any) -> Any:
    if isinstance(value, str) and value not in IDENTIFIER_TARGETS:
        raise _err(
            "identifier_target",
            "unknown identifier {value!r}; expected one of {expected}",
            value=value,
            expected=", ".join(IDENTIFIER_TARGETS),
        )
    return value


def canonical_attribute(target: str) -> str | None:
    """The dotted Attentive attribute for a target (``city`` -> ``location.city``), or None."""
    stripped = target.strip()
    if stripped in WELL_KNOWN_ATTRIBUTES:
        return stripped
    return FLAT_ATTRIBUTE_ALIASES.get(stripped)


def _attribute_target(value: str) -> str:
    canonical = canonical_attribute(value)
    if canonical is not None:
        return canonical
    if value.strip() in AMBIGUOUS_ATTRIBUTE_NAMES:
        leaf = value.strip()
        options = " or ".join(p for p in WELL_KNOWN_ATTRIBUTES if p.endswith("." + leaf))
        raise _err(
            "attribute_target",
            "attribute {value!r} is ambiguous; use the dotted path: {options}",
            value=value,
            options=options,
        )
    raise _err(
        "attribute_target",
        "unknown attribute {value!r}; expected one of {expected} (flat names such as 'city' are "
        "accepted when unambiguous); to send any other field use custom_attributes",
        value=value,
        expected=", ".join(WELL_KNOWN_ATTRIBUTES),
    )


def _non_blank(value: str) -> str:
    value = value.strip()
    if not value:
        raise _err("blank", "must not be empty")
    return value


def _optional_text(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    return value or None


def _phone_region(value: str) -> str:
    region = value.strip().upper()
    if region not in phonenumbers.SUPPORTED_REGIONS:
        raise _err(
            "phone_region",
            "{value!r} is not a region code phonenumbers knows; use an ISO 3166-1 alpha-2 code such as US",
            value=value,
        )
    return region


def _segment_id(value: str) -> str:
    if not SEGMENT_ID.fullmatch(value):
        raise _err(
            "segment_id",
            "segment id {value!r} must be 1-128 letters, digits, '_' or '-' (the Lytics segment's id "
            "from GET /v2/segment)",
            value=value,
        )
    return value


def _env_var_name(value: str) -> str:
    if not ENV_VAR_NAME.fullmatch(value):
        raise _err("env_var", "{value!r} is not an environment variable name", value=value)
    if value in RESERVED_ENV_VARS:
        raise _err("env_var", "{value!r} holds this service's own secret; name another variable", value=value)
    return value


FieldPath = Annotated[str, AfterValidator(_field_path)]
CustomName = Annotated[str, AfterValidator(_custom_name)]
AudienceSlug = Annotated[str, AfterValidator(_audience_slug)]
Target = Annotated[IdentifierTarget, BeforeValidator(_identifier_target)]
AttributeTarget = Annotated[str, AfterValidator(_attribute_target)]
SegmentId = Annotated[str, AfterValidator(_segment_id)]
EnvVarName = Annotated[str, AfterValidator(_env_var_name)]


# --------------------------------------------------------------------------------------------------
# Cross-field rules, written against plain values so they also run on a file that failed typing
# --------------------------------------------------------------------------------------------------


def _str_items(value: Any) -> list[tuple[int, str]]:
    if isinstance(value, list | tuple):
        return [(i, v) for i, v in enumerate(value) if isinstance(v, str)]
    return []


def _str_pairs(value: Any) -> list[tuple[str, str]]:
    if isinstance(value, Mapping):
        return [(k, v) for k, v in value.items() if isinstance(k, str) and isinstance(v, str)]
    return []


def _key_path(field: str, key: str) -> str:
    return f"{field}.{key}" if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) else f"{field}[{key!r}]"


def cross_field_problems(data: Mapping[str, Any]) -> list[str]:
    """Rules spanning several items or fields. Tolerant: items of the wrong type are skipped."""
    problems: list[str] = []
    audiences = _str_items(data.get("audiences"))
    customs = _str_items(data.get("custom_attributes"))
    extras = _str_items(data.get("extra_identifiers"))
    id_maps = _str_pairs(data.get("identifier_mappings"))
    attr_maps = _str_pairs(data.get("attribute_mappings"))

    seen: dict[str, str] = {}  # casefolded name -> where it was first used
    for i, slug in audiences:
        if slug.casefold() in seen:
            problems.append(f"audiences[{i}]: audience {slug!r} is listed twice")
        else:
            seen[slug.casefold()] = f"audience {slug!r}"
    for i, name in customs:
        first = seen.get(name.casefold())
        if first is not None:
            problems.append(
                f"custom_attributes[{i}]: {name!r} collides with {first} (names are compared case-insensitively)"
            )
        else:
            seen[name.casefold()] = f"custom attribute {name!r}"
    total = len(audiences) + len(customs)
    if total > MAX_CUSTOM_ATTRIBUTES:
        problems.append(
            f"custom_attributes: {len(customs)} custom attributes plus {len(audiences)} audience flags make "
            f"{total}; Attentive allows at most {MAX_CUSTOM_ATTRIBUTES} custom attributes"
        )

    used_targets: dict[str, str] = {}
    for field, target in id_maps:
        if target in used_targets:
            problems.append(
                f"{_key_path('identifier_mappings', field)}: identifier {target!r} is already mapped from "
                f"{used_targets[target]!r}; each identifier can be used once"
            )
        else:
            used_targets[target] = field

    used_attrs: dict[str, str] = {}
    for field, target in attr_maps:
        canonical = canonical_attribute(target)
        if canonical is None:
            continue
        if canonical in used_attrs:
            problems.append(
                f"{_key_path('attribute_mappings', field)}: attribute {canonical!r} is already mapped from "
                f"{used_attrs[canonical]!r}; each attribute can be used once"
            )
        else:
            used_attrs[canonical] = field

    extra_seen: set[str] = set()
    for i, name in extras:
        if name in extra_seen:
            problems.append(f"extra_identifiers[{i}]: {name!r} is listed twice")
        extra_seen.add(name)
    problems.extend(_backfill_problems(data, {slug for _i, slug in audiences}))
    return problems


def _backfill_problems(data: Mapping[str, Any], audiences: set[str]) -> list[str]:
    """The backfill section must only name the job's audiences, and only when Existing Users is on."""
    backfill = data.get("backfill")
    if isinstance(backfill, BaseModel):
        backfill = backfill.model_dump()
    if not isinstance(backfill, Mapping):
        return []
    problems: list[str] = []
    if data.get("existing_users") is False:
        problems.append(
            "backfill: existing_users is false, so nothing would be backfilled; remove the backfill "
            "section or set existing_users: true"
        )
    for slug, _segment in _str_pairs(backfill.get("lytics_segments")):
        if slug not in audiences:
            problems.append(
                f"{_key_path('backfill.lytics_segments', slug)}: {slug!r} is not one of the job's audiences "
                f"({', '.join(sorted(audiences)) or 'none'})"
            )
    return problems


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class BackfillConfig(BaseModel):
    """Where Existing Users come from: a Lytics segment per audience, scanned once at job start.

    The Lytics token is not stored: the job names the environment variable that holds it on the
    workers (like ``EXPORT_SECRET_KEY``), so the job table never contains a Lytics secret and a
    rotated token takes effect on the next worker restart. Audiences without a segment are not
    backfilled from Lytics (``attentive-export backfill JOB FILE`` can load them from a file).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    lytics_segments: Annotated[dict[AudienceSlug, SegmentId], Field(min_length=1)]
    lytics_token_env: EnvVarName = "LYTICS_API_TOKEN"
    page_size: Annotated[int, Field(ge=1, le=MAX_SCAN_PAGE_SIZE)] = MAX_SCAN_PAGE_SIZE


class ExportJobConfig(BaseModel):
    """One export job's configuration, as the user wrote it (attribute targets made canonical)."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)

    label: Annotated[str, AfterValidator(_non_blank), Field(max_length=MAX_LABEL_CHARS)]
    description: Annotated[
        str | None, Field(max_length=MAX_DESCRIPTION_CHARS), AfterValidator(_optional_text)
    ] = None
    authorization: Annotated[str, AfterValidator(_non_blank)]
    audiences: Annotated[list[AudienceSlug], Field(min_length=1)]
    identifier_mappings: Annotated[dict[FieldPath, Target], Field(min_length=1)]
    extra_identifiers: Annotated[list[CustomName], Field(max_length=MAX_EXTRA_IDENTIFIERS)] = []
    attribute_mappings: dict[FieldPath, AttributeTarget] = {}
    custom_attributes: list[CustomName] = []
    existing_users: bool = True
    default_phone_region: Annotated[str, AfterValidator(_phone_region)] = "US"
    user_key_field: Annotated[FieldPath | None, Field()] = None
    flush_interval_seconds: Annotated[int, Field(ge=1, le=300)] = 30
    batch_size: Annotated[int, Field(ge=1, le=256)] = 256
    backfill: BackfillConfig | None = None

    @model_validator(mode="after")
    def _cross_fields(self) -> ExportJobConfig:
        problems = cross_field_problems(self.model_dump())
        if problems:
            raise PydanticCustomError("job_config_cross", "{problems}", {"problems": problems})
        return self

    @property
    def key_field(self) -> str:
        """The profile field that identifies a user: ``user_key_field`` or the first identifier's source."""
        return self.user_key_field or next(iter(self.identifier_mappings))


# --------------------------------------------------------------------------------------------------
# Errors and entry points
# --------------------------------------------------------------------------------------------------

_TOP_LEVEL_KEYS = tuple(ExportJobConfig.model_fields)


class JobConfigError(ValueError):
    """A configuration was refused. ``problems`` lists every problem, each prefixed by its field path."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems: list[str] = list(problems)
        super().__init__("\n".join(self.problems))


def _loc_path(loc: Iterable[int | str]) -> tuple[str, bool]:
    out = ""
    is_key = False
    for part in loc:
        if part == "[key]":
            is_key = True
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif not out:
            out = part
        else:
            out = _key_path(out, part)
    return out or "<file>", is_key


def _message(err: Any) -> str:
    kind = err["type"]
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden" and tuple(err["loc"][:1]) == ("backfill",) and len(err["loc"]) == 2:
        return f"unknown key (a typo?); expected one of {', '.join(BackfillConfig.model_fields)}"
    if kind == "extra_forbidden":
        return f"unknown key (a typo?); expected one of {', '.join(_TOP_LEVEL_KEYS)}"
    if kind == "too_short" and err["loc"] == ("audiences",):
        return "at least one audience is required"
    if kind == "too_short" and err["loc"] == ("identifier_mappings",):
        return "at least one identifier mapping is required"
    if kind == "too_short" and err["loc"] == ("backfill", "lytics_segments"):
        return "map at least one audience to its Lytics segment id"
    if kind == "too_short" and err["loc"] == ("label",):
        return "must not be empty"
    msg: str = err["msg"]
    if kind == "literal_error" and err["loc"][:1] == ("identifier_mappings",):
        msg = f"unknown identifier; expected one of {', '.join(IDENTIFIER_TARGETS)}"
    return msg[:1].lower() + msg[1:] if msg[:2] != msg[:2].upper() else msg


def problems_from_validation_error(exc: ValidationError) -> list[str]:
    """Readable ``path: message`` lines for a pydantic error on :class:`ExportJobConfig`."""
    problems: list[str] = []
    for err in exc.errors(include_url=False):
        if err["type"] == "job_config_cross":
            problems.extend(err["ctx"]["problems"])
            continue
        path, is_key = _loc_path(err["loc"])
        if err["loc"] and err["loc"][0] not in _TOP_LEVEL_KEYS and err["type"] == "extra_forbidden":
            problems.append(f"{err['loc'][0]}: {_message(err)}")
            continue
        prefix = f"{path} (field name)" if is_key else path
        problems.append(f"{prefix}: {_message(err)}")
    return problems


def parse_job_config(data: Mapping[str, Any]) -> ExportJobConfig:
    """Validate a configuration mapping; raise :class:`JobConfigError` listing every problem."""
    if not isinstance(data, Mapping):
        raise JobConfigError(
            [f"<file>: the configuration must be a mapping of keys, got {type(data).__name__}"]
        )
    try:
        return ExportJobConfig.model_validate(dict(data))
    except ValidationError as exc:
        problems = problems_from_validation_error(exc)
        if not any(e["type"] == "job_config_cross" for e in exc.errors()):
            # Typing failed, so the model's cross-field check did not run: run it on the raw file.
            problems.extend(p for p in cross_field_problems(data) if p not in problems)
        raise JobConfigError(problems) from None


def load_job_config(path: str | Path) -> ExportJobConfig:
    """Read a ``.json`` (JSON) or any other (YAML) file and validate it like :func:`parse_job_config`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise JobConfigError([f"{path}: cannot read the file: {exc}"]) from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise JobConfigError([f"{path}: not valid JSON: {exc}"]) from None
    except yaml.YAMLError as exc:
        raise JobConfigError([f"{path}: not valid YAML: {exc}".rstrip()]) from None
    except ValueError as exc:  # a number over 4,300 digits, a YAML date such as 2020-13-45
        reason = str(exc).split("; use sys.", 1)[0]  # Python's hint is for programmers, not operators
        raise JobConfigError([f"{path}: cannot read the file: {reason}"]) from None
    except RecursionError:  # both parsers recurse: nesting deeper than any configuration needs
        raise JobConfigError([f"{path}: cannot read the file: it is nested too deeply"]) from None
    if data is None:
        raise JobConfigError([f"{path}: the file is empty"])
    try:
        return parse_job_config(data)
    except JobConfigError as exc:  # each problem names the file, in place of parse's "<file>"
        raise JobConfigError([f"{path}: {p.removeprefix('<file>: ')}" for p in exc.problems]) from None
