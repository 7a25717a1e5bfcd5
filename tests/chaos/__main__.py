"""``python -m tests.chaos``: run the chaos harness and print its verdict (exit 0 only on PASS)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from tests.chaos.config import ChaosConfig
from tests.chaos.run import run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__)
    p.add_argument("--seed", type=int, default=None, help="the run's seed (default 1; 7 with --small)")
    p.add_argument("--small", action="store_true", help="the CI size: 1,000 users, 8,000 transitions")
    p.add_argument("--users", type=int, help="users (full size: 20,000)")
    p.add_argument("--transitions", type=int, help="transitions (full size: 200,000)")
    p.add_argument("--minutes", type=float, help="bound on the whole run (full size: 9.5)")
    p.add_argument("--send-seconds", type=float, help="how long transitions arrive under faults")
    p.add_argument("--workers", help="pool processes per worker instance, comma-separated (full size: 2,1,2)")
    p.add_argument(
        "--appendfsync", choices=("always", "everysec", "no"), help="Redis appendfsync (default everysec)"
    )
    p.add_argument("--redis-kills", type=int, help="Redis SIGKILLs during the run (full size: 2)")
    p.add_argument("--workdir", type=Path, help="where logs, inputs and the AOF go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep inputs and the AOF even when the run passes")
    return p


def config_from(args: argparse.Namespace) -> ChaosConfig:
    cfg = ChaosConfig.small() if args.small else ChaosConfig()
    changes: dict[str, object] = {}
    if args.seed is not None:
        changes["seed"] = args.seed
    for name in ("users", "transitions", "minutes", "send_seconds", "appendfsync", "redis_kills", "workdir"):
        value = getattr(args, name)
        if value is not None:
            changes[name] = value
    if args.workers:
        changes["workers"] = tuple(int(x) for x in args.workers.split(","))
    if args.keep:
        changes["keep"] = True
    return dataclasses.replace(cfg, **changes)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    cfg = config_from(build_parser().parse_args(argv))
    result = run(cfg)
    print()
    print(result.table)
    print()
    print(f"chaos: {'PASS' if result.passed else 'FAIL'}; logs and summary in {result.workdir}")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
