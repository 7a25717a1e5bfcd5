"""Sandbox options and tokens: set on the command line, changeable at runtime via ``/_sandbox/options``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

COMPLETION_ORDERS = ("fifo", "random")
VALIDATION_MODES = ("sync", "per_record")
FRACTIONS = ("fault_429", "fault_5xx", "drop_connections", "drop_after_accept", "fail_jobs", "drop_jobs")


@dataclass
class Options:
    """Behaviour knobs. Fractions are probabilities in [0, 1] rolled per request (or per job)."""

    #: Seconds from acceptance until a job completes: the median when ``processing_spread`` is set.
    processing_delay: float = 1.0
    #: Spread of the processing delay (sigma of a lognormal around ``processing_delay``; 0 = fixed).
    #: Each job's delay depends only on ``seed`` and the job's submission number, so a run with the
    #: same seed and the same submissions sees the same delays (sandbox.faults.processing_factor).
    processing_spread: float = 0.0
    completion_order: str = "fifo"
    validation: str = "sync"
    #: Requests/s per token on the bulk and job-status endpoints; 0 disables limiting (benchmarks).
    rate_limit: int = 100
    #: Requests/s per token on the other API endpoints (Attentive: 150/s for most endpoints).
    rate_limit_other: int = 150
    retry_after: bool = False
    fault_429: float = 0.0
    fault_5xx: float = 0.0
    latency_ms: float = 0.0
    drop_connections: float = 0.0
    #: Accepted bulk POSTs whose job is created (and later completes as usual) but whose 202 never
    #: leaves: the connection is reset instead, as when a connection dies after Attentive accepted.
    drop_after_accept: float = 0.0
    fail_jobs: float = 0.0
    drop_jobs: float = 0.0
    seed: int | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def updated(self, changes: dict[str, Any]) -> Options:
        """A copy with ``changes`` applied and checked; raises ValueError naming the bad field."""
        known = {f.name: f for f in dataclasses.fields(self)}
        values = self.to_json()
        for name, value in changes.items():
            if name not in known:
                raise ValueError(f"unknown option {name!r}; known: {', '.join(sorted(known))}")
            values[name] = _coerce(name, value)
        return Options(**values)


def _coerce(name: str, value: Any) -> Any:
    if name == "completion_order":
        if value not in COMPLETION_ORDERS:
            raise ValueError(f"completion_order must be one of {COMPLETION_ORDERS}")
        return value
    if name == "validation":
        if value not in VALIDATION_MODES:
            raise ValueError(f"validation must be one of {VALIDATION_MODES}")
        return value
    if name == "retry_after":
        if not isinstance(value, bool):
            raise ValueError("retry_after must be a boolean")
        return value
    if name == "seed":
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError("seed must be an integer or null")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number")
    if name in ("rate_limit", "rate_limit_other"):
        if value < 0 or int(value) != value:
            raise ValueError(f"{name} must be a non-negative integer")
        return int(value)
    if value < 0 or (name in FRACTIONS and value > 1):
        raise ValueError(f"{name} must be {'in [0, 1]' if name in FRACTIONS else 'non-negative'}")
    return float(value)


@dataclass(frozen=True)
class Token:
    """An API key the sandbox knows; ``readonly`` keys get 403 on write endpoints."""

    key: str
    readonly: bool = False
    company_name: str = "Sandbox Company"

    @classmethod
    def parse(cls, spec: str) -> Token:
        """``KEY[:flag[,flag...]]`` with flags ``readonly``/``no-write`` and ``company=NAME``."""
        key, _, flags = spec.partition(":")
        if not key:
            raise ValueError(f"empty token in {spec!r}")
        readonly = False
        company = cls.company_name
        for flag in filter(None, flags.split(",")):
            if flag in ("readonly", "no-write"):
                readonly = True
            elif flag.startswith("company="):
                company = flag.removeprefix("company=")
            else:
                raise ValueError(
                    f"unknown token flag {flag!r} in {spec!r} (readonly, no-write, company=NAME)"
                )
        return cls(key, readonly, company)
