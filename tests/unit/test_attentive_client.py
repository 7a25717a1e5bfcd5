"""Unit tests of worker.clients.attentive against httpx.MockTransport: every status path, retries, secrets."""

from __future__ import annotations

import json
import logging
import pickle
import random
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest

from tests.contract.schema import contract_problems, schema_errors
from worker.clients.attentive import (
    AttentiveClient,
    AttentiveError,
    BulkJobStatus,
    Forbidden,
    InvalidRequest,
    MeResponse,
    NotFound,
    RateLimited,
    ResultLine,
    ServerError,
    TransportError,
    Unauthorized,
    UnexpectedResponse,
)
from worker.clients.attentive import client as client_module
from worker.clients.attentive.client import split_lines

BASE = "https://attentive.test"
KEY = "sk_live_SuperSecret-0123456789abcdef"
JOB_ID = "550e8400-e29b-41d4-a716-446655440000"

Handler = Callable[[httpx.Request], httpx.Response]


def user(i: int = 0) -> dict[str, Any]:
    return {
        "identifiers": {"phone": f"+1914844{i:04d}", "email": f"u{i}@example.com"},
        "attributes": {"firstName": "Ann", "custom": {"vip_shoppers": True}},
    }


def encoded(users: list[dict[str, Any]]) -> list[bytes]:
    """Records as the flush hands them over: each user's JSON object, UTF-8."""
    return [json.dumps(u, ensure_ascii=False).encode() for u in users]


class Recorder:
    """A MockTransport handler that records requests and answers from a queue (last answer repeats)."""

    def __init__(self, *answers: httpx.Response | Exception | Handler) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        if callable(answer) and not isinstance(answer, httpx.Response):
            return answer(request)
        return answer


@pytest.fixture
def make_client() -> Iterator[Callable[..., tuple[AttentiveClient, Recorder, list[float]]]]:
    clients: list[AttentiveClient] = []

    def make(*answers: httpx.Response | Exception | Handler, **kwargs: Any) -> Any:
        recorder = Recorder(*answers)
        client = AttentiveClient(KEY, BASE, transport=httpx.MockTransport(recorder), **kwargs)
        sleeps: list[float] = []
        client._sleep = sleeps.append  # no real sleeping in unit tests
        clients.append(client)
        return client, recorder, sleeps

    yield make
    for c in clients:
        c.close()


def resp(status: int, body: Any = None, *, text: str | None = None, headers: Any = None) -> httpx.Response:
    if text is not None:
        return httpx.Response(status, text=text, headers=headers)
    if body is None:
        return httpx.Response(status, headers=headers)
    return httpx.Response(status, json=body, headers=headers)


ACCEPTED = resp(202, {"message": "Bulk user attributes job successfully submitted", "batchJobId": JOB_ID})


# --- happy paths -----------------------------------------------------------------------------------


def test_me_parses_and_tolerates_unknown_fields(make_client: Any) -> None:
    body = {
        "applicationName": "Pillow Api",
        "attentiveDomainName": "hudsonivy.attn.tv",
        "companyName": "Hudson & Ivy",
        "contactEmail": "name@company.com",
        "companyId": "MDc6Q29tcGFueTI",
        "brandNew": {"x": 1},
    }
    client, rec, _ = make_client(resp(200, body))
    me = client.me()
    assert isinstance(me, MeResponse)
    assert me.companyName == "Hudson & Ivy" and me.companyId == "MDc6Q29tcGFueTI"
    req = rec.requests[0]
    assert req.method == "GET" and req.url == httpx.URL(f"{BASE}/v2/me")
    assert req.headers["Authorization"] == f"Bearer {KEY}"
    assert req.headers["User-Agent"].startswith("attentive-audience-export/")


def test_me_all_fields_optional(make_client: Any) -> None:
    client, _, _ = make_client(resp(200, {}))
    assert client.me() == MeResponse()


def test_submit_bulk_json_sends_the_records_and_returns_batch_job_id(make_client: Any) -> None:
    client, rec, _ = make_client(ACCEPTED)
    users = [user(i) for i in range(256)]
    users[0]["attributes"]["firstName"] = "Zoë 李"
    assert client.submit_bulk_json(encoded(users)) == JOB_ID
    req = rec.requests[0]
    assert req.method == "POST" and req.url.path == "/v2/bulk/user/attributes"
    assert req.headers["Content-Type"] == "application/json"
    body = json.loads(req.content.decode("utf-8"))
    assert body == {"users": users}
    assert schema_errors("UserAttributes", body) == []
    assert contract_problems(body) == []


def test_submit_bulk_json_tolerates_extra_fields_in_202(make_client: Any) -> None:
    client, _, _ = make_client(resp(202, {"batchJobId": JOB_ID, "queuedAt": "now"}))
    assert client.submit_bulk_json(encoded([user()])) == JOB_ID


@pytest.mark.parametrize(
    "records, match",
    [
        ([], "empty"),
        ([b"{}"] * 257, "at most 256"),
        (b"{}", "sequence"),
        (['{"identifiers":{}}'], "records\\[0\\]"),
        ([b"{}", b'["not an object"]'], "records\\[1\\]"),
        ([b"{}", b""], "records\\[1\\]"),
        ([b"{}", b"{}", bytearray(b"{}")], "records\\[2\\]"),
        ([b"{}", b"{"], "records\\[1\\]"),
    ],
)
def test_submit_bulk_json_refuses_locally(make_client: Any, records: Any, match: str) -> None:
    client, rec, _ = make_client(ACCEPTED)
    with pytest.raises(ValueError, match=match):
        client.submit_bulk_json(records)
    assert rec.requests == []


def test_job_status_in_progress_then_completed(make_client: Any) -> None:
    client, rec, _ = make_client(
        resp(200, {"bulkJobId": JOB_ID, "status": "IN_PROGRESS", "totalRecords": 3}),
        resp(
            200,
            {
                "bulkJobId": JOB_ID,
                "status": "COMPLETED",
                "totalRecords": "3",
                "url": "https://files.test/r.jsonl?sig=abc",
                "completedAt": "2026-11-26T17:00:00Z",
            },
        ),
    )
    first = client.job_status(JOB_ID)
    assert (first.status, first.totalRecords, first.url) == ("IN_PROGRESS", 3, None)
    assert not first.is_terminal and not first.is_success
    second = client.job_status(JOB_ID)
    assert second.is_terminal and second.is_success and second.totalRecords == 3
    assert second.url == "https://files.test/r.jsonl?sig=abc"
    assert rec.requests[0].url.path == f"/v2/bulk/job/{JOB_ID}"


@pytest.mark.parametrize(
    "status, terminal, success, known",
    [
        ("PENDING", False, False, True),
        ("IN_PROGRESS", False, False, True),
        ("NEEDS_REVIEW", False, False, True),
        ("COMPLETED", True, True, True),
        ("completed", True, True, True),
        ("FAILED", True, False, True),
        ("CANCELLED", True, False, True),
        ("SOMETHING_NEW", False, False, False),
    ],
)
def test_job_status_policy(status: str, terminal: bool, success: bool, known: bool) -> None:
    s = BulkJobStatus(bulkJobId="x", status=status)
    assert (s.is_terminal, s.is_success, s.is_known_status) == (terminal, success, known)


def test_job_status_url_encodes_id_and_fills_missing_id(make_client: Any) -> None:
    client, rec, _ = make_client(resp(200, {"status": "PENDING"}))
    status = client.job_status("a/b c?d")
    assert status.bulkJobId == "a/b c?d"
    assert rec.requests[0].url.raw_path == b"/v2/bulk/job/a%2Fb%20c%3Fd"


@pytest.mark.parametrize("bad", ["", " ", ".", ".."])
def test_job_status_refuses_bad_ids(make_client: Any, bad: str) -> None:
    client, rec, _ = make_client(resp(200, {"status": "PENDING"}))
    with pytest.raises(ValueError):
        client.job_status(bad)
    assert rec.requests == []


# --- non-JSON / malformed success bodies --------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        resp(202, text="<html>accepted</html>"),
        resp(202),
        resp(202, ["not", "an", "object"]),
        resp(202, {"message": "ok"}),
        resp(202, {"batchJobId": ""}),
    ],
)
def test_submit_bulk_json_unexpected_success_body(make_client: Any, answer: httpx.Response) -> None:
    client, _, _ = make_client(answer)
    with pytest.raises(UnexpectedResponse) as info:
        client.submit_bulk_json(encoded([user()]))
    assert info.value.status_code == 202


def test_job_status_missing_status_is_unexpected(make_client: Any) -> None:
    client, _, _ = make_client(resp(200, {"bulkJobId": JOB_ID}))
    with pytest.raises(UnexpectedResponse, match="status"):
        client.job_status(JOB_ID)


def test_redirect_is_not_followed_for_api_calls(make_client: Any) -> None:
    client, rec, _ = make_client(resp(302, headers={"Location": "https://elsewhere.test/v2/me"}))
    with pytest.raises(UnexpectedResponse) as info:
        client.me()
    assert info.value.status_code == 302 and len(rec.requests) == 1


# --- status errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer, message, error_id",
    [
        (
            resp(400, {"error": {"id": 1234, "message": "users[0].identifiers.phone: not E.164"}}),
            "phone",
            "1234",
        ),
        (
            resp(400, {"error": "Must either specify subscriberPhone or subscriberEmail"}),
            "subscriberPhone",
            None,
        ),
        (resp(400, {"message": "users must have 1 to 256 items"}), "1 to 256", None),
        (resp(400, "a JSON string"), "a JSON string", None),
        (resp(400, text="Bad phone number\nsecond line"), "Bad phone number", None),
        (resp(400, text=""), None, None),
        (resp(400, [1, 2]), None, None),
        (resp(400, {"error": {"id": "abc"}}), None, "abc"),
    ],
)
def test_400_body_shapes(
    make_client: Any, answer: httpx.Response, message: str | None, error_id: Any
) -> None:
    client, rec, sleeps = make_client(answer)
    with pytest.raises(InvalidRequest) as info:
        client.submit_bulk_json(encoded([user()]))
    err = info.value
    assert err.status_code == 400 and err.error_id == error_id
    assert err.method == "POST" and err.path == "/v2/bulk/user/attributes"
    if message is None:
        assert err.attentive_message is None
    else:
        assert err.attentive_message is not None and message in err.attentive_message
        assert message in str(err)
    assert "second line" not in str(err)
    assert len(rec.requests) == 1 and sleeps == []  # never retried


def test_long_error_text_is_truncated(make_client: Any) -> None:
    client, _, _ = make_client(resp(400, {"message": "x" * 10_000}))
    with pytest.raises(InvalidRequest) as info:
        client.submit_bulk_json(encoded([user()]))
    assert len(str(info.value)) < 500


@pytest.mark.parametrize(
    "status, cls",
    [
        (401, Unauthorized),
        (403, Forbidden),
        (404, NotFound),
        (413, InvalidRequest),
        (422, InvalidRequest),
        (409, UnexpectedResponse),
        (500, ServerError),
        (502, ServerError),
        (503, ServerError),
        (504, ServerError),
    ],
)
@pytest.mark.parametrize("call", ["me", "submit", "status"])
def test_status_maps_to_error_class_without_retry(
    make_client: Any, status: int, cls: type[AttentiveError], call: str
) -> None:
    client, rec, sleeps = make_client(
        resp(status, {"error": {"id": 7, "message": "nope"}}, headers={"x-ratelimit-limit": "100"})
    )
    with pytest.raises(cls) as info:
        if call == "me":
            client.me()
        elif call == "submit":
            client.submit_bulk_json(encoded([user()]))
        else:
            client.job_status(JOB_ID)
    err = info.value
    assert isinstance(err, AttentiveError)
    assert err.status_code == status and err.attentive_message == "nope" and err.limit == 100
    assert str(status) in str(err)
    assert len(rec.requests) == 1 and sleeps == []


def test_server_error_with_html_body(make_client: Any) -> None:
    client, _, _ = make_client(resp(502, text="<html><body>Bad Gateway</body></html>"))
    with pytest.raises(ServerError) as info:
        client.job_status(JOB_ID)
    assert info.value.status_code == 502


def test_429_without_retry_after(make_client: Any) -> None:
    client, rec, sleeps = make_client(
        resp(429, headers={"x-ratelimit-limit": "100", "x-ratelimit-remaining": "0"})
    )
    with pytest.raises(RateLimited) as info:
        client.submit_bulk_json(encoded([user()]))
    err = info.value
    assert (err.status_code, err.retry_after, err.limit, err.remaining) == (429, None, 100, 0)
    assert len(rec.requests) == 1 and sleeps == []  # not slept on in-process


def test_429_with_delta_seconds(make_client: Any) -> None:
    client, _, _ = make_client(resp(429, {"message": "Too Many Requests"}, headers={"Retry-After": "7"}))
    with pytest.raises(RateLimited) as info:
        client.job_status(JOB_ID)
    assert info.value.retry_after == 7.0 and info.value.limit is None


def test_429_with_http_date(make_client: Any) -> None:
    when = datetime.now(UTC) + timedelta(seconds=120)
    client, _, _ = make_client(resp(429, headers={"Retry-After": format_datetime(when, usegmt=True)}))
    with pytest.raises(RateLimited) as info:
        client.submit_bulk_json(encoded([user()]))
    assert info.value.retry_after is not None and 100 <= info.value.retry_after <= 121


def test_retry_after_on_503_is_kept(make_client: Any) -> None:
    client, _, _ = make_client(resp(503, headers={"Retry-After": "3"}))
    with pytest.raises(ServerError) as info:
        client.me()
    assert info.value.retry_after == 3.0


@pytest.mark.parametrize("limit, remaining", [("abc", "12.0"), ("", " 3 ")])
def test_lenient_ratelimit_headers(make_client: Any, limit: str, remaining: str) -> None:
    client, _, _ = make_client(
        resp(429, headers={"x-ratelimit-limit": limit, "x-ratelimit-remaining": remaining})
    )
    with pytest.raises(RateLimited) as info:
        client.me()
    assert info.value.limit is None and info.value.remaining in (12, 3)


# --- transport errors and retries ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        httpx.ConnectError("[Errno 111] Connection refused"),
        httpx.ConnectTimeout("timed out"),
    ],
)
def test_connection_errors_are_retried_then_succeed(make_client: Any, exc: Exception) -> None:
    client, rec, sleeps = make_client(exc, exc, ACCEPTED)
    assert client.submit_bulk_json(encoded([user()])) == JOB_ID
    assert len(rec.requests) == 3
    assert len(sleeps) == 2 and all(0 < s <= 0.5 for s in sleeps) and sum(sleeps) <= 1.0
    assert rec.requests[0].content == rec.requests[2].content


@pytest.mark.parametrize(
    "exc, reached",
    [
        (httpx.ConnectError("[Errno 111] Connection refused"), False),
        (httpx.ConnectTimeout("timed out"), False),
    ],
)
def test_connection_errors_exhaust_retries_into_transport_error(
    make_client: Any, exc: Exception, reached: bool
) -> None:
    client, rec, sleeps = make_client(exc)
    with pytest.raises(TransportError) as info:
        client.job_status(JOB_ID)
    err = info.value
    assert len(rec.requests) == 3 and len(sleeps) == 2
    assert err.status_code is None and err.may_have_reached_server is reached
    assert type(exc).__name__ in str(err) and "3 attempt" in str(err)
    assert isinstance(err.__cause__, httpx.TransportError)


@pytest.mark.parametrize(
    "exc",
    [
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
        httpx.ReadError("[Errno 104] Connection reset by peer"),
        httpx.WriteError("[Errno 32] Broken pipe"),
    ],
)
def test_a_post_that_may_have_reached_attentive_is_never_replayed(make_client: Any, exc: Exception) -> None:
    """No idempotency key: a replayed POST could start a second, untracked Attentive job (the flush
    records the send as uncertain instead). Bug caught: retrying dropped connections in the client."""
    client, rec, sleeps = make_client(exc, ACCEPTED)
    with pytest.raises(TransportError) as info:
        client.submit_bulk_json(encoded([user()]))
    assert len(rec.requests) == 1 and sleeps == []
    assert info.value.may_have_reached_server is True


@pytest.mark.parametrize(
    "exc", [httpx.ReadTimeout("read timed out"), httpx.WriteTimeout("w"), httpx.PoolTimeout("p")]
)
def test_timeouts_after_connect_are_not_retried(make_client: Any, exc: Exception) -> None:
    client, rec, sleeps = make_client(exc, ACCEPTED)
    with pytest.raises(TransportError) as info:
        client.submit_bulk_json(encoded([user()]))
    assert len(rec.requests) == 1 and sleeps == []
    assert info.value.may_have_reached_server is (not isinstance(exc, httpx.PoolTimeout))


def test_max_attempts_one_disables_retries(make_client: Any) -> None:
    client, rec, sleeps = make_client(httpx.ConnectError("refused"), max_attempts=1)
    with pytest.raises(TransportError):
        client.me()
    assert len(rec.requests) == 1 and sleeps == []


def test_retry_then_status_error_is_typed(make_client: Any) -> None:
    client, rec, _ = make_client(httpx.ConnectError("refused"), resp(500))
    with pytest.raises(ServerError):
        client.submit_bulk_json(encoded([user()]))
    assert len(rec.requests) == 2


def test_real_timeout_against_a_silent_socket() -> None:
    """A real read timeout (not a mock) surfaces as TransportError quickly and is not retried."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                accepted.append(conn)  # never answer
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        client = AttentiveClient(KEY, f"http://127.0.0.1:{port}", timeout=0.3)
        with client, pytest.raises(TransportError, match="ReadTimeout"):
            client.me()
        assert len(accepted) == 1
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        server.close()


# --- iter_results -------------------------------------------------------------------------------------

RESULTS = (
    '{"index":0,"request":{"identifiers":{"email":"a@x.io"}},"response":{"statusCode":202,"body":{}}}\n'
    "\n"
    '{"index":1,"request":{},"response":{"statusCode":400,"body":{"error":{"id":1,"message":"bad phone"}}}}\n'
    '{"index":2,"response":{"status":"413"}}\n'
    "   \n"
    "not json at all\n"
    '{"index":"4","code":500,"message":"boom"}\n'
    "[1,2]\n"
    '{"index":6,"response":{"statusCode":202},"extra":true}'  # no trailing newline
)


def test_iter_results_streams_without_authorization(make_client: Any) -> None:
    url = "https://files.test/results/abc.jsonl?X-Amz-Signature=sig"
    client, rec, _ = make_client(resp(200, text=RESULTS, headers={"Content-Type": "application/x-ndjson"}))
    lines = list(client.iter_results(url))
    req = rec.requests[0]
    assert "authorization" not in req.headers
    assert req.url == httpx.URL(url)
    assert [ln.line_number for ln in lines] == list(range(7))
    assert [ln.index for ln in lines] == [0, 1, 2, None, 4, None, 6]
    by_number = {ln.line_number: ln for ln in lines}
    assert by_number[0].succeeded and not by_number[0].failed and by_number[0].index == 0
    assert by_number[0].request == {"identifiers": {"email": "a@x.io"}}
    assert by_number[1].failed and by_number[1].status_code == 400 and by_number[1].message == "bad phone"
    assert by_number[2].failed and by_number[2].status_code == 413
    assert by_number[3].unparseable and by_number[3].status_code is None and not by_number[3].failed
    assert by_number[4].index == 4 and by_number[4].status_code == 500 and by_number[4].message == "boom"
    assert by_number[5].unparseable and "list" in (by_number[5].parse_error or "")
    assert by_number[6].succeeded and by_number[6].index == 6
    assert len(lines) == 7
    # personal data stays out of repr
    assert "a@x.io" not in repr(by_number[0])


def test_iter_results_follows_redirect_and_relative_url(make_client: Any) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/files/r.jsonl":
            return resp(307, headers={"Location": "https://bucket.test/r.jsonl"})
        return resp(200, text='{"index":0,"response":{"statusCode":202}}\n')

    client, rec, _ = make_client(handler)
    lines = list(client.iter_results("/files/r.jsonl"))
    assert len(lines) == 1 and lines[0].succeeded
    assert [str(r.url) for r in rec.requests] == [f"{BASE}/files/r.jsonl", "https://bucket.test/r.jsonl"]
    assert all("authorization" not in r.headers for r in rec.requests)


@pytest.mark.parametrize("status, cls", [(403, Forbidden), (404, NotFound), (500, ServerError)])
def test_iter_results_http_errors(make_client: Any, status: int, cls: type[AttentiveError]) -> None:
    client, _, _ = make_client(resp(status, text="<Error><Code>AccessDenied</Code></Error>"))
    with pytest.raises(cls) as info:
        list(client.iter_results("https://files.test/r.jsonl?X-Amz-Signature=topsecret"))
    assert "topsecret" not in str(info.value) and info.value.path == "/r.jsonl"


def test_iter_results_connection_error(make_client: Any) -> None:
    client, rec, _ = make_client(httpx.ConnectError("refused"))
    with pytest.raises(TransportError):
        list(client.iter_results("https://files.test/r.jsonl"))
    assert len(rec.requests) == 3


def test_iter_results_empty_file(make_client: Any) -> None:
    client, _, _ = make_client(resp(200, text=""))
    assert list(client.iter_results("https://files.test/r.jsonl")) == []


class _BrokenStream(httpx.SyncByteStream):
    def __iter__(self) -> Iterator[bytes]:
        yield b'{"index":0,"response":{"statusCode":202}}\n{"index":1,"resp'
        raise httpx.ReadError("[Errno 104] Connection reset by peer")


def test_iter_results_mid_stream_failure(make_client: Any) -> None:
    client, rec, _ = make_client(httpx.Response(200, stream=_BrokenStream()))
    got: list[ResultLine] = []
    with pytest.raises(TransportError, match="1 attempt") as info:
        got.extend(client.iter_results("https://files.test/r.jsonl"))
    assert [ln.index for ln in got] == [0] and len(rec.requests) == 1
    assert info.value.may_have_reached_server


def _reference_lines(data: bytes, max_bytes: int) -> list[bytes | None]:
    """What split_lines must give: split the whole text at once."""
    out: list[bytes | None] = []
    for raw in data.split(b"\n"):
        if len(raw) > max_bytes:
            out.append(None)
        elif raw.strip():
            out.append(raw.strip())
    return out


@pytest.mark.parametrize("seed", range(40))
def test_split_lines_agrees_with_splitting_the_whole_text_however_it_is_chunked(seed: int) -> None:
    rng = random.Random(seed)
    pieces = [b"", b" ", b"\n", b"ab", b'{"index":1}', b"x" * rng.randint(5, 40), b"\r\n"]
    data = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 60)))
    max_bytes = rng.choice([8, 16, 30, 10_000])
    cuts = sorted(rng.sample(range(len(data) + 1), min(len(data) + 1, rng.randint(0, 12))))
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]

    assert list(split_lines(chunks, max_bytes)) == _reference_lines(data, max_bytes)


def test_an_overlong_results_line_is_reported_unreadable_and_the_rest_still_read(
    make_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module, "MAX_RESULT_LINE_BYTES", 100)
    body = b'{"index":0,"response":{"statusCode":202}}\n{"index":1,"x":"' + b"y" * 500 + b'"}\n'
    body += b'{"index":2,"response":{"statusCode":400,"body":{"error":"bad"}}}\n'
    client, _, _ = make_client(httpx.Response(200, content=body))

    got = list(client.iter_results("https://files.test/r.jsonl"))

    assert [ln.line_number for ln in got] == [0, 1, 2]
    assert got[1].unparseable and "longer than 100 bytes" in (got[1].parse_error or "")
    assert got[0].succeeded and got[2].failed and got[2].message == "bad"


def test_iter_results_refuses_empty_url_eagerly(make_client: Any) -> None:
    client, rec, _ = make_client(resp(200, text=""))
    with pytest.raises(ValueError):
        client.iter_results("  ")
    assert rec.requests == []


def test_iter_results_is_lazy_and_closes_early(make_client: Any) -> None:
    client, rec, _ = make_client(resp(200, text=RESULTS))
    lines = client.iter_results("https://files.test/r.jsonl")
    assert rec.requests == []
    assert next(lines).index == 0
    lines.close()
    assert len(rec.requests) == 1


def test_job_status_tolerates_odd_values(make_client: Any) -> None:
    client, _, _ = make_client(
        resp(200, {"bulkJobId": 12345, "status": "PENDING", "totalRecords": "many", "url": ""}),
        resp(200, {"bulkJobId": None, "status": "COMPLETED", "totalRecords": 3.0, "url": "u"}),
    )
    first = client.job_status("12345")
    assert (first.bulkJobId, first.totalRecords, first.url) == ("12345", None, None)
    second = client.job_status(JOB_ID)
    assert (second.bulkJobId, second.totalRecords, second.url) == (JOB_ID, 3, "u")


def test_me_coerces_numeric_ids(make_client: Any) -> None:
    client, _, _ = make_client(resp(200, {"companyId": 42, "companyName": None}))
    assert client.me().companyId == "42"


def test_result_line_status_variants() -> None:
    assert ResultLine.from_line(b'{"index":2,"response":{"statusCode":202}}', 0).index == 2
    assert ResultLine.from_line(b"\xff", 0).unparseable
    assert ResultLine.from_line('{"response":413}', 0).status_code == 413
    assert ResultLine.from_line('{"response":{"statusCode":"400 Bad Request"}}', 0).status_code == 400
    assert ResultLine.from_line('{"response":{"code":"INVALID"},"status":404}', 0).status_code == 404
    assert ResultLine.from_line('{"response":{"statusCode":true}}', 0).status_code is None
    assert ResultLine.from_line('{"index":true}', 0).index is None
    line = ResultLine.from_line('{"response":{"statusCode":400,"body":{"error":"no id"}}}', 3)
    assert line.failed and line.message == "no id" and line.line_number == 3


@pytest.mark.parametrize(
    "raw",
    [
        b'{"index":4,"request":{"ltv":NaN},"response":{"statusCode":400,"body":{"error":"bad ltv"}}}',
        b'{"index":4,"request":{"ltv":-Infinity},"response":{"statusCode":400,"body":{"error":"bad ltv"}}}',
    ],
)
def test_a_result_line_orjson_refuses_but_json_allows_is_still_read(raw: bytes) -> None:
    """NaN and Infinity: orjson rejects them, the stdlib reads them (and once did here)."""
    line = ResultLine.from_line(raw, 0)
    assert not line.unparseable and line.failed and line.index == 4 and line.message == "bad ltv"
    assert ResultLine.from_line(raw[:-1], 0).unparseable  # truncated: still unreadable


# --- secrets ------------------------------------------------------------------------------------------


def _all_text(err: BaseException) -> str:
    return " ".join([str(err), repr(err), *map(str, err.args), *map(repr, err.args)])


def test_key_not_in_client_repr_or_str() -> None:
    with AttentiveClient(KEY, BASE) as client:
        assert KEY not in repr(client) and KEY not in str(client)
        assert KEY not in repr(vars(client))


@pytest.mark.parametrize("bad", ["", "   ", "key with space", "key\nX-Injected: 1", "ключ"])
def test_bad_keys_refused_without_echo(bad: str) -> None:
    with pytest.raises(ValueError) as info:
        AttentiveClient(bad, BASE)
    assert bad.strip() == "" or bad not in str(info.value)


def test_base_url_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTENTIVE_API_URL", "http://127.0.0.1:9999/")
    with AttentiveClient(KEY) as client:
        assert client.base_url == "http://127.0.0.1:9999"


def test_key_never_in_errors_or_logs(make_client: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Run every path at DEBUG (httpx/httpcore included); the key must not appear anywhere."""
    echo = {"error": {"id": 1, "message": f"bad token Bearer {KEY}"}}
    client, _, _ = make_client(
        resp(200, {"companyName": "C"}),
        ACCEPTED,
        resp(200, {"bulkJobId": JOB_ID, "status": "COMPLETED", "url": "https://f.test/r.jsonl"}),
        resp(200, text='{"index":0,"response":{"statusCode":202}}\n'),
        resp(401, echo),
        resp(400, text=f"Authorization: Bearer {KEY}"),
        resp(429, headers={"Retry-After": "1"}),
        resp(503, echo),
        httpx.ConnectError(f"could not connect with {KEY}"),
    )
    errors: list[AttentiveError] = []
    with caplog.at_level(logging.DEBUG):
        client.me()
        client.submit_bulk_json(encoded([user()]))
        list(client.iter_results(client.job_status(JOB_ID).url or ""))
        for call in (
            client.me,
            lambda: client.submit_bulk_json(encoded([user()])),
            client.me,
            client.me,
            client.me,
        ):
            with pytest.raises(AttentiveError) as info:
                call()
            errors.append(info.value)
    assert [type(e) for e in errors] == [
        Unauthorized,
        InvalidRequest,
        RateLimited,
        ServerError,
        TransportError,
    ]
    for err in errors:
        assert KEY not in _all_text(err)
        assert KEY not in repr(vars(err))
        assert KEY not in str(pickle.loads(pickle.dumps(err)))
        assert "[redacted]" in str(err) or not isinstance(err, Unauthorized | InvalidRequest | ServerError)
    assert caplog.records, "expected DEBUG lines from the client"
    logged = "\n".join(r.getMessage() + repr(r.args) for r in caplog.records)
    assert KEY not in logged
    assert "/v2/bulk/user/attributes" in logged and "u0@example.com" not in logged  # no bodies


def test_key_not_logged_over_real_http(caplog: pytest.LogCaptureFixture) -> None:
    """Over a real socket httpx and httpcore log at DEBUG/INFO too: check their lines, not just ours."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization", ""))
            payload = b'{"companyName":"C"}' if self.path == "/v2/me" else b'{"error":"nope"}'
            self.send_response(200 if self.path == "/v2/me" else 401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with (
            caplog.at_level(logging.DEBUG),
            AttentiveClient(KEY, f"http://127.0.0.1:{server.server_port}") as c,
        ):
            assert c.me().companyName == "C"
            with pytest.raises(Unauthorized):
                c.job_status(JOB_ID)
    finally:
        server.shutdown()
        server.server_close()
    assert seen == [f"Bearer {KEY}"] * 2
    loggers = {r.name for r in caplog.records}
    assert {"httpx", "worker.clients.attentive.client"} <= loggers and any(
        n.startswith("httpcore") for n in loggers
    )
    assert KEY not in "\n".join(f"{r.getMessage()} {r.args!r}" for r in caplog.records)


def test_errors_pickle_round_trip() -> None:
    err = RateLimited("Attentive POST /x -> 429", status_code=429, retry_after=2.0, limit=100, remaining=0)
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is RateLimited and str(copy) == str(err)
    assert (copy.status_code, copy.retry_after, copy.limit, copy.remaining) == (429, 2.0, 100, 0)
    terr = TransportError("t", may_have_reached_server=False)
    assert pickle.loads(pickle.dumps(terr)).may_have_reached_server is False


def test_bulk_post_carries_the_client_headers_and_its_own_length(make_client: Any) -> None:
    """The bulk POST is prepared once per client (worker/clients/attentive/client.py, _send_direct):
    every request still carries the key, the client's headers and the length of its own body."""
    client, rec, _ = make_client(ACCEPTED)
    for n in (1, 3):
        client.submit_bulk_json(encoded([user(i) for i in range(n)]))
    first, second = rec.requests
    for req in (first, second):
        assert req.url == httpx.URL(f"{BASE}/v2/bulk/user/attributes")
        assert req.headers["Authorization"] == f"Bearer {KEY}"
        assert req.headers["Accept"] == "application/json"
        assert req.headers["User-Agent"].startswith("attentive-audience-export/")
        assert req.headers["Content-Type"] == "application/json"
        assert req.headers["Content-Length"] == str(len(req.content))
        assert req.headers.get_list("Content-Length") == [str(len(req.content))]
    assert len(json.loads(second.content)["users"]) == 3


def test_bulk_post_after_close_is_refused_like_any_call(make_client: Any) -> None:
    client, rec, _ = make_client(ACCEPTED)
    client.close()
    with pytest.raises(RuntimeError, match="closed"):
        client.submit_bulk_json(encoded([user()]))
    with pytest.raises(RuntimeError, match="closed"):
        client.me()
    assert rec.requests == []


def test_connections_are_reused() -> None:
    """One client keeps one pool: the same httpx.Client serves every call (keep-alive)."""
    rec = Recorder(resp(200, {}))
    with AttentiveClient(KEY, BASE, transport=httpx.MockTransport(rec)) as client:
        pool = client._http
        client.me()
        client.me()
        assert client._http is pool and len(rec.requests) == 2
    assert pool.is_closed
