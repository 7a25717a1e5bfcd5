"""The operator's monitoring commands: ``status`` (readable, ``--json``, ``--watch``), ``health``, ``metrics``.

Kept out of :mod:`worker.cli.main`, which only registers them. Exit statuses: 0 fine, 1 unhealthy
(``health``), 2 a problem the operator can fix (as everywhere in the CLI), 130 interrupted.

Probes run ``health`` every few seconds in every pod, and ``attentive-export health`` loads this
module without the rest of the CLI: at the top it imports only what ``health`` needs (Redis, the
settings, :mod:`worker.observe.health`); ``status`` and ``metrics`` import the rest when they run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import redis

from worker.observe import health, probe
from worker.settings import Settings

#: Seconds between refreshes of ``status --watch`` without a value.
DEFAULT_WATCH_SECONDS = 2.0
#: ``attentive-export metrics``: where the exporter listens by default.
DEFAULT_METRICS_HOST = "127.0.0.1"
DEFAULT_METRICS_PORT = 9808
#: ANSI: cursor home, clear the screen (only written to a terminal).
_CLEAR = "\x1b[H\x1b[2J"


def _client(settings: Settings) -> redis.Redis | None:
    """A Redis client that answers, or None after one ``error:`` line on stderr."""
    try:
        client = health.redis_client(settings.redis_url)  # (a cluster client connects at once)
        client.ping()
    except redis.RedisError as exc:
        print(f"error: cannot reach Redis at REDIS_URL={settings.redis_url}: {exc}", file=sys.stderr)
        return None
    return client


# --- status ------------------------------------------------------------------------------------------
def add_status_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON for scripts (one document)")
    parser.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=DEFAULT_WATCH_SECONDS,
        metavar="SECONDS",
        help=f"refresh every SECONDS (default {DEFAULT_WATCH_SECONDS:g}) until Ctrl-C; "
        "with --json, one JSON document per line",
    )


def snapshot(client: redis.Redis, job_id: str | None, sweep_interval_seconds: float = 1.0) -> dict[str, Any]:
    """What ``status --json`` prints: one job, or the service, ingest and every job."""
    from worker.observe.service import service_status
    from worker.observe.status import ingest_status, job_status
    from worker.setup.jobs import JobStore

    if job_id:
        return job_status(client, job_id)
    return {
        "service": service_status(client, sweep_interval_seconds=sweep_interval_seconds),
        "ingest": ingest_status(client),
        "jobs": [job_status(client, j.id) for j in JobStore(client).list()],
    }


def render_status(data: dict[str, Any], job_id: str | None, now_ms: int) -> str:
    from worker.observe import summary

    if job_id:
        return summary.render([data], now_ms)
    return summary.render(data["jobs"], now_ms, ingest=data["ingest"], service=data["service"])


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    client = _client(settings)
    if client is None:
        return 2
    if args.watch is None:
        _print_status(client, args, settings.sweep_interval_seconds)
        return 0
    interval = max(0.5, args.watch)
    while True:
        try:
            _print_status(
                client, args, settings.sweep_interval_seconds, clear=not args.json and sys.stdout.isatty()
            )
        except redis.RedisError as exc:  # watching outlives a Redis restart
            print(f"error: Redis: {exc} (retrying in {interval:g} s)", file=sys.stderr, flush=True)
        time.sleep(interval)


def _print_status(
    client: redis.Redis, args: argparse.Namespace, sweep_interval_seconds: float, clear: bool = False
) -> None:
    now_ms = int(time.time() * 1000)
    data = snapshot(client, args.job, sweep_interval_seconds)
    if args.json:
        print(json.dumps(data, indent=None if args.watch is not None else 2, default=str), flush=True)
        return
    text = render_status(data, args.job, now_ms)
    print((_CLEAR if clear else "") + text, flush=True)


# --- health ------------------------------------------------------------------------------------------
def cmd_health(args: argparse.Namespace, settings: Settings) -> int:
    """Run the checks of one component; print one line each; 0 when all pass, else 1."""
    try:
        client = health.redis_client(settings.redis_url)
    except redis.RedisError as exc:  # a Redis Cluster client asks for the cluster's layout at once
        down = probe.Check("redis", False, f"unreachable: {exc}")
        checks = [health.check_webhook(args.url)] if args.component == "webhook" else [down]
    else:
        checks = health.run(
            args.component,
            client,
            sweep_interval_seconds=settings.sweep_interval_seconds,
            node=args.node,
            max_age=args.max_age,
            webhook_url=args.url,
        )
    if not args.quiet:
        for check in checks:
            print(check.line())
    return 0 if all(c.ok for c in checks) else 1


# --- metrics -----------------------------------------------------------------------------------------
def cmd_metrics(args: argparse.Namespace, settings: Settings) -> int:
    """Serve ``/metrics`` computed from Redis at each scrape, or print one scrape (``--once``)."""
    from prometheus_client import start_http_server

    from worker.observe import metrics

    client = health.redis_client(settings.redis_url)
    reg = metrics.registry(
        client,
        broker=metrics.broker_client(settings.broker_url),
        rate_per_second=settings.rate_limit_per_second,
    )
    if args.once:
        sys.stdout.write(metrics.scrape_text(reg))
        return 0
    _server, thread = start_http_server(args.port, args.host, registry=reg)
    print(
        f"serving metrics on http://{args.host}:{args.port}/metrics (read from Redis at each scrape)",
        flush=True,
    )
    thread.join()
    return 0


def add_commands(sub: Any) -> None:
    """Register ``health`` and ``metrics`` on the CLI's subcommands."""
    hp = sub.add_parser(
        "health",
        help="check a worker, beat, the webhook receiver or the whole service; exit 0 healthy, 1 not",
    )
    hp.add_argument(
        "component",
        nargs="?",
        default="service",
        choices=health.COMPONENTS,
        help="service (default): Redis, a live worker, beat and the sweep; worker: a worker on this host "
        "(or --node); beat: beat publishes the sweep; webhook: the receiver's /healthz answers 200",
    )
    hp.add_argument("--node", help="worker node name (name@host) instead of any worker on this host")
    hp.add_argument(
        "--max-age",
        type=float,
        metavar="SECONDS",
        help="oldest heartbeat that still counts as alive (default: 30 s for workers; for beat and "
        "the sweep, 30 s or 5 sweep intervals, whichever is longer)",
    )
    hp.add_argument("--url", default=probe.DEFAULT_WEBHOOK_URL, help="webhook health URL to ask")
    hp.add_argument("-q", "--quiet", action="store_true", help="print nothing, only set the exit status")
    hp.set_defaults(func=cmd_health)

    mp = sub.add_parser("metrics", help="serve Prometheus metrics read from Redis at each scrape")
    mp.add_argument(
        "--host", default=DEFAULT_METRICS_HOST, help="address to listen on (0.0.0.0 in a container)"
    )
    mp.add_argument(
        "--port",
        type=int,
        default=DEFAULT_METRICS_PORT,
        help=f"port to listen on (default {DEFAULT_METRICS_PORT})",
    )
    mp.add_argument("--once", action="store_true", help="print one scrape to stdout and exit")
    mp.set_defaults(func=cmd_metrics)
