"""What a chaos run sends: users, their audience transitions in delivery order, and a backfill file.

Everything comes from one seed. Two export jobs share one authorization: job A exports ``vip`` and
``lapsed`` (user key ``user_id``), job B exports ``churn_risk`` (user key ``email``). Users:

* each has a unique email and ``user_id`` and a phone in one of two formats; pairs of users share
  a phone (a household): the product must never put them in one request, and Attentive (the
  sandbox) merges them into one profile, so they are checked by what each was sent, not by the
  merged profile;
* transitions are heavy-tailed per user (a few hot users flip enter/exit within milliseconds),
  event times are unique per (user, audience) and odd (the backfill's time is even: no ties);
* delivery is roughly in event-time order over the run, but some transitions arrive late (out of
  order), some twice (redelivered), and a few lines are unusable on purpose (not JSON, a bad event,
  a time in the future, no identifier, an audience no job exports).

The expectation is computed from what was actually sent: per (user, audience) the value of the
newest usable transition by event time, including the backfill's enters (job A, ``vip`` only).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

JOB_A = "A"
JOB_B = "B"
#: audience -> export job
AUDIENCE_JOB = {"vip": JOB_A, "lapsed": JOB_A, "churn_risk": JOB_B}
AUDIENCE_WEIGHTS = (("vip", 0.45), ("lapsed", 0.25), ("churn_risk", 0.30))
BACKFILL_AUDIENCE = "vip"
AREAS = ("212", "305", "415", "617", "702")
NAMES = ("Ada", "Bo", "Cy", "Di", "Ed", "Flo")


def job_configs(authorization: str) -> dict[str, dict[str, Any]]:
    """The two export jobs (YAML-equivalent dicts for ``attentive-export jobs create``)."""
    return {
        JOB_A: {
            "label": "chaos A: vip and lapsed",
            "authorization": authorization,
            "audiences": ["vip", "lapsed"],
            "identifier_mappings": {"email": "email", "phone": "phone", "user_id": "clientUserId"},
            "attribute_mappings": {"first_name": "firstName"},
            "user_key_field": "user_id",
            "flush_interval_seconds": 2,
            "batch_size": 256,
        },
        JOB_B: {
            "label": "chaos B: churn risk",
            "authorization": authorization,
            "audiences": ["churn_risk"],
            "identifier_mappings": {"email": "email", "phone": "phone"},
            "user_key_field": "email",
            "flush_interval_seconds": 3,
            "batch_size": 128,
        },
    }


@dataclass
class User:
    idx: int
    user_id: str
    email: str
    phone: str  # E.164
    first_name: str
    #: index of the user sharing this one's phone, if any
    shares_phone_with: int | None = None

    def profile(self, rng: random.Random) -> dict[str, Any]:
        phone: str = self.phone
        roll = rng.random()
        if roll < 0.4:  # national format, normalised by the product
            phone = f"({self.phone[2:5]}) {self.phone[5:8]}-{self.phone[8:]}"
        elif roll < 0.41:
            phone = "not a phone"  # left out as an identifier; the user is still sent by email
        return {"user_id": self.user_id, "email": self.email, "phone": phone, "first_name": self.first_name}


@dataclass
class Line:
    """One line the run sends (a transition, or an unusable line on purpose)."""

    lid: int
    text: str
    #: (user idx, audience, enter, event time ms) for a usable transition; None for unusable lines
    transition: tuple[int, str, bool, int] | None
    #: position in the run's delivery order, 0..1
    when: float


@dataclass
class Delivery:
    """A group of lines sent together: one webhook POST, or one file for ``attentive-export ingest``."""

    seq: int
    channel: str  # "webhook-ndjson" | "webhook-lytics" | "cli"
    lines: list[Line]
    when: float
    #: filled in by the run: (started, accepted) times of the attempt that succeeded
    accepted: tuple[float, float] | None = None
    attempts: list[tuple[float, float, str]] = field(default_factory=list)

    def body(self) -> bytes:
        if self.channel == "webhook-lytics":
            return ("[" + ",".join(line.text for line in self.lines) + "]").encode()
        return ("\n".join(line.text for line in self.lines) + "\n").encode()


@dataclass
class Workload:
    seed: int
    users: list[User]
    lines: list[Line]
    deliveries: list[Delivery]
    backfill_users: list[int]
    backfill_at: int
    backfill_bad_lines: int
    t_lo: int
    t_hi: int
    now_ms: int

    @property
    def transitions(self) -> int:
        return sum(1 for line in self.lines if line.transition is not None)

    def backfill_file(self) -> str:
        rng = random.Random(self.seed * 7919 + 1)
        out = [json.dumps(self.users[i].profile(rng)) for i in self.backfill_users]
        for k in range(self.backfill_bad_lines):
            out.insert(rng.randrange(len(out) + 1), "this is not JSON {" + str(k))
        return "\n".join(out) + "\n"

    def shared_users(self) -> set[int]:
        return {u.idx for u in self.users if u.shares_phone_with is not None}


def make_users(n: int, rng: random.Random, shared_fraction: float) -> list[User]:
    users = []
    for i in range(n):
        area, rest = AREAS[i % len(AREAS)], i // len(AREAS)
        phone = f"+1{area}{234 + rest // 10000}{rest % 10000:04d}"
        users.append(User(i, f"u{i:06d}", f"chaos{i}@example.com", phone, rng.choice(NAMES)))
    pairs = int(n * shared_fraction / 2)
    for a in rng.sample(range(0, n - 1, 2), min(pairs, (n - 1) // 2)):
        b = a + 1
        users[b].phone = users[a].phone
        users[a].shares_phone_with, users[b].shares_phone_with = b, a
    return users


def _times(rng: random.Random, count: int, hot: bool, t_lo: int, t_hi: int) -> list[int]:
    """``count`` strictly increasing odd times in [t_lo, t_hi]."""
    span = t_hi - t_lo
    if hot:  # rapid flips: bursts milliseconds apart
        start = t_lo + rng.randrange(span // 2)
        out, t = [], start
        for _ in range(count):
            t += rng.choice(
                (rng.randint(1, 40), rng.randint(1, 40), rng.randint(1000, span // (4 * count) + 1001))
            )
            out.append(t)
    else:
        out = sorted(rng.sample(range(span // 2), count))
        out = [t_lo + 2 * x for x in out]
    out = [t | 1 for t in out]
    for k in range(1, len(out)):  # keep them strictly increasing after forcing odd
        if out[k] <= out[k - 1]:
            out[k] = out[k - 1] + 2
    return out


def make_workload(
    seed: int,
    users: int,
    transitions: int,
    *,
    shared_fraction: float = 0.02,
    hot_fraction: float = 0.05,
    late_fraction: float = 0.10,
    duplicate_fraction: float = 0.05,
    bad_fraction: float = 0.003,
    backfill_fraction: float = 0.25,
    cli_share: float = 0.35,
    now_ms: int | None = None,
) -> Workload:
    """The run's workload; ``now_ms`` (default: the clock) anchors event times, so a recorded run can
    be judged again (``Workload.now_ms``)."""
    rng = random.Random(seed)
    people = make_users(users, rng, shared_fraction)
    now = now_ms if now_ms is not None else int(time.time() * 1000)
    t_hi = (now - 10 * 60_000) // 2 * 2
    t_lo = t_hi - 2 * 3600_000
    backfill_at = (t_lo + t_hi) // 2 // 2 * 2  # even: never equal to a real-time event time

    hot = {i for i in range(users) if rng.random() < hot_fraction}
    weights = [8.0 if i in hot else 1.0 for i in range(users)]
    counts = [0] * users
    for i in rng.choices(range(users), weights=weights, k=transitions):
        counts[i] += 1
    audiences = [a for a, _w in AUDIENCE_WEIGHTS]
    aud_weights = [w for _a, w in AUDIENCE_WEIGHTS]

    lines: list[Line] = []
    lid = 0

    def add(text: str, transition: tuple[int, str, bool, int] | None, when: float) -> None:
        nonlocal lid
        lines.append(Line(lid, text, transition, min(max(when, 0.0), 1.0)))
        lid += 1

    for i, count in enumerate(counts):
        if not count:
            continue
        per_audience: dict[str, int] = {}
        for a in rng.choices(audiences, weights=aud_weights, k=count):
            per_audience[a] = per_audience.get(a, 0) + 1
        user = people[i]
        for audience, n in per_audience.items():
            enter = rng.random() < 0.7
            for at in _times(rng, n, i in hot, t_lo, t_hi):
                transition = (i, audience, enter, at)
                when = (at - t_lo) / (t_hi - t_lo)
                if rng.random() < late_fraction:
                    when += rng.uniform(0.05, 0.4)  # arrives after newer ones
                profile = user.profile(rng)
                add(_canonical(audience, enter, at, profile), transition, when)
                if rng.random() < duplicate_fraction:  # redelivered later
                    add(_canonical(audience, enter, at, profile), transition, when + rng.uniform(0.01, 0.5))
                enter = not enter if rng.random() < 0.85 else enter  # mostly flips, sometimes repeats

    bad = max(5, int(transitions * bad_fraction))
    for k in range(bad):
        kind = k % 5
        user = people[rng.randrange(users)]
        at = t_lo + 2 * rng.randrange((t_hi - t_lo) // 2) + 1
        if kind == 0:
            text = "this is not JSON {" + str(k)
        elif kind == 1:
            text = json.dumps({"audience": "vip", "event": "join", "at": at, "user": user.profile(rng)})
        elif kind == 2:  # a time far in the future: refused, never makes later changes stale
            text = json.dumps(
                {"audience": "vip", "event": "enter", "at": "2999-01-01T00:00:00Z", "user": user.profile(rng)}
            )
        elif kind == 3:  # no identifier: skipped by the mapping
            text = json.dumps(
                {"audience": "lapsed", "event": "enter", "at": at, "user": {"first_name": "Nobody"}}
            )
        else:  # an audience no job exports: unroutable
            text = json.dumps(
                {"audience": "not_exported", "event": "enter", "at": at, "user": user.profile(rng)}
            )
        add(text, None, rng.random())

    lines.sort(key=lambda line: (line.when, line.lid))
    deliveries = _deliveries(rng, lines, transitions, cli_share)

    chosen = rng.sample(range(users), int(users * backfill_fraction))
    return Workload(seed, people, lines, deliveries, sorted(chosen), backfill_at, 3, t_lo, t_hi, now)


def _canonical(audience: str, enter: bool, at: int, profile: dict[str, Any]) -> str:
    return json.dumps(
        {"audience": audience, "event": "enter" if enter else "exit", "at": at, "user": profile}
    )


def _lytics(line: Line) -> str:
    """The same transition as a Lytics audience-trigger body (time under the event's own name)."""
    obj = json.loads(line.text)
    event = obj["event"]
    data = dict(obj["user"])
    data["segment_events"] = [{"slug": obj["audience"], "event": event, event: obj["at"]}]
    return json.dumps({"data": data})


def _deliveries(rng: random.Random, lines: list[Line], transitions: int, cli_share: float) -> list[Delivery]:
    """Cut the delivery order into webhook POSTs and CLI files.

    The receiver refuses a whole NDJSON body with a line that is not JSON (README: 400 with line
    and column) and Lytics bodies carry transitions only, so unusable lines travel by the CLI (the
    next CLI file, or a last one), which counts each by reason and goes on.
    """
    cli_size = max(300, transitions // 40)
    post_size = max(40, transitions // 330)
    out: list[Delivery] = []
    carried: list[Line] = []  # unusable lines waiting for the next CLI file
    pos = 0
    while pos < len(lines):
        # P(cli) such that about ``cli_share`` of the lines go through the CLI.
        if rng.random() < cli_share * post_size / (cli_share * post_size + (1 - cli_share) * cli_size):
            channel, size = "cli", int(cli_size * rng.uniform(0.6, 1.4))
        else:
            channel = "webhook-lytics" if rng.random() < 0.3 else "webhook-ndjson"
            size = int(post_size * rng.uniform(0.5, 1.5))
        group = lines[pos : pos + max(1, size)]
        pos += len(group)
        if channel == "cli":
            out.append(Delivery(len(out), channel, carried + group, group[0].when))
            carried = []
            continue
        carried += [line for line in group if line.transition is None]
        usable = [line for line in group if line.transition is not None]
        if channel == "webhook-lytics":
            usable = [Line(line.lid, _lytics(line), line.transition, line.when) for line in usable]
        if usable:
            out.append(Delivery(len(out), channel, usable, group[0].when))
    if carried:
        out.append(Delivery(len(out), "cli", carried, carried[-1].when))
    return out


def iter_usable(workload: Workload) -> Iterator[tuple[Line, tuple[int, str, bool, int]]]:
    for line in workload.lines:
        if line.transition is not None:
            yield line, line.transition


def expected_values(
    workload: Workload, accepted_lids: set[int], backfill_accepted: bool
) -> dict[tuple[int, str], tuple[int, bool]]:
    """(user idx, audience) -> (event time, value) of the newest usable transition sent and accepted."""
    best: dict[tuple[int, str], tuple[int, bool]] = {}
    for line, (i, audience, enter, at) in iter_usable(workload):
        if line.lid not in accepted_lids:
            continue
        key = (i, audience)
        known = best.get(key)
        if known is None or at > known[0]:
            best[key] = (at, enter)
    if backfill_accepted:
        for i in workload.backfill_users:
            key = (i, BACKFILL_AUDIENCE)
            known = best.get(key)
            if known is None or workload.backfill_at > known[0]:
                best[key] = (workload.backfill_at, True)
    return best
