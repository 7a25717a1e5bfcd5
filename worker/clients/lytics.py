"""Lytics segment scan: the members of an audience, page by page, for the one-time backfill.

``GET {LYTICS_API_URL}/api/segment/{id}/scan?limit=N[&start=TOKEN]`` answers
``{"status":200,"message":"success","_next":"<token>","total":N,"data":[{...profile...}, ...]}``;
the last page has ``"_next": ""`` (``shared/lytics/INPUTS.md``). The token goes in the
``Authorization`` header as is, without ``Bearer``.

Why the client is shaped this way:

* One call fetches **one page** (:meth:`LyticsClient.scan_page`) so a Celery task can save the
  ``_next`` token after every page and a killed worker redoes at most one page.
* Transient failures (5xx, 429, timeouts, dropped connections) are retried a few times here with a
  short, bounded back-off (tenacity); after that a typed error lets the task reschedule itself later
  instead of holding a worker. 401/403 are never retried: they need an operator.
* The token never appears in a log line, a ``repr`` or an exception message: errors carry the status,
  the segment id and Lytics' own message with any occurrence of the token masked.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from worker.clients.http import parse_retry_after
from worker.settings import Settings

#: Lytics' maximum (and our default) page size for a segment scan.
MAX_PAGE_SIZE = 100
#: Attempts per page for transient failures before the caller is told to try later.
ATTEMPTS = 3
#: Longest wait between two attempts, also the cap on a Retry-After we honour inside one call.
MAX_WAIT_SECONDS = 10.0
#: Waits between attempts without a Retry-After: exponential from half a second plus up to half a
#: second of jitter, so workers retrying together spread out.
_BACKOFF = wait_exponential_jitter(multiplier=0.5, max=MAX_WAIT_SECONDS, jitter=0.5)
#: Characters of Lytics' error message kept in our error (enough to act on, short for status).
MESSAGE_CHARS = 200


class LyticsError(Exception):
    """A segment scan failed; ``str(exc)`` is safe to show and store (no token inside)."""


class LyticsAuthError(LyticsError):
    """401/403: the token is wrong, revoked or lacks permission. Retrying will not help."""


class LyticsRetryable(LyticsError):
    """A transient failure that outlasted our retries (5xx, timeout, dropped connection)."""


class LyticsRateLimited(LyticsRetryable):
    """429 that outlasted our retries; ``retry_after`` is Lytics' hint in seconds, if any."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class LyticsBadResponse(LyticsError):
    """Any other refusal (404 unknown segment, 400 expired scan token) or a body we cannot read."""


@dataclass(frozen=True, slots=True)
class ScanPage:
    """One page of a scan: the members, the token for the next page (``""`` after the last), the size."""

    members: list[dict[str, Any]]
    next_token: str
    total: int | None

    @property
    def last(self) -> bool:
        return not self.next_token


def lytics_api_url() -> str:
    """The configured Lytics host (``LYTICS_API_URL``, see :mod:`worker.settings`), no trailing slash."""
    return Settings.from_env().lytics_api_url


class LyticsClient:
    """A small synchronous Lytics client for segment scans. Use as a context manager or ``close()``."""

    def __init__(
        self,
        token: str,
        base_url: str | None = None,
        *,
        timeout: float = 20.0,
        transport: httpx.BaseTransport | None = None,
        attempts: int = ATTEMPTS,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        if not token:
            raise LyticsAuthError("no Lytics API token given")
        self._token = token
        self._attempts = max(1, attempts)
        self._sleep: Callable[[float], None] = sleep or time.sleep
        self._http = httpx.Client(
            base_url=(base_url or lytics_api_url()).rstrip("/"),
            headers={"Authorization": token, "Accept": "application/json"},
            timeout=timeout,
            transport=transport,
        )

    def __repr__(self) -> str:
        return f"LyticsClient({self._http.base_url!s}, token=<secret>)"

    def __enter__(self) -> LyticsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # --- paging -----------------------------------------------------------------------------------
    def scan_page(self, segment_id: str, start: str | None = None, limit: int = MAX_PAGE_SIZE) -> ScanPage:
        """Fetch one page of ``segment_id``'s members, from the beginning or from ``start``."""
        if not 1 <= limit <= MAX_PAGE_SIZE:
            raise ValueError(f"limit must be between 1 and {MAX_PAGE_SIZE}, got {limit}")
        params: dict[str, str | int] = {"limit": limit}
        if start:
            params["start"] = start
        retrying = Retrying(
            retry=retry_if_exception_type(LyticsRetryable),
            stop=stop_after_attempt(self._attempts),
            wait=self._wait,
            reraise=True,
            sleep=self._sleep,
        )
        for attempt in retrying:
            with attempt:
                return self._get_page(segment_id, params)
        raise AssertionError("unreachable: tenacity either returns or re-raises")  # pragma: no cover

    # --- one request --------------------------------------------------------------------------------
    @staticmethod
    def _wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, LyticsRateLimited) and exc.retry_after is not None:
            return min(exc.retry_after, MAX_WAIT_SECONDS)
        return _BACKOFF(state)

    def _get_page(self, segment_id: str, params: dict[str, str | int]) -> ScanPage:
        where = f"Lytics segment scan of {segment_id!r}"
        try:
            response = self._http.get(f"/api/segment/{segment_id}/scan", params=params)
        except httpx.TimeoutException:
            raise LyticsRetryable(f"{where}: timed out") from None
        except httpx.TransportError as exc:
            raise LyticsRetryable(f"{where}: connection failed ({type(exc).__name__})") from None
        status = response.status_code
        if status == 200:
            return self._page(where, response)
        message = self._message(response)
        if status in (401, 403):
            hint = "the token is wrong or revoked" if status == 401 else "the token lacks permission"
            raise LyticsAuthError(f"{where}: Lytics answered {status} ({hint}): {message}")
        if status == 429:
            raise LyticsRateLimited(
                f"{where}: Lytics answered 429 (rate limited): {message}",
                parse_retry_after(response.headers.get("retry-after")),
            )
        if status >= 500:
            raise LyticsRetryable(f"{where}: Lytics answered {status}: {message}")
        raise LyticsBadResponse(f"{where}: Lytics answered {status}: {message}")

    def _page(self, where: str, response: httpx.Response) -> ScanPage:
        try:
            body = response.json()
        except ValueError:
            raise LyticsBadResponse(f"{where}: the answer is not JSON") from None
        if not isinstance(body, dict):
            raise LyticsBadResponse(f"{where}: the answer is not a JSON object")
        data = body.get("data")
        if data is None:
            data = []
        if not isinstance(data, list):
            raise LyticsBadResponse(f"{where}: 'data' is not a list")
        next_token = body.get("_next") or ""
        if not isinstance(next_token, str | int):
            raise LyticsBadResponse(f"{where}: '_next' is not a string")
        total = body.get("total")
        members = [m for m in data if isinstance(m, dict)]
        return ScanPage(members, str(next_token), total if isinstance(total, int) else None)

    def _message(self, response: httpx.Response) -> str:
        try:
            body = response.json()
            text = body.get("message") if isinstance(body, dict) else None
        except ValueError:
            text = None
        text = str(text or response.reason_phrase or "no message")[:MESSAGE_CHARS]
        # Lytics should never echo the token, but a proxy or a debugging build might.
        return text.replace(self._token, "••••") if self._token else text
