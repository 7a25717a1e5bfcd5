"""The verdict of a chaos run: DESIGN.md §2's promises checked against what Attentive (the sandbox) ended
up holding, what crossed the wire (tests/chaos/proxy.py), and what the jobs recorded in Redis.

Checks, by invariant (a row fails the run; "info" rows only report):

1. *Nothing is lost.* Every accepted transition reached its job (the job's last-writer time for the
   user and audience is at least as new), and the newest one per (user, audience) reached Attentive
   or was dead-lettered with a reason (``attentive-export deadletters``). A miss whose every copy was
   accepted within the append-only file's ``everysec`` window before a Redis SIGKILL is counted apart
   as a Redis-crash loss, with that explanation; any other miss fails. Every job the sandbox accepted
   was asked about by a worker, unless its answer never reached one: the drop-after-accept fault, a
   worker killed while the answer was on its way or just after (the kill records the ports of the
   killed processes' connections, so this is exact), or Redis down at that moment.
2. *Order per user.* No job carrying an older value for a user and audience completes after a job
   submitted later carrying another one; no request carries an identifier value twice; while held,
   a user's changes for one audience coalesce to the newest (the jobs' waiting hashes, sampled).
3. *Last writer wins.* Per (user, audience), Attentive's final value is the value of the newest
   usable transition the run sent (backfill enters included). Users sharing a phone are merged into
   one profile by Attentive (it matches on phone first), so for them the final value is rebuilt from
   the sandbox's request log and job completion order; for everyone else the store itself is read,
   and the rebuild is cross-checked against it.
4. *One rate limit.* The sandbox's busiest second for the key, bulk and job status together, <= 100.
5. *No personal data or secret in broker messages*: queued and unacknowledged task messages, sampled.
6. *Bad input gets a counted reason*: every unusable line sent is counted by its reason; Attentive
   never refused (400/413) a request the workers built.
7. *Stateless workers*: workers are SIGKILLed and restarted throughout; no product process may exit
   by itself (Redis restarts included).
8. *Bounded*: held changes (as in 2) and Redis memory, sampled during the run and at the end; and the
   run itself: every job settles within the time bound once the faults are off.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from tests.chaos.config import ChaosConfig
from tests.chaos.workload import (
    AUDIENCE_JOB,
    BACKFILL_AUDIENCE,
    JOB_A,
    JOB_B,
    Workload,
    expected_values,
    job_configs,
)
from worker.mapping.mapper import Mapper
from worker.setup.jobconfig import parse_job_config
from worker.store import keys

#: appendfsync everysec: Redis may lose about the last second of acknowledged writes (two, when a
#: slow fsync postpones the write); a transition accepted this long before a SIGKILL may be lost.
EVERYSEC_WINDOW = 2.5
FINAL_STATUSES = ("COMPLETED", "FAILED", "CANCELLED")
STILL_QUEUED = "still queued when the run ended (not settled)"
#: How Celery's log says it gave up starting a worker (a pool process died before the pool was up).
STARTUP_GIVE_UP = "Unrecoverable error: WorkerLostError('Could not start worker processes')"


@dataclass
class Evidence:
    job_ids: dict[str, str] = field(default_factory=dict)
    users: list[dict[str, Any]] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    jobs: list[dict[str, Any]] = field(default_factory=list)
    counters: dict[str, Any] = field(default_factory=dict)
    wire: dict[str, Any] = field(default_factory=dict)
    status: dict[str, dict[str, Any]] = field(default_factory=dict)
    status_raw: dict[str, dict[str, str]] = field(default_factory=dict)
    #: per job: last-writer-wins digest (text) -> newest accepted event time (ms)
    lww: dict[str, dict[str, int]] = field(default_factory=dict)
    ingest: dict[str, int] = field(default_factory=dict)
    redis_memory: dict[str, Any] = field(default_factory=dict)
    redis_keys: int = 0
    deadletters: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    aof_bytes: int = 0
    outages: list[tuple[float, ...]] = field(default_factory=list)
    worker_rss: dict[str, int] = field(default_factory=dict)
    #: per job, user keys still in the open batch, unfinished batches or waiting at the end
    queued_users: dict[str, list[str]] = field(default_factory=dict)
    #: per job, sends whose answer never came still holding users: (batch id, users, until ms)
    holds: dict[str, list[tuple[int, int, int]]] = field(default_factory=dict)
    #: when the evidence was collected (time.time())
    collected_at: float = 0.0
    crashes: list[tuple[str, float, int]] = field(default_factory=list)
    log_errors: dict[str, int] = field(default_factory=dict)
    #: (seq, channel, line ids, accepted interval or None, attempts)
    deliveries: list[tuple[int, str, list[int], tuple[float, float] | None, int]] = field(
        default_factory=list
    )


@dataclass
class Row:
    check: str
    result: str  # PASS, FAIL or info
    figures: str


@dataclass
class Verdict:
    rows: list[Row]
    summary: dict[str, Any]

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(r.result != "FAIL" for r in self.rows)

    def render(self, header: str) -> str:
        lines = [
            f"**{'PASS' if self.passed else 'FAIL'}**: {header}",
            "",
            "| check | result | figures |",
            "|---|---|---|",
        ]
        lines += [f"| {r.check} | {r.result} | {r.figures.replace('|', '/')} |" for r in self.rows]
        return "\n".join(lines)


def _n(x: float) -> str:
    return f"{x:,.0f}"


def _mb(x: float) -> str:
    return f"{x / 1e6:,.1f} MB"


def _overlaps(interval: tuple[float, float], window: tuple[float, float]) -> bool:
    return interval[0] <= window[1] and interval[1] >= window[0]


class Judge:
    def __init__(self, cfg: ChaosConfig, workload: Workload, ev: Evidence, journal: Any, error: str) -> None:
        self.cfg = cfg
        self.w = workload
        self.ev = ev
        self.journal = journal
        self.error = error
        self.rows: list[Row] = []
        self.summary: dict[str, Any] = {
            "seed": cfg.seed,
            "users": cfg.users,
            "transitions": cfg.transitions,
            "workload_now_ms": workload.now_ms,
        }
        self.crash_windows = [(o[0] - EVERYSEC_WINDOW, o[0]) for o in ev.outages]
        self.outages = [(o[0], o[1] if len(o) > 1 and o[1] else o[0] + 60.0) for o in ev.outages]

    def add(self, check: str, ok: bool | None, figures: str) -> None:
        self.rows.append(Row(check, "info" if ok is None else ("PASS" if ok else "FAIL"), figures))

    # -------------------------------------------------------------- inputs
    def prepare(self) -> None:
        w, ev = self.w, self.ev
        self.accepted_at: dict[int, list[tuple[float, float]]] = defaultdict(list)
        for _seq, _channel, lids, accepted, _attempts in ev.deliveries:
            if accepted is not None:
                for lid in lids:
                    self.accepted_at[lid].append(tuple(accepted))  # type: ignore[arg-type]
        self.backfill_ok = self.journal.backfill is not None
        self.expected = expected_values(w, set(self.accepted_at), self.backfill_ok)
        self.shared = w.shared_users()
        mappers = {name: Mapper(parse_job_config(cfg)) for name, cfg in job_configs("x").items()}
        self.keys: dict[str, list[str]] = {name: [] for name in mappers}
        for user in w.users:
            profile = {"user_id": user.user_id, "email": user.email, "phone": user.phone}
            for name, mapper in mappers.items():
                self.keys[name].append(mapper.user_key(profile) or "")
        self.by_email = {u.email: u.idx for u in w.users}
        self.lines_of: dict[tuple[int, str, bool, int], list[int]] = defaultdict(list)
        for line in w.lines:
            if line.transition is not None:
                self.lines_of[line.transition].append(line.lid)
        # sandbox: jobs, completed writes per (email, audience), sends per (export job, email)
        self.jobs = {j["bulkJobId"]: j for j in ev.jobs}
        self.writes: dict[tuple[str, str], list[tuple[int, bool, int, str]]] = defaultdict(list)
        self.sends: dict[tuple[str, str], list[tuple[int, tuple[tuple[str, bool], ...]]]] = defaultdict(list)
        self.dup_requests: list[str] = []
        self.user_records = 0
        for req in ev.requests:
            job = self.jobs.get(req["batchJobId"])
            seen: set[tuple[str, str]] = set()
            dup = False
            for i, user in enumerate(req["body"]["users"]):
                ids = user.get("identifiers", {})
                for name in ("email", "phone", "clientUserId"):
                    if name in ids:
                        if (name, ids[name]) in seen:
                            dup = True
                        seen.add((name, ids[name]))
                custom = (user.get("attributes") or {}).get("custom") or {}
                values = tuple(sorted((a, v) for a, v in custom.items() if a in AUDIENCE_JOB))
                email = ids.get("email")
                if not values or email is None:
                    continue
                self.user_records += 1
                export = AUDIENCE_JOB[values[0][0]]
                self.sends[(export, email)].append((req["seq"], values))
                if job is not None and job["status"] == "COMPLETED" and str(i) not in job["recordErrors"]:
                    for audience, value in values:
                        self.writes[(email, audience)].append(
                            (job["completedOrder"], value, req["seq"], req["batchJobId"])
                        )
            if dup:
                self.dup_requests.append(req["batchJobId"])
        self.store: dict[str, dict[str, Any]] = {}
        self.store_users = len(ev.users)
        for stored in ev.users:
            email = stored["identifiers"].get("email")
            if email in self.by_email and self.by_email[email] not in self.shared:
                self.store[email] = stored["custom"]
        # wire
        wire = ev.wire
        self.polled = {g[1] for g in wire.get("gets", [])}
        self.seen_final = {
            g[1] for g in wire.get("gets", []) if g[2] == 200 and g[3] in FINAL_STATUSES and g[4]
        }
        self.post_of = {p["job"]: p for p in wire.get("posts", []) if p.get("job")}
        self.last_seen: dict[str, float] = {job: p["t1"] for job, p in self.post_of.items()}
        for g in wire.get("gets", []):
            self.last_seen[g[1]] = max(self.last_seen.get(g[1], 0.0), g[0])
        self.conns = {int(k): v for k, v in wire.get("conns", {}).items()}
        self.answer_dropped = {r["batchJobId"] for r in ev.requests if r.get("answerDropped")}
        self.deadletter_of: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        for name, rows in ev.deadletters.items():
            for row in rows:
                self.deadletter_of[(name, row.get("user", ""))].append(row)

    def final_from_log(self, email: str, audience: str) -> bool | None:
        writes = self.writes.get((email, audience))
        return max(writes)[1] if writes else None

    # -------------------------------------------------------------- checks
    def check_values(self) -> None:
        ev = self.ev
        wrong: list[tuple[int, str, bool, Any]] = []
        disagree = 0
        checked = 0
        for (i, audience), (_at, value) in self.expected.items():
            email = self.w.users[i].email
            rebuilt = self.final_from_log(email, audience)
            if i in self.shared:
                actual = rebuilt
            else:
                actual = self.store.get(email, {}).get(audience)
                if rebuilt != actual:
                    disagree += 1
            checked += 1
            if actual is not value:
                wrong.append((i, audience, value, actual))
        phantoms = 0
        for email, custom in self.store.items():
            i = self.by_email[email]
            for audience in custom:
                if audience in AUDIENCE_JOB and (i, audience) not in self.expected:
                    phantoms += 1
        # (Users sharing a phone can leave two stored profiles with one email: Attentive merged them.)
        strangers = sum(1 for u in ev.users if u["identifiers"].get("email") not in self.by_email)
        causes: Counter[str] = Counter()
        samples: dict[str, list[str]] = defaultdict(list)
        for i, audience, value, actual in wrong:
            cause = self.why(i, audience, value)
            causes[cause] += 1
            if len(samples[cause]) < 5:
                samples[cause].append(
                    f"{self.w.users[i].user_id}/{self.w.users[i].email} {audience}: expected {value}, "
                    f"Attentive has {actual}"
                )
        explained = (
            causes["dead-lettered (reason recorded)"] + causes["lost to a Redis crash (everysec window)"]
        )
        ok = len(wrong) == explained and phantoms == 0 and strangers == 0
        shared_pairs = sum(1 for key in self.expected if key[0] in self.shared)
        self.add(
            "final attribute = newest transition sent (per user, audience)",
            ok,
            f"{_n(checked)} pairs ({_n(len({k[0] for k in self.expected}))} users; {_n(shared_pairs)} of users "
            f"sharing a phone, rebuilt from the request log): {_n(checked - len(wrong))} equal, "
            f"{_n(len(wrong))} differ"
            + (f" ({', '.join(f'{c}: {n}' for c, n in causes.items())})" if wrong else "")
            + f"; values with no transition sent: {phantoms}; unknown profiles: {strangers}",
        )
        self.summary["values"] = {
            "pairs": checked,
            "wrong": len(wrong),
            "causes": dict(causes),
            "samples": dict(samples),
            "phantoms": phantoms,
            "unknown_profiles": strangers,
            "rebuild_disagrees_with_store": disagree,
        }
        self.add(
            "request log rebuild agrees with the store (sanity)",
            None if disagree == 0 else False,
            f"{disagree} pairs differ between the rebuilt and the stored value",
        )
        self.causes = causes

    def reached(self, export: str, audience: str, key: str) -> int | None:
        """The newest event time the job accepted for (user, audience), from its last-writer-wins state."""
        return self.ev.lww.get(export, {}).get(keys.lww_digest(key, audience).decode())

    def why(self, i: int, audience: str, value: bool) -> str:
        """Why (user, audience)'s newest value is not Attentive's final value."""
        export = AUDIENCE_JOB[audience]
        key = self.keys[export][i]
        at = self.expected[(i, audience)][0]
        for row in self.deadletter_of.get((export, key), []):
            record = row.get("record") or {}
            custom = (record.get("attributes") or {}).get("custom") or {}
            if not record or audience in custom:
                return "dead-lettered (reason recorded)"
        reached = self.reached(export, audience, key)
        if reached is None or reached < at:
            return self.lost_before_job(i, audience, value, at)
        if key in self.ev.queued_users.get(export, ()):
            return STILL_QUEUED
        email = self.w.users[i].email
        writes = self.writes.get((email, audience), [])
        if writes:
            last = max(writes)
            if any(w[1] is value and w[2] > last[2] for w in writes):
                return "overwritten by an older job completing later"
        sent = [s for s in self.sends.get((export, email), []) if (audience, value) in s[1]]
        if sent and (not writes or max(sent)[0] > max(writes)[2]):
            return "sent, but no job carrying it completed"
        return "reached its job, never sent"

    def lost_before_job(self, i: int, audience: str, value: bool, at: int) -> str:
        if audience == BACKFILL_AUDIENCE and at == self.w.backfill_at and i in set(self.w.backfill_users):
            intervals = [self.journal.backfill] if self.journal.backfill else []
        else:
            intervals = [
                iv for lid in self.lines_of[(i, audience, value, at)] for iv in self.accepted_at[lid]
            ]
        if intervals and all(any(_overlaps(iv, win) for win in self.crash_windows) for iv in intervals):
            return "lost to a Redis crash (everysec window)"
        return "accepted but never reached its job"

    def check_reached(self) -> None:
        """Every accepted transition reached its job's buffer (last-writer time at least as new)."""
        missing = 0
        crash = 0
        total = 0
        for line in self.w.lines:
            if line.transition is None or line.lid not in self.accepted_at:
                continue
            i, audience, _value, at = line.transition
            export = AUDIENCE_JOB[audience]
            total += 1
            reached = self.reached(export, audience, self.keys[export][i])
            if reached is None or reached < at:
                missing += 1
                if all(
                    any(_overlaps(iv, w) for w in self.crash_windows) for iv in self.accepted_at[line.lid]
                ):
                    crash += 1
        if self.backfill_ok:
            for i in self.w.backfill_users:
                total += 1
                reached = self.reached(JOB_A, BACKFILL_AUDIENCE, self.keys[JOB_A][i])
                if reached is None or reached < self.w.backfill_at:
                    missing += 1
                    if any(_overlaps(self.journal.backfill, w) for w in self.crash_windows):
                        crash += 1
        dead = self.causes.get("dead-lettered (reason recorded)", 0)
        queued = self.causes.get(STILL_QUEUED, 0)
        not_lost = (
            "dead-lettered (reason recorded)",
            "lost to a Redis crash (everysec window)",
            STILL_QUEUED,
        )
        lost_values = sum(n for c, n in self.causes.items() if c not in not_lost)
        delivered = len(self.expected) - sum(self.causes.values())
        ok = missing == crash and lost_values == 0
        self.add(
            "nothing lost: accepted transitions reach their job; newest per pair delivered or dead-lettered",
            ok,
            f"{_n(total)} accepted transitions (with redeliveries and {len(self.w.backfill_users) if self.backfill_ok else 0:,} "
            f"backfill enters): {_n(total - missing)} reached their job, {missing} did not "
            f"({crash} inside a Redis-crash window); newest per pair: {_n(delivered)} delivered, "
            f"{dead} dead-lettered, {lost_values} lost"
            + (
                f", {queued} still queued in Redis when the run ended (not lost; not settled)"
                if queued
                else ""
            ),
        )
        self.summary["reached"] = {"accepted": total, "missing": missing, "in_crash_window": crash}
        dl_reasons: Counter[str] = Counter()
        for rows in self.ev.deadletters.values():
            for row in rows:
                dl_reasons[str(row.get("reason", ""))[:80]] += 1
        self.add(
            "dead letters (each with a reason)",
            None,
            f"{sum(dl_reasons.values())} records"
            + (f": {'; '.join(f'{r} x{n}' for r, n in dl_reasons.most_common(4))}" if dl_reasons else ""),
        )
        self.summary["deadletters"] = dict(dl_reasons)
        windows = ", ".join(f"{o[1] - o[0]:.1f}s down" for o in self.outages)
        self.add(
            "Redis SIGKILL + restart from AOF (appendfsync " + self.cfg.appendfsync + ")",
            None,
            f"{len(self.outages)} crashes ({windows or 'none'}); accepted transitions lost with the "
            f"crashes: {crash} (a transition whose every copy was acknowledged within {EVERYSEC_WINDOW}s before "
            "a kill counts here: everysec fsyncs once a second, so an OS crash could lose that second; a "
            "killed redis-server process loses nothing it already wrote to the kernel)",
        )

    def check_order(self) -> None:
        inversions = 0
        by_class: Counter[str] = Counter()
        samples: list[str] = []
        for (email, audience), writes in self.writes.items():
            ordered = sorted(writes, key=lambda w: w[2])  # by submission
            for x in range(len(ordered)):
                for y in range(x + 1, len(ordered)):
                    older, newer = ordered[x], ordered[y]
                    if older[0] > newer[0] and older[1] != newer[1]:
                        inversions += 1
                        cls = (
                            self.unpolled_class(older[3])
                            if older[3] not in self.polled
                            else "older job polled"
                        )
                        by_class[cls] += 1
                        if len(samples) < 5:
                            samples.append(
                                f"{email} {audience}: job {older[3][:8]} (sent #{older[2]}, {older[1]}) completed "
                                f"after job {newer[3][:8]} (sent #{newer[2]}, {newer[1]}) [{cls}]"
                            )
        self.add(
            "order at Attentive: no older value completes after a newer one",
            inversions == 0,
            f"{inversions} inversions"
            + (f" ({', '.join(f'{c}: {n}' for c, n in by_class.items())})" if inversions else ""),
        )
        self.summary["inversions"] = {"count": inversions, "classes": dict(by_class), "samples": samples}
        self.add(
            "one request never carries a user (or an identifier value) twice",
            not self.dup_requests,
            f"{len(self.ev.requests):,} accepted requests, {len(self.dup_requests)} with a repeated identifier value",
        )

    def unpolled_class(self, job_id: str) -> str:
        """Why a worker never asked about ``job_id`` (one of the explained reasons, or unexplained)."""
        if self.journal.settled_at is None and self.last_seen.get(job_id, 0.0) > self.ev.collected_at - 30:
            return "in flight when the run ended (not settled)"
        if job_id in self.answer_dropped:
            return "answer dropped by the sandbox (drop-after-accept)"
        post = self.post_of.get(job_id)
        if post is None:
            return "unexplained: no answer recorded on the wire"
        t0, t1 = post["t0"], post["t1"]
        if any(_overlaps((t1 - 0.5, t1 + 5.0), o) for o in self.outages):
            return "Redis down when the answer came"
        # A kill records the proxy-side ports of the connections its processes held: exact attribution.
        port = post["port"]
        if not post["delivered"]:
            gone = post.get("gone") or t1
            if any(
                port in k.get("ports", ()) and t0 - 1.0 <= k["t"] <= gone + 0.5 for k in self.journal.kills
            ):
                return "worker killed before the answer reached it"
            return "worker closed its connection before the answer (timeout)"
        if any(port in k.get("ports", ()) and t1 - 0.5 <= k["t"] <= t1 + 10.0 for k in self.journal.kills):
            return "worker killed right after the answer, before recording it"
        return "unexplained"

    def check_polled(self) -> None:
        never: Counter[str] = Counter()
        unfinished: Counter[str] = Counter()
        samples: list[str] = []
        for job_id, job in self.jobs.items():
            if job_id not in self.polled:
                cls = self.unpolled_class(job_id)
                never[cls] += 1
                if cls.startswith("unexplained") and len(samples) < 5:
                    samples.append(f"{job_id} ({job['status']}, {job['totalRecords']} users)")
            elif job_id not in self.seen_final:
                cls = self.unpolled_class(job_id)
                unfinished[cls if cls != "unexplained" else "unexplained: polled, never seen finished"] += 1
                if cls == "unexplained" and len(samples) < 10:
                    samples.append(f"polled, never seen finished: {job_id} ({job['status']})")
        bad = sum(n for c, n in never.items() if c.startswith("unexplained")) + sum(
            n for c, n in unfinished.items() if c.startswith("unexplained")
        )
        explained = ", ".join(f"{c}: {n}" for c, n in never.items() if not c.startswith("unexplained"))
        self.add(
            "Attentive jobs accepted but never polled by the workers",
            bad == 0,
            f"{len(self.jobs):,} jobs accepted; never polled: {sum(never.values())} ({explained or 'none'}); "
            f"unexplained: {sum(n for c, n in never.items() if c.startswith('unexplained'))}; polled but never "
            f"seen finished: {sum(unfinished.values())}",
        )
        self.summary["unpolled"] = {"never": dict(never), "unfinished": dict(unfinished), "samples": samples}

    def check_resends(self) -> None:
        resent = 0
        users: set[tuple[str, str]] = set()
        for key, sends in self.sends.items():
            sends.sort()
            for a, b in itertools.pairwise(sends):
                if a[1] == b[1]:
                    resent += 1
                    users.add(key)
        self.add(
            "users re-sent (same values again: duplicates)",
            None,
            f"{_n(self.user_records)} user records sent; {_n(resent)} repeated the previous one "
            f"({_n(len(users))} (job, user) pairs)",
        )
        self.summary["resent"] = {"records": self.user_records, "repeats": resent, "users": len(users)}

    def check_held(self) -> None:
        j = self.journal
        pair, user = j.held_max_pair, j.held_max_user
        self.add(
            "held changes coalesce: at most the newest per (user, audience) waits (invariants 2, 8)",
            pair[0] <= 1 if j.held_samples else None,
            f"{j.held_samples} samples; most changes held for one (user, audience): {pair[0]}"
            + (f" (job {pair[1]}, user {pair[2]}, {pair[3]})" if pair[0] else "")
            + f"; for one user: {user[0]}; all users at once: {j.held_max_total:,}",
        )
        self.summary["held"] = {"pair": pair, "user": user, "total": j.held_max_total}

    def check_broker(self) -> None:
        j = self.journal
        self.add(
            "no personal data or secret in broker messages (sampled; invariant 5)",
            not j.broker_leaks if j.broker_sampled else None,
            f"{j.broker_sampled:,} task messages read (queued and unacknowledged) during the run; carrying an "
            f"email, phone, user id, API key or webhook token: {sum(j.broker_leaks.values())}"
            + (f" {j.broker_leaks}" if j.broker_leaks else ""),
        )

    def check_bad_input(self) -> None:
        """Invariant 6: every unusable line sent is counted by its reason; Attentive never answers 400."""
        sent: Counter[str] = Counter()
        kinds = (
            ("this is not JSON", "rejected:not_json"),
            ('"event": "join"', "rejected:bad_event"),
            ("2999-01-01", "rejected:timestamp_in_future"),
            ('"first_name": "Nobody"', "skip:no_identifier"),
            ("not_exported", "unroutable"),
        )
        accepted = set(self.accepted_at)
        for line in self.w.lines:
            if line.transition is None and line.lid in accepted:
                for marker, reason in kinds:
                    if marker in line.text:
                        sent[reason] += 1
        counted = dict(self.ev.ingest)
        counted["skip:no_identifier"] = int(
            self.ev.status.get(JOB_A, {}).get("skips", {}).get("no_identifier", 0)
        )
        # Chunks can be ingested twice (a redelivered task, a re-driven chunk), so counts are at least.
        short = {r: (n, counted.get(r, 0)) for r, n in sent.items() if counted.get(r, 0) < n}
        bulk = self.ev.counters.get("requests", {}).get("POST /v2/bulk/user/attributes", {})
        refused = int(bulk.get("400", 0)) + int(bulk.get("413", 0))
        self.add(
            "bad input counted by reason, never a 400 from Attentive (invariant 6)",
            not short and refused == 0,
            "sent/counted: "
            + ", ".join(f"{r} {n}/{counted.get(r, 0)}" for r, n in sorted(sent.items()))
            + f"; bulk requests Attentive refused (400/413): {refused}",
        )
        self.summary["bad_input"] = {"sent": dict(sent), "counted": counted, "refused": refused}

    def check_rate(self) -> None:
        peaks = self.ev.counters.get("max_requests_per_second", {})
        budgeted = int(peaks.get("budgeted", 0))
        self.add(
            "busiest second per key at the sandbox <= 100",
            0 < budgeted <= 100,
            f"bulk + job status: {budgeted}/s (bulk {peaks.get('POST /v2/bulk/user/attributes', 0)}, "
            f"job status {peaks.get('GET /v2/bulk/job/{bulkJobId}', 0)})",
        )
        self.summary["peak_per_second"] = peaks

    def check_faults(self) -> None:
        kills = self.journal.kills
        kinds = Counter(f"{'mid-flush ' if k['midflush'] else ''}{k['kind']}" for k in kills)
        requests = self.ev.counters.get("requests", {})
        bulk = requests.get("POST /v2/bulk/user/attributes", {})
        polls = requests.get("GET /v2/bulk/job/{bulkJobId}", {})
        failed = sum(1 for j in self.ev.jobs if j["status"] == "FAILED")
        pins = self.ev.wire.get("pins", {})
        beat2 = self.journal.beat2
        lat = sorted({int(ms) for _t, ms in self.journal.latency})
        self.add(
            "faults injected",
            None,
            f"worker SIGKILLs {len(kills)} ({', '.join(f'{k}: {n}' for k, n in sorted(kinds.items()))}); "
            f"Redis SIGKILLs {len(self.outages)}; second beat for "
            f"{(beat2[1] - beat2[0]) if len(beat2) > 1 else 0:.0f}s; sandbox bulk 429 {bulk.get('429', 0)}, "
            f"5xx {bulk.get('500', 0) + bulk.get('503', 0)}, dropped {bulk.get('0', 0)}, answers dropped after "
            f"accept {self.ev.counters.get('answers_dropped', 0)}; job status 429 {polls.get('429', 0)}, 5xx "
            f"{polls.get('500', 0) + polls.get('503', 0)}, dropped {polls.get('0', 0)}; failed jobs {failed}; "
            f"slow jobs {len(pins)} of {len(self.ev.jobs)} ({sum(1 for jid in pins if jid not in self.polled)} of them "
            f"orphans no worker ever polled); latency ms {lat}",
        )
        self.summary["faults"] = {
            "kills": dict(kinds),
            "redis_outages": self.outages,
            "beat2": beat2,
            "bulk": bulk,
            "job_status": polls,
            "answers_dropped": self.ev.counters.get("answers_dropped", 0),
            "failed_jobs": failed,
            "slow_jobs": len(pins),
            "restarts": self.journal.restarts,
        }

    def check_settled(self) -> None:
        j = self.journal
        if j.settled_at is not None:
            self.add(
                "settled: every job has nothing outstanding (bounded wait)",
                True,
                f"{j.settled_at - j.faults_off:.0f}s after faults off (send phase {j.send_end - j.send_start:.0f}s)",
            )
        else:
            end = self.ev.collected_at
            holds = [h for rows in self.ev.holds.values() for h in rows]
            longest = {
                name: int(raw.get("longest_attentive_job_ms", 0)) / 1000
                for name, raw in self.ev.status_raw.items()
            }
            queued = sum(len(v) for v in self.ev.queued_users.values())
            chain = j.held_last[0]
            self.add(
                "settled: every job has nothing outstanding (bounded wait)",
                False,
                f"not within the bound, {end - j.faults_off:.0f}s after faults off: {queued} users still queued "
                f"(most changes held for one user at the end: {chain}); {len(holds)} unanswered "
                f"sends still holding {sum(h[1] for h in holds)} users"
                + (
                    f", the last until {max(h[2] for h in holds) / 1000 - end:.0f}s after the end"
                    if holds
                    else ""
                )
                + "; longest Attentive "
                "job the product recorded (its hold after an unanswered send is twice that): "
                + ", ".join(f"{k} {v:.0f}s" for k, v in longest.items())
                + f" (the sandbox's slowest job: {self.cfg.slowest_job_seconds:.0f}s)",
            )
        st = {name: self.ev.status.get(name, {}) for name in (JOB_A, JOB_B)}
        parts = []
        for name, s in st.items():
            c = s.get("counters", {})
            raw = self.ev.status_raw.get(name, {})
            parts.append(
                f"{name}: accepted {c.get('accepted', 0):,}, stale {c.get('stale', 0):,}, merged "
                f"{c.get('merged', 0):,}, held {c.get('queued_behind_unfinished', 0):,}, sealed for shared id "
                f"{c.get('sealed_for_shared_identifier', 0)}, batches sent {c.get('batches_submitted', 0)} / "
                f"completed {c.get('batches_completed', 0)} / resent {c.get('batches_resent', 0)}, users "
                f"delivered {c.get('users_delivered', 0):,}, 429s {c.get('responses_429', 0)}, leases expired "
                f"{c.get('leases_expired', 0)}, uncertain sends {raw.get('sends_uncertain', 0)}, state "
                f"{s.get('state')}"
            )
        self.add("job counters", None, "; ".join(parts))
        self.summary["status"] = st

    def check_processes(self) -> None:
        # Celery gives up starting a worker whose pool process dies before the pool is up ("Unrecoverable
        # error: WorkerLostError('Could not start worker processes')", exit 1): the harness's own SIGKILL
        # of a pool process in a worker's first seconds. A restart policy brings it back, as the
        # harness does (and docker-compose.yml); any other exit, or unrecoverable error, fails.
        logs = self.ev.log_errors
        explained: list[str] = []
        unexplained: list[str] = []
        used: Counter[str] = Counter()
        for name, t, code in self.ev.crashes:
            killed = any(
                k.get("worker") == name and k.get("kind") == "child" and t - 15 <= k["t"] <= t
                for k in self.journal.kills
            )
            startup = logs.get(f"{name}: {STARTUP_GIVE_UP}", 0) > used[name]
            if killed and startup:
                used[name] += 1
                explained.append(name)
            else:
                unexplained.append(f"{name} (code {code})")
        unrecoverable = sum(v for k, v in logs.items() if k.endswith(": Unrecoverable error"))
        other_unrecoverable = unrecoverable - sum(
            v for k, v in logs.items() if k.endswith(f": {STARTUP_GIVE_UP}")
        )
        self.add(
            "no product process exited by itself (workers ride out Redis restarts)",
            not unexplained and other_unrecoverable <= 0,
            f"{len(unexplained)} unexpected exits {unexplained}; "
            f"{len(explained)} worker(s) gave up starting because the harness killed a pool process in "
            f"their first seconds (Celery's 'Could not start worker processes'; restarted, as a restart "
            f"policy does) {explained}; log lines: "
            + (", ".join(f"{k} x{v}" for k, v in sorted(logs.items())) or "none"),
        )
        mem = self.ev.redis_memory
        used = int(mem.get("used_memory", 0))
        rss = self.ev.worker_rss
        self.add(
            "memory at the end",
            None,
            f"Redis used_memory {_mb(used)} (highest sampled during the run {_mb(self.journal.redis_peak[0])}; "
            f"{used / max(1, self.cfg.users):,.0f} B per user at the end, {self.ev.redis_keys:,} "
            f"keys, AOF {_mb(self.ev.aof_bytes)}); worker RSS "
            + ", ".join(f"{k} {_mb(v)}" for k, v in sorted(rss.items()))
            + f" (total {_mb(sum(rss.values()))})",
        )
        self.summary["memory"] = {
            "redis_used": used,
            "redis_peak": self.journal.redis_peak[0],
            "worker_rss": rss,
            "aof": self.ev.aof_bytes,
        }
        retried = sum(1 for d in self.ev.deliveries if d[4] > 1)
        channels = Counter(d[1] for d in self.ev.deliveries)
        self.add(
            "deliveries",
            None,
            f"{len(self.ev.deliveries)} ({', '.join(f'{c} {n}' for c, n in sorted(channels.items()))}); "
            f"{retried} needed a retry (Redis down); backfill attempts {self.journal.backfill_attempts}",
        )

    def run(self) -> Verdict:
        if self.error:
            self.add("run completed", False, self.error)
        self.prepare()
        self.check_values()
        self.check_reached()
        self.check_order()
        self.check_polled()
        self.check_held()
        self.check_broker()
        self.check_bad_input()
        self.check_rate()
        self.check_settled()
        self.check_resends()
        self.check_faults()
        self.check_processes()
        if self.journal.notes:
            self.add("notes", None, "; ".join(self.journal.notes))
        return Verdict(self.rows, self.summary)


def judge(cfg: ChaosConfig, workload: Workload, ev: Evidence | None, journal: Any, error: str) -> Verdict:
    if ev is None:
        return Verdict([Row("run completed", "FAIL", error or "no evidence collected")], {"error": error})
    try:
        return Judge(cfg, workload, ev, journal, error).run()
    except Exception as exc:  # a verdict bug must not hide the run: say so and fail
        import traceback

        return Verdict(
            [Row("verdict computed", "FAIL", f"{type(exc).__name__}: {exc}")],
            {"error": f"{error}; {exc}", "traceback": traceback.format_exc()},
        )
