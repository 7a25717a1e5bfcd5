"""The result of one health check, and the HTTP one: does a URL answer 200? Standard library only.

``attentive-export health webhook`` asks the webhook receiver's ``/healthz`` (Compose and Kubernetes
also point it at Flower's and the metrics exporter's URL) every 10 to 60 s in those containers.
Through httpx, with the CLI's settings and redis-py loaded, one probe cost about 0.4 s of CPU and
60 MB (measured 2026-12-05: 0.36-0.47 s, 5 runs); an HTTP GET needs none of that, so this module
imports only the standard library and :mod:`worker.cli.entry` answers such a probe before it loads
the rest of the command line.
"""

from __future__ import annotations

import http.client
from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_WEBHOOK_URL = "http://127.0.0.1:8080/healthz"
#: Every Redis and HTTP call of a probe gives up after this long: a probe that hangs is worse than
#: one that fails.
TIMEOUT_SECONDS = 3.0


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.name}: {self.detail}"


def check_url(url: str, *, name: str = "webhook", timeout: float = TIMEOUT_SECONDS) -> Check:
    """``url`` answers a GET with 200 (redirects are not followed; the receiver's ``/healthz``
    answers 503 while Redis is unreachable). Never raises."""
    try:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return Check(name, False, f"{url}: not an http:// or https:// URL")
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = kind(parts.hostname, parts.port, timeout=timeout)
        try:
            conn.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
            status = conn.getresponse().status
        finally:
            conn.close()
    except (OSError, ValueError, http.client.HTTPException) as exc:  # refused, timed out, bad port
        return Check(name, False, f"{url}: {type(exc).__name__}: {exc}")
    if status != 200:
        return Check(name, False, f"{url} answered {status}")
    return Check(name, True, f"{url} answered 200")
