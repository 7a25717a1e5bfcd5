"""The sandbox's HTTP surface: Attentive's endpoints (CONTRACT §7) plus ``/_sandbox/`` admin routes.

Every API request goes through the same gate, in this order: injected latency, dropped connection,
rate limit (429), auth (401/403), injected 429/5xx, then the endpoint. An accepted bulk POST may then
lose its answer (drop-after-accept): its job is created and completes as usual, but the connection is
reset instead of sending the 202. Rate-limit headers are added to every API response when limiting
is on. Admin routes and the results files need no auth and are never faulted or limited (results
stand in for pre-signed object-store URLs).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sandbox.counters import LoggedRequest, Recorder
from sandbox.faults import FaultDice, drop_connection
from sandbox.jobs import STATUSES, Clock, Job, JobBoard
from sandbox.lytics import LyticsStand
from sandbox.options import Options, Token
from sandbox.ratelimit import RateLimiter
from sandbox.store import UserStore
from sandbox.validation import (
    BodyError,
    check_custom,
    check_users_array,
    is_e164,
    oversized_records,
    parse_body,
    record_problems,
    user_problems,
)

logger = logging.getLogger("sandbox")

BULK = "POST /v2/bulk/user/attributes"
BULK_PATH = "/v2/bulk/user/attributes"
#: ASGI scope key: the accepted request (its log entry) whose answer is to be dropped.
UNANSWERED = "sandbox.unanswered"
JOB = "GET /v2/bulk/job/{bulkJobId}"
SINGLE = "POST /v2/user/attributes"
ACCEPTED_MESSAGE = "Bulk user attributes job successfully submitted"
#: How many problems a 400 message lists before summarising the rest.
MAX_LISTED_PROBLEMS = 20
#: The background completer never sleeps longer than this, so newly submitted jobs are noticed.
COMPLETER_TICK = 0.02
#: Completed jobs are applied to the store when something reads it (every read syncs first), or in
#: the background once this many wait (bounds memory, about 77 KB a job). Until then the store's
#: work stays off the CPU the client shares with the sandbox on one machine: at Attentive it runs
#: on Attentive's servers, not the exporter's...
MAX_BACKLOG = 1000
#: ...in slices of at most this many seconds, so a new request waits little.
APPLY_SLICE = 0.01

Handler = Callable[[Request, Token, dict[str, str]], Awaitable[Response]]


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status, headers, media_type="application/json")


def _credential(authorization: str) -> str:
    scheme, _, value = authorization.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


class Sandbox:
    """All sandbox state and the ASGI app serving it; one instance per process."""

    def __init__(self, tokens: list[Token], options: Options, lytics_tokens: Sequence[str] = ()) -> None:
        self.tokens = {t.key: t for t in tokens}
        self.initial_tokens = dict(self.tokens)
        self.initial_options = options
        self.options = options
        self.dice = FaultDice(options.seed)
        self.clock = Clock()
        self.store = UserStore()
        self.board = JobBoard(self.store, self.clock)
        self.limiter = RateLimiter()
        self.recorder = Recorder()
        self.lytics = LyticsStand(lytics_tokens)  # Lytics' segment scan, for backfills
        self._error_ids = itertools.count(1)
        self._seq = itertools.count(1)
        self.app = Starlette(routes=self._routes(), lifespan=self._lifespan)

    # ----------------------------------------------------------------- plumbing

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Outermost ASGI layer: latency and dropped connections need uvicorn's own ``send``."""
        if scope["type"] == "http" and scope["path"].startswith(("/v1/", "/v2/")):
            options = self.options
            if options.latency_ms > 0:
                await asyncio.sleep(options.latency_ms / 1000.0)
            if self.dice.roll(options.drop_connections):
                headers = dict(scope.get("headers") or ())
                token = self.tokens.get(_credential(headers.get(b"authorization", b"").decode("latin-1")))
                if token is not None:
                    self.recorder.count(token.key, _endpoint_name(scope["method"], scope["path"]), 0)
                if await drop_connection(send):
                    return
            if scope["method"] == "POST" and scope["path"] == BULK_PATH:
                send = self._answer_or_drop(scope, send)
        await self.app(scope, receive, send)

    def _answer_or_drop(self, scope: Any, send: Any) -> Any:
        """Wrap uvicorn's ``send``: when the bulk handler marked the request (drop-after-accept), reset
        the connection instead of starting its 202, and swallow what the app sends after that."""
        dropped = False

        async def answer_or_drop(message: Any) -> None:
            nonlocal dropped
            if dropped:
                return
            entry: LoggedRequest | None = scope.get(UNANSWERED)
            if entry is not None and message["type"] == "http.response.start":
                if await drop_connection(send):
                    dropped = True
                    self.recorder.answer_dropped(entry)
                    return
                logger.warning(
                    "drop-after-accept: no transport to reset; answering job %s", entry.batch_job_id
                )
            await send(message)

        return answer_or_drop

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(self._complete_forever())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _complete_forever(self) -> None:
        """Finish due jobs even when nobody polls; apply finished ones to the store past MAX_BACKLOG."""
        while True:
            try:
                self.board.advance()
                if self.board.pending_applies() > MAX_BACKLOG:
                    self.board.apply_pending(budget=APPLY_SLICE)
            except Exception:  # keep completing other jobs; a bug here must not freeze every job
                logger.exception("sandbox completer failed; continuing")
            next_due = self.board.next_due()
            wait = COMPLETER_TICK if next_due is None else next_due - self.clock.now()
            await asyncio.sleep(min(max(wait, 0.001), COMPLETER_TICK))

    def reset(self) -> None:
        """Forget everything and restore the start-up options (faults included) and tokens."""
        self.options = self.initial_options
        self.tokens = dict(self.initial_tokens)
        self.dice = FaultDice(self.options.seed)
        self.clock.offset = 0.0
        self.store.clear()
        self.board.clear()
        self.limiter.clear()
        self.recorder.clear()
        self.lytics.clear()
        self._seq = itertools.count(1)  # job numbers restart: the processing model's delays with them

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        return _json(status, {"error": {"id": next(self._error_ids), "message": message}}, headers)

    async def _api(
        self, request: Request, endpoint: str, limit: int, write: bool, handler: Handler
    ) -> Response:
        """The common gate for Attentive endpoints (see the module docstring for the order)."""
        credential = _credential(request.headers.get("authorization", ""))
        allowed, remaining = self.limiter.take(credential, endpoint, limit)
        headers = (
            {"x-ratelimit-limit": str(limit), "x-ratelimit-remaining": str(remaining)} if limit > 0 else {}
        )
        token = self.tokens.get(credential)
        options = self.options
        if not allowed:
            response = self._too_many(headers)
        elif token is None:
            response = self._error(401, "Unauthorized: missing or unknown bearer token", headers)
        elif write and token.readonly:
            response = self._error(403, "Access Denied: this key lacks write permission", headers)
        elif self.dice.roll(options.fault_429):
            if headers:
                headers["x-ratelimit-remaining"] = "0"
            response = self._too_many(headers)
        elif self.dice.roll(options.fault_5xx):
            status = self.dice.server_error()
            message = "Internal Server Error" if status == 500 else "Service Unavailable"
            response = self._error(status, message, headers)
        else:
            response = await handler(request, token, headers)
        # Unknown keys are counted under what they sent, so a test can see a revoked key's retries.
        self.recorder.count(
            token.key if token is not None else credential or "<none>", endpoint, response.status_code
        )
        return response

    def _too_many(self, headers: dict[str, str]) -> Response:
        if self.options.retry_after:
            headers = {**headers, "retry-after": "1"}
        return self._error(429, "Too Many Requests", headers)

    def _base_url(self, request: Request) -> str:
        return str(request.base_url).rstrip("/")

    # ----------------------------------------------------------------- Attentive endpoints

    async def me(self, request: Request) -> Response:
        async def answer(_r: Request, token: Token, headers: dict[str, str]) -> Response:
            return _json(
                200,
                {
                    "applicationName": "Attentive Sandbox",
                    "attentiveDomainName": "sandbox.attn.tv",
                    "companyName": token.company_name,
                    "contactEmail": "sandbox@example.com",
                    "companyId": "U2FuZGJveENvbXBhbnk",
                },
                headers,
            )

        return await self._api(
            request, f"GET {request.url.path}", self.options.rate_limit_other, False, answer
        )

    async def bulk(self, request: Request) -> Response:
        return await self._api(request, BULK, self.options.rate_limit, True, self._bulk)

    async def _bulk(self, request: Request, token: Token, headers: dict[str, str]) -> Response:
        raw = await request.body()
        try:
            users = check_users_array(parse_body(raw))
        except BodyError as exc:
            return self._reject(token, str(exc), headers)
        problems = record_problems(users)
        options = self.options
        if problems and options.validation == "sync":
            return self._reject(token, _summarise(problems), headers)
        record_errors = {i: (400, "; ".join(found)) for i, found in problems.items()}
        for i, size in oversized_records(len(raw), users).items():
            record_errors.setdefault(i, (413, f"record exceeds 1 MiB ({size} bytes)"))
        job_id = str(uuid.uuid4())
        dropped = self.dice.roll(options.drop_jobs)
        entry = self.recorder.log_accepted(token.key, job_id, raw, len(users), dropped)
        if self.dice.roll(options.drop_after_accept):
            request.scope[UNANSWERED] = entry  # the job is created below; the answer is dropped (__call__)
        if not dropped:
            now = self.clock.now()
            seq = next(self._seq)
            self.board.add(
                Job(
                    id=job_id,
                    token=token.key,
                    seq=seq,
                    submitted_at=now,
                    submitted_wall=time.time(),
                    total=len(users),
                    due=now + self.dice.completion_delay(options, seq),
                    raw=raw,
                    record_errors=record_errors,
                    will_fail=self.dice.roll(options.fail_jobs),
                )
            )
        return _json(202, {"message": ACCEPTED_MESSAGE, "batchJobId": job_id}, headers)

    def _reject(self, token: Token, message: str, headers: dict[str, str]) -> Response:
        self.recorder.log_rejected(token.key, 400, message)
        return self._error(400, message, headers)

    async def job_status(self, request: Request) -> Response:
        async def answer(req: Request, _token: Token, headers: dict[str, str]) -> Response:
            self.board.advance()
            job = self.board.get(req.path_params["job_id"])
            if job is None:
                return self._error(404, "The specified resource was not found", headers)
            return _json(200, job.view(self._base_url(req)), headers)

        return await self._api(request, JOB, self.options.rate_limit, False, answer)

    async def results(self, request: Request) -> Response:
        """The results file; no auth, like a pre-signed URL."""
        self.board.advance()
        job = self.board.get(request.path_params["job_id"])
        if job is None or job.status != "COMPLETED":
            return self._error(404, "The specified resource was not found")
        if job.results_fetched_wall is None:
            job.results_fetched_wall = time.time()
            self.recorder.results_downloaded(job.id, job.results_fetched_wall)
        return Response(b"".join(job.result_lines()), 200, media_type="application/x-ndjson")

    async def single_user(self, request: Request) -> Response:
        async def answer(req: Request, token: Token, headers: dict[str, str]) -> Response:
            try:
                user = parse_body(await req.body())
            except BodyError as exc:
                return self._reject(token, str(exc), headers)
            problems = user_problems("body", user)
            if problems:
                return self._reject(token, _summarise({0: problems}), headers)
            self.board.apply_now(user)
            return _json(202, {"success": True, "message": "User attributes successfully submitted"}, headers)

        return await self._api(request, SINGLE, self.options.rate_limit_other, True, answer)

    async def custom_attributes(self, request: Request) -> Response:
        """GET answers ``[{"name","value"}]`` for exactly one of phone/email; POST upserts (v1 shape)."""
        limit = self.options.rate_limit_other
        if request.method == "POST":
            return await self._api(request, "POST /v1/attributes/custom", limit, True, self._post_custom)
        return await self._api(request, "GET /v1/attributes/custom", limit, False, self._get_custom)

    async def _get_custom(self, request: Request, _token: Token, headers: dict[str, str]) -> Response:
        phone, email = request.query_params.get("phone"), request.query_params.get("email")
        if (phone is None) == (email is None):
            return self._error(400, "Must specify exactly one of phone or email", headers)
        self.board.sync()
        user = self.store.find("phone", phone) if phone is not None else self.store.find("email", str(email))
        pairs = [{"name": k, "value": v} for k, v in user.custom.items()] if user else []
        return _json(200, pairs, headers)

    async def _post_custom(self, request: Request, token: Token, headers: dict[str, str]) -> Response:
        try:
            body = parse_body(await request.body())
        except BodyError as exc:
            return self._reject(token, str(exc), headers)
        problems, user = _v1_custom_problems(body)
        if problems:
            return self._reject(token, "; ".join(problems), headers)
        self.board.apply_now(user)
        return Response(b"", 200)

    # ----------------------------------------------------------------- admin endpoints

    async def admin_health(self, _request: Request) -> Response:
        return _json(200, {"ok": True})

    async def admin_reset(self, _request: Request) -> Response:
        self.reset()
        return _json(200, {"ok": True})

    async def admin_tokens(self, request: Request) -> Response:
        """``POST {"token": "KEY[:flags]"}`` adds a key; ``DELETE /_sandbox/tokens/KEY`` revokes one
        (its requests then get 401, as a key revoked in Attentive's UI would)."""
        if request.method == "DELETE":
            revoked = self.tokens.pop(request.path_params["key"], None)
            return _json(200 if revoked else 404, {"revoked": revoked is not None})
        try:
            body = json.loads(await request.body() or b"{}")
            token = Token.parse(str(body["token"]))
        except (ValueError, KeyError, TypeError) as exc:
            return _json(400, {"error": {"id": 0, "message": f'expected {{"token": "KEY[:flags]"}}: {exc}'}})
        self.tokens[token.key] = token
        return _json(200, {"added": token.key})

    async def admin_options(self, request: Request) -> Response:
        if request.method == "PUT":
            try:
                changes = json.loads(await request.body() or b"{}")
                if not isinstance(changes, dict):
                    raise ValueError("body must be a JSON object of option: value")
                self.options = self.options.updated(changes)
            except ValueError as exc:
                return _json(400, {"error": {"id": 0, "message": str(exc)}})
            if "seed" in changes:
                self.dice = FaultDice(self.options.seed)
        return _json(200, self.options.to_json())

    async def admin_users(self, request: Request) -> Response:
        self.board.sync()
        criteria = {k: v for k, v in request.query_params.items() if k in ("phone", "email", "clientUserId")}
        return _json(200, {"users": [u.to_json() for u in self.store.lookup(**criteria)]})

    async def admin_counters(self, _request: Request) -> Response:
        return _json(200, {"tokens": {k: c.to_json() for k, c in self.recorder.tokens.items()}})

    async def admin_requests(self, request: Request) -> Response:
        bodies = request.query_params.get("bodies") in ("1", "true")
        return _json(
            200,
            {
                "requests": [r.to_json(bodies) for r in self.recorder.accepted],
                "rejected": list(self.recorder.rejected),
            },
        )

    async def admin_timeline(self, request: Request) -> Response:
        """``?token=KEY&since=EPOCH_SECOND``: that token's answered requests per wall-clock second,
        ``{"now": t, "seconds": {"<second>": {endpoint: {status: n}}}}`` (the current second is
        still filling)."""
        counters = self.recorder.tokens.get(request.query_params.get("token", ""))
        try:
            since = int(request.query_params.get("since", "0"))
        except ValueError:
            return self._error(400, "since must be a whole number of epoch seconds")
        seconds = counters.timeline_json(since) if counters is not None else {}
        return _json(200, {"now": time.time(), "seconds": seconds})

    async def admin_receipts(self, request: Request) -> Response:
        """What arrived and what was confirmed, read incrementally (long runs: bench/bench_scale.py).

        ``?after=SEQ&email_domain=D&count_domain=D&limit=N``: accepted bulk requests numbered above
        ``after`` (at most ``limit``, default 5000), each ``{"seq", "time", "batchJobId", "users",
        "droppedJob"}``, plus the emails it carried of each ``email_domain`` (``"emails": {domain:
        [...]}``) and, per ``count_domain``, ``"counts": {domain: {"users", "customAttributes"}}``: how
        many users of that domain it carried and how many custom attribute values they had (both
        parameters repeatable). ``results_after=N``: the first results download of each job from the
        N+1-th on, ``[jobId, time]``, in order (a client confirming the job complete).
        """
        params = request.query_params
        try:
            after = int(params.get("after", "0"))
            results_after = int(params.get("results_after", "0"))
            limit = int(params.get("limit", "5000"))
        except ValueError:
            return self._error(400, "after, results_after and limit must be whole numbers")
        recorder = self.recorder
        requests = recorder.receipts(
            after,
            tuple(d.lower() for d in params.getlist("email_domain")),
            tuple(d.lower() for d in params.getlist("count_domain")),
            max(limit, 1),
        )
        return _json(
            200,
            {
                "requests": requests,
                "accepted_total": len(recorder.accepted),
                "results": recorder.results_fetched[max(results_after, 0) :],
            },
        )

    async def admin_jobs(self, request: Request) -> Response:
        self.board.sync()
        job_id = request.path_params.get("job_id")
        if job_id is None:
            return _json(200, {"jobs": [j.admin_view() for j in self.board.jobs.values()]})
        job = self.board.jobs.get(job_id)
        return _json(200, job.admin_view()) if job else self._error(404, f"no job {job_id}")

    async def admin_job_status(self, request: Request) -> Response:
        job = self.board.jobs.get(request.path_params["job_id"])
        if job is None:
            return self._error(404, f"no job {request.path_params['job_id']}")
        try:
            status = json.loads(await request.body())["status"]
        except (ValueError, KeyError, TypeError):
            return self._error(400, 'body must be {"status": "<STATUS>"}')
        if status not in STATUSES:
            return self._error(400, f"status must be one of {', '.join(STATUSES)}")
        self.board.advance()
        self.board.set_status(job, status, self.options.processing_delay)
        return _json(200, job.admin_view())

    async def admin_clock(self, request: Request) -> Response:
        try:
            seconds = float(json.loads(await request.body())["advance_seconds"])
        except (ValueError, KeyError, TypeError):
            return self._error(400, 'body must be {"advance_seconds": <number>}')
        self.clock.offset += seconds
        self.board.advance()
        return _json(200, {"offset_seconds": self.clock.offset})

    def _routes(self) -> list[Route]:
        return [
            Route("/v1/me", self.me, methods=["GET"]),
            Route("/v2/me", self.me, methods=["GET"]),
            Route("/v2/bulk/user/attributes", self.bulk, methods=["POST"]),
            Route("/v2/bulk/job/{job_id}", self.job_status, methods=["GET"]),
            Route("/v2/user/attributes", self.single_user, methods=["POST"]),
            Route("/v1/attributes/custom", self.custom_attributes, methods=["GET", "POST"]),
            Route("/results/{job_id}.jsonl", self.results, methods=["GET"]),
            Route("/_sandbox/health", self.admin_health, methods=["GET"]),
            Route("/_sandbox/reset", self.admin_reset, methods=["POST"]),
            Route("/_sandbox/options", self.admin_options, methods=["GET", "PUT"]),
            Route("/_sandbox/faults", self.admin_options, methods=["GET", "PUT"]),
            Route("/_sandbox/users", self.admin_users, methods=["GET"]),
            Route("/_sandbox/counters", self.admin_counters, methods=["GET"]),
            Route("/_sandbox/requests", self.admin_requests, methods=["GET"]),
            Route("/_sandbox/receipts", self.admin_receipts, methods=["GET"]),
            Route("/_sandbox/timeline", self.admin_timeline, methods=["GET"]),
            Route("/_sandbox/jobs", self.admin_jobs, methods=["GET"]),
            Route("/_sandbox/jobs/{job_id}", self.admin_jobs, methods=["GET"]),
            Route("/_sandbox/jobs/{job_id}/status", self.admin_job_status, methods=["POST"]),
            Route("/_sandbox/clock", self.admin_clock, methods=["POST"]),
            Route("/_sandbox/tokens", self.admin_tokens, methods=["POST"]),
            Route("/_sandbox/tokens/{key}", self.admin_tokens, methods=["DELETE"]),
            *self.lytics.routes(),
        ]


def _endpoint_name(method: str, path: str) -> str:
    """The counter key of a request: the route template, so job ids don't each get a key."""
    if path.startswith("/v2/bulk/job/"):
        return JOB
    return f"{method} {path}"


def _summarise(problems: dict[int, list[str]]) -> str:
    """One 400 message listing the first problems, each naming its user index and field."""
    flat = [p for i in sorted(problems) for p in problems[i]]
    listed = "; ".join(flat[:MAX_LISTED_PROBLEMS])
    if len(flat) > MAX_LISTED_PROBLEMS:
        listed += f"; ... and {len(flat) - MAX_LISTED_PROBLEMS} more"
    return listed


def _v1_custom_problems(body: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """Check a v1 ``CustomAttributesRequest`` and convert it to the v2 record shape for the store."""
    out: list[str] = []
    for key in sorted(body.keys() - {"properties", "user"}):
        out.append(f"{key}: unknown field")
    properties = body.get("properties")
    if properties is None:
        out.append("properties: required")
    else:
        check_custom("properties", properties, out)
    user = body.get("user")
    ids: dict[str, Any] = {}
    if not isinstance(user, dict) or not user:
        out.append("user: required, an object with phone, email or externalIdentifiers")
        return out, {}
    for key in sorted(user.keys() - {"phone", "email", "externalIdentifiers"}):
        out.append(f"user.{key}: unknown field")
    if "phone" in user:
        if not is_e164(user["phone"]):
            out.append(f"user.phone: not E.164: {user['phone']!r}")
        ids["phone"] = user["phone"]
    if "email" in user:
        if not isinstance(user["email"], str) or "@" not in user["email"]:
            out.append(f"user.email: not an email address: {user['email']!r}")
        ids["email"] = user["email"]
    external = user.get("externalIdentifiers")
    if external is not None:
        if not isinstance(external, dict):
            out.append("user.externalIdentifiers: must be an object")
        else:
            if isinstance(external.get("clientUserId"), str) and external["clientUserId"]:
                ids["clientUserId"] = external["clientUserId"]
            customs = external.get("customIdentifiers") or []
            if not isinstance(customs, list) or not all(
                isinstance(c, dict) and isinstance(c.get("name"), str) and isinstance(c.get("value"), str)
                for c in customs
            ):
                out.append("user.externalIdentifiers.customIdentifiers: items need string name and value")
            elif customs:
                ids["customIdentifiers"] = [{"key": c["name"], "value": c["value"]} for c in customs]
    if "phone" not in ids and "email" not in ids:
        out.append("user: phone or email required (external identifiers must be tied via the Identity API)")
    return out, {"identifiers": ids, "attributes": {"custom": properties}}
