"""The Attentive client against the real sandbox process over loopback HTTP, one test per status path."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.contract.schema import contract_problems, schema_errors
from tests.sandboxproc import SandboxProcess
from worker.clients.attentive import (
    AttentiveClient,
    BulkJobStatus,
    Forbidden,
    InvalidRequest,
    NotFound,
    RateLimited,
    ServerError,
    TransportError,
    Unauthorized,
)

pytestmark = pytest.mark.integration

KEY = "test-key"
READONLY = "readonly-key"
BULK = "POST /v2/bulk/user/attributes"
JOB = "GET /v2/bulk/job/{bulkJobId}"


def users(n: int = 3) -> list[dict[str, Any]]:
    return [
        {
            "identifiers": {"phone": f"+1914844{i:04d}", "email": f"member{i}@example.com"},
            "attributes": {
                "firstName": f"Ann{i}",
                "demographic": {"dateOfBirth": "1990-01-31"},
                "location": {"city": "Brooklyn", "country": "US"},
                "custom": {"vip_shoppers": True, "score": i},
            },
        }
        for i in range(n)
    ]


def encoded(users: list[dict[str, Any]]) -> list[bytes]:
    """Records as the flush hands them over: each user's JSON object, UTF-8."""
    return [json.dumps(u, ensure_ascii=False).encode() for u in users]


@pytest.fixture
def client(sandbox: SandboxProcess) -> Iterator[AttentiveClient]:
    with AttentiveClient(KEY, sandbox.url, timeout=5.0) as c:
        yield c


def wait_terminal(client: AttentiveClient, job_id: str, timeout: float = 10.0) -> BulkJobStatus:
    """Poll with a deadline (never a fixed sleep) until the job is terminal."""
    deadline = time.monotonic() + timeout
    while True:
        status = client.job_status(job_id)
        if status.is_terminal:
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {status.status} after {timeout}s")
        time.sleep(0.02)


def requests_to(sandbox: SandboxProcess, endpoint: str, token: str = KEY) -> dict[str, int]:
    """Status code -> count of requests the sandbox saw on ``endpoint`` (``"0"`` = dropped)."""
    counts: dict[str, int] = sandbox.counters(token).get("requests", {}).get(endpoint, {})
    return counts


def assert_bodies_follow_contract(sandbox: SandboxProcess) -> list[dict[str, Any]]:
    logged = sandbox.requests(bodies=True)
    assert logged, "the sandbox accepted no bulk request"
    for entry in logged:
        body = entry["body"]
        assert schema_errors("UserAttributes", body) == []
        assert contract_problems(body) == []
    return logged


# --- success paths ------------------------------------------------------------------------------------


def test_me_ok(client: AttentiveClient) -> None:
    me = client.me()
    assert me.companyName == "Sandbox Company" and me.companyId


def test_me_unknown_key_is_unauthorized(sandbox: SandboxProcess) -> None:
    with AttentiveClient("no-such-key", sandbox.url) as c, pytest.raises(Unauthorized) as info:
        c.me()
    err = info.value
    assert err.status_code == 401 and err.error_id is not None
    assert err.attentive_message and "Unauthorized" in err.attentive_message


def test_submit_poll_and_read_results(sandbox: SandboxProcess, client: AttentiveClient) -> None:
    sandbox.set_options(processing_delay=60.0)  # IN_PROGRESS until the sandbox clock moves on
    sent = users(3)
    job_id = client.submit_bulk_json(encoded(sent))
    assert uuid.UUID(job_id)

    first = client.job_status(job_id)
    assert first.status == "IN_PROGRESS" and not first.is_terminal and first.url is None
    assert first.bulkJobId == job_id and first.totalRecords == 3

    sandbox.advance_clock(61.0)
    done = wait_terminal(client, job_id)
    assert done.is_success and done.totalRecords == 3 and done.url

    lines = list(client.iter_results(done.url))
    assert [ln.index for ln in lines] == [0, 1, 2]
    assert all(ln.succeeded and not ln.failed and not ln.unparseable for ln in lines)
    assert [ln.request for ln in lines] == sent

    logged = assert_bodies_follow_contract(sandbox)
    assert len(logged) == 1 and logged[0]["batchJobId"] == job_id and logged[0]["body"] == {"users": sent}
    stored = sandbox.user(phone="+19148440001")
    assert stored is not None and stored["custom"]["vip_shoppers"] is True


def test_full_batch_of_256(sandbox: SandboxProcess, client: AttentiveClient) -> None:
    job_id = client.submit_bulk_json(encoded(users(256)))
    done = wait_terminal(client, job_id)
    assert done.totalRecords == 256
    assert sum(1 for ln in client.iter_results(done.url or "") if ln.succeeded) == 256
    assert_bodies_follow_contract(sandbox)
    with pytest.raises(ValueError):
        client.submit_bulk_json(encoded(users(257)))
    assert len(sandbox.requests()) == 1


@pytest.mark.parametrize("status", ["FAILED", "CANCELLED", "NEEDS_REVIEW", "PENDING"])
def test_injected_job_statuses(sandbox: SandboxProcess, client: AttentiveClient, status: str) -> None:
    job_id = client.submit_bulk_json(encoded(users(1)))
    sandbox.set_job_status(job_id, status)
    seen = client.job_status(job_id)
    assert seen.status == status and seen.url is None and not seen.is_success
    assert seen.is_terminal is (status in ("FAILED", "CANCELLED"))


def test_per_record_validation_lands_in_results(sandbox: SandboxProcess, client: AttentiveClient) -> None:
    sandbox.set_options(validation="per_record")
    batch = users(2)
    batch[1]["identifiers"]["phone"] = "555-0100"
    done = wait_terminal(client, client.submit_bulk_json(encoded(batch)))
    lines = {ln.index: ln for ln in client.iter_results(done.url or "")}
    assert lines[0].succeeded
    assert lines[1].failed and lines[1].status_code == 400
    assert lines[1].message and "phone" in lines[1].message


# --- errors -------------------------------------------------------------------------------------------


def test_400_carries_the_message_naming_the_field(sandbox: SandboxProcess, client: AttentiveClient) -> None:
    batch = users(3)
    batch[2]["identifiers"]["phone"] = "19148440001"  # no leading +
    with pytest.raises(InvalidRequest) as info:
        client.submit_bulk_json(encoded(batch))
    err = info.value
    assert err.status_code == 400 and err.error_id is not None
    assert err.attentive_message and "users[2].identifiers.phone" in err.attentive_message
    assert "users[2].identifiers.phone" in str(err)
    assert err.limit == 100 and err.remaining is not None
    assert sandbox.requests() == []
    assert requests_to(sandbox, BULK) == {"400": 1}  # never retried


def test_403_with_readonly_key(sandbox: SandboxProcess) -> None:
    with AttentiveClient(READONLY, sandbox.url) as c:
        assert c.me().companyName  # reading works: /me says nothing about permissions
        with pytest.raises(Forbidden) as info:
            c.submit_bulk_json(encoded(users(1)))
    assert info.value.status_code == 403 and info.value.attentive_message
    assert sandbox.requests() == []


def test_429_without_retry_after(sandbox: SandboxProcess, client: AttentiveClient) -> None:
    sandbox.set_faults(fault_429=1.0)
    with pytest.raises(RateLimited) as info:
        client.submit_bulk_json(encoded(users(1)))
    err = info.value
    assert (err.status_code, err.retry_after, err.limit, err.remaining) == (429, None, 100, 0)
    assert requests_to(sandbox, BULK) == {"429": 1}  # not slept on, not retried in-process


def test_429_with_retry_after(sandbox: SandboxProcess, client: AttentiveClient) -> None:
    sandbox.set_faults(fault_429=1.0, retry_after=True)
    with pytest.raises(RateLimited) as info:
        client.job_status(str(uuid.uuid4()))
    assert info.value.retry_after == 1.0 and info.value.limit == 100
    assert requests_to(sandbox, JOB) == {"429": 1}


def test_real_rate_limit_burst(sandbox: SandboxProcess, client: AttentiveClient) -> None:
    """Not injected: the sandbox's own bucket (100/s per token) answers 429 once the burst is spent."""
    sandbox.set_options(rate_limit=5)
    unknown = str(uuid.uuid4())
    with pytest.raises(RateLimited) as info:
        for _ in range(50):
            with pytest.raises(NotFound):
                client.job_status(unknown)
    assert info.value.limit == 5 and info.value.remaining == 0


def test_5xx_is_server_error(sandbox: SandboxProcess, client: AttentiveClient) -> None:
    sandbox.set_faults(fault_5xx=1.0)
    for call in (
        lambda: client.submit_bulk_json(encoded(users(1))),
        lambda: client.job_status(str(uuid.uuid4())),
        client.me,
    ):
        with pytest.raises(ServerError) as info:
            call()
        assert info.value.status_code in (500, 503) and info.value.attentive_message
    assert sum(requests_to(sandbox, BULK).values()) == 1 and sandbox.requests() == []


def test_a_dropped_connection_is_one_transport_error_never_a_replay(
    sandbox: SandboxProcess, client: AttentiveClient
) -> None:
    """A request that went out is never replayed by the client: there is no idempotency key, so a
    replay could start a second job nobody tracks (the flush records the send as uncertain instead)."""
    sandbox.set_faults(drop_connections=1.0)
    with pytest.raises(TransportError) as info:
        client.submit_bulk_json(encoded(users(1)))
    err = info.value
    assert err.status_code is None and err.may_have_reached_server and "1 attempt" in str(err)
    assert requests_to(sandbox, BULK) == {"0": 1}
    sandbox.set_faults(drop_connections=0.0)
    assert client.submit_bulk_json(encoded(users(1)))  # the same client recovers (fresh connection)


def test_a_refused_connection_is_retried_in_the_call(sandbox: SandboxProcess) -> None:
    """Only a request that never left is retried in the call: a closed port, then the sandbox."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    dead = AttentiveClient("test-key", base_url=f"http://127.0.0.1:{closed_port}", max_attempts=3)
    with pytest.raises(TransportError) as info:
        dead.me()
    assert "3 attempt" in str(info.value) and info.value.may_have_reached_server is False
    dead.close()


def test_unknown_job_is_not_found(client: AttentiveClient) -> None:
    with pytest.raises(NotFound) as info:
        client.job_status(str(uuid.uuid4()))
    assert info.value.status_code == 404
    with pytest.raises(NotFound):
        client.job_status("a/b?c")  # encoded, never reaches another route


def test_dropped_job_is_not_found(sandbox: SandboxProcess, client: AttentiveClient) -> None:
    sandbox.set_faults(drop_jobs=1.0)
    job_id = client.submit_bulk_json(encoded(users(1)))
    with pytest.raises(NotFound):
        client.job_status(job_id)


def test_expired_job_and_results(sandbox: SandboxProcess, client: AttentiveClient) -> None:
    done = wait_terminal(client, client.submit_bulk_json(encoded(users(1))))
    sandbox.advance_clock(15 * 24 * 3600)
    with pytest.raises(NotFound):
        client.job_status(done.bulkJobId)
    with pytest.raises(NotFound):
        list(client.iter_results(done.url or ""))


# --- secrets and connections --------------------------------------------------------------------------


def test_key_never_logged_and_connection_reused(
    sandbox: SandboxProcess, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "test-key"
    with caplog.at_level(logging.DEBUG), AttentiveClient(secret, sandbox.url) as c:
        c.me()
        done = wait_terminal(c, c.submit_bulk_json(encoded(users(2))))
        list(c.iter_results(done.url or ""))
        with pytest.raises(InvalidRequest) as info:
            c.submit_bulk_json(encoded([{"identifiers": {}}]))
        assert secret not in repr(c) and secret not in str(info.value) and secret not in repr(info.value)
    text = "\n".join(f"{r.name} {r.getMessage()} {r.args!r}" for r in caplog.records)
    assert secret not in text
    assert "member0@example.com" not in text  # no bodies in logs
    connects = [r for r in caplog.records if r.name.startswith("httpcore") and "connect_tcp.started" in r.msg]
    assert len(connects) == 1, "keep-alive: every call should reuse the one loopback connection"
