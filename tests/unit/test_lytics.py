"""Lytics segment scan client: paging by ``_next``, the raw-token header, and every failure class."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from worker.clients.lytics import (
    MAX_PAGE_SIZE,
    LyticsAuthError,
    LyticsBadResponse,
    LyticsClient,
    LyticsRateLimited,
    LyticsRetryable,
    ScanPage,
    lytics_api_url,
)

TOKEN = "lytics-secret-token-123"
BASE = "https://lytics.test"


class FakeScan:
    """Serves ``members`` in pages; ``replies`` (statuses or exceptions) are answered first, in turn."""

    def __init__(self, members: int = 0, replies: list[int | Exception] | None = None) -> None:
        self.members = [{"email": f"m{i}@x.io"} for i in range(members)]
        self.replies = list(replies or [])
        self.requests: list[httpx.Request] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.replies:
            reply = self.replies.pop(0)
            if isinstance(reply, Exception):
                raise reply
            headers = {"retry-after": "2"} if reply == 429 else None
            return httpx.Response(reply, json={"status": reply, "message": f"said {reply}"}, headers=headers)
        limit = int(request.url.params["limit"])
        offset = int(request.url.params.get("start") or 0)
        page = self.members[offset : offset + limit]
        end = offset + len(page)
        nxt = str(end) if end < len(self.members) else ""
        return httpx.Response(
            200,
            json={
                "status": 200,
                "message": "success",
                "_next": nxt,
                "total": len(self.members),
                "data": page,
            },
        )


def client(fake: FakeScan, sleeps: list[float] | None = None, attempts: int = 3) -> LyticsClient:
    record = sleeps if sleeps is not None else []
    return LyticsClient(
        TOKEN, BASE, transport=httpx.MockTransport(fake.handler), attempts=attempts, sleep=record.append
    )


def every_page(c: LyticsClient, segment: str, limit: int = MAX_PAGE_SIZE) -> list[ScanPage]:
    """Page after page, handing back each page's ``_next``, as the backfill steps do."""
    pages = [c.scan_page(segment, limit=limit)]
    while not pages[-1].last:
        pages.append(c.scan_page(segment, pages[-1].next_token, limit))
    return pages


def test_scan_follows_next_until_empty_with_limit_and_raw_token() -> None:
    fake = FakeScan(members=250)
    with client(fake) as c:
        pages = every_page(c, "seg1")
    assert [len(p.members) for p in pages] == [100, 100, 50]
    assert [p.next_token for p in pages] == ["100", "200", ""]
    assert pages[-1].last and not pages[0].last
    assert {p.total for p in pages} == {250}
    assert [m["email"] for p in pages for m in p.members] == [f"m{i}@x.io" for i in range(250)]
    first, second = fake.requests[0], fake.requests[1]
    assert first.url.path == "/api/segment/seg1/scan"
    assert first.headers["authorization"] == TOKEN  # no "Bearer"
    assert first.url.params["limit"] == "100" and "start" not in first.url.params
    assert second.url.params["start"] == "100"


def test_page_size_is_configurable_and_bounded() -> None:
    fake = FakeScan(members=25)
    with client(fake) as c:
        assert [len(p.members) for p in every_page(c, "s", limit=10)] == [10, 10, 5]
        with pytest.raises(ValueError):
            c.scan_page("s", limit=101)


def test_empty_segment_is_one_last_page() -> None:
    with client(FakeScan(members=0)) as c:
        [page] = every_page(c, "s")
    assert page.members == [] and page.last


@pytest.mark.parametrize("status", [401, 403])
def test_auth_errors_are_not_retried_and_never_show_the_token(status: int) -> None:
    fake = FakeScan(members=5, replies=[status])
    with client(fake) as c, pytest.raises(LyticsAuthError) as info:
        c.scan_page("seg1")
    assert len(fake.requests) == 1
    assert str(status) in str(info.value) and "seg1" in str(info.value)
    assert TOKEN not in str(info.value) and TOKEN not in repr(c)


def test_token_echoed_by_the_server_is_masked() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"message": f"bad token {TOKEN}"})

    with (
        LyticsClient(TOKEN, BASE, transport=httpx.MockTransport(handler)) as c,
        pytest.raises(LyticsAuthError) as info,
    ):
        c.scan_page("s")
    assert TOKEN not in str(info.value) and "••••" in str(info.value)


def test_429_waits_for_retry_after_then_succeeds() -> None:
    sleeps: list[float] = []
    fake = FakeScan(members=3, replies=[429])
    with client(fake, sleeps) as c:
        page = c.scan_page("s")
    assert len(page.members) == 3 and sleeps == [2.0]


def test_retry_after_as_an_http_date_is_honoured_and_capped() -> None:
    when = datetime.now(UTC) + timedelta(seconds=60)
    replies = [
        httpx.Response(429, headers={"retry-after": format_datetime(when, usegmt=True)}),
        httpx.Response(429, headers={"retry-after": "3"}),
    ]
    sleeps: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        return replies.pop(0) if replies else FakeScan(members=1).handler(request)

    with LyticsClient(TOKEN, BASE, transport=httpx.MockTransport(handler), sleep=sleeps.append) as c:
        assert len(c.scan_page("s").members) == 1
    assert sleeps == [10.0, 3.0]  # a minute away: waited out later, not inside one call


def test_429_that_outlasts_the_retries_says_when_to_come_back() -> None:
    fake = FakeScan(members=3, replies=[429, 429, 429])
    with client(fake) as c, pytest.raises(LyticsRateLimited) as info:
        c.scan_page("s")
    assert info.value.retry_after == 2.0 and len(fake.requests) == 3


def test_5xx_and_dropped_connections_are_retried_a_few_times() -> None:
    sleeps: list[float] = []
    fake = FakeScan(members=3, replies=[503, httpx.ConnectError("boom")])
    with client(fake, sleeps) as c:
        assert len(c.scan_page("s").members) == 3
    assert len(fake.requests) == 3 and len(sleeps) == 2 and all(0 < s <= 10 for s in sleeps)

    fake = FakeScan(members=3, replies=[500, 502, 503])
    with client(fake) as c, pytest.raises(LyticsRetryable) as info:
        c.scan_page("s")
    assert "503" in str(info.value) and not isinstance(info.value, LyticsRateLimited)


def test_timeout_is_retryable() -> None:
    fake = FakeScan(members=1, replies=[httpx.ReadTimeout("slow")] * 3)
    with client(fake) as c, pytest.raises(LyticsRetryable, match="timed out"):
        c.scan_page("s")


@pytest.mark.parametrize(
    ("reply", "match"),
    [
        (httpx.Response(404, json={"status": 404, "message": "segment not found"}), "404.*segment not found"),
        (httpx.Response(400, json={"status": 400, "message": "invalid scan id"}), "400"),
        (httpx.Response(200, text="<html>"), "not JSON"),
        (httpx.Response(200, json={"data": {"not": "a list"}}), "'data' is not a list"),
    ],
)
def test_other_answers_are_bad_responses_without_retry(reply: httpx.Response, match: str) -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return reply

    with (
        LyticsClient(TOKEN, BASE, transport=httpx.MockTransport(handler)) as c,
        pytest.raises(LyticsBadResponse, match=match),
    ):
        c.scan_page("s")
    assert len(calls) == 1


def test_missing_token_is_refused_up_front() -> None:
    with pytest.raises(LyticsAuthError):
        LyticsClient("", BASE)


def test_base_url_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LYTICS_API_URL", raising=False)
    assert lytics_api_url() == "https://api.lytics.io"
    monkeypatch.setenv("LYTICS_API_URL", "http://127.0.0.1:9999/")
    assert lytics_api_url() == "http://127.0.0.1:9999"
