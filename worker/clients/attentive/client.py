"""Synchronous client for Attentive's Bulk User Attributes API (CONTRACT.md).

One :class:`AttentiveClient` per API key, reused across calls so connections stay alive. Celery tasks are
synchronous, so this is a plain ``httpx.Client``.

Retry policy (in-process, tenacity): only failures where the request certainly never reached
Attentive are retried (connect errors and connect timeouts), at most
:data:`DEFAULT_MAX_ATTEMPTS` attempts with jittered exponential waits capped so that all waits together
stay around one second. So every attempt that reaches Attentive is one the caller took a rate-limit
token for (DESIGN.md invariant 4).

Anything after the request went out (a dropped connection, ``ReadError``, ``RemoteProtocolError``, a
read timeout) raises :class:`TransportError` with ``may_have_reached_server`` at once: for the bulk POST
Attentive may have created a job whose id we never saw, and there is no idempotency key (CONTRACT.md
§0), so the flush records such a send and holds its users until that job has surely finished
(worker.pipeline.flush). Retrying here would create more untracked jobs.

Status errors are never retried or slept on here: 4xx are not transient, and for 429/5xx the caller (a
task sharing one rate limiter across all workers) decides how long everyone waits (DESIGN.md invariant 4).

Secrets: the key lives only inside the ``httpx.Client`` default headers. It is never logged, is not part
of ``repr``, and any error text echoed by a server is scrubbed of it before it reaches an exception.
Bodies are never logged (personal data); DEBUG lines carry method, path, status and elapsed time.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import operator
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from importlib import metadata
from types import TracebackType
from typing import Any, NoReturn, TypeVar
from urllib.parse import quote

import httpx
import pydantic
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from worker.clients.attentive.errors import (
    MAX_ATTENTIVE_MESSAGE,
    AttentiveError,
    Forbidden,
    InvalidRequest,
    NotFound,
    RateLimited,
    ServerError,
    TransportError,
    Unauthorized,
    UnexpectedResponse,
)
from worker.clients.attentive.models import BulkJobStatus, BulkSuccess, MeResponse, ResultLine, ResultLines
from worker.clients.http import parse_retry_after

logger = logging.getLogger(__name__)

_Model = TypeVar("_Model", bound=pydantic.BaseModel)

#: Bulk User Attributes (CONTRACT.md §1).
BULK_PATH = "/v2/bulk/user/attributes"
#: A bulk job's status, the job id appended (CONTRACT.md §2).
STATUS_PATH = "/v2/bulk/job/"
#: Attentive's documented bounds on ``users`` (CONTRACT.md §1: minItems 1, maxItems 256).
MAX_USERS_PER_REQUEST = 256

#: Connect fast (a dead host should fail quickly and be retried), but give Attentive time to read a
#: 256-user body and answer. The pool timeout only matters when threads share the client.
DEFAULT_TIMEOUT = httpx.Timeout(connect=5.0, read=30.0, write=30.0, pool=5.0)
#: Keep a few connections warm per key; 30 s outlives a flush interval so bursts reuse connections.
DEFAULT_LIMITS = httpx.Limits(max_connections=10, max_keepalive_connections=10, keepalive_expiry=30.0)

#: Total attempts for connection-level failures (1 try + 2 retries).
DEFAULT_MAX_ATTEMPTS = 3
#: Longest results line read (one record's outcome with its request echoed: a few KiB). A longer one
#: is reported unreadable instead of being held in memory whole.
MAX_RESULT_LINE_BYTES = 1 << 20


#: Waits between attempts: 0.2 s then 0.4 s, plus up to 0.2 s jitter, never over 0.5 s: at most
#: 1 s in all with 3 attempts.
_RETRY_WAIT = wait_exponential_jitter(multiplier=0.2, max=0.5, jitter=0.2)

#: Failures that certainly happened before the request was sent.
_NOT_SENT: tuple[type[BaseException], ...] = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
#: The only ones retried here (a pool timeout already waited its time for a connection).
_RETRIED: tuple[type[BaseException], ...] = (httpx.ConnectError, httpx.ConnectTimeout)


def _user_agent() -> str:
    try:
        version = metadata.version("attentive-audience-export")
    except metadata.PackageNotFoundError:
        version = "0"
    return f"attentive-audience-export/{version} (+audience export worker) httpx/{httpx.__version__}"


USER_AGENT = _user_agent()


class AttentiveClient:
    """Calls to Attentive with one API key: validate the key, submit bulk jobs, poll them, read results."""

    def __init__(
        self,
        api_key: str,
        base_url: str | None = None,
        *,
        timeout: httpx.Timeout | float | None = None,
        transport: httpx.BaseTransport | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> None:
        """Create a client; no request is made.

        Args:
            api_key: the private app's API key, sent as ``Authorization: Bearer <key>``.
            base_url: Attentive's host, without ``/v2``. None reads ``ATTENTIVE_API_URL`` through
                :meth:`worker.settings.Settings.from_env`.
            timeout: an ``httpx.Timeout``, or one number for every phase. None means
                :data:`DEFAULT_TIMEOUT` (connect 5 s, read 30 s, write 30 s, pool 5 s).
            transport: an httpx transport, for tests (``httpx.MockTransport``).
            max_attempts: attempts for connection-level failures, 1 disables retries.

        Raises:
            ValueError: the key is empty or not a valid header value (the key is not echoed).
        """
        if not isinstance(api_key, str) or not api_key.strip():
            raise ValueError("api_key must be a non-empty string")
        key = api_key.strip()
        if not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
            # httpx/h11 would raise an error that echoes the header value; refuse before that.
            raise ValueError("api_key contains characters that cannot be sent in an HTTP header")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if base_url is None:
            from worker.settings import Settings

            base_url = Settings.from_env().attentive_api_url
        self._base_url = base_url.rstrip("/")
        self._max_attempts = max_attempts
        self._sleep: Callable[[float], None] = time.sleep
        if timeout is None:
            timeout = DEFAULT_TIMEOUT
        self._http = httpx.Client(
            base_url=self._base_url,
            headers={
                "Authorization": f"Bearer {key}",
                "User-Agent": USER_AGENT,
                "Accept": "application/json",
            },
            timeout=timeout,
            limits=DEFAULT_LIMITS,
            transport=transport,
            follow_redirects=False,
        )
        # The bulk POST (once per batch sent) and the status GET (once per check) are prepared once
        # (URL, headers, timeouts and the transport httpx would pick for them): see _send_direct.
        bulk = self._http.build_request("POST", BULK_PATH, headers={"Content-Type": "application/json"})
        self._bulk_url = bulk.url
        self._bulk_headers = httpx.Headers([h for h in bulk.headers.raw if h[0].lower() != b"content-length"])
        self._bulk_extensions = bulk.extensions
        status = self._http.build_request("GET", STATUS_PATH)
        self._status_prefix = str(status.url)
        self._status_headers = status.headers
        self._status_extensions = status.extensions
        self._api_transport = self._http._transport_for_url(bulk.url)

    # --- lifecycle ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Close pooled connections. Safe to call twice."""
        self._http.close()

    def __enter__(self) -> AttentiveClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"AttentiveClient(base_url={self._base_url!r})"

    __str__ = __repr__

    @property
    def base_url(self) -> str:
        """The host this client talks to."""
        return self._base_url

    # --- API -------------------------------------------------------------------------------------------

    def me(self) -> MeResponse:
        """Check a key with ``GET /v2/me``. /me does not report permissions; a 403 shows up on writes.

        Returns:
            The account the key belongs to.

        Raises:
            Unauthorized: unknown or revoked key. Other :class:`AttentiveError` subclasses otherwise.
        """
        response = self._send(self._http.build_request("GET", "/v2/me"))
        return self._parse(MeResponse, response)

    def submit_bulk_json(self, records: Sequence[bytes]) -> str:
        """Submit up to 256 user records, already encoded as JSON objects (UTF-8), with
        ``POST /v2/bulk/user/attributes``.

        The flush path keeps records as the JSON text mapping produced, so a batch is sent without a
        parse and re-encode. Only the framing is checked here: what is inside each object is the
        mapping layer's responsibility, and Attentive's 400 is the judge.

        Args:
            records: 1 to 256 ``CreateUserAttributesRequestDtoV21`` objects as JSON bytes.

        Returns:
            The ``batchJobId`` to poll with :meth:`job_status`.

        Raises:
            ValueError: empty, over 256 records, or an item that is not ``{...}`` bytes (nothing sent).
            InvalidRequest: Attentive answered 400. Other :class:`AttentiveError` subclasses otherwise.
        """
        _check_batch_size(records, "records", "JSON objects (bytes)")
        if not _framed(records):
            for i, record in enumerate(records):
                if not isinstance(record, bytes) or not (record.startswith(b"{") and record.endswith(b"}")):
                    raise ValueError(f"records[{i}] is not a JSON object's bytes")
        request = httpx.Request(
            "POST",
            self._bulk_url,
            headers=self._bulk_headers,
            content=b'{"users":[' + b",".join(records) + b"]}",
            extensions=self._bulk_extensions,
        )
        response = self._send(request, direct=True)
        return self._parse(BulkSuccess, response).batchJobId

    def job_status(self, job_id: str) -> BulkJobStatus:
        """Poll one job with ``GET /v2/bulk/job/{id}``.

        Args:
            job_id: the ``batchJobId`` returned by :meth:`submit_bulk_json` (URL-encoded here).

        Returns:
            The job's status. A body without ``bulkJobId`` gets the id asked for.

        Raises:
            ValueError: empty id, or ``.``/``..`` (URL normalisation would change the path).
            NotFound: unknown or expired job (14 days). Other :class:`AttentiveError` subclasses.
        """
        if not isinstance(job_id, str) or job_id.strip() in ("", ".", ".."):
            raise ValueError("job_id must be a non-empty id")
        request = httpx.Request(
            "GET",
            self._status_prefix + quote(job_id, safe=""),
            headers=self._status_headers,
            extensions=self._status_extensions,
        )
        response = self._send(request, direct=True)
        data = self._json_object(response)
        if not data.get("bulkJobId"):
            data["bulkJobId"] = job_id
        return self._parse(BulkJobStatus, response, data)

    def iter_results(self, url: str) -> ResultLines:
        """Stream a completed job's results file (JSON Lines), one record at a time.

        The URL is fetched **without** the Authorization header: it is (probably) a pre-signed object
        store URL (CONTRACT.md §2), and our key must not travel to another host. Redirects are followed.
        Blank lines are skipped. A line that is not a JSON object is yielded with ``parse_error`` set
        rather than raised, so one bad line does not hide the other records' outcomes. Connection
        failures before the first byte are retried like any call; a failure mid-stream raises
        :class:`TransportError` (lines already yielded stay valid; the caller re-reads the whole file).

        Args:
            url: the job status ``url``; an absolute URL, or a path on the API host.

        Returns:
            A lazy iterator of one :class:`ResultLine` per non-blank line, in file order; its
            :meth:`ResultLines.skipping_plain_successes` leaves out the lines that plainly report
            a 2xx, for a caller that only wants the failed and unreadable ones.

        Raises:
            ValueError: empty url (raised at once; the download starts on the first ``next()``).
            NotFound: expired or unknown file. Other :class:`AttentiveError` subclasses.
        """
        if not isinstance(url, str) or not url.strip():
            raise ValueError("url must be the non-empty results URL of a completed job")
        url = url.strip()
        return ResultLines(lambda skip: self._stream_results(url, skip))

    def _stream_results(self, url: str, skip_plain_successes: bool) -> Generator[ResultLine, None, None]:
        request = self._http.build_request("GET", url)
        request.headers.pop("Authorization", None)
        request.headers["Accept"] = "application/x-ndjson, application/jsonl, application/json, */*"
        response = self._send(request, stream=True)
        try:
            lines = split_lines(response.iter_bytes(), MAX_RESULT_LINE_BYTES)
            skip = ResultLine.plainly_succeeded if skip_plain_successes else None
            for number, line in enumerate(lines):
                if line is None:
                    error = f"line longer than {MAX_RESULT_LINE_BYTES} bytes"
                    yield ResultLine(line_number=number, parse_error=error)
                elif skip is None or not skip(line):
                    yield ResultLine.from_line(line, number)
        except httpx.TransportError as exc:
            raise self._transport_error(request, exc, attempts=1) from exc
        finally:
            response.close()

    # --- plumbing ----------------------------------------------------------------------------------

    def _send(self, request: httpx.Request, *, stream: bool = False, direct: bool = False) -> httpx.Response:
        """Send with connection-level retries; return a 2xx response or raise a typed error.

        ``direct``: a prepared request to the API (the bulk POST, the status GET), sent by
        :meth:`_send_direct`.
        """
        retrying = Retrying(
            stop=stop_after_attempt(self._max_attempts),
            wait=_RETRY_WAIT,
            retry=retry_if_exception_type(_RETRIED),
            sleep=self._sleep,
            before_sleep=self._log_retry(request),
            reraise=True,
        )
        started = time.perf_counter()
        try:
            response: httpx.Response = (
                retrying(self._send_direct, request)
                if direct
                else retrying(self._http.send, request, stream=stream, follow_redirects=stream)
            )
        except httpx.TransportError as exc:
            attempts = int(retrying.statistics.get("attempt_number", 1))
            logger.debug(
                "attentive %s %s failed after %.1f ms: %s",
                request.method,
                request.url.path,
                (time.perf_counter() - started) * 1000,
                type(exc).__name__,
            )
            raise self._transport_error(request, exc, attempts=attempts) from exc
        logger.debug(
            "attentive %s %s -> %d in %.1f ms",
            request.method,
            request.url.path,
            response.status_code,
            (time.perf_counter() - started) * 1000,
        )
        if response.is_success:
            return response
        try:
            if stream:
                response.read()
        except httpx.TransportError:
            pass  # the status alone is enough to classify the failure
        finally:
            response.close()
        self._raise_for_status(request, response)

    def _send_direct(self, request: httpx.Request) -> httpx.Response:
        """Send a prepared request to the API host (the bulk POST, the status GET) on the transport
        ``httpx.Client.send`` would use for it (the connection pool, or a proxy the environment
        names), and read the answer.

        ``Client.send`` adds nothing these requests use, at about a third of their CPU (measured: a
        status GET took 381 µs of client CPU through it and 277 µs on this path): an auth
        flow (the key is a default header), redirects (never followed here), event hooks (none), its
        INFO line (httpx logs at WARNING in workers, worker/app.py) and a cookie jar. Attentive's API
        authenticates by key, so cookies are neither sent nor kept on this path.
        """
        if self._http.is_closed:
            raise RuntimeError("Cannot send a request, as the client has been closed.")
        response = self._api_transport.handle_request(request)
        response.request = request
        try:
            response.read()
        except BaseException:
            response.close()
            raise
        return response

    def _log_retry(self, request: httpx.Request) -> Callable[[RetryCallState], None]:
        def log(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else 0.0
            logger.info(
                "attentive %s %s: %s, attempt %d/%d, retrying in %.2f s",
                request.method,
                request.url.path,
                type(exc).__name__,
                state.attempt_number,
                self._max_attempts,
                wait,
            )

        return log

    def _transport_error(
        self, request: httpx.Request, exc: httpx.TransportError, *, attempts: int
    ) -> TransportError:
        sent = not isinstance(exc, _NOT_SENT)
        detail = self._scrub(str(exc))[:MAX_ATTENTIVE_MESSAGE] or "no detail"
        return TransportError(
            f"Attentive {request.method} {request.url.path}: {type(exc).__name__} ({detail}) "
            f"after {attempts} attempt(s)",
            method=request.method,
            path=request.url.path,
            may_have_reached_server=sent,
        )

    def _raise_for_status(self, request: httpx.Request, response: httpx.Response) -> NoReturn:
        status = response.status_code
        error_id, text = _parse_error_body(response)
        text = self._scrub(text)[:MAX_ATTENTIVE_MESSAGE] if text else None
        headers = response.headers
        cls: type[AttentiveError]
        if status in (400, 413, 422):
            cls = InvalidRequest
        elif status == 401:
            cls = Unauthorized
        elif status == 403:
            cls = Forbidden
        elif status == 404:
            cls = NotFound
        elif status == 429:
            cls = RateLimited
        elif status >= 500:
            cls = ServerError
        else:
            cls = UnexpectedResponse
        reason = response.reason_phrase or "HTTP error"
        message = f"Attentive {request.method} {request.url.path} -> {status} {reason}"
        if text:
            message += f": {text}"
        raise cls(
            message,
            status_code=status,
            method=request.method,
            path=request.url.path,
            attentive_message=text,
            error_id=error_id,
            retry_after=parse_retry_after(headers.get("retry-after")),
            limit=_header_int(headers.get("x-ratelimit-limit")),
            remaining=_header_int(headers.get("x-ratelimit-remaining")),
        )

    def _json_object(self, response: httpx.Response) -> dict[str, Any]:
        try:
            data = response.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise self._unexpected(response, "body is not a JSON object")
        return data

    def _parse(
        self, model: type[_Model], response: httpx.Response, data: dict[str, Any] | None = None
    ) -> _Model:
        if data is None:
            data = self._json_object(response)
        try:
            return model.model_validate(data)
        except pydantic.ValidationError as exc:
            fields = ", ".join(sorted({".".join(map(str, e["loc"])) for e in exc.errors()}))
            raise self._unexpected(response, f"body does not match {model.__name__} ({fields})") from None

    def _unexpected(self, response: httpx.Response, why: str) -> UnexpectedResponse:
        request = response.request
        return UnexpectedResponse(
            f"Attentive {request.method} {request.url.path} -> {response.status_code}: {why}",
            status_code=response.status_code,
            method=request.method,
            path=request.url.path,
        )

    def _scrub(self, text: str) -> str:
        """Remove the API key from text a server sent back (defence in depth)."""
        auth = self._http.headers.get("Authorization", "")
        key = auth.removeprefix("Bearer ")
        return text.replace(key, "[redacted]") if key and key in text else text


def _check_batch_size(items: object, name: str, kind: str) -> None:
    """ValueError unless ``items`` is a sequence (not text) of 1 to 256 items; names it ``name``."""
    if isinstance(items, str | bytes) or not isinstance(items, Sequence):
        raise ValueError(f"{name} must be a sequence of {kind}")
    if not items:
        raise ValueError(f"{name} is empty; Attentive requires 1 to 256 users per request")
    if len(items) > MAX_USERS_PER_REQUEST:
        raise ValueError(f"{len(items)} users; Attentive accepts at most {MAX_USERS_PER_REQUEST}")


_FIRST, _LAST = operator.itemgetter(0), operator.itemgetter(-1)


def _framed(records: Sequence[bytes]) -> bool:
    """Whether every record is bytes that starts with ``{`` and ends with ``}``.

    With C-level maps: a Python loop over 256 records cost about a tenth of a flush's CPU per batch.
    """
    n = len(records)
    try:
        return (
            all(map(isinstance, records, itertools.repeat(bytes)))
            and bytes(map(_FIRST, records)) == b"{" * n
            and bytes(map(_LAST, records)) == b"}" * n
        )
    except IndexError:  # an empty record
        return False


def _parse_error_body(response: httpx.Response) -> tuple[str | None, str | None]:
    """``(error_id, message)`` from ``{"error":{"id","message"}}``, ``{"error":"..."}``,
    ``{"message":"..."}``, a JSON string, plain text, or nothing."""
    try:
        raw = response.text
    except (httpx.ResponseNotRead, httpx.StreamError, UnicodeDecodeError):
        return None, None
    raw = raw.strip()
    if not raw:
        return None, None
    try:
        data = json.loads(raw)
    except ValueError:
        # Plain text (or HTML from a proxy): keep the first line, it is usually the summary.
        return None, raw.splitlines()[0].strip() or None
    if isinstance(data, str):
        return None, data.strip() or None
    if not isinstance(data, dict):
        return None, None
    error = data.get("error")
    error_id: str | None = None
    message: str | None = None
    if isinstance(error, dict):
        raw_id = error.get("id")
        error_id = str(raw_id) if isinstance(raw_id, str | int) and not isinstance(raw_id, bool) else None
        inner = error.get("message")
        message = inner if isinstance(inner, str) else None
    elif isinstance(error, str):
        message = error
    if not message:
        for key in ("message", "detail", "error_description"):
            value = data.get(key)
            if isinstance(value, str) and value:
                message = value
                break
    return error_id, (message.strip() or None) if message else None


def _header_int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value.strip())
    except ValueError:
        try:
            number = float(value)
        except ValueError:
            return None
        return int(number) if math.isfinite(number) else None


def split_lines(chunks: Iterable[bytes], max_bytes: int) -> Iterator[bytes | None]:
    """The non-blank, stripped lines of a byte stream; None in place of a line over ``max_bytes``.

    Splits bytes itself (decoding to text first, as ``iter_lines`` does, costs more than parsing)
    and copies each byte about once, however many chunks a line spans.
    """
    pending = bytearray()
    too_long = False
    for chunk in chunks:
        *complete, rest = chunk.split(b"\n")
        if complete:
            # The first piece ends the line begun in earlier chunks ...
            first = complete[0]
            if too_long or len(pending) + len(first) > max_bytes:
                yield None
            elif line := (bytes(pending + first) if pending else first).strip():
                yield line
            pending.clear()
            too_long = False
            # ... the others are whole lines (most of a file: kept to the fewest steps a line).
            for piece in itertools.islice(complete, 1, None):
                if len(piece) > max_bytes:
                    yield None
                elif line := piece.strip():
                    yield line
        if not too_long:
            pending += rest
            if len(pending) > max_bytes:
                too_long = True
                pending.clear()
    if too_long:
        yield None
    elif line := bytes(pending).strip():
        yield line
