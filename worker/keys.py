"""Every Redis key this service writes, in one place.

All of a job's keys share the hash tag ``{job:<id>}`` so that the Lua scripts touching them run on one
Redis Cluster slot. Global keys (registries, rate limiter) have their own tags.
"""

from __future__ import annotations

#: Prefix on every key, so the service can share a Redis with others and tests can clean up by pattern.
PREFIX = "aex"


def _job(job_id: str, suffix: str) -> str:
    return f"{PREFIX}:{{job:{job_id}}}:{suffix}"


# --- registries -------------------------------------------------------------------------------------
def authorizations() -> str:
    """Hash: authorization id -> encrypted JSON record."""
    return f"{PREFIX}:authorizations"


def jobs() -> str:
    """Hash: export job id -> JSON job record (config + state)."""
    return f"{PREFIX}:jobs"


def ratelimit(key_hash: str) -> str:
    """String: GCRA theoretical arrival time for one Attentive API key (hashed, never the key)."""
    return f"{PREFIX}:{{rl:{key_hash}}}:tat"


def ratelimit_backoff(key_hash: str) -> str:
    """String: epoch-ms until which every worker holds off this API key after a 429."""
    return f"{PREFIX}:{{rl:{key_hash}}}:backoff"


# --- per job ----------------------------------------------------------------------------------------
def job_status(job_id: str) -> str:
    """Hash of counters and last-seen values shown by ``status``."""
    return _job(job_id, "status")


def job_skips(job_id: str) -> str:
    """Hash: skip reason -> count."""
    return _job(job_id, "skips")


def job_deadletters(job_id: str) -> str:
    """List of JSON dead-letter records (user key, reason, record) an operator can read."""
    return _job(job_id, "deadletters")
