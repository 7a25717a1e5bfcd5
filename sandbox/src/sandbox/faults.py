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
import math
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

    def completion_delay(self, options: Options, job_seq: int) -> float:
        """Seconds until job number ``job_seq`` completes: ``processing_delay``, times its
        :func:`processing_factor` when ``processing_spread`` is set, times a wide jitter (0.1x to 3x,
        from this seeded sequence) with random completion order."""
        delay = options.processing_delay
        if options.processing_spread > 0:
            delay *= processing_factor(options.seed, job_seq, options.processing_spread)
        if options.completion_order == "random":
            delay *= self.rng.uniform(0.1, 3.0)
        return delay


def processing_factor(seed: int | None, job_seq: int, spread: float) -> float:
    """A lognormal factor with median 1 and sigma ``spread`` for job number ``job_seq``.

    Drawn from its own generator seeded by (seed, job number), not from the fault dice: the same job
    gets the same delay in every run with that seed, whatever faults were rolled before it, and
    turning a fault on does not change the processing model. No seed counts as seed 0.
    """
    z = random.Random(f"processing:{seed or 0}:{job_seq}").gauss(0.0, 1.0)
    return math.exp(spread * z)


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
