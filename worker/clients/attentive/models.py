"""Typed views of Attentive's responses.

Response models ignore unknown fields: the job-status description promises "metadata such as timestamps
and error messages" that its schema does not list (CONTRACT.md §2), and Attentive may add fields at any
time. Field names follow the wire format (camelCase) so they read like the contract.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator

from worker import jsonio

#: Job states after which a job never changes again (CONTRACT.md §2 client policy).
TERMINAL_STATUSES = frozenset({"COMPLETED", "FAILED", "CANCELLED"})
#: Status values seen in Attentive's docs. Others are legal (``status`` is a plain string).
KNOWN_STATUSES = frozenset({"PENDING", "IN_PROGRESS", "NEEDS_REVIEW", *TERMINAL_STATUSES})


class _Response(BaseModel):
    # Unknown fields ignored; ids sent as JSON numbers still read as strings.
    model_config = ConfigDict(extra="ignore", frozen=True, coerce_numbers_to_str=True)


class MeResponse(_Response):
    """``GET /v2/me``: who the key belongs to. It says nothing about permissions (CONTRACT.md §3)."""

    applicationName: str | None = None
    attentiveDomainName: str | None = None
    companyName: str | None = None
    contactEmail: str | None = None
    companyId: str | None = None


class BulkSuccess(_Response):
    """202 body of ``POST /v2/bulk/user/attributes``."""

    message: str | None = None
    batchJobId: str = Field(min_length=1)


class BulkJobStatus(_Response):
    """``GET /v2/bulk/job/{id}``. ``status`` stays a plain string: the contract lists no enum."""

    bulkJobId: str
    status: str
    totalRecords: int | None = None
    url: str | None = None

    @field_validator("totalRecords", mode="before")
    @classmethod
    def _lenient_total(cls, value: Any) -> Any:
        """A count we cannot read must not stop polling: it is informational."""
        if isinstance(value, bool) or value is None:
            return None
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return _as_int(value)

    @field_validator("url", mode="before")
    @classmethod
    def _blank_url_is_none(cls, value: Any) -> Any:
        return value if isinstance(value, str) and value.strip() else None

    @property
    def normalized_status(self) -> str:
        """Upper-cased, trimmed status, for comparisons."""
        return self.status.strip().upper()

    @property
    def is_terminal(self) -> bool:
        """COMPLETED, FAILED or CANCELLED. NEEDS_REVIEW, PENDING and unknown values keep polling."""
        return self.normalized_status in TERMINAL_STATUSES

    @property
    def is_success(self) -> bool:
        """COMPLETED: the results file (``url``) lists per-record outcomes, which may still be failures."""
        return self.normalized_status == "COMPLETED"

    @property
    def is_known_status(self) -> bool:
        """False for a value the docs never mention; the poller logs and surfaces it."""
        return self.normalized_status in KNOWN_STATUSES


@dataclass(frozen=True, slots=True)
class ResultLine:
    """One line of a job's results file.

    The line format is undocumented (CONTRACT.md §2), so it is parsed defensively: the status code is
    looked up under ``response.statusCode``, ``response.status``, ``response.code`` (then the same keys at
    the top level). A line that is not a JSON object does not stop the stream: it comes back with
    ``parse_error`` set and no status, so one bad line cannot hide the outcome of the other 255 records.

    A plain dataclass, not a pydantic model: every record of every batch passes through here once
    (measured: 13 us a line as a model with the stdlib parser, 2 us like this).
    ``request`` and ``body`` contain personal data; they are left out of ``repr``.
    """

    line_number: int
    index: int | None = None
    request: dict[str, Any] | None = field(default=None, repr=False)
    status_code: int | None = None
    #: Error text, looked for only when the status is not 2xx (or is missing).
    message: str | None = None
    body: Any = field(default=None, repr=False)
    parse_error: str | None = None

    @property
    def failed(self) -> bool:
        """Attentive reported an error (status >= 400) for this record."""
        return self.status_code is not None and self.status_code >= 400

    @property
    def succeeded(self) -> bool:
        """Attentive reported a 2xx for this record."""
        return self.status_code is not None and 200 <= self.status_code < 300

    @property
    def unparseable(self) -> bool:
        """The line was not a JSON object; its record's outcome is unknown."""
        return self.parse_error is not None

    @classmethod
    def from_line(cls, line: str | bytes, line_number: int) -> ResultLine:
        """Parse one JSONL line; never raises.

        Args:
            line: the text (or UTF-8 bytes) of the line, without its newline.
            line_number: 0-based position among the non-blank lines of the file.

        Returns:
            The parsed line, or one with ``parse_error`` set.
        """
        try:
            # Lenient (NaN, Infinity are read): a report on a record is worth the slower parse.
            obj = jsonio.loads(line)
        except ValueError as exc:
            return cls(line_number=line_number, parse_error=f"invalid JSON: {type(exc).__name__}")
        if not isinstance(obj, dict):
            return cls(line_number=line_number, parse_error=f"not a JSON object: {type(obj).__name__}")
        return cls.from_obj(obj, line_number)

    @staticmethod
    def plainly_succeeded(line: bytes) -> bool:
        """Whether :meth:`from_line` would certainly report a 2xx for this line; never raises.

        True only for a JSON object (orjson reads it) whose ``response`` is an object with an
        integer ``statusCode`` from 200 to 299: :meth:`from_obj` takes such a code as the line's
        status whatever else the line holds, so it can neither fail a record nor be unreadable. A
        caller looking for those skips such lines without building them (most of a results file,
        and most of the cost of reading one). False for anything else, however close: those lines
        get the full, lenient parse.
        """
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            return False
        if type(obj) is dict:
            response = obj.get("response")
            if type(response) is dict:
                code = response.get("statusCode")
                return type(code) is int and 200 <= code < 300
        return False

    @classmethod
    def from_obj(cls, obj: dict[str, Any], line_number: int) -> ResultLine:
        """Build from a decoded line object; never raises.

        Args:
            obj: the decoded JSON object.
            line_number: 0-based position among the non-blank lines of the file.

        Returns:
            The parsed line.
        """
        response = obj.get("response")
        body: Any = None
        status: int | None = None
        message: str | None = None
        if isinstance(response, dict):
            body = response.get("body")
            code = response.get("statusCode")
            # Fast path for the usual shape; anything else goes through the lenient lookups.
            status = code if type(code) is int and 100 <= code <= 599 else _first_status(response)
        elif response is not None:
            status = _as_status(response)
        if status is None:
            status = _first_status(obj)
        if status is None or status >= 300:  # error text is only looked for where it can matter
            if isinstance(response, dict):
                message = _message_of(response) or _message_of(body)
            if message is None:
                message = _message_of(obj)
        request = obj.get("request")
        return cls(
            line_number=line_number,
            index=_as_int(obj.get("index")),
            request=request if isinstance(request, dict) else None,
            status_code=status,
            message=message,
            body=body,
        )


class ResultLines(Iterator[ResultLine]):
    """A results file's lines, read on demand: the download starts on the first ``next()``.

    ``read(skip_plain_successes)`` opens the stream (``AttentiveClient._stream_results``).
    """

    def __init__(self, read: Callable[[bool], Generator[ResultLine, None, None]]) -> None:
        self._read = read
        self._skip = False
        self._lines: Generator[ResultLine, None, None] | None = None

    def skipping_plain_successes(self) -> ResultLines:
        """Leave out the lines that plainly report a 2xx (:meth:`ResultLine.plainly_succeeded`):
        they can neither fail a record nor be unreadable, and skipping them makes reading a file
        cost little more than downloading it. Call before reading."""
        if self._lines is not None:
            raise RuntimeError("the results are being read already")
        self._skip = True
        return self

    def __iter__(self) -> ResultLines:
        return self

    def __next__(self) -> ResultLine:
        if self._lines is None:
            self._lines = self._read(self._skip)
        return next(self._lines)

    def close(self) -> None:
        """Stop reading (the download is closed), as a generator's ``close``."""
        if self._lines is not None:
            self._lines.close()


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def _as_status(value: Any) -> int | None:
    """An HTTP status from ``413``, ``"413"`` or ``"413 Payload Too Large"``; None for anything else."""
    if isinstance(value, str):
        head = value.strip().split(" ", 1)[0]
        value = head if head.isdigit() else None
    number = _as_int(value)
    return number if number is not None and 100 <= number <= 599 else None


def _first_status(obj: dict[str, Any]) -> int | None:
    for key in ("statusCode", "status", "code"):
        status = _as_status(obj.get(key))
        if status is not None:
            return status
    return None


def _message_of(value: Any) -> str | None:
    """Error text from ``{"message"}``, ``{"error": "..."}``, ``{"error": {"message"}}`` or a string."""
    if isinstance(value, str):
        return value or None
    if not isinstance(value, dict):
        return None
    message = value.get("message")
    if isinstance(message, str) and message:
        return message
    error = value.get("error")
    if isinstance(error, str) and error:
        return error
    if isinstance(error, dict):
        inner = error.get("message")
        if isinstance(inner, str) and inner:
            return inner
    return None
