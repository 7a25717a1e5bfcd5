"""A stand-in for Lytics' segment scan (``shared/lytics/INPUTS.md``), for backfill tests and the demo.

``GET /api/segment/{id}/scan?limit=N[&start=TOKEN]`` pages through a segment's members the way
Lytics does: the raw token in ``Authorization`` (no ``Bearer``) or the ``access_token`` query
parameter, the ``{"status", "message", "_next", "total", "data", "request_id"}`` envelope, ``limit``
10 by default and at most 100, ``_next`` an opaque token naming a server-side scan and ``""`` on the
last page. A scan reads a snapshot of the segment taken when it started, so replacing a segment
midway does not shift pages under a running scan.

Strict where a client could get it wrong: ``Bearer <token>`` is refused (401), a ``limit`` over 100
or an unknown ``start`` token is a 400, an unknown segment a 404.

Admin (no auth): ``PUT /_sandbox/lytics/segments/{id}`` with a JSON list of profiles seeds a segment;
``GET /_sandbox/lytics`` shows segment sizes, scan requests by answer and queued faults;
``PUT /_sandbox/lytics/faults`` with ``{"fail_next": [503, 429, ...]}`` makes the next scan requests
answer those statuses (a 429 carries ``Retry-After: 1``). Everything but the tokens is forgotten on
``/_sandbox/reset``.
"""

from __future__ import annotations

import itertools
import json
import secrets
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

DEFAULT_LIMIT = 10
MAX_LIMIT = 100


@dataclass
class _Scan:
    members: list[dict[str, Any]]
    offset: int


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status, headers, media_type="application/json")


class LyticsStand:
    """Segments, running scans and counters; one per sandbox process."""

    def __init__(self, tokens: Sequence[str] = ()) -> None:
        self.tokens = frozenset(tokens)
        self.segments: dict[str, list[dict[str, Any]]] = {}
        self.scans: dict[str, _Scan] = {}
        self.requests: Counter[str] = Counter()
        self.fail_next: deque[int] = deque()
        self._request_ids = itertools.count(1)

    def clear(self) -> None:
        self.segments.clear()
        self.scans.clear()
        self.requests.clear()
        self.fail_next.clear()

    def routes(self) -> list[Route]:
        return [
            Route("/api/segment/{segment_id}/scan", self.scan, methods=["GET"]),
            Route("/_sandbox/lytics", self.admin_view, methods=["GET"]),
            Route("/_sandbox/lytics/segments/{segment_id}", self.admin_segment, methods=["GET", "PUT"]),
            Route("/_sandbox/lytics/faults", self.admin_faults, methods=["PUT"]),
        ]

    # ----------------------------------------------------------------- the API

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        self.requests[str(status)] += 1
        body = {"status": status, "message": message, "request_id": str(next(self._request_ids))}
        return _json(status, body, headers)

    async def scan(self, request: Request) -> Response:
        token = request.headers.get("authorization") or request.query_params.get("access_token") or ""
        if token not in self.tokens:
            return self._error(401, "Unauthorized: missing or invalid API token")
        if self.fail_next:
            status = self.fail_next.popleft()
            headers = {"retry-after": "1"} if status == 429 else None
            return self._error(status, "Too Many Requests" if status == 429 else "injected failure", headers)
        try:
            limit = int(request.query_params.get("limit", DEFAULT_LIMIT))
        except ValueError:
            return self._error(400, "limit must be an integer")
        if not 1 <= limit <= MAX_LIMIT:
            return self._error(400, f"limit must be between 1 and {MAX_LIMIT}")
        segment_id = request.path_params["segment_id"]
        start = request.query_params.get("start")
        if start:
            scan = self.scans.get(start)
            if scan is None:
                return self._error(400, "invalid or expired scan id in 'start'")
        else:
            members = self.segments.get(segment_id)
            if members is None:
                return self._error(404, f"segment {segment_id!r} not found")
            scan = _Scan(members, 0)
        page = scan.members[scan.offset : scan.offset + limit]
        end = scan.offset + len(page)
        next_token = ""
        if end < len(scan.members):
            next_token = secrets.token_hex(8)
            self.scans[next_token] = _Scan(scan.members, end)
        self.requests["200"] += 1
        return _json(
            200,
            {
                "status": 200,
                "message": "success",
                "_next": next_token,
                "total": len(scan.members),
                "data": page,
                "request_id": str(next(self._request_ids)),
            },
        )

    # ----------------------------------------------------------------- admin

    async def admin_view(self, _request: Request) -> Response:
        return _json(
            200,
            {
                "segments": {k: len(v) for k, v in self.segments.items()},
                "requests": dict(self.requests),
                "fail_next": list(self.fail_next),
            },
        )

    async def admin_segment(self, request: Request) -> Response:
        segment_id = request.path_params["segment_id"]
        if request.method == "PUT":
            try:
                members = json.loads(await request.body())
            except ValueError:
                return _json(400, {"message": "body must be a JSON list of profile objects"})
            if not isinstance(members, list) or not all(isinstance(m, dict) for m in members):
                return _json(400, {"message": "body must be a JSON list of profile objects"})
            self.segments[segment_id] = members
        members = self.segments.get(segment_id)
        if members is None:
            return _json(404, {"message": f"segment {segment_id!r} not found"})
        return _json(200, {"id": segment_id, "total": len(members)})

    async def admin_faults(self, request: Request) -> Response:
        try:
            body = json.loads(await request.body())
            statuses = [int(s) for s in body["fail_next"]]
        except (ValueError, KeyError, TypeError):
            return _json(400, {"message": 'body must be {"fail_next": [status, ...]}'})
        if any(not 400 <= s <= 599 for s in statuses):
            return _json(400, {"message": "statuses must be 4xx or 5xx"})
        self.fail_next.extend(statuses)
        return _json(200, {"fail_next": list(self.fail_next)})
