"""A local Redis Cluster for tests: three masters started from the server binary, torn down after.

Usage::

    with local_cluster() as cluster:            # 3 masters on free ports, cluster_state:ok
        client = cluster.client()               # RedisCluster, through worker.store.connection
        cluster.url                             # redis+cluster://127.0.0.1:PORT, for REDIS_URL
        cluster.port_of(key)                    # the master serving a key's slot
        with ScriptAudit(cluster) as audit:     # every command scripts run, per node (MONITOR)
            ...
        audit.problems()                        # keys a script touched outside its declared slot

Servers come from :func:`worker.cli.localredis.start_server` (``redis-server``, else the Valkey
server of the ``dev`` extra), each with a client port and a cluster bus port asked of the OS. The
cluster is formed with the commands ``redis-cli --cluster create`` sends (slot ranges, then MEET),
so it needs no ``redis-cli``.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.cluster import key_slot

from worker.cli.localredis import HOST, Server, free_port, start_server
from worker.store.connection import connect

SLOTS = 16384
#: How long the nodes may take to agree that every slot is served.
FORM_TIMEOUT = 20.0


@dataclass
class LocalCluster:
    """Running masters; ``slots[i]`` is the (first, last) slot range of ``servers[i]``."""

    servers: list[Server]
    slots: list[tuple[int, int]]

    @property
    def url(self) -> str:
        return f"redis+cluster://{HOST}:{self.servers[0].port}"

    @property
    def ports(self) -> list[int]:
        return [s.port for s in self.servers]

    def client(self, **options: Any) -> redis.Redis:
        """A cluster client as the service builds one (``REDIS_URL`` = :attr:`url`)."""
        return connect(self.url, **options)

    def node(self, port: int) -> redis.Redis:
        """A plain client of one node (its own keys only)."""
        return redis.Redis(host=HOST, port=port)

    def port_of(self, key: str | bytes) -> int:
        """The port of the master serving ``key``'s slot."""
        slot = key_slot(key.encode() if isinstance(key, str) else key)
        for server, (first, last) in zip(self.servers, self.slots, strict=True):
            if first <= slot <= last:
                return server.port
        raise AssertionError(f"slot {slot} is served by no master")


def _ranges(masters: int) -> list[tuple[int, int]]:
    bounds = [SLOTS * i // masters for i in range(masters + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(masters)]


def _node_args(bus_port: int) -> list[str]:
    return [
        *("--cluster-enabled", "yes"),
        *("--cluster-config-file", "nodes.conf"),  # in the server's own temporary directory
        *("--cluster-port", str(bus_port)),
        *("--cluster-node-timeout", "5000"),
    ]


def _formed(nodes: list[redis.Redis], masters: int) -> bool:
    for node in nodes:
        info = node.cluster("INFO")
        if info.get("cluster_state") != "ok" or int(info.get("cluster_known_nodes", 0)) != masters:
            return False
        if int(info.get("cluster_slots_ok", 0)) != SLOTS:
            return False
    return True


@contextlib.contextmanager
def local_cluster(masters: int = 3) -> Iterator[LocalCluster]:
    """Start ``masters`` cluster-enabled servers, give each an equal slot range, join them, wait
    until every node says ``cluster_state:ok`` with every slot served; stop them all on exit.

    Raises:
        worker.cli.localredis.LocalRedisError: no server binary, or a server did not start.
    """
    with contextlib.ExitStack() as stack:
        bus_ports = [free_port() for _ in range(masters)]  # not port + 10000, which may be taken
        servers = [stack.enter_context(start_server(args=_node_args(bus))) for bus in bus_ports]
        nodes = [redis.Redis(host=HOST, port=s.port, decode_responses=True) for s in servers]
        for node in nodes:
            stack.callback(node.close)
        slots = _ranges(masters)
        for node, (first, last) in zip(nodes, slots, strict=True):
            node.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
        for node in nodes[1:]:
            node.execute_command("CLUSTER", "MEET", HOST, servers[0].port, bus_ports[0])
        deadline = time.monotonic() + FORM_TIMEOUT
        while not _formed(nodes, masters):
            if time.monotonic() > deadline:
                states = [n.cluster("INFO").get("cluster_state") for n in nodes]
                raise AssertionError(f"the cluster did not form within {FORM_TIMEOUT}s: {states}")
            time.sleep(0.1)
        yield LocalCluster(servers, slots)


# --- which keys scripts touch ----------------------------------------------------------------------
#: One MONITOR line: time, ``[db client]``, then the command's arguments, each quoted.
_LINE = re.compile(rb"^[\d.]+ \[\d+ (?P<who>[^\]]+)\] (?P<args>.*)$", re.S)
_ARG = re.compile(rb'"((?:[^"\\]|\\.)*)"', re.S)
_ESCAPES = {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"a": b"\a", b"b": b"\b", b'"': b'"', b"\\": b"\\"}
_ESCAPE = re.compile(rb"\\(x[0-9a-fA-F]{2}|.)", re.S)
#: Marks the end of what an audit waits for on each node.
_END = "aex-script-audit-end"


def _unquote(quoted: bytes) -> bytes:
    def one(m: re.Match[bytes]) -> bytes:
        code = m.group(1)
        return bytes([int(code[1:], 16)]) if code[:1] == b"x" else _ESCAPES.get(code, code)

    return _ESCAPE.sub(one, quoted)


def parse_monitor_line(raw: bytes) -> tuple[str, list[bytes]] | None:
    """(who ran it: ``lua`` or a client address, arguments) of one MONITOR line; None if unreadable."""
    m = _LINE.match(raw)
    if m is None:
        return None
    return m.group("who").decode(), [_unquote(a) for a in _ARG.findall(m.group("args"))]


@dataclass
class ScriptCall:
    """One EVAL/EVALSHA a node ran: its declared keys and the keys its commands touched."""

    port: int
    declared: list[bytes]
    touched: list[bytes] = field(default_factory=list)


class ScriptAudit:
    """Records, on every master, each script call and the keys its commands touch (MONITOR shows a
    script's commands as ``lua`` lines right after the call that ran them; a node runs one command
    at a time, so they cannot interleave with another client's)."""

    def __init__(self, cluster: LocalCluster) -> None:
        self._cluster = cluster
        self._lines: dict[int, list[bytes]] = {port: [] for port in cluster.ports}
        self._threads: list[threading.Thread] = []
        self._monitors: list[Any] = []
        self.calls: list[ScriptCall] = []

    def __enter__(self) -> ScriptAudit:
        for port in self._cluster.ports:
            monitor = self._cluster.node(port).monitor()
            monitor.__enter__()  # sends MONITOR and reads its +OK
            self._monitors.append(monitor)
            thread = threading.Thread(target=self._read, args=(port, monitor), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _read(self, port: int, monitor: Any) -> None:
        lines = self._lines[port]
        end = _END.encode()
        while True:
            try:
                raw = monitor.connection.read_response()
            except (redis.RedisError, OSError):
                return
            raw = raw if isinstance(raw, bytes) else str(raw).encode()
            if end in raw:
                return
            lines.append(raw)

    def __exit__(self, *exc: object) -> None:
        for port in self._cluster.ports:
            with self._cluster.node(port) as node:
                node.echo(_END)
        for thread in self._threads:
            thread.join(timeout=30)
        for monitor in self._monitors:
            with contextlib.suppress(redis.RedisError, OSError):
                monitor.connection.disconnect()
        self._collect()

    def _collect(self) -> None:
        parser = self._cluster.client().commands_parser  # type: ignore[attr-defined]
        keys_of: dict[tuple[bytes, ...], list[bytes]] = {}
        for port, lines in self._lines.items():
            call: ScriptCall | None = None
            with self._cluster.node(port) as node:
                for raw in lines:
                    parsed = parse_monitor_line(raw)
                    if parsed is None or not parsed[1]:
                        continue
                    who, args = parsed
                    name = args[0].upper()
                    if who != "lua":
                        call = None
                        if name in (b"EVAL", b"EVALSHA"):
                            call = ScriptCall(port, args[3 : 3 + int(args[2])])
                            self.calls.append(call)
                        continue
                    if call is None:
                        continue
                    sig = tuple(args)
                    if sig not in keys_of:
                        got = parser.get_keys(node, *(a.decode("latin-1") for a in args)) or []
                        keys_of[sig] = [k.encode("latin-1") if isinstance(k, str) else k for k in got]
                    call.touched.extend(keys_of[sig])

    def problems(self) -> list[str]:
        """Each key a script touched outside its declared keys' slot (or a call whose declared keys
        span slots): empty when every call kept to one slot."""
        found = []
        for call in self.calls:
            slots = {key_slot(k) for k in call.declared}
            if len(slots) > 1:
                found.append(f"node {call.port}: declared keys in {len(slots)} slots: {call.declared[:3]}")
                continue
            for key in call.touched:
                if slots and key_slot(key) not in slots:
                    found.append(f"node {call.port}: {key!r} is not in the slot of {call.declared[0]!r}")
        return found

    def undeclared(self) -> set[bytes]:
        """Keys scripts touched without declaring them (those the slot check above is about)."""
        return {k for call in self.calls for k in call.touched if k not in set(call.declared)}
