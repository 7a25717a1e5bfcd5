"""Process settings, read once from the environment.

Every knob a deployment can turn lives here, with its default and a one-line reason. Workers are
stateless (DESIGN.md invariant 7): nothing here is per-job; per-job settings live on the export job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

#: Attentive's production host. The v2 paths carry their own ``/v2`` prefix (CONTRACT.md §0).
DEFAULT_ATTENTIVE_API_URL = "https://api.attentivemobile.com"
#: Lytics' API host, for the segment scan behind backfills.
DEFAULT_LYTICS_API_URL = "https://api.lytics.io"
#: Local Redis, database 0. Tests override it with ``TEST_REDIS_URL``.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
#: Attentive allows 100 requests/s per key on the bulk and job-status endpoints; stay 10% under.
DEFAULT_RATE_LIMIT_PER_SECOND = 90.0


def _env(name: str, default: str) -> str:
    value = os.environ.get(name, "").strip()
    return value or default


@dataclass(frozen=True)
class Settings:
    """Typed view of the environment. Build it with :meth:`from_env`."""

    redis_url: str = DEFAULT_REDIS_URL
    broker_url: str = DEFAULT_REDIS_URL
    attentive_api_url: str = DEFAULT_ATTENTIVE_API_URL
    lytics_api_url: str = DEFAULT_LYTICS_API_URL
    #: Fernet key (urlsafe base64, 32 bytes) that encrypts stored API keys. Never logged.
    secret_key: str | None = field(default=None, repr=False)
    rate_limit_per_second: float = DEFAULT_RATE_LIMIT_PER_SECOND
    #: First status check of an Attentive batch job; later checks back off exponentially.
    first_poll_seconds: float = 2.0
    #: Longest wait between two status checks of one batch job.
    poll_cap_seconds: float = 60.0
    #: How long a flush owns a claimed batch before the sweep hands it to another worker.
    lease_seconds: float = 60.0
    #: How often beat runs the sweep; parked polls are released over one interval (worker.pipeline.parked).
    sweep_interval_seconds: float = 1.0

    @classmethod
    def from_env(cls) -> Settings:
        """Read ``REDIS_URL``, ``CELERY_BROKER_URL``, ``ATTENTIVE_API_URL``, ``LYTICS_API_URL``, ``EXPORT_SECRET_KEY``,
        ``ATTENTIVE_RATE_LIMIT`` (requests/s for all workers together), ``ATTENTIVE_FIRST_POLL_SECONDS``,
        ``ATTENTIVE_POLL_CAP_SECONDS``, ``FLUSH_LEASE_SECONDS``, ``SWEEP_INTERVAL_SECONDS``."""
        redis_url = _env("REDIS_URL", DEFAULT_REDIS_URL)
        return cls(
            redis_url=redis_url,
            broker_url=_env("CELERY_BROKER_URL", redis_url),
            attentive_api_url=_env("ATTENTIVE_API_URL", DEFAULT_ATTENTIVE_API_URL).rstrip("/"),
            lytics_api_url=_env("LYTICS_API_URL", DEFAULT_LYTICS_API_URL).rstrip("/"),
            secret_key=os.environ.get("EXPORT_SECRET_KEY") or None,
            rate_limit_per_second=float(_env("ATTENTIVE_RATE_LIMIT", str(DEFAULT_RATE_LIMIT_PER_SECOND))),
            first_poll_seconds=float(_env("ATTENTIVE_FIRST_POLL_SECONDS", "2")),
            poll_cap_seconds=float(_env("ATTENTIVE_POLL_CAP_SECONDS", "60")),
            lease_seconds=float(_env("FLUSH_LEASE_SECONDS", "60")),
            sweep_interval_seconds=float(_env("SWEEP_INTERVAL_SECONDS", "1")),
        )
