"""Run benchmarks and record their results in bench/RESULTS.md.

Each ``bench/bench_<name>.py`` module exposes ``run() -> str`` returning a Markdown section (figures
measured side by side in one run: medians and ratios, since these machines are shared and noisy). The
section replaces the one between ``<!-- bench:<name> -->`` markers, so running one benchmark keeps the
others' last figures. Every section is stamped with the machine and the date it was measured on.

Usage: ``python -m bench`` (all but the long ones in ON_DEMAND) or ``python -m bench mapping sandbox``.
Options after the name go to that one benchmark's ``run(argv)``: ``python -m bench scale --quick``. A
module whose options change what it measures names its section from them with ``section(argv)``
(``scale --rate-limit 30`` records ``scale-backlog``, not over the 100/s run's ``scale``).
"""

from __future__ import annotations

import datetime as dt
import importlib
import os
import platform
import re
import sys
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "RESULTS.md"
HEADER = "# Benchmark results\n\nWritten by `make bench` (`python -m bench`). Each section says where and when it ran.\n"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()} {platform.release()}"


#: Benchmarks that run only when named (``make bench-scale``): they take from minutes to hours.
ON_DEMAND = frozenset({"scale"})


def available() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))


def record(name: str, body: str) -> None:
    stamp = f"_Measured {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC on {machine()}._\n\n"
    section = f"<!-- bench:{name} -->\n{stamp}{body.strip()}\n<!-- /bench:{name} -->"
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S)
    text = (
        pattern.sub(lambda _m: section, text) if pattern.search(text) else f"{text.rstrip()}\n\n{section}\n"
    )
    RESULTS.write_text(text if text.endswith("\n") else text + "\n")


def main(argv: list[str]) -> int:
    cut = next((i for i, arg in enumerate(argv) if arg.startswith("-")), len(argv))
    names, options = argv[:cut] or [n for n in available() if n not in ON_DEMAND], argv[cut:]
    unknown = sorted(set(names) - set(available()))
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; available: {', '.join(available())}")
        return 2
    if options and len(names) != 1:
        print(f"options ({' '.join(options)}) need exactly one benchmark named before them")
        return 2
    for name in names:
        print(f"== bench {name}", flush=True)
        module = importlib.import_module(f"bench.bench_{name}")
        body = module.run(options) if options else module.run()
        print(body, flush=True)
        record(module.section(options) if hasattr(module, "section") else name, body)
    print(f"results written to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
