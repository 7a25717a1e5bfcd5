"""Turn one profile plus audience changes into one Attentive user record, or a reason not to send it.

The mapping package, room by room: :mod:`~worker.mapping.reasons` (reason codes, limits, the drop
verdict), :mod:`~worker.mapping.phones` and :mod:`~worker.mapping.emails` (normalisation),
:mod:`~worker.mapping.values` (one converter per kind of value), and this module, which puts a
record together.

Why this module is shaped the way it is:

* **Attentive must never answer 400 to what we build** (DESIGN.md invariant 6): the converters
  repair or drop each value; this module assembles the record around them. No record ever carries
  ``subscriptions``.
* **Mapping never raises.** Any JSON-like input (and then some) yields a record or a skip reason;
  a last-resort guard turns an unexpected exception into :data:`~worker.mapping.reasons.MAPPING_ERROR`
  rather than a crash.
* **It is the hot path** of ingest and backfill (targets: 50,000 profiles/s with E.164 phones and
  25,000/s with national-format phones, one core). :class:`Mapper` compiles the job configuration
  once into plain tuples of (field access, converter); :meth:`Mapper.map` uses no pydantic, raises
  no exceptions for bad input and runs one loop per kind of field with the checks inline.

Decisions (documented for users in the README's field reference):

* A record needs at least one *standard* identifier (phone, email, clientUserId, shopifyId,
  klaviyoId); custom identifiers alone are not enough for Attentive to match a subscriber.
* Values that would take the record past :data:`~worker.mapping.reasons.MAX_RECORD_BYTES` (below
  Attentive's 1 MiB per-record limit, measured as ASCII-escaped JSON, the largest encoding) are
  dropped, typed attributes before custom ones.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from worker.mapping.reasons import (
    INVALID_PROFILE,
    MAPPING_ERROR,
    MAX_IDENTIFIER_CHARS,
    MAX_RECORD_BYTES,
    MAX_VALUE_CHARS,
    NO_IDENTIFIER,
    RECORD_TOO_LARGE,
    WORST_BYTES_PER_CHAR,
    Converter,
    Drop,
)
from worker.mapping.values import (
    convert_age,
    convert_client_user_id,
    convert_custom,
    convert_date,
    convert_email,
    convert_other_id,
    convert_text,
    json_size,
    make_phone_converter,
    worst_size,
)
from worker.setup.jobconfig import ExportJobConfig

log = logging.getLogger(__name__)


@dataclass(slots=True)
class MapResult:
    """One profile's outcome: a record to send, or ``record=None`` with a ``skip_reason``.

    ``dropped`` lists ``(profile field path, reason code)`` for values left out of the record.
    """

    record: dict[str, Any] | None
    skip_reason: str | None = None
    dropped: list[tuple[str, str]] = field(default_factory=list)
    #: :meth:`Mapper.user_key` of the profile, set with a record (found while mapping, so ingest
    #: does not normalise the key field a second time).
    user_key: str | None = None


#: Section marker of custom attributes in Mapper._all_attributes (never a real section name).
_CUSTOM = "\x00custom"
#: The largest JSON size of one attribute value: converters send numbers, booleans and strings of
#: at most MAX_VALUE_CHARS characters (arrays are joined within that bound).
_WORST_VALUE_BYTES: Final = MAX_VALUE_CHARS * WORST_BYTES_PER_CHAR + 2


# --------------------------------------------------------------------------------------------------
# Field access
# --------------------------------------------------------------------------------------------------

#: A key the profile does not have (a present ``None`` is a null value).
_MISSING: Final = object()


def _accessor(path: str) -> tuple[str, tuple[str, ...] | None]:
    """(literal key, dotted segments or None). A flat key spelled with dots wins over nesting."""
    segments = tuple(path.split("."))
    return path, (segments if len(segments) > 1 else None)


def _nested(profile: Mapping[str, Any], key: str, segments: tuple[str, ...]) -> Any:
    """The value at a dotted path whose literal key is missing or null: a present null key wins."""
    return _walk(profile, segments) if profile.get(key, _MISSING) is _MISSING else None


def _walk(profile: Mapping[str, Any], segments: tuple[str, ...]) -> Any:
    current: Any = profile
    for segment in segments:
        if type(current) is not dict and not isinstance(current, Mapping):
            return None
        current = current.get(segment)
        if current is None:
            return None
    return current


# --------------------------------------------------------------------------------------------------
# The mapper
# --------------------------------------------------------------------------------------------------


class Mapper:
    """A job's mapping, compiled once; :meth:`map` turns profiles into Attentive user records."""

    def __init__(self, config: ExportJobConfig) -> None:
        self.config = config
        region = config.default_phone_region
        phone = make_phone_converter(region)
        by_target: dict[str, Converter] = {
            "phone": phone,
            "email": convert_email,
            "clientUserId": convert_client_user_id,
            "shopifyId": convert_other_id,
            "klaviyoId": convert_other_id,
        }
        # (literal key, segments, identifier name, converter, field path)
        self._identifiers: tuple[tuple[str, tuple[str, ...] | None, str, Converter, str], ...] = tuple(
            (*_accessor(src), target, by_target[target], src)
            for src, target in config.identifier_mappings.items()
        )
        #: Whether the user key field is one of the identifiers (then mapping finds the key itself).
        self._key_field = config.key_field
        self._key_is_identifier = self._key_field in config.identifier_mappings
        self._extra: tuple[tuple[str, tuple[str, ...] | None, str], ...] = tuple(
            (*_accessor(src), src) for src in config.extra_identifiers
        )
        # (literal key, segments, section or None, leaf, converter, field path)
        attributes = []
        for src, target in config.attribute_mappings.items():
            section, _, leaf = target.rpartition(".")
            conv = convert_date if leaf == "dateOfBirth" else convert_age if leaf == "age" else convert_text
            attributes.append((*_accessor(src), section or None, leaf, conv, src))
        self._attributes: tuple[tuple[str, tuple[str, ...] | None, str | None, str, Converter, str], ...] = (
            tuple(attributes)
        )
        self._custom: tuple[tuple[str, tuple[str, ...] | None, str], ...] = tuple(
            (*_accessor(src), src) for src in config.custom_attributes
        )
        #: Typed attributes then custom ones, as (key, segments, section, leaf, converter, path);
        #: custom ones have section _CUSTOM and their field path as leaf.
        self._all_attributes: tuple[
            tuple[str, tuple[str, ...] | None, str | None, str, Converter, str], ...
        ] = self._attributes + tuple(
            (key, seg, _CUSTOM, src, convert_custom, src) for key, seg, src in self._custom
        )
        key_field = config.key_field
        key_conv = next(
            (conv for _, _, _, conv, src in self._identifiers if src == key_field), convert_other_id
        )
        self._key: tuple[str, tuple[str, ...] | None, Converter] = (*_accessor(key_field), key_conv)
        # Worst-case JSON size of everything but attribute values: keys, identifiers (bounded by the
        # converters), punctuation. Attribute values are then added as they are mapped.
        per_key = WORST_BYTES_PER_CHAR
        base = 200
        base += sum(16 + per_key * (len(t) + MAX_IDENTIFIER_CHARS) for _, _, t, _, _ in self._identifiers)
        base += sum(40 + per_key * (len(src) + MAX_IDENTIFIER_CHARS) for _, _, src in self._extra)
        base += sum(16 + len(leaf) for _, _, _, leaf, _, _ in self._attributes)
        base += sum(8 + per_key * len(src) for _, _, src in self._custom)
        self._base_size = base
        #: The most all attribute values together can add: when that fits, no value is measured.
        self._attributes_worst = len(self._all_attributes) * _WORST_VALUE_BYTES

    def user_key(self, profile: Mapping[str, Any]) -> str | None:
        """The user's stable key: the ``user_key_field`` value normalised like its identifier."""
        try:
            key, segments, conv = self._key
            value = profile.get(key)
            if value is None and segments is not None:
                value = _walk(profile, segments)
            if value is None:
                return None
            out = conv(value)
            return out if type(out) is str else None
        except Exception:  # a Mapping with a misbehaving .get(), a non-Mapping profile
            return None

    def map(
        self, profile: Mapping[str, Any], audiences: Mapping[str, bool], *, include_attributes: bool = True
    ) -> MapResult:
        """One Attentive user record for ``profile`` with ``audiences`` flags (``slug -> member``).

        ``include_attributes=False`` (exits) sends identifiers and audience flags only. Never raises.
        """
        try:
            return self._map(profile, audiences, include_attributes)
        except Exception as exc:  # last resort; the property tests assert it never happens
            log.error("mapping failed unexpectedly: %s", type(exc).__name__)
            return MapResult(None, MAPPING_ERROR, [])

    def _map(self, profile: Any, audiences: Any, include_attributes: bool) -> MapResult:
        if type(profile) is not dict and not isinstance(profile, Mapping):
            return MapResult(None, INVALID_PROFILE, [])
        get = profile.get
        dropped: list[tuple[str, str]] = []
        identifiers: dict[str, Any] = {}
        key_field = self._key_field
        user_key: str | None = None
        for key, segments, target, conv, src in self._identifiers:
            value = get(key)
            if value is None:  # missing or null
                if segments is None:
                    continue
                value = _nested(profile, key, segments)
                if value is None:
                    continue
            out = conv(value)
            if out is None:
                continue
            if type(out) is Drop:
                dropped.append((src, out.code))
            else:
                identifiers[target] = out
                if src == key_field:
                    user_key = out
        if not identifiers:
            return MapResult(None, NO_IDENTIFIER, dropped)
        if not self._key_is_identifier:
            user_key = self.user_key(profile)
        if self._extra:
            custom_ids = []
            for key, segments, src in self._extra:
                value = get(key)
                if value is None:  # missing or null
                    if segments is None:
                        continue
                    value = _nested(profile, key, segments)
                    if value is None:
                        continue
                out = convert_other_id(value)
                if out is None:
                    continue
                if type(out) is Drop:
                    dropped.append((src, out.code))
                else:
                    custom_ids.append({"key": src, "value": out})
            if custom_ids:
                identifiers["customIdentifiers"] = custom_ids

        size = self._base_size
        flags: dict[str, bool] = {}
        if audiences:
            for slug, member in audiences.items():
                if type(slug) is str and 0 < len(slug) <= 200:
                    flags[slug] = member is True or (member is not False and bool(member))
                    size += 16 + WORST_BYTES_PER_CHAR * len(slug)

        attributes: dict[str, Any] = {}
        custom: dict[str, Any] = {}
        if include_attributes:
            # Most jobs map few enough attributes that even their largest values fit in a record:
            # then the running size bound is not kept (it was a fifth of the time of this loop).
            measure = size + self._attributes_worst > MAX_RECORD_BYTES
            # One loop over typed and custom attributes with the value checks inline: this runs for
            # every transition, and a call per field cost about a fifth of mapping time.
            for key, segments, section, leaf, conv, src in self._all_attributes:
                value = get(key)
                if value is None:  # missing or null
                    if segments is None:
                        continue
                    value = _nested(profile, key, segments)
                    if value is None:
                        continue
                out = conv(value)
                if out is None:
                    continue
                if type(out) is Drop:
                    dropped.append((src, out.code))
                    continue
                if measure:
                    worst = len(out) * WORST_BYTES_PER_CHAR + 2 if type(out) is str else 32
                    if size + worst <= MAX_RECORD_BYTES:
                        size += worst
                    else:
                        size, fits = self._fits(size, out)
                        if not fits:
                            dropped.append((src, RECORD_TOO_LARGE))
                            continue
                if section is None:
                    attributes[leaf] = out
                elif section is _CUSTOM:
                    custom[leaf] = out
                else:
                    sub = attributes.get(section)
                    if sub is None:
                        attributes[section] = sub = {}
                    sub[leaf] = out
        if flags:
            custom.update(flags)
        if custom:
            attributes["custom"] = custom
        record: dict[str, Any] = {"identifiers": identifiers}
        if attributes:
            record["attributes"] = attributes
        return MapResult(record, None, dropped, user_key)

    @staticmethod
    def _fits(size: int, value: Any) -> tuple[int, bool]:
        """Add ``value`` to the running size bound; measure exactly only when the bound is too high."""
        worst = worst_size(value)
        if size + worst <= MAX_RECORD_BYTES:
            return size + worst, True
        exact = json_size(value)
        if size + exact <= MAX_RECORD_BYTES:
            return size + exact, True
        return size, False


#: Compiled mappings per job id, with the configuration each was compiled from.
_compiled: dict[str, tuple[ExportJobConfig, Mapper]] = {}


def compiled_mapper(job_id: str, config: ExportJobConfig) -> Mapper:
    """The job's mapping, compiled once per process and configuration (a changed job recompiles).

    Called per transition on the hot path: the job table keeps an unchanged configuration as the
    same object across reloads, so the usual check is one identity comparison.
    """
    hit = _compiled.get(job_id)
    if hit is None or (hit[0] is not config and hit[0] != config):
        hit = (config, Mapper(config))
        _compiled[job_id] = hit
    return hit[1]
