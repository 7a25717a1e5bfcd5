"""The ``attentive-export`` command: answers an HTTP probe itself, hands everything else to
:mod:`worker.cli.main`.

``health webhook`` (the receiver's, Flower's and the exporter's container probe, every 10 to 60 s)
only asks a URL, so it is answered here with the standard library (:mod:`worker.observe.probe`)
before the command line loads the settings, redis-py and httpx: about 0.4 CPU-seconds less per
probe. Only the plain forms are taken (``health webhook [--url URL] [-q|--quiet]``); anything else,
``--help`` or a mistake included, goes to the full command line, which prints its usual help and
errors. Unlike other commands, such a probe does not validate the environment: it reads none of it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def _plain_webhook_probe(args: Sequence[str]) -> tuple[str | None, bool] | None:
    """(url or None for the default, quiet) for ``health webhook``'s plain options, else None."""
    url: str | None = None
    quiet = False
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        if arg in ("-q", "--quiet"):
            quiet = True
        elif arg == "--url" and rest and not rest[0].startswith("-"):
            url = rest.pop(0)
        elif arg.startswith("--url=") and len(arg) > len("--url="):
            url = arg[len("--url=") :]
        else:
            return None
    return url, quiet


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    plain = _plain_webhook_probe(argv[2:]) if argv[:2] == ["health", "webhook"] else None
    if plain is not None:
        from worker.observe.probe import DEFAULT_WEBHOOK_URL, check_url

        url, quiet = plain
        check = check_url(url or DEFAULT_WEBHOOK_URL)
        if not quiet:
            print(check.line())
        return 0 if check.ok else 1
    from worker.cli.main import main as full_main

    return full_main(argv)


if __name__ == "__main__":
    sys.exit(main())
