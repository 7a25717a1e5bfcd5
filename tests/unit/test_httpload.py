"""The load generator behind the sandbox benchmark's fallback (no ``wrk``) and its rate-limit test."""

from __future__ import annotations

import asyncio

from tests.httpload import encode_request, offer


async def _offer_to_a_slow_server(answer_after: float, rate: float, seconds: float) -> int:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                await asyncio.sleep(answer_after)
                writer.write(b"HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n\r\n{}")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    request = encode_request("GET", "/", f"127.0.0.1:{port}", {})
    async with server:
        outcomes = await offer("127.0.0.1", port, request, rate, seconds, connections=2)
    assert {o.status for o in outcomes} == {202}
    return len(outcomes)


def test_a_server_slower_than_the_offered_rate_ends_the_run_on_time() -> None:
    # 300 slots are due in 0.3 s, but two connections answered every 50 ms can carry about 14:
    # the generator stops sending at 0.3 s instead of working through every slot.
    sent = asyncio.run(_offer_to_a_slow_server(answer_after=0.05, rate=1000, seconds=0.3))
    assert 2 <= sent <= 2 * (0.3 / 0.05 + 1)


def test_a_server_that_keeps_up_gets_every_slot() -> None:
    assert asyncio.run(_offer_to_a_slow_server(answer_after=0.0, rate=50, seconds=0.3)) == 15
