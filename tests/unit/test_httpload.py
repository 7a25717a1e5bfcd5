"""The load generator behind the sandbox benchmark's fallback (no ``wrk``) and its rate-limit test.

It runs here on a clock the test controls: an event loop whose time stands still while anything can
run and jumps to the next timer when every task waits for one, and in-memory connections instead
of sockets. What the generator sends therefore depends on its schedule alone, never on how busy the
machine is, so the counts below are exact. (Real sockets are exercised by the sandbox rate-limit
test in tests/integration/test_sandbox_http.py.)
"""

from __future__ import annotations

import asyncio
import selectors
import types
from typing import Any

import pytest

from tests import httpload
from tests.httpload import Outcome, encode_request, offer


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop on a virtual clock: when nothing is ready, time jumps to the next timer."""

    def __init__(self) -> None:
        self.now = 0.0
        super().__init__(_JumpingSelector(self))

    def time(self) -> float:
        return self.now


class _JumpingSelector(selectors.SelectSelector):
    """Never blocks: a wait for the next timer is spent by moving the loop's clock instead."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:  # nothing ready, no timer: with no sockets, nothing can ever wake the loop
            raise RuntimeError("virtual-time loop idle with no timer: the test deadlocked")
        if timeout > 0:
            self._loop.now += timeout
        return super().select(0)


class _PipeWriter:
    """One direction of an in-memory connection: what is written lands in the peer's reader."""

    def __init__(self, peer: asyncio.StreamReader) -> None:
        self._peer = peer

    def write(self, data: bytes) -> None:
        self._peer.feed_data(data)

    async def drain(self) -> None:
        return None

    def close(self) -> None:
        if not self._peer.at_eof():
            self._peer.feed_eof()


def _offer_to_a_slow_server(
    monkeypatch: pytest.MonkeyPatch, answer_after: float, rate: float, seconds: float
) -> list[Outcome]:
    """Run ``offer`` over two connections to a server answering ``answer_after`` seconds after each request."""

    async def handle(reader: asyncio.StreamReader, writer: Any) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                await asyncio.sleep(answer_after)
                writer.write(b"HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n\r\n{}")
                await writer.drain()
        except asyncio.IncompleteReadError:
            writer.close()

    servers: list[asyncio.Task[None]] = []

    async def open_connection(host: str, port: int) -> tuple[asyncio.StreamReader, _PipeWriter]:
        to_server, to_client = asyncio.StreamReader(), asyncio.StreamReader()
        servers.append(asyncio.ensure_future(handle(to_server, _PipeWriter(to_client))))
        return to_client, _PipeWriter(to_server)

    async def run() -> list[Outcome]:
        outcomes = await offer("load.test", 80, encode_request("GET", "/", "load.test", {}), rate, seconds, 2)
        await asyncio.gather(*servers)  # each server saw its connection closed
        return outcomes

    monkeypatch.setattr(asyncio, "open_connection", open_connection)
    monkeypatch.setattr(
        httpload, "time", types.SimpleNamespace(monotonic=lambda: asyncio.get_running_loop().time())
    )
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        outcomes = runner.run(run())
    assert {o.status for o in outcomes} == {202}
    return outcomes


def test_a_server_slower_than_the_offered_rate_ends_the_run_on_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # 300 slots are due in 0.3 s, but two connections answered every 40 ms carry 8 requests each
    # (sent at 0, 40, ..., 280 ms): the generator stops sending at 0.3 s instead of working through
    # every slot. Bug caught: a generator that sends every slot (300 requests, ending at 6 s).
    outcomes = _offer_to_a_slow_server(monkeypatch, answer_after=0.04, rate=1000, seconds=0.3)
    assert len(outcomes) == 16
    assert max(o.at for o in outcomes) <= 0.3 + 0.04 + 0.001  # nothing sent after 0.3 s


def test_a_server_that_keeps_up_gets_every_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    # 15 slots in 0.3 s at 50/s, each sent at its due time k / 50 (an instant server answers at once).
    # Bugs caught: a slot dropped or added (off by one in the slot count or the time check), and
    # slots sent as fast as possible instead of at their due times.
    outcomes = _offer_to_a_slow_server(monkeypatch, answer_after=0.0, rate=50, seconds=0.3)
    assert sorted(o.at for o in outcomes) == pytest.approx([k / 50 for k in range(15)], abs=1e-9)
