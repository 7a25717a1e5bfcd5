"""Command line: ``python -m sandbox --port 8787 --token KEY[:readonly] [options]``.

Serves the sandbox with uvicorn (uvloop + httptools, one process: all state is in memory) and prints
``sandbox listening on http://HOST:PORT`` once it accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys

import uvicorn
import uvloop

from sandbox.app import Sandbox
from sandbox.options import COMPLETION_ORDERS, VALIDATION_MODES, Options, Token


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction in [0, 1]")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0.0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a number of at least 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sandbox", description="Local Attentive API sandbox.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8787)
    p.add_argument(
        "--token",
        action="append",
        default=[],
        metavar="KEY[:FLAGS]",
        help="a known API key; flags: readonly (or no-write) for 403 on writes, company=NAME (repeatable)",
    )
    p.add_argument(
        "--lytics-token",
        action="append",
        default=[],
        metavar="TOKEN",
        help="a Lytics API token the segment scan endpoint accepts (repeatable)",
    )
    p.add_argument(
        "--processing-delay",
        type=_non_negative,
        default=1.0,
        metavar="SECONDS",
        help="seconds from acceptance until a bulk job completes (the median with --processing-spread)",
    )
    p.add_argument(
        "--processing-spread",
        type=_non_negative,
        default=0.0,
        metavar="SIGMA",
        help="vary each job's delay: lognormal with this sigma around --processing-delay, the same per "
        "job number in every run with the same --seed (0.5: a tenth of jobs take under 0.53x the "
        "median, a tenth over 1.9x)",
    )
    p.add_argument("--completion-order", choices=COMPLETION_ORDERS, default="fifo")
    p.add_argument("--validation", choices=VALIDATION_MODES, default="sync")
    p.add_argument(
        "--rate-limit",
        type=int,
        default=100,
        help="requests/s per token on bulk and job status (other endpoints get 1.5x); 0 turns limiting off",
    )
    p.add_argument(
        "--retry-after", action="store_true", help="add Retry-After: 1 to 429s (Attentive sends none)"
    )
    p.add_argument("--fault-429", type=_fraction, default=0.0, metavar="FRACTION")
    p.add_argument("--fault-5xx", type=_fraction, default=0.0, metavar="FRACTION", help="split 500/503")
    p.add_argument("--latency-ms", type=float, default=0.0, metavar="N")
    p.add_argument("--drop-connections", type=_fraction, default=0.0, metavar="FRACTION")
    p.add_argument(
        "--drop-after-accept",
        type=_fraction,
        default=0.0,
        metavar="FRACTION",
        help="accepted bulk POSTs whose job is created but whose 202 is replaced by a connection reset",
    )
    p.add_argument("--fail-jobs", type=_fraction, default=0.0, metavar="FRACTION")
    p.add_argument("--drop-jobs", type=_fraction, default=0.0, metavar="FRACTION")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--log-level", default="warning")
    return p


def options_from(args: argparse.Namespace) -> Options:
    return Options(
        processing_delay=args.processing_delay,
        processing_spread=args.processing_spread,
        completion_order=args.completion_order,
        validation=args.validation,
        rate_limit=args.rate_limit,
        rate_limit_other=args.rate_limit * 3 // 2,
        retry_after=args.retry_after,
        fault_429=args.fault_429,
        fault_5xx=args.fault_5xx,
        latency_ms=args.latency_ms,
        drop_connections=args.drop_connections,
        drop_after_accept=args.drop_after_accept,
        fail_jobs=args.fail_jobs,
        drop_jobs=args.drop_jobs,
        seed=args.seed,
    )


async def serve(sandbox: Sandbox, host: str, port: int, log_level: str) -> None:
    config = uvicorn.Config(
        sandbox,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        log_level=log_level,
        access_log=False,
        backlog=2048,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            await task
            raise SystemExit(f"sandbox could not start on {host}:{port}")
        await asyncio.sleep(0.01)
    print(f"sandbox listening on http://{host}:{port}", flush=True)
    await task


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        tokens = [Token.parse(spec) for spec in args.token]
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not tokens:
        print("warning: no --token given; every API request will get 401", file=sys.stderr)
    sandbox = Sandbox(tokens, options_from(args), args.lytics_token)
    # Each bulk request allocates thousands of short-lived dicts; the default gen-0 threshold (700) runs
    # a collection several times per request and promotes them into ever-longer full collections.
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)

    uvloop.run(serve(sandbox, args.host, args.port, args.log_level))
    return 0


if __name__ == "__main__":
    sys.exit(main())
