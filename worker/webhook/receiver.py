"""The HTTP receiver for Lytics audience-trigger webhooks (and canonical transitions).

``POST /v1/transitions`` takes one Lytics trigger body, a JSON array of them (Lytics batching), a
CloudEvents envelope, a canonical transition, or NDJSON (``application/x-ndjson``: one of those per
line). It does not map profiles: it stores the raw body (or the NDJSON lines) as one inbox chunk in
Redis and enqueues the ingest task with the chunk id, so broker messages carry ids only (DESIGN.md
invariant 5). It answers ``202 {"accepted": lines, "chunk": id, ...}`` only after the chunk is in
Redis (invariant 1); with Redis unreachable it answers 503, which Lytics retries. The process keeps
nothing between requests, so any number of receivers can run behind a load balancer (invariant 7).

What is refused at the door, and why (invariant 6: a clear answer):

- a body that is not JSON (400, with the line and column; also nesting beyond the parser's 1,024
  levels or an integer over 4,300 digits), empty (400), too large (413, the limit is
  ``WEBHOOK_MAX_BYTES``), of another content type (415), or without the shared token (401);
- a body in which *no* transition is usable (400, with the reasons): nothing in it could ever reach
  Attentive, so retrying is pointless, and a 400 shows a misconfigured webhook (wrong template,
  wrong fields) in Lytics' delivery log at once instead of only in our counters.

A body with at least one usable transition is accepted whole, and its unusable events (a missing
slug, a bad time, an unknown shape...) are counted by reason by ingest (``attentive-export status``,
``ingest`` block) and listed in the 202 answer. Lytics does not retry a 400 (``do_not_retry``
defaults to 400, 401, 403, 404), so refusing a batch for one bad event would drop the good ones with
it. The door check reuses :func:`worker.mapping.transitions.parse_payload` (cheap: no mapping, no Redis), so
the door and ingest never disagree on what is usable.

No body gets a 5xx (only Redis being down does): parsing never raises, and a last-resort guard turns
anything unforeseen into a 400 (``test_fuzz_inputs.py`` fuzzes the receiver to keep it so).

Redelivery is harmless: Lytics retries create another chunk, and ingest drops a transition that is
not newer than one already accepted for the same user and audience (invariant 3).

Auth is a shared secret (``WEBHOOK_TOKEN``; several comma-separated tokens allow rotation) given as
``Authorization: Bearer <token>``, ``X-Webhook-Token: <token>`` or ``?token=<token>`` (Lytics' static
headers or query parameters). Without a token the receiver refuses to start unless auth is turned off
explicitly. Tokens are never logged; the access log hides ``token=`` query values.
Lytics' OAuth2 client-credentials option would need a token endpoint here; it is not offered, the
static bearer header does the same job.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, quote_plus, unquote_plus

import redis
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from worker import jsonio, logs
from worker.mapping.transitions import Rejected, parse_payload
from worker.observe import metrics
from worker.pipeline import inbox
from worker.settings import (
    DEFAULT_RATE_LIMIT_PER_SECOND,
    DEFAULT_REDIS_URL,
    DEFAULT_WEBHOOK_MAX_BYTES,
    MIN_WEBHOOK_TOKEN_LENGTH,
    WEBHOOK_METHODS,
    SettingsError,
    load_settings,
)
from worker.store.connection import connect

log = logging.getLogger("worker.webhook.receiver")

#: Where Lytics (or any producer) sends transitions.
TRANSITIONS_PATH = "/v1/transitions"
HEALTH_PATH = "/healthz"
#: Prometheus metrics of the whole service, read from Redis at each scrape (worker/observe/metrics.py).
METRICS_PATH = "/metrics"
#: 5 MiB: a Lytics batch of 1,000 triggers with a few dozen profile fields fits comfortably.
DEFAULT_MAX_BYTES = DEFAULT_WEBHOOK_MAX_BYTES
#: A token shorter than this is too easy to guess for an endpoint on the internet.
MIN_TOKEN_LENGTH = MIN_WEBHOOK_TOKEN_LENGTH
TOKEN_HEADER = "x-webhook-token"
TOKEN_PARAM = "token"
#: Methods Lytics can be configured to use (``POST`` is its default and always accepted).
LYTICS_METHODS = WEBHOOK_METHODS
#: Seconds a client should wait before retrying after a 503.
RETRY_AFTER_SECONDS = 5
#: Reasons listed in a 400 for a body with no usable transition.
MAX_DETAILS = 5

NDJSON_TYPES = frozenset({"application/x-ndjson", "application/ndjson", "application/jsonl"})
JSON_TYPES = frozenset({"application/json", "text/json"})
UTF8_CHARSETS = frozenset({"utf-8", "utf8", "us-ascii"})


class WebhookConfigError(Exception):
    """The receiver cannot start as configured; the message says how to fix it."""


@dataclass(frozen=True)
class WebhookSettings:
    """What the receiver needs; build it with :meth:`from_env`."""

    redis_url: str = DEFAULT_REDIS_URL
    #: Accepted shared secrets. Empty only when ``require_auth`` is off. Never logged.
    tokens: tuple[str, ...] = field(default=(), repr=False)
    require_auth: bool = True
    max_bytes: int = DEFAULT_MAX_BYTES
    methods: tuple[str, ...] = ("POST",)
    #: For ``/metrics``: Celery queue depths (when the broker is Redis) and the limiter's wait.
    broker_url: str = ""
    rate_limit_per_second: float = DEFAULT_RATE_LIMIT_PER_SECOND
    #: How long after a request the drain that ingests it starts (``WEBHOOK_DRAIN_GATHER_SECONDS``).
    drain_gather_seconds: float = inbox.DRAIN_GATHER_SECONDS

    def __post_init__(self) -> None:
        if self.require_auth and not self.tokens:
            raise WebhookConfigError(
                "WEBHOOK_TOKEN is not set: the receiver refuses to accept unauthenticated webhooks. "
                "Set WEBHOOK_TOKEN to a long random secret (python -c 'import secrets; "
                "print(secrets.token_urlsafe(32))') and give it to Lytics, or start with "
                "--insecure-no-auth on a private network"
            )
        for token in self.tokens:
            if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
                raise WebhookConfigError(
                    f"WEBHOOK_TOKEN: each token must be at least {MIN_TOKEN_LENGTH} characters "
                    "without spaces (python -c 'import secrets; print(secrets.token_urlsafe(32))')"
                )
        if self.max_bytes < 1:
            raise WebhookConfigError("WEBHOOK_MAX_BYTES must be a positive number of bytes")
        unknown = [m for m in self.methods if m not in LYTICS_METHODS]
        if unknown:
            raise WebhookConfigError(
                f"WEBHOOK_METHOD {unknown[0]!r} is not one Lytics can send ({', '.join(LYTICS_METHODS)})"
            )

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, insecure_no_auth: bool = False
    ) -> WebhookSettings:
        """The receiver's part of :class:`worker.settings.Settings` (validated there, like every
        process's): ``REDIS_URL``, ``WEBHOOK_TOKEN`` (comma-separated for rotation),
        ``WEBHOOK_MAX_BYTES``, ``WEBHOOK_METHOD`` (the method configured in Lytics, besides POST)
        and ``WEBHOOK_DRAIN_GATHER_SECONDS``.
        ``env`` defaults to the environment.

        ``insecure_no_auth`` only allows starting without a token: a token that is set is enforced.
        """
        try:
            settings = load_settings(env)
        except SettingsError as exc:
            raise WebhookConfigError(str(exc)) from None
        tokens = settings.webhook_token_values()
        return cls(
            redis_url=settings.redis_url,
            tokens=tokens,
            require_auth=bool(tokens) or not insecure_no_auth,
            max_bytes=settings.webhook_max_bytes,
            methods=tuple(dict.fromkeys(("POST", settings.webhook_method))),
            broker_url=settings.broker_url,
            rate_limit_per_second=settings.rate_limit_per_second,
            drain_gather_seconds=settings.webhook_drain_gather_seconds,
        )


class BadBody(Exception):
    """A body refused with 400; ``extra`` goes into the JSON answer."""

    def __init__(self, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra


@dataclass(frozen=True)
class Accepted:
    lines: int
    chunk_id: str
    transitions: int
    unusable: dict[str, int]


def _error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> Response:
    return JSONResponse({"error": code, "message": message, **extra}, status_code=status, headers=headers)


def _parse_json(text: bytes, where: str, line: int | None = None) -> Any:
    try:
        return jsonio.loads(text)  # as ingest parses it (``transitions.parse_line``)
    except UnicodeDecodeError as exc:
        raise BadBody(
            "invalid_json", f"{where} is not UTF-8 text: {exc.reason} at byte {exc.start}"
        ) from None
    except json.JSONDecodeError as exc:
        position = {"line": line if line is not None else exc.lineno, "column": exc.colno}
        if line is None:
            position["position"] = exc.pos
        raise BadBody(
            "invalid_json",
            f"{where} is not valid JSON: {exc.msg} at line {position['line']} column {exc.colno}",
            **position,
        ) from None
    except (ValueError, RecursionError) as exc:
        # Read by neither parser for another reason: an integer too long to convert (the standard
        # library's 4,300-digit limit), nesting too deep. A clear 400, never a 500 Lytics would retry.
        raise BadBody("invalid_json", f"{where} is not valid JSON: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


def body_lines(body: bytes, ndjson: bool) -> list[tuple[int, bytes]]:
    """The texts to store with their line numbers in the body: the whole body, or each non-blank
    NDJSON line (kept raw, without its line ending)."""
    if not ndjson:
        return [(1, body)]
    return [(n, line.rstrip(b"\r")) for n, line in enumerate(body.split(b"\n"), start=1) if line.strip()]


def check_lines(
    lines: Iterable[tuple[int, bytes]], ndjson: bool, received_ms: int
) -> tuple[int, Counter[str], list[str]]:
    """Syntax and shape check at the door: (usable transitions, unusable by reason, first details).

    Raises :class:`BadBody` for text that is not JSON or a top level that is not an object or array.
    """
    usable = 0
    unusable: Counter[str] = Counter()
    details: list[str] = []
    for number, line in lines:
        where = f"line {number}" if ndjson else "the body"
        payload = _parse_json(line, where, number if ndjson else None)
        if not isinstance(payload, dict | list):
            raise BadBody(
                "not_an_object",
                f"{where} must be a JSON object (a Lytics trigger, CloudEvents envelope or transition) "
                f"or an array of them, got {type(payload).__name__}",
            )
        for item in parse_payload(payload, received_ms):
            if isinstance(item, Rejected):
                unusable[item.reason] += 1
                if len(details) < MAX_DETAILS:
                    details.append(f"{where}: {item.detail}" if ndjson else item.detail)
            else:
                usable += 1
    return usable, unusable, details


class Receiver:
    """Request handling, with its Redis client and dispatcher (both shared by all requests)."""

    def __init__(
        self, settings: WebhookSettings, client: redis.Redis, dispatcher: inbox.DrainDispatcher | None
    ) -> None:
        self.settings = settings
        self.redis = client
        self._dispatcher = dispatcher
        self._tokens = tuple(t.encode() for t in settings.tokens)
        self.metrics = metrics.registry(
            client,
            broker=metrics.broker_client(settings.broker_url) if settings.broker_url else None,
            rate_per_second=settings.rate_limit_per_second,
        )

    @property
    def dispatcher(self) -> inbox.DrainDispatcher:
        if self._dispatcher is None:  # imported late: the Celery app reads the broker URL on import
            from worker.dispatch import CeleryDispatcher

            self._dispatcher = CeleryDispatcher()
        return self._dispatcher

    # -- auth

    def authorized(self, request: Request) -> bool:
        if not self.settings.require_auth:
            return True
        presented: list[str] = []
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            presented.append(value.strip())
        if TOKEN_HEADER in request.headers:
            presented.append(request.headers[TOKEN_HEADER].strip())
        presented += request.query_params.getlist(TOKEN_PARAM)
        ok = False
        for candidate in presented:
            given = candidate.encode("utf-8", "replace")
            for token in self._tokens:  # every comparison runs: timing says nothing about which
                ok |= hmac.compare_digest(given, token)
        return ok

    # -- endpoints

    async def transitions(self, request: Request) -> Response:
        if request.method not in self.settings.methods:
            return _error(
                405,
                "method_not_allowed",
                f"use {' or '.join(self.settings.methods)} (set WEBHOOK_METHOD to the method configured in Lytics)",
                headers={"Allow": ", ".join(self.settings.methods)},
            )
        if not self.authorized(request):
            return _error(
                401, "unauthorized", "missing or invalid credentials", headers={"WWW-Authenticate": "Bearer"}
            )
        ndjson = _content_kind(request.headers.get("content-type", ""))
        if ndjson is None:
            return _error(
                415,
                "unsupported_media_type",
                "send application/json (a Lytics trigger, an array of them, a CloudEvents envelope or a "
                "transition) or application/x-ndjson (one per line), UTF-8",
            )
        too_large = _error(
            413, "too_large", f"the body is larger than {self.settings.max_bytes} bytes (WEBHOOK_MAX_BYTES)"
        )
        declared = request.headers.get("content-length")
        if declared is not None:
            if not (declared.isascii() and declared.isdigit()):  # isdigit() alone accepts "²"
                return _error(400, "bad_request", "Content-Length is not a number")
            if int(declared) > self.settings.max_bytes:
                return too_large
        try:
            body = await _read_limited(request, self.settings.max_bytes)
        except ClientDisconnect:
            return _error(400, "bad_request", "the client disconnected before the body was complete")
        if body is None:
            return too_large
        if not body.strip():
            return _error(400, "empty_body", "the body is empty: send at least one transition")
        try:
            accepted = await run_in_threadpool(self.accept, body, ndjson)
        except BadBody as exc:
            return _error(400, exc.code, exc.message, **exc.extra)
        except redis.RedisError as exc:
            log.warning("Redis unavailable, answered 503: %s", type(exc).__name__)
            return _error(
                503,
                "unavailable",
                "storage is unavailable; nothing was accepted, retry later",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        return JSONResponse(
            {
                "accepted": accepted.lines,
                "chunk": accepted.chunk_id,
                "transitions": accepted.transitions,
                "unusable": accepted.unusable,
            },
            status_code=202,
        )

    def accept(self, body: bytes, ndjson: bool) -> Accepted:
        """Check, store, dispatch (in a worker thread: JSON parsing and Redis calls block)."""
        lines = body_lines(body, ndjson)
        try:
            usable, unusable, details = check_lines(lines, ndjson, int(time.time() * 1000))
        except BadBody:
            raise
        except Exception as exc:
            # Last resort: parsing never raises for bad input (tested by fuzzing); should it ever,
            # the sender gets a 400 naming the problem rather than a 500 it would retry forever.
            # Type only: a traceback or message could quote the body (personal data, invariant 5).
            log.error("webhook body could not be checked: %s", type(exc).__name__)
            raise BadBody("unreadable_body", f"the body could not be read ({type(exc).__name__})") from None
        if not usable:
            if not unusable:
                raise BadBody("no_transitions", "the body holds no transitions (an empty array)")
            raise BadBody(
                "no_usable_transitions",
                "no transition in the body can be used: " + "; ".join(details),
                unusable=dict(unusable),
            )
        gather = self.settings.drain_gather_seconds
        chunk_id, send = inbox.put_chunk_for_drain(self.redis, [text for _n, text in lines], gather)
        # The chunk is durable and registered as pending from here on: if the broker refuses the
        # task, the sweep re-drives the chunk (inbox.ORPHAN_AFTER_MS), so the answer stays 202.
        try:
            if send:
                inbox.send_drain(self.redis, self.dispatcher, gather)
        except Exception as exc:
            log.warning(
                "drain task for chunk %s not sent (%s); the sweep re-drives it", chunk_id, type(exc).__name__
            )
        return Accepted(len(lines), chunk_id, usable, dict(unusable))

    async def health(self, _request: Request) -> Response:
        try:
            await run_in_threadpool(self.redis.ping)
        except redis.RedisError:
            return JSONResponse({"status": "unavailable", "redis": "unreachable"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics_page(self, request: Request) -> Response:
        """The service's metrics, computed from Redis now (no token: like ``/healthz``, for the
        scraper; the numbers hold no personal data or secret). Redis down still answers 200 with
        ``attentive_export_redis_up 0``, so the scrape shows why."""
        body, content_type = await run_in_threadpool(
            metrics.render, self.metrics, request.headers.get("accept")
        )
        return Response(body, headers={"Content-Type": content_type})


def _content_kind(header: str) -> bool | None:
    """``True`` for NDJSON, ``False`` for JSON (also when absent), ``None`` when unsupported."""
    media, *params = (part.strip().lower() for part in header.split(";"))
    for param in params:
        name, _, value = param.partition("=")
        if name.strip() == "charset" and value.strip().strip('"') not in UTF8_CHARSETS:
            return None
    if media in NDJSON_TYPES:
        return True
    if not media or media in JSON_TYPES or (media.startswith("application/") and media.endswith("+json")):
        return False  # +json covers application/cloudevents+json and cloudevents-batch+json
    return None


async def _read_limited(request: Request, limit: int) -> bytes | None:
    """The body, or None as soon as it exceeds ``limit`` (a missing Content-Length proves nothing)."""
    parts: list[bytes] = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            return None
        parts.append(part)
    return b"".join(parts)


# --- logging ---------------------------------------------------------------------------------------
#: A query string in a log line (uvicorn's access log prints the raw one, percent-encoding included).
_QUERY = re.compile(r"\?[^\s\"]*")
REDACTED = "***"


def _redact_param(param: str, tokens: tuple[str, ...]) -> str:
    """One ``name=value`` of a query string, its value hidden if it may be a token.

    Names are compared as Starlette reads them (``parse_qsl``: ``+`` and percent-escapes decoded), so
    ``tok%65n=`` (accepted as ``token``) is hidden like ``token=``. A parameter that mentions a token
    or holds one of ``tokens``, raw or decoded (repeatedly: ``tok%2565n``), is hidden whole.
    """
    name, _eq, _value = param.partition("=")
    if unquote_plus(name).strip().casefold() == TOKEN_PARAM:
        return f"{name}={REDACTED}"
    decoded = [param]
    while len(decoded) < 5 and unquote_plus(decoded[-1]) != decoded[-1]:  # tok%2565n -> tok%65n -> token
        decoded.append(unquote_plus(decoded[-1]))
    if any(TOKEN_PARAM in d.casefold() or any(t in d for t in tokens) for d in decoded):
        return REDACTED
    return param


def redact_tokens(text: str, tokens: Iterable[str] = ()) -> str:
    """``text`` without webhook tokens: query values named ``token`` (however encoded) hidden, and
    any of ``tokens`` (the configured ones) hidden wherever they appear, raw or percent-encoded."""
    known = tuple(t for t in tokens if t)
    text = _QUERY.sub(
        lambda m: "?" + "&".join(_redact_param(p, known) for p in m.group()[1:].split("&")), text
    )
    for token in known:
        for form in {token, quote(token, safe=""), quote_plus(token)}:
            text = text.replace(form, REDACTED)
    return text


class RedactTokenFilter(logging.Filter):
    """Hides webhook tokens in log lines (uvicorn's access log prints the query string): every
    ``token`` query value, and the configured tokens anywhere in the line."""

    def __init__(self, tokens: Iterable[str] = ()) -> None:
        super().__init__()
        self.tokens: tuple[str, ...] = tuple(tokens)

    def __repr__(self) -> str:
        return f"RedactTokenFilter(<{len(self.tokens)} token(s)>)"

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact_tokens(record.msg, self.tokens)
        if isinstance(record.args, tuple):
            record.args = tuple(
                redact_tokens(a, self.tokens) if isinstance(a, str) else a for a in record.args
            )
        return True


def install_log_redaction(tokens: Iterable[str] = ()) -> None:
    """Attach the filter to uvicorn's access logger once (also when run as ``uvicorn
    worker.webhook.receiver:app``); ``tokens`` are added to what it hides."""
    logger = logging.getLogger("uvicorn.access")
    for existing in logger.filters:
        if isinstance(existing, RedactTokenFilter):
            existing.tokens = tuple(dict.fromkeys((*existing.tokens, *tokens)))
            return
    logger.addFilter(RedactTokenFilter(tokens))


# --- app -------------------------------------------------------------------------------------------
def redis_client(url: str) -> redis.Redis:
    """Short timeouts: a hung Redis should turn into a 503 Lytics retries, not a hung request."""
    return connect(url, socket_connect_timeout=2, socket_timeout=5)


def create_app(
    settings: WebhookSettings,
    client: redis.Redis | None = None,
    dispatcher: inbox.DrainDispatcher | None = None,
) -> Starlette:
    """The ASGI app. Tests pass a fake Redis and a recording dispatcher; by default it connects to
    ``settings.redis_url`` and sends Celery tasks to ``CELERY_BROKER_URL``."""
    owned = client is None
    receiver = Receiver(
        settings, client if client is not None else redis_client(settings.redis_url), dispatcher
    )

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        install_log_redaction(settings.tokens)
        yield
        if owned:
            receiver.redis.close()

    app = Starlette(
        routes=[
            Route(TRANSITIONS_PATH, receiver.transitions, methods=list(LYTICS_METHODS)),
            Route(HEALTH_PATH, receiver.health, methods=["GET"]),
            Route(METRICS_PATH, receiver.metrics_page, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.receiver = receiver
    return app


_app: Starlette | None = None


class WebhookStartupError(WebhookConfigError, SystemExit):
    """A bad configuration met by the module-level ``app``. uvicorn lets a SystemExit through
    untouched, so ``uvicorn worker.webhook.receiver:app`` prints ``error: <one line>`` and exits 1
    instead of a traceback; it is still a :class:`WebhookConfigError` for callers that catch that."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = f"error: {message}"


def __getattr__(name: str) -> Any:
    """``worker.webhook.receiver.app``, built from the environment on first access, so ``uvicorn
    worker.webhook.receiver:app`` works while importing this module (tests, the CLI) needs no configuration."""
    global _app
    if name == "app":
        if _app is None:
            try:
                _app = create_app(WebhookSettings.from_env())
            except WebhookConfigError as exc:
                raise WebhookStartupError(str(exc)) from None
            if logs.log_format() == logs.JSON:  # uvicorn set up its readable logging already
                logs.use_json_under_uvicorn()
        return _app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def serve(
    host: str,
    port: int,
    insecure_no_auth: bool = False,
    access_log: bool = True,
    env: Mapping[str, str] | None = None,
) -> None:
    """Run the receiver with uvicorn until stopped (``attentive-export serve``)."""
    import uvicorn

    settings = WebhookSettings.from_env(env, insecure_no_auth=insecure_no_auth)
    app = create_app(settings)
    install_log_redaction(settings.tokens)
    if settings.require_auth:
        auth = f"{len(settings.tokens)} token(s) from WEBHOOK_TOKEN"
    else:
        auth = "NONE (--insecure-no-auth): anyone who can reach this port can queue transitions"
    print(
        f"receiving transitions on http://{host}:{port}{TRANSITIONS_PATH} "
        f"({'/'.join(settings.methods)}, auth: {auth}, max body {settings.max_bytes} bytes)",
        flush=True,
    )
    if insecure_no_auth and settings.require_auth:
        print("note: --insecure-no-auth ignored because WEBHOOK_TOKEN is set", flush=True)
    options: dict[str, Any] = {}
    log_config = logs.uvicorn_log_config(logs.log_format())
    if log_config is not None:  # LOG_FORMAT=json; otherwise uvicorn's own readable configuration
        options["log_config"] = log_config
    uvicorn.run(
        app,
        host=host,
        port=port,
        access_log=access_log,
        server_header=False,
        log_level="info",
        **options,
    )
