"""What the sandbox saw, for tests to assert on: counters per token and the accepted-requests log.

The log keeps every accepted bulk request's users' identifiers in arrival order, so tests can check
ordering and that one request never carries the same user twice. A request accepted but left without
its 202 (the drop-after-accept fault) is counted as 202 like any accepted one, flagged
``answerDropped`` in the log and counted in ``answers_dropped``: its job exists, the client never
learnt its id. The per-token peak over any sliding one-second window tells whether a client stayed
under Attentive's 100 requests/s.
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
