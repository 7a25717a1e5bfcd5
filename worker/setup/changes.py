"""What changing an export job means, worked out before anything is written (``jobs update``,
``jobs resync``, ``jobs stop --teardown``).

Pure functions of two configurations and the operator's options: the difference, the members to
send (:class:`MemberSend`: an audience's current members as enters or exits, from its Lytics
segment or a member file), notes, and every problem that refuses the change (listed at once, like
``jobs create``). :mod:`worker.backfill.ops` carries a plan out; ``--dry-run`` just prints it.

What a change may not do, and why:

* Change the user key (``user_key_field``, or the first identifier mapping's source when it is not
  set, and how that identifier is normalised): last-writer-wins state and per-user order are kept
  per user key, so users would start over with no history and two keys of one user could race.
* Move the job to another authorization: what it sent lives in another Attentive account.
* Remove an audience whose members it cannot find (no Lytics segment, no member file) without
  ``--keep-removed``: its ``<slug>: true`` flags would stay in Attentive for good, silently.
* Name a custom attribute after an audience it removes: Attentive holds that name as the flag.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Literal

from worker.setup.jobconfig import MAX_SCAN_PAGE_SIZE, ExportJobConfig

#: Fields that decide what a transition becomes in Attentive.
MAPPING_FIELDS = (
    "identifier_mappings",
    "extra_identifiers",
    "attribute_mappings",
    "custom_attributes",
    "default_phone_region",
    "user_key_field",
)
#: Everything else but the audiences.
OTHER_FIELDS = (
    "label",
    "description",
    "authorization",
    "existing_users",
    "backfill",
    "flush_interval_seconds",
    "batch_size",
)
DEFAULT_TOKEN_ENV = "LYTICS_API_TOKEN"

Why = Literal["backfill", "resync", "teardown"]


@dataclass(frozen=True)
class FieldChange:
    field: str
    old: Any
    new: Any

    def describe(self) -> str:
        return f"{self.field}: {_show(self.old)} -> {_show(self.new)}"


def _show(value: Any) -> str:
    return json.dumps(value, sort_keys=False, ensure_ascii=False)


@dataclass(frozen=True)
class MemberSend:
    """One audience's current members to send: as enters (a backfill or a resync: ``<slug>: true``
    with the job's identifiers and attributes) or as exits (a teardown: ``<slug>: false``)."""

    audience: str
    why: Why
    #: The Lytics segment scanned for the members; None: they come from a member file.
    segment: str | None
    token_env: str = DEFAULT_TOKEN_ENV
    page_size: int = MAX_SCAN_PAGE_SIZE

    @property
    def event(self) -> str:
        return "exit" if self.why == "teardown" else "enter"

    def source(self) -> str:
        return f"Lytics segment {self.segment}" if self.segment else "the member file given"

    def describe(self) -> str:
        if self.why == "teardown":
            return (
                f"teardown: each current member of {self.audience} ({self.source()}) gets "
                f"{self.audience}: false"
            )
        what = "backfill" if self.why == "backfill" else "resync"
        attributes = "with its identifiers and mapped attributes"
        return f"{what}: each current member of {self.audience} ({self.source()}) gets {self.audience}: true {attributes}"


@dataclass
class ConfigChange:
    """The difference between a job's configuration and a new one."""

    old: ExportJobConfig
    new: ExportJobConfig
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    mapping: list[FieldChange] = field(default_factory=list)
    other: list[FieldChange] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return self.old != self.new


def diff(old: ExportJobConfig, new: ExportJobConfig) -> ConfigChange:
    before, after = old.model_dump(mode="json"), new.model_dump(mode="json")
    change = ConfigChange(
        old,
        new,
        added=[a for a in new.audiences if a not in old.audiences],
        removed=[a for a in old.audiences if a not in new.audiences],
    )
    for name in MAPPING_FIELDS:
        if before[name] != after[name]:
            change.mapping.append(FieldChange(name, before[name], after[name]))
    for name in OTHER_FIELDS:
        if before[name] != after[name]:
            change.other.append(FieldChange(name, before[name], after[name]))
    if before["audiences"] != after["audiences"] and not change.added and not change.removed:
        change.other.append(FieldChange("audiences (order)", before["audiences"], after["audiences"]))
    return change


def _segment(config: ExportJobConfig, audience: str) -> str | None:
    if config.backfill is None:
        return None
    return config.backfill.lytics_segments.get(audience)


def _send(config: ExportJobConfig, audience: str, why: Why, from_file: bool) -> MemberSend | None:
    """Members of ``audience`` by ``config``'s sources: the member file if given, else its segment."""
    cfg = config.backfill
    token_env = cfg.lytics_token_env if cfg is not None else DEFAULT_TOKEN_ENV
    page_size = cfg.page_size if cfg is not None else MAX_SCAN_PAGE_SIZE
    if from_file:
        return MemberSend(audience, why, None, token_env, page_size)
    segment = _segment(config, audience)
    if segment is None:
        return None
    return MemberSend(audience, why, segment, token_env, page_size)


def _key_identity(config: ExportJobConfig) -> tuple[str, str | None, str | None]:
    """What makes a user key: the field, the identifier it maps to (its normaliser), the phone region."""
    key_field = config.key_field
    target = config.identifier_mappings.get(key_field)
    return key_field, target, config.default_phone_region if target == "phone" else None


@dataclass
class UpdatePlan:
    """What ``jobs update`` would do: the difference, the members it sends, and why it may not."""

    change: ConfigChange
    started: bool
    keep_removed: bool
    resync: bool
    sends: list[MemberSend] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def nothing_to_do(self) -> bool:
        return not self.change.changed and not self.sends


def plan_update(
    old: ExportJobConfig,
    new: ExportJobConfig,
    *,
    started: bool,
    keep_removed: bool = False,
    resync: bool = False,
    member_files: Collection[str] = (),
    same_authorization: bool = True,
) -> UpdatePlan:
    """Work out an update of a job from ``old`` to ``new``.

    ``started``: the job has sent (or buffered) something; a job still ``created`` just takes the
    new configuration, its backfill at start covers it. ``member_files``: audiences whose current
    members the operator gives as a file (``--members A=FILE``), used instead of a segment.
    """
    change = diff(old, new)
    plan = UpdatePlan(change, started, keep_removed, resync)
    problems = plan.problems
    files = set(member_files)

    old_key, new_key = _key_identity(old), _key_identity(new)
    if old_key != new_key:
        hint = (
            f"set user_key_field: {old_key[0]} to keep it"
            if old_key[0] != new_key[0] and old_key[0] in new.identifier_mappings
            else "keep the key field's identifier mapping and default_phone_region as they are"
        )
        problems.append(
            f"user_key_field: the user key would change from {old_key[0]!r} ({old_key[1] or 'not an identifier'}) "
            f"to {new_key[0]!r} ({new_key[1] or 'not an identifier'}): last-writer-wins and per-user order are "
            f"kept per user key, so a job's user key cannot change; {hint}, or create a new job"
        )
    if not same_authorization:
        problems.append(
            f"authorization: {old.authorization!r} -> {new.authorization!r} is another Attentive account; "
            "what the job sent stays in the old one, so a job cannot move: create a new job instead"
        )
    removed_folded = {a.casefold(): a for a in change.removed}
    for i, name in enumerate(new.custom_attributes):
        if name.casefold() in removed_folded:
            problems.append(
                f"custom_attributes[{i}]: {name!r} is the flag of audience {removed_folded[name.casefold()]!r} "
                "that this update removes; Attentive holds that name as the audience's flag"
            )

    if not started:
        plan.notes.append(
            "the job has not started: the new configuration is used when it starts; nothing is sent now"
        )
        if files:
            problems.append(
                f"--members {', '.join(sorted(files))}: the job has not started, so nothing is sent now"
            )
        return plan

    used_files: set[str] = set()
    for audience in change.added:
        if not new.existing_users:
            plan.notes.append(
                f"{audience}: existing_users is false, so only its enters and exits from now on are exported"
            )
            continue
        send = _send(new, audience, "backfill", audience in files)
        if send is None:
            plan.notes.append(
                f"{audience}: no Lytics segment (backfill.lytics_segments) and no --members file: load its "
                f"current members with `attentive-export backfill JOB --audience {audience} FILE`"
            )
            continue
        plan.sends.append(send)
        used_files.add(audience)

    for audience in change.removed:
        if keep_removed:
            plan.notes.append(
                f"{audience}: kept: its members keep {audience} as it is in Attentive (--keep-removed); "
                "later enters and exits are no longer exported"
            )
            continue
        send = _send(old, audience, "teardown", audience in files)
        if send is None:
            problems.append(
                f"audiences: removing {audience!r} tears its members down ({audience}: false), but it has no "
                f"Lytics segment in the job's backfill section: give its current members with "
                f"--members {audience}=FILE, or leave its flags as they are with --keep-removed"
            )
            continue
        plan.sends.append(send)
        used_files.add(audience)

    if change.mapping and not resync:
        plan.notes.append(
            "the new mapping applies to transitions from now on; members already in Attentive keep what "
            "was sent to them (add --resync to send every current member again)"
        )
    if resync:
        for audience in new.audiences:
            if audience in change.added:
                continue  # its backfill sends it under the new configuration already
            send = _send(new, audience, "resync", audience in files)
            if send is None:
                plan.notes.append(
                    f"{audience}: no Lytics segment: not re-sent; give its current members with "
                    f"--members {audience}=FILE"
                )
                continue
            plan.sends.append(send)
            used_files.add(audience)
    for audience in sorted(files - used_files):
        problems.append(
            f"--members {audience}: this update sends no members of {audience!r} "
            "(only added audiences, removed ones without --keep-removed, and with --resync every audience)"
        )
    for audience in new.audiences:
        if audience in change.added or resync:
            continue
        before, after = _segment(old, audience), _segment(new, audience)
        if before != after:
            plan.notes.append(
                f"{audience}: its Lytics segment changes ({before or 'none'} -> {after or 'none'}); later "
                "resyncs and teardowns use the new one (a backfill under way keeps the one it started with; "
                "--resync starts over)"
            )
    return plan


def render_update(plan: UpdatePlan, job_id: str, state: str) -> list[str]:
    """The difference, then what goes to Attentive, as ``jobs update --dry-run`` prints it."""
    change = plan.change
    lines = [f"job {job_id} ({change.old.label}), {state}:"]
    if not change.changed:
        lines.append("  configuration: no change")
    for audience in change.added:
        lines.append(f"  + audience {audience}")
    for audience in change.removed:
        lines.append(f"  - audience {audience}" + ("  (kept: --keep-removed)" if plan.keep_removed else ""))
    for item in change.mapping:
        lines.append(f"  ~ {item.describe()}")
    for item in change.other:
        lines.append(f"  ~ {item.describe()}")
    lines.append("sent to Attentive:")
    if plan.sends:
        lines += [f"  {send.describe()}" for send in plan.sends]
    else:
        lines.append("  nothing now")
    lines += [f"note: {note}" for note in plan.notes]
    return lines


def resync_sends(
    config: ExportJobConfig, audience: str | None, member_files: Collection[str] = ()
) -> tuple[list[MemberSend], list[str], list[str]]:
    """``jobs resync``: the audience's (or every audience's) current members as enters.

    Returns the sends, notes (audiences skipped for lack of a source) and problems.
    """
    files = set(member_files)
    problems: list[str] = []
    notes: list[str] = []
    if audience is not None and audience not in config.audiences:
        problems.append(f"--audience {audience!r} is not exported by the job ({', '.join(config.audiences)})")
        return [], notes, problems
    wanted = [audience] if audience is not None else list(config.audiences)
    for name in sorted(files - set(wanted)):
        problems.append(f"--members {name}: not an audience being resynced ({', '.join(wanted)})")
    sends: list[MemberSend] = []
    for name in wanted:
        send = _send(config, name, "resync", name in files)
        if send is None:
            message = (
                f"{name}: no Lytics segment in the job's backfill section; give its current members "
                f"with --members {name}=FILE"
            )
            (problems if audience is not None else notes).append(message)
            continue
        sends.append(send)
    if not sends and not problems:
        problems.append(
            "no audience of the job has a Lytics segment: give current members with --members AUDIENCE=FILE"
        )
    return sends, notes, problems


def teardown_sends(
    config: ExportJobConfig, member_files: Collection[str] = ()
) -> tuple[list[MemberSend], list[str]]:
    """``jobs stop --teardown``: every audience's current members as exits; the problems refusing it
    (an audience whose members cannot be found)."""
    files = set(member_files)
    problems = [
        f"--members {name}: not an audience of the job ({', '.join(config.audiences)})"
        for name in sorted(files - set(config.audiences))
    ]
    sends: list[MemberSend] = []
    for audience in config.audiences:
        send = _send(config, audience, "teardown", audience in files)
        if send is None:
            problems.append(
                f"{audience}: no Lytics segment in the job's backfill section, so its members cannot be "
                f"found: give them with --members {audience}=FILE, or stop without --teardown"
            )
            continue
        sends.append(send)
    return sends, problems
