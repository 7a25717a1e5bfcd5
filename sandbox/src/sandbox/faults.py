"""Fault injection: seeded random rolls and dropping a connection without any response.

Dropping a connection under uvicorn: an ASGI app cannot normally close its socket (raising or returning
without a response makes uvicorn answer 500). The ``send`` callable uvicorn hands to the app is a bound
method of its per-request cycle object, which holds the asyncio transport. The outermost ASGI layer
(``sandbox.app.Sandbox.__call__``, before Starlette wraps ``send``) sets SO_LINGER to 0 on that socket
and calls ``transport.abort()``: the kernel sends a TCP RST, the client sees a transport error
(connection reset / server disconnected without a response). Uvicorn then sees the connection lost and
does not try to answer. If the transport cannot be found (another server), we fall back to sending
nothing but an ``http.response.start`` that never completes, which still leaves the client without a
usable response.

Two faults use it: ``drop_connections`` before a request is processed, ``drop_after_accept`` after an
accepted bulk POST was processed (its job exists; only the 202 is lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
from typing import Any

from sandbox.options import Options


class FaultDice:
    """Seeded rolls, so a run with ``--seed`` is reproducible."""

    def __init__(self, seed: int | None) -> None:
        self.rng = random.Random(seed)

    def roll(self, fraction: float) -> bool:
        return fraction > 0.0 and self.rng.random() < fraction

    def server_error(self) -> int:
        """500 or 503, evenly split."""
        return 500 if self.rng.random() < 0.5 else 503

    def completion_delay(self, options: Options) -> float:
        """Seconds until a job completes: fixed for fifo, widely jittered (0.1x to 3x) for random."""
        if options.completion_order == "random":
            return options.processing_delay * self.rng.uniform(0.1, 3.0)
        return options.processing_delay


async def drop_connection(send: Any) -> bool:
    """Reset the client's connection without a response; True when the transport was found."""
    cycle = getattr(send, "__self__", None)
    transport: Any = getattr(cycle, "transport", None)
    # Duck-typed: uvloop's transports do not subclass asyncio.BaseTransport.
    if not callable(getattr(transport, "abort", None)) or not callable(
        getattr(transport, "get_extra_info", None)
    ):
        return False
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
    # Let uvicorn's connection_lost run so it marks the cycle disconnected and sends no 500.
    for _ in range(10):
        if getattr(cycle, "disconnected", True):
            break
        await asyncio.sleep(0)
    return True
