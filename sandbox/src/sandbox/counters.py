"""What the sandbox saw, for tests to assert on: counters per token and the accepted-requests log.

The log keeps every accepted bulk request's users' identifiers in arrival order, so tests can check
ordering and that one request never carries the same user twice. A request accepted but left without
its 202 (the drop-after-accept fault) is counted as 202 like any accepted one, flagged
``answerDropped`` in the log and counted in ``answers_dropped``: its job exists, the client never
learnt its id. The per-token peak over any sliding one-second window tells whether a client stayed
under Attentive's 100 requests/s.

For runs that last hours (bench/bench_scale.py) two reads stay cheap however long the run: answered
requests per wall-clock second (``timeline``, per token, endpoint and status) and, in order, the
first download of each job's results file (``results_fetched``: when a client confirmed the job
complete). ``/_sandbox/receipts`` reads the accepted-requests log from a given sequence number on.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import orjson

#: The endpoints that share Attentive's 100/s budget in our design (bulk submit and job status).
BUDGETED = frozenset(("POST /v2/bulk/user/attributes", "GET /v2/bulk/job/{bulkJobId}"))
#: How many rejected (4xx) bulk requests to keep for debugging.
REJECTED_KEPT = 200


@dataclass
class _Window:
    """Request times in the last second and the highest count ever seen in such a window."""

    times: deque[float] = field(default_factory=deque)
    peak: int = 0

    def hit(self, now: float) -> None:
        times = self.times
        times.append(now)
        while times[0] <= now - 1.0:
            times.popleft()
        if len(times) > self.peak:
            self.peak = len(times)


@dataclass
class TokenCounters:
    requests: dict[str, Counter[int]] = field(default_factory=dict)
    users_per_request: Counter[int] = field(default_factory=Counter)
    windows: dict[str, _Window] = field(default_factory=dict)
    #: Accepted bulk requests (counted 202 above, job created) whose answer was replaced by a reset.
    answers_dropped: int = 0
    #: Answered requests per wall-clock second (int(time.time())): endpoint -> status -> count.
    timeline: dict[int, dict[str, Counter[int]]] = field(default_factory=dict)

    def timeline_json(self, since: int) -> dict[str, dict[str, dict[str, int]]]:
        """The per-second counts from second ``since`` on (epoch seconds as keys, in order)."""
        return {
            str(second): {ep: {str(k): v for k, v in c.items()} for ep, c in per.items()}
            for second, per in sorted(self.timeline.items())
            if second >= since
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": {ep: {str(k): v for k, v in sorted(c.items())} for ep, c in self.requests.items()},
            "users_per_request": {str(k): v for k, v in sorted(self.users_per_request.items())},
            "max_requests_per_second": {name: w.peak for name, w in self.windows.items()},
            "answers_dropped": self.answers_dropped,
        }


@dataclass
class LoggedRequest:
    seq: int
    time: float
    token: str
    batch_job_id: str
    raw: bytes
    users: int
    dropped: bool
    #: The job was created but the client got a connection reset instead of the 202.
    answer_dropped: bool = False

    def to_json(self, with_body: bool) -> dict[str, Any]:
        """The log entry; identifiers (and the body) are re-parsed from the raw request on demand."""
        body = orjson.loads(self.raw)
        out: dict[str, Any] = {
            "seq": self.seq,
            "time": self.time,
            "token": self.token,
            "batchJobId": self.batch_job_id,
            "users": self.users,
            "identifiers": [u.get("identifiers") if isinstance(u, dict) else None for u in body["users"]],
            "droppedJob": self.dropped,
            "answerDropped": self.answer_dropped,
        }
        if with_body:
            out["body"] = body
        return out


class Recorder:
    """Counters per token, the accepted-requests log and the last rejected requests."""

    def __init__(self) -> None:
        self.tokens: dict[str, TokenCounters] = {}
        self.accepted: list[LoggedRequest] = []
        self.rejected: deque[dict[str, Any]] = deque(maxlen=REJECTED_KEPT)
        #: (job id, wall-clock time) of each job's first results download, in that order.
        self.results_fetched: list[tuple[str, float]] = []

    def clear(self) -> None:
        self.__init__()  # type: ignore[misc]

    def count(self, token: str, endpoint: str, status: int) -> None:
        """Count one answered request of a known token; feeds the sliding-window peaks."""
        counters = self.tokens.get(token)
        if counters is None:
            counters = self.tokens[token] = TokenCounters()
        per_endpoint = counters.requests.get(endpoint)
        if per_endpoint is None:
            per_endpoint = counters.requests[endpoint] = Counter()
        per_endpoint[status] += 1
        second = int(time.time())
        per_second = counters.timeline.get(second)
        if per_second is None:
            per_second = counters.timeline[second] = {}
        in_second = per_second.get(endpoint)
        if in_second is None:
            in_second = per_second[endpoint] = Counter()
        in_second[status] += 1
        now = time.monotonic()
        for name in (endpoint, "budgeted") if endpoint in BUDGETED else (endpoint,):
            window = counters.windows.get(name)
            if window is None:
                window = counters.windows[name] = _Window()
            window.hit(now)

    def log_accepted(self, token: str, job_id: str, raw: bytes, users: int, dropped: bool) -> LoggedRequest:
        self.tokens.setdefault(token, TokenCounters()).users_per_request[users] += 1
        entry = LoggedRequest(len(self.accepted) + 1, time.time(), token, job_id, raw, users, dropped)
        self.accepted.append(entry)
        return entry

    def answer_dropped(self, entry: LoggedRequest) -> None:
        """``entry`` was accepted, but the client got a connection reset instead of its answer."""
        entry.answer_dropped = True
        self.tokens.setdefault(entry.token, TokenCounters()).answers_dropped += 1

    def log_rejected(self, token: str, status: int, message: str) -> None:
        self.rejected.append({"time": time.time(), "token": token, "status": status, "message": message})

    def results_downloaded(self, job_id: str, at: float) -> None:
        """A job's results file was downloaded for the first time, at ``at`` (wall clock)."""
        self.results_fetched.append((job_id, at))

    def receipts(
        self, after: int, list_domains: tuple[str, ...], count_domains: tuple[str, ...], limit: int
    ) -> list[dict[str, Any]]:
        """Accepted requests with a sequence number above ``after`` (at most ``limit``): when each
        arrived, its job and users, the emails it carried in ``list_domains``, and for
        ``count_domains`` how many users it carried and how many custom attribute values they had
        (each audience flag is one). A body is parsed only when it mentions one of the domains."""
        out = []
        wanted = [(d, b"@" + d.encode()) for d in (*list_domains, *count_domains)]
        for entry in self.accepted[max(after, 0) : max(after, 0) + limit]:
            item: dict[str, Any] = {
                "seq": entry.seq,
                "time": entry.time,
                "batchJobId": entry.batch_job_id,
                "users": entry.users,
                "droppedJob": entry.dropped,
            }
            present = [d for d, needle in wanted if needle in entry.raw]
            if present:
                emails: dict[str, list[str]] = {d: [] for d in present}
                custom: Counter[str] = Counter()
                for user in orjson.loads(entry.raw)["users"]:
                    ids = user.get("identifiers") if isinstance(user, dict) else None
                    email = ids.get("email") if isinstance(ids, dict) else None
                    if not isinstance(email, str):
                        continue
                    domain = email.rpartition("@")[2]
                    if domain in emails:
                        emails[domain].append(email)
                        attributes = user.get("attributes")
                        values = attributes.get("custom") if isinstance(attributes, dict) else None
                        custom[domain] += len(values) if isinstance(values, dict) else 0
                item["emails"] = {d: v for d, v in emails.items() if d in list_domains and v}
                item["counts"] = {
                    d: {"users": len(v), "customAttributes": custom[d]}
                    for d, v in emails.items()
                    if d in count_domains
                }
            out.append(item)
        return out
