"""A minimal open-loop HTTP/1.1 load generator on raw asyncio streams.

httpx costs about a millisecond of client CPU per request, too much to offer 300 requests/s reliably
on a shared two-core machine; this sends pre-encoded requests on keep-alive connections for a few tens
of microseconds each. Used by the sandbox rate-limit test and by ``bench/bench_sandbox.py`` (as
``python -m tests.httpload``, so the client runs in its own process).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass


@dataclass
class Outcome:
    """One answered request: seconds since the run started, status, lower-cased headers."""

    at: float
    status: int
    headers: dict[str, str]


def encode_request(method: str, path: str, host: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split(" ", 2)[1]), headers


async def offer(
    host: str, port: int, request: bytes, rate: float, seconds: float, connections: int = 16
) -> list[Outcome]:
    """Offer ``request`` at ``rate``/s for ``seconds`` over ``connections`` keep-alive connections.

    Slot k is due at ``k / rate``; connection c takes slots c, c+N, c+2N... and sends late slots at once,
    so the offered rate holds as long as the server answers within N/rate seconds. Nothing is sent
    after ``seconds``: a server slower than the offered rate ends the run on time with fewer requests
    (otherwise a very high ``rate`` would mean waiting for every slot to be answered).
    """
    total = int(rate * seconds)
    outcomes: list[Outcome] = []
    start = time.monotonic()

    async def worker(c: int) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for k in range(c, total, connections):
                if time.monotonic() - start >= seconds:
                    break
                delay = start + k / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                writer.write(request)
                status, headers = await _read_response(reader)
                outcomes.append(Outcome(time.monotonic() - start, status, headers))
        finally:
            writer.close()

    await asyncio.gather(*(worker(c) for c in range(min(connections, total))))
    return outcomes


def main(argv: list[str]) -> int:
    """CLI for benchmarks: prints a JSON list of [seconds, status] pairs."""
    p = argparse.ArgumentParser(prog="python -m tests.httpload")
    p.add_argument("--url", required=True, help="http://host:port/path")
    p.add_argument("--method", default="POST")
    p.add_argument("--header", action="append", default=[], help="Name: value")
    p.add_argument("--body-file")
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--connections", type=int, default=16)
    args = p.parse_args(argv)
    rest = args.url.removeprefix("http://")
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.partition(":")
    body = open(args.body_file, "rb").read() if args.body_file else b""  # noqa: SIM115
    headers = dict(h.split(": ", 1) for h in args.header)
    request = encode_request(args.method, "/" + path, hostport, headers, body)
    outcomes = asyncio.run(offer(host, int(port or 80), request, args.rate, args.seconds, args.connections))
    json.dump([[o.at, o.status] for o in outcomes], sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
