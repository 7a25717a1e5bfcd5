"""The results fast path: lines that plainly report a 2xx are skipped, and nothing else is.

The line format is undocumented (CONTRACT.md §2), so reading only the failed and unreadable lines
(``iter_results(url).skipping_plain_successes()``) must find exactly what the full, lenient parse
finds: every failure shape, in every position of the file, and every unreadable line.
"""

from __future__ import annotations

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.clients.attentive import AttentiveClient, ResultLine
from worker.clients.attentive import client as client_module

URL = "https://files.test/r.jsonl"
REQUEST = '"request":{"identifiers":{"email":"a@x.io"},"attributes":{"custom":{"vip":true}}}'

#: Lines the full parse reports as failed: the status under every key it looks at, as a number or a
#: string, in the response or at the top level, beside other keys that look like a success.
FAILED = [
    '{"index":0,' + REQUEST + ',"response":{"statusCode":400,"body":{"error":{"id":1,"message":"bad"}}}}',
    '{"index":0,"response":{"statusCode":413,"body":{}}}',
    '{"index":0,"response":{"statusCode":429}}',
    '{"index":0,"response":{"statusCode":500,"body":{}}}',
    '{"index":0,"response":{"statusCode":503,"body":"unavailable"}}',
    '{"index":0,"response":{"statusCode":"400"}}',
    '{"index":0,"response":{"statusCode":"413 Payload Too Large"}}',
    '{"index":0,"response":{"status":400}}',
    '{"index":0,"response":{"status":"500"}}',
    '{"index":0,"response":{"code":413,"message":"Record exceeds 1 MiB"}}',
    '{"index":0,"response":{"code":"422"}}',
    '{"index":0,"response":{"statusCode":null,"status":500}}',
    '{"index":0,"response":{"statusCode":true,"code":400}}',
    '{"index":0,"response":{"statusCode":202.5,"status":500}}',
    '{"index":0,"response":{"statusCode":2020,"code":404}}',
    '{"index":0,"response":{"body":{"statusCode":202}},"status":500}',
    '{"index":0,"response":"413"}',
    '{"index":0,"response":"500 Internal Server Error"}',
    '{"index":0,"response":413}',
    '{"index":0,"statusCode":400,"message":"bad"}',
    '{"index":"0","status":"413"}',
    '{"index":0,"code":500,"message":"boom"}',
    '{"index":0,"response":null,"code":500}',
    '{"index":0,"response":[],"status":400}',
    '{"index":0,"response":{"statusCode":500},"request":{"response":{"statusCode":202,"body":{}}}}',
    # duplicate keys: the last one counts, for orjson and the standard library alike
    '{"index":0,"response":{"statusCode":202,"statusCode":500}}',
    '{"index":0,"response":{"statusCode":202},"response":{"statusCode":400}}',
    # orjson refuses NaN: the lenient parse still reads the failure
    '{"index":0,"response":{"statusCode":500},"score":NaN}',
    # a success nested deeper than the response does not count
    '{"index":0,"response":{"status":400,"body":{"statusCode":202}}}',
]

#: Lines the full parse cannot read: unreadable, whatever success they seem to report.
UNREADABLE = [
    '{"index":0,"request":{"email":},"response":{"statusCode":202,"body":{}}}',
    '{"index":0,"response":{"statusCode":202,"body":{}}',
    '"response":{"statusCode":202,"body":{}}}',
    '{"index":0,"response":{"statusCode":202,"body":{}}} trailing',
    '[{"index":0,"response":{"statusCode":202}}]',
    "202",
    '"ok"',
    "not json at all",
    '{"index":0,"response":{"statusCode":202}},{"index":1,"response":{"statusCode":202}}',
]

#: Lines that are plainly a success: skipped.
PLAIN = [
    '{"index":0,' + REQUEST + ',"response":{"statusCode":202,"body":{}}}',
    '{"index":0,"response":{"statusCode":200}}',
    '{"index":0,"response":{"statusCode":299,"body":{"error":{"message":"ignored"}}}}',
    '{"index":0,"response":{"statusCode":202},"status":500,"code":413}',  # the response's code wins
    '{"response":{"statusCode":204},"index":"7"}',
    '{"index":0,"response":{"statusCode":400},"response":{"statusCode":202}}',
    '{"index":0,"response":{"statusCode":202},"big":123456789012345678901234567890}',
]

#: Neither failed nor unreadable, and not plainly a success: read in full, not skipped.
NEITHER = [
    '{"index":0,"response":{"statusCode":202.0}}',
    '{"index":0,"response":{"statusCode":"202"}}',
    '{"index":0,"response":{"status":202}}',
    '{"index":0,"response":{"statusCode":302}}',
    '{"index":0,"response":{"statusCode":199}}',
    '{"index":0}',
    "{}",
]


def _read(body: str | bytes, skip: bool) -> list[ResultLine]:
    """The lines ``iter_results`` yields for a file holding ``body``, in full or skipping."""
    content = body.encode() if isinstance(body, str) else body
    transport = httpx.MockTransport(lambda _request: httpx.Response(200, content=content))
    with AttentiveClient("k", "https://attentive.test", transport=transport) as client:
        lines = client.iter_results(URL)
        return list(lines.skipping_plain_successes() if skip else lines)


def _problems(lines: list[ResultLine]) -> list[ResultLine]:
    return [ln for ln in lines if ln.failed or ln.unparseable]


@pytest.mark.parametrize("line", FAILED)
def test_every_failure_shape_is_read_in_full(line: str) -> None:
    assert not ResultLine.plainly_succeeded(line.encode())
    [full] = _read(line, skip=False)
    assert full.failed
    assert _read(line, skip=True) == [full]


@pytest.mark.parametrize("line", UNREADABLE)
def test_every_unreadable_line_is_reported(line: str) -> None:
    assert not ResultLine.plainly_succeeded(line.encode())
    [full] = _read(line, skip=False)
    assert full.unparseable
    assert _read(line, skip=True) == [full]


@pytest.mark.parametrize("line", PLAIN)
def test_plain_successes_are_skipped(line: str) -> None:
    assert ResultLine.plainly_succeeded(line.encode())
    [full] = _read(line, skip=False)
    assert full.succeeded and not full.failed and not full.unparseable
    assert _read(line, skip=True) == []


@pytest.mark.parametrize("line", NEITHER)
def test_lines_that_are_not_plainly_a_success_are_read_in_full(line: str) -> None:
    assert not ResultLine.plainly_succeeded(line.encode())
    [full] = _read(line, skip=False)
    assert not full.failed and not full.unparseable
    assert _read(line, skip=True) == [full]


@pytest.mark.parametrize("position", [0, 1, 127, 254, 255])
@pytest.mark.parametrize("line", [*FAILED, *UNREADABLE])
def test_a_failure_anywhere_among_256_successes_is_found(line: str, position: int) -> None:
    lines = [PLAIN[0].replace('"index":0', f'"index":{i}') for i in range(256)]
    lines[position] = line
    body = "\n".join(lines) + "\n"

    full = _read(body, skip=False)
    [found] = _read(body, skip=True)

    assert len(full) == 256 and _problems(full) == [found]
    assert found.line_number == position


def test_an_overlong_line_is_still_reported_when_skipping(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_module, "MAX_RESULT_LINE_BYTES", 100)
    body = f'{PLAIN[1]}\n{{"index":1,"response":{{"statusCode":202}},"x":"{"y" * 200}"}}\n{FAILED[1]}\n'
    got = _read(body, skip=True)
    assert [ln.line_number for ln in got] == [1, 2]
    assert got[0].unparseable and "longer than 100 bytes" in (got[0].parse_error or "")
    assert got[1].failed


_SHAPES = st.sampled_from([*FAILED, *UNREADABLE, *PLAIN, *NEITHER])


@settings(max_examples=200, deadline=None)
@given(st.lists(_SHAPES, max_size=40), st.sampled_from(["\n", "\r\n", "\n\n  \n"]))
def test_skipping_finds_exactly_what_the_full_parse_finds(lines: list[str], newline: str) -> None:
    body = newline.join(lines)
    full = _read(body, skip=False)
    skipped = _read(body, skip=True)

    assert _problems(skipped) == _problems(full)
    kept = {ln.line_number for ln in skipped}
    assert all(ln.succeeded for ln in full if ln.line_number not in kept)
    assert [ln for ln in full if ln.line_number in kept] == skipped


def test_results_are_read_lazily_and_skipping_is_chosen_before_reading() -> None:
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(200, text=f"{FAILED[0]}\n{FAILED[1]}\n")

    with AttentiveClient("k", "https://attentive.test", transport=httpx.MockTransport(handler)) as client:
        lines = client.iter_results(URL)
        assert requests == []
        assert next(lines.skipping_plain_successes()).failed
        with pytest.raises(RuntimeError):
            lines.skipping_plain_successes()
        lines.close()
        assert list(lines) == [] and len(requests) == 1
        assert "authorization" not in requests[0].headers
