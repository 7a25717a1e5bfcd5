"""The wire between the workers and the sandbox: a small HTTP/1.1 proxy that records what crossed it.

Why it exists: the sandbox counts requests per endpoint, not per Attentive job, so it cannot say
whether a worker ever asked about a given job. The proxy can, and it also sees whether a worker was
still there to read an answer. Per bulk POST it records the job id Attentive (the sandbox) answered,
whether that answer reached the worker (``delivered``) or the worker's connection closed first
(``gone``: killed, or gave up waiting), and the worker's local port (the harness maps it to a
process, to kill the one whose flush holds a batch in flight). Per job-status GET: the job id, the
HTTP status and the job status it carried. Per results download: the job id.

It also makes *slow jobs*: with ``slow_fraction`` > 0 a share of accepted jobs is pinned ``PENDING``
through the sandbox's admin API before the 202 is passed on (so no worker can see the job
finish early), then released ``IN_PROGRESS`` after ``slow_min``..``slow_max`` seconds (it then
completes after the sandbox's processing delay, or fails if the fail-jobs fault chose it). Jobs whose
answer no worker reads are rolled for too, as Attentive cannot tell: a worker killed mid-request, and
a request the sandbox reset after accepting it (drop-after-accept: the proxy finds that job in
``/_sandbox/jobs``). These orphans are what the product's holds and leases must outlast.

Faithful to the sandbox's faults: a connection the sandbox resets (dropped connections, the
drop-after-accept fault) is reset towards the worker too (RST, no answer). The proxy never closes a
worker's idle connection itself, and reconnects upstream before uvicorn's keep-alive timeout, so it
adds no transport errors of its own. Requests are forwarded byte for byte (the ``Host`` header too, so
results URLs point back at the proxy). Only what httpx and uvicorn use is supported: requests with a
``Content-Length`` (or none), responses with a length, chunked, or ending at close.

Admin routes (never forwarded): ``GET /_proxy/health``, ``PUT /_proxy/options`` (``slow_fraction``,
``slow_min``, ``slow_max``), ``GET /_proxy/inflight`` (bulk POSTs waiting for their answer),
``GET /_proxy/pinned`` (slow jobs not released yet), ``POST /_proxy/release`` (release them all now),
``GET /_proxy/log``.

Run: ``python -m tests.chaos.proxy --port P --upstream 127.0.0.1:SANDBOX_PORT --seed N``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import random
import re
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any

BULK = b"/v2/bulk/user/attributes"
JOB_STATUS = re.compile(rb"^/v2/bulk/job/([^/?\s]+)")
RESULTS = re.compile(rb"^/results/([^/?\s]+)\.jsonl")
#: Reconnect upstream when its connection idled this long (uvicorn closes idle ones after 5 s).
UPSTREAM_IDLE_SECONDS = 3.0
READ_SIZE = 65536


class Eof(Exception):
    """The peer closed its side; ``partial`` holds bytes read before that."""

    def __init__(self, partial: bytes = b"") -> None:
        super().__init__("eof")
        self.partial = partial


class Reader:
    """A StreamReader with its own buffer, so bytes read while watching for EOF are not lost."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.buf = bytearray()

    async def fill(self) -> bytes:
        data = await self.reader.read(READ_SIZE)
        if not data:
            raise Eof(bytes(self.buf))
        self.buf += data
        return data

    async def until(self, sep: bytes) -> bytes:
        start = 0
        while True:
            i = self.buf.find(sep, start)
            if i >= 0:
                out = bytes(self.buf[: i + len(sep)])
                del self.buf[: i + len(sep)]
                return out
            start = max(0, len(self.buf) - len(sep) + 1)
            await self.fill()

    async def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            await self.fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def to_eof(self) -> bytes:
        try:
            while True:
                await self.fill()
        except Eof:
            pass
        out = bytes(self.buf)
        self.buf.clear()
        return out


@dataclass
class Message:
    head: bytes
    first: list[bytes]
    headers: dict[bytes, bytes]
    body: bytes = b""

    @property
    def raw(self) -> bytes:
        return self.head + self.body


def parse_head(head: bytes) -> tuple[list[bytes], dict[bytes, bytes]]:
    lines = head[:-4].split(b"\r\n")
    first = lines[0].split(b" ", 2)
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return first, headers


async def read_message(reader: Reader, response_to: bytes | None = None) -> Message:
    """One request (``response_to`` None) or the response to a request with method ``response_to``."""
    head = await reader.until(b"\r\n\r\n")
    first, headers = parse_head(head)
    msg = Message(head, first, headers)
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        parts = []
        while True:
            size_line = await reader.until(b"\r\n")
            parts.append(size_line)
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers, then an empty line
                    trailer = await reader.until(b"\r\n")
                    parts.append(trailer)
                    if trailer == b"\r\n":
                        break
                break
            parts.append(await reader.exactly(size + 2))
        msg.body = b"".join(parts)
    elif b"content-length" in headers:
        msg.body = await reader.exactly(int(headers[b"content-length"]))
    elif response_to is not None:
        status = int(first[1]) if len(first) > 1 and first[1].isdigit() else 0
        if response_to != b"HEAD" and status >= 200 and status not in (204, 304):
            msg.body = await reader.to_eof()
    return msg


def _json_body(msg: Message) -> Any:
    try:
        return json.loads(msg.body)
    except ValueError:
        return None


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (as the sandbox does when it drops a connection)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass
class Options:
    slow_fraction: float = 0.0
    slow_min: float = 3.0
    slow_max: float = 20.0


@dataclass
class Log:
    """What crossed the wire. Times are ``time.time()`` seconds."""

    #: bulk POSTs: {"t0", "t1", "conn", "port", "status", "job", "delivered", "gone"}
    posts: list[dict[str, Any]] = field(default_factory=list)
    #: job-status GETs: [t, job id, HTTP status, job status or None]
    gets: list[list[Any]] = field(default_factory=list)
    #: results downloads: [t, job id, HTTP status]
    results: list[list[Any]] = field(default_factory=list)
    #: connections: conn id -> {"port", "opened", "closed", "how"}
    conns: dict[int, dict[str, Any]] = field(default_factory=dict)
    #: slow jobs: job id -> {"pinned", "release_at", "released", "late"}
    pins: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: other requests by "METHOD path-prefix status" -> count
    other: dict[str, int] = field(default_factory=dict)
    #: jobs found in the sandbox after a reset (their 202 never came by)
    unseen: list[str] = field(default_factory=list)


class Proxy:
    def __init__(self, upstream_host: str, upstream_port: int, options: Options, seed: int) -> None:
        self.host = upstream_host
        self.port = upstream_port
        self.options = options
        self.rng = random.Random(seed)
        self.log = Log()
        self.ids = itertools.count(1)
        #: bulk POSTs waiting for their answer: conn id -> {"port", "since"}
        self.inflight: dict[int, dict[str, Any]] = {}
        self.release_tasks: dict[str, asyncio.Task[None]] = {}
        #: job ids seen in a 202 (or found after a reset), so a reset's job is told apart
        self.known_jobs: set[str] = set()

    # -- admin calls to the sandbox (own short connections)

    async def sandbox_admin(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            payload = json.dumps(body).encode() if body is not None else b""
            writer.write(
                f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
            msg = await read_message(Reader(reader), response_to=method.encode())
            return int(msg.first[1]), _json_body(msg)
        finally:
            writer.close()

    async def pin_unseen(self, since: float) -> None:
        """Roll the slow-job dice for jobs the sandbox created since ``since`` whose 202 never came by."""
        if self.options.slow_fraction <= 0:
            return
        try:
            status, body = await self.sandbox_admin("GET", "/_sandbox/jobs")
        except (OSError, Eof, ValueError):
            return
        if status != 200 or not isinstance(body, dict):
            return
        for job in body.get("jobs", []):
            job_id = job.get("bulkJobId")
            if job_id and job_id not in self.known_jobs and job.get("submittedAt", 0) >= since - 0.05:
                self.known_jobs.add(job_id)
                self.log.unseen.append(job_id)
                await self.maybe_pin(job_id)

    async def maybe_pin(self, job_id: str) -> None:
        opts = self.options
        if job_id in self.log.pins or opts.slow_fraction <= 0 or self.rng.random() >= opts.slow_fraction:
            return
        delay = self.rng.uniform(opts.slow_min, opts.slow_max)
        try:
            status, view = await self.sandbox_admin(
                "POST", f"/_sandbox/jobs/{job_id}/status", {"status": "PENDING"}
            )
        except (OSError, Eof, ValueError):
            return
        if status != 200:
            return
        late = bool(view and view.get("completedOrder") is not None)
        now = time.time()
        self.log.pins[job_id] = {"pinned": now, "release_at": now + delay, "released": None, "late": late}
        self.release_tasks[job_id] = asyncio.create_task(self.release_later(job_id, 0.0 if late else delay))

    async def release_later(self, job_id: str, delay: float) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(delay)
        await self.release(job_id)

    async def release(self, job_id: str) -> None:
        pin = self.log.pins.get(job_id)
        if pin is None or pin["released"] is not None:
            return
        for _attempt in range(20):
            try:
                status, _view = await self.sandbox_admin(
                    "POST", f"/_sandbox/jobs/{job_id}/status", {"status": "IN_PROGRESS"}
                )
                if status == 200:
                    pin["released"] = time.time()
                    return
            except (OSError, Eof, ValueError):
                pass
            await asyncio.sleep(0.2)

    # -- admin routes of the proxy itself

    async def admin(self, msg: Message) -> tuple[int, Any]:
        method, target = msg.first[0], msg.first[1].decode()
        if target == "/_proxy/health":
            return 200, {"ok": True}
        if target == "/_proxy/options":
            if method == b"PUT":
                changes = json.loads(msg.body or b"{}")
                for name, value in changes.items():
                    if not hasattr(self.options, name):
                        return 400, {"error": f"unknown option {name}"}
                    setattr(self.options, name, float(value))
            return 200, self.options.__dict__
        if target == "/_proxy/inflight":
            return 200, {"inflight": [{"conn": c, **v} for c, v in self.inflight.items()]}
        if target == "/_proxy/pinned":
            waiting = [j for j, p in self.log.pins.items() if p["released"] is None]
            return 200, {"waiting": waiting, "pinned": len(self.log.pins)}
        if target == "/_proxy/release":
            waiting = [j for j, p in self.log.pins.items() if p["released"] is None]
            for job_id in waiting:
                task = self.release_tasks.get(job_id)
                if task is not None:
                    task.cancel()
            await asyncio.gather(*(self.release(j) for j in waiting))
            return 200, {"released": len(waiting)}
        if target == "/_proxy/log":
            log = self.log
            return 200, {
                "posts": log.posts,
                "gets": log.gets,
                "results": log.results,
                "conns": log.conns,
                "pins": log.pins,
                "other": log.other,
                "unseen": log.unseen,
            }
        return 404, {"error": f"no route {target}"}

    # -- one worker connection

    async def handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        conn = next(self.ids)
        peer = c_writer.get_extra_info("peername")
        port = peer[1] if peer else 0
        self.log.conns[conn] = {"port": port, "opened": time.time(), "closed": None, "how": None}
        client = Reader(c_reader)
        up: tuple[Reader, asyncio.StreamWriter] | None = None
        up_used = 0.0
        how = "client closed"
        try:
            while True:
                try:
                    request = await read_message(client)
                except Eof:
                    break
                target = request.first[1] if len(request.first) > 1 else b""
                method = request.first[0]
                if target.startswith(b"/_proxy/"):
                    status, body = await self.admin(request)
                    payload = json.dumps(body).encode()
                    c_writer.write(
                        b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                        % (status, len(payload))
                        + payload
                    )
                    await c_writer.drain()
                    continue
                if up is not None and (
                    time.monotonic() - up_used > UPSTREAM_IDLE_SECONDS or up[0].reader.at_eof()
                ):
                    up[1].close()
                    up = None
                if up is None:
                    u_reader, u_writer = await asyncio.open_connection(self.host, self.port)
                    up = (Reader(u_reader), u_writer)
                is_bulk = method == b"POST" and target.split(b"?")[0] == BULK
                t0 = time.time()
                if is_bulk:
                    self.inflight[conn] = {"port": port, "since": t0}
                try:
                    outcome = await self.exchange(
                        request, up, client, c_writer, is_bulk, target, t0, conn, port
                    )
                finally:
                    self.inflight.pop(conn, None)
                up_used = time.monotonic()
                if outcome != "ok":
                    how = outcome
                    if up is not None:
                        up[1].close()
                        up = None
                    break
        except (OSError, Eof, asyncio.IncompleteReadError) as exc:
            how = f"error: {type(exc).__name__}"
        finally:
            if up is not None:
                up[1].close()
            record = self.log.conns[conn]
            record["closed"], record["how"] = time.time(), how
            if how != "reset":
                with contextlib.suppress(Exception):
                    c_writer.close()

    async def exchange(
        self,
        request: Message,
        up: tuple[Reader, asyncio.StreamWriter],
        client: Reader,
        c_writer: asyncio.StreamWriter,
        is_bulk: bool,
        target: bytes,
        t0: float,
        conn: int,
        port: int,
    ) -> str:
        """Forward one request and its answer; returns "ok", "reset" or "client gone"."""
        u_reader, u_writer = up
        u_writer.write(request.raw)
        await u_writer.drain()
        answer = asyncio.ensure_future(read_message(u_reader, response_to=request.first[0]))
        watch = asyncio.ensure_future(client.fill())
        gone: float | None = None
        try:
            done, _ = await asyncio.wait({answer, watch}, return_when=asyncio.FIRST_COMPLETED)
            if watch in done and watch.exception() is not None:
                gone = time.time()  # the worker closed its connection before the answer came
            elif watch not in done:
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError, Eof, OSError):
                    await watch
            try:
                response: Message | None = await answer
            except (Eof, OSError, asyncio.IncompleteReadError, ValueError):
                response = None
        finally:
            if not watch.done():
                watch.cancel()
        status = int(response.first[1]) if response is not None and response.first[1].isdigit() else 0
        job_id: str | None = None
        if response is not None and is_bulk and status == 202:
            body = _json_body(response)
            job_id = body.get("batchJobId") if isinstance(body, dict) else None
            if job_id:
                # Whether or not the worker is still there to read the answer: Attentive cannot know.
                self.known_jobs.add(job_id)
                await self.maybe_pin(job_id)
        elif response is None and is_bulk:
            # Reset by the sandbox: if it accepted the request first (drop-after-accept), a job exists
            # whose id nobody saw; it may be slow like any other.
            await self.pin_unseen(t0)
        delivered = False
        if response is not None and gone is None:
            try:
                c_writer.write(response.raw)
                await c_writer.drain()
                delivered = True
            except (OSError, RuntimeError):
                gone = time.time()
        self.record(request, response, status, target, t0, conn, port, job_id, delivered, gone)
        if response is None:
            if gone is None:
                reset(c_writer)
                return "reset"
            return "client gone"
        if gone is not None:
            return "client gone"
        if response.headers.get(b"connection", b"").lower() == b"close":
            return "upstream closed"
        return "ok"

    def record(
        self,
        request: Message,
        response: Message | None,
        status: int,
        target: bytes,
        t0: float,
        conn: int,
        port: int,
        job_id: str | None,
        delivered: bool,
        gone: float | None,
    ) -> None:
        now = time.time()
        method = request.first[0]
        path = target.split(b"?")[0]
        if method == b"POST" and path == BULK:
            self.log.posts.append(
                {
                    "t0": t0,
                    "t1": now,
                    "conn": conn,
                    "port": port,
                    "status": status,
                    "job": job_id,
                    "delivered": delivered,
                    "gone": gone,
                }
            )
            return
        m = JOB_STATUS.match(path)
        if m and method == b"GET":
            job_status = None
            if response is not None and status == 200:
                body = _json_body(response)
                job_status = body.get("status") if isinstance(body, dict) else None
            self.log.gets.append([now, m.group(1).decode(), status, job_status, delivered])
            return
        m = RESULTS.match(path)
        if m:
            self.log.results.append([now, m.group(1).decode(), status, delivered])
            return
        key = f"{method.decode()} {path.decode()[:40]} {status}"
        self.log.other[key] = self.log.other.get(key, 0) + 1


async def serve(args: argparse.Namespace) -> None:
    host, _, port = args.upstream.rpartition(":")
    proxy = Proxy(
        host or "127.0.0.1", int(port), Options(args.slow_fraction, args.slow_min, args.slow_max), args.seed
    )
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", args.port, backlog=1024, limit=1 << 22)
    print(f"proxy listening on http://127.0.0.1:{args.port} -> {args.upstream}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.chaos.proxy", description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True, help="HOST:PORT of the sandbox")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slow-fraction", type=float, default=0.0)
    p.add_argument("--slow-min", type=float, default=3.0)
    p.add_argument("--slow-max", type=float, default=20.0)
    args = p.parse_args(argv)
    try:
        import uvloop

        uvloop.run(serve(args))
    except ImportError:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
