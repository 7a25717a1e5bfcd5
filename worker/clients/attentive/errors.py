"""Typed errors for the Attentive client.

Callers branch on the class, never on message text (DESIGN.md §4): 401/403 pause the export job, 400
splits the batch, 429 pushes the shared rate limiter forward, 5xx and transport errors are retried by the
Celery task with a countdown. Messages are built only from the method, the path, the status and
Attentive's own error text (truncated, with the API key scrubbed), so an error can be logged, stored in a
dead-letter reason or pickled by Celery without leaking a secret. Exception ``args`` hold the message only.
"""

from __future__ import annotations

#: Longest piece of Attentive's error text kept in an exception (bodies may echo personal data).
MAX_ATTENTIVE_MESSAGE = 300


class AttentiveError(Exception):
    """Base class of every error the client raises about an Attentive call.

    Attributes:
        status_code: HTTP status, or None when no response arrived.
        method: HTTP method of the failed call.
        path: URL path of the failed call (never the query string, which may be pre-signed).
        attentive_message: Attentive's error text, parsed leniently from the body, when present.
        error_id: ``error.id`` from an ``{"error": {"id", "message"}}`` body ("maps to service logs").
        retry_after: seconds to wait from a ``Retry-After`` header, when present (never negative).
        limit: ``x-ratelimit-limit`` header (requests per second), when present.
        remaining: ``x-ratelimit-remaining`` header, when present.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        method: str | None = None,
        path: str | None = None,
        attentive_message: str | None = None,
        error_id: str | None = None,
        retry_after: float | None = None,
        limit: int | None = None,
        remaining: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.method = method
        self.path = path
        self.attentive_message = attentive_message
        self.error_id = error_id
        self.retry_after = retry_after
        self.limit = limit
        self.remaining = remaining

    @property
    def message(self) -> str:
        """The safe, human-readable message (same as ``str(exc)``)."""
        return str(self.args[0]) if self.args else ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, status_code={self.status_code!r})"


class InvalidRequest(AttentiveError):
    """400 (also 413/422): Attentive rejected the body. Not retried; the caller splits the batch."""


class Unauthorized(AttentiveError):
    """401: the API key is unknown or revoked. Fatal for the export job until re-authorized."""


class Forbidden(AttentiveError):
    """403: the key lacks Custom Attributes or Subscribers Write. Fatal until the app is fixed."""


class NotFound(AttentiveError):
    """404: unknown path or job id (job records live at most 14 days, CONTRACT.md §2)."""


class RateLimited(AttentiveError):
    """429: over the per-key limit. Not slept on in-process; the shared rate limiter backs off."""


class ServerError(AttentiveError):
    """5xx: Attentive failed. Not retried in-process; the task retries with a countdown."""


class UnexpectedResponse(AttentiveError):
    """A response the contract does not allow: a 2xx without the promised JSON, a 3xx, an odd 4xx."""


class TransportError(AttentiveError):
    """No usable response: timeout, refused or dropped connection, after the in-process retries.

    Attributes:
        may_have_reached_server: False only when the connection was never established (connect
            error or connect timeout). When True, a POST may have created a job whose id we never saw;
            replaying it is harmless in effect (CONTRACT.md §0: the write is an upsert).
    """

    def __init__(
        self,
        message: str,
        *,
        method: str | None = None,
        path: str | None = None,
        may_have_reached_server: bool = True,
    ) -> None:
        super().__init__(message, method=method, path=path)
        self.may_have_reached_server = may_have_reached_server
