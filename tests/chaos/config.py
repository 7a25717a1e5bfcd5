"""The knobs of a chaos run, with the full size (``make chaos``) and the small one (CI) as presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ChaosConfig:
    seed: int = 1
    users: int = 20_000
    transitions: int = 200_000
    #: Hard bound on the whole run (setup, sending, settling, verdict); every wait derives from it.
    minutes: float = 9.5
    #: How long transitions keep arriving; faults are on for that long, then all off.
    send_seconds: float = 170.0
    #: Pool processes per ``celery worker`` instance (one instance each, all queues).
    workers: tuple[int, ...] = (2, 1, 2)
    appendfsync: str = "everysec"
    #: Seconds between two worker kills (uniform).
    kill_gap: tuple[float, float] = (3.0, 6.0)
    #: After this share of the send phase only pool processes are killed, not whole workers: a whole
    #: worker takes its countdown polls with it, which the sweep re-drives only after two minutes.
    group_kills_until: float = 0.75
    redis_kills: int = 2
    #: Seconds Redis stays down after a kill.
    redis_down: tuple[float, float] = (1.0, 3.0)
    #: Window (shares of the send phase) in which a second beat runs by mistake.
    second_beat: tuple[float, float] = (0.45, 0.6)
    fault_429: float = 0.20
    fault_5xx: float = 0.05
    drop_connections: float = 0.02
    drop_after_accept: float = 0.03
    fail_jobs: float = 0.02
    #: Added latency, changed every 10-25 s among these.
    latencies_ms: tuple[float, ...] = (0.0, 30.0, 150.0, 400.0)
    #: Sandbox processing delay; with random completion order a job takes 0.1x..3x of it.
    processing_delay: float = 1.0
    slow_fraction: float = 0.15
    slow_seconds: tuple[float, float] = (3.0, 20.0)
    #: When (share of the send phase) the file backfill runs.
    backfill_at: float = 0.2
    backfill_fraction: float = 0.25
    workdir: Path | None = None
    #: Keep the work directory (logs, AOF) even when the run passes.
    keep: bool = False
    #: Reserve at the end of the time bound for the verdict and teardown.
    reserve_seconds: float = 70.0

    @property
    def slowest_job_seconds(self) -> float:
        return self.slow_seconds[1] + 3 * self.processing_delay

    @property
    def hold_seconds(self) -> float:
        """ATTENTIVE_UNCERTAIN_HOLD_SECONDS: a few seconds above the sandbox's slowest job."""
        return round(self.slowest_job_seconds + 5, 1)

    @classmethod
    def small(cls, seed: int = 7, **changes: object) -> ChaosConfig:
        """The CI variant: the same run with small numbers and fewer, shorter faults (< 4 minutes)."""
        base = cls(
            seed=seed,
            users=1_000,
            transitions=8_000,
            minutes=3.6,
            send_seconds=50.0,
            workers=(2, 1, 1),
            kill_gap=(4.0, 8.0),
            group_kills_until=0.35,
            redis_kills=1,
            redis_down=(1.0, 2.0),
            second_beat=(0.4, 0.6),
            slow_seconds=(2.0, 6.0),
            backfill_at=0.15,
            reserve_seconds=35.0,
        )
        return dataclasses.replace(base, **changes)  # type: ignore[arg-type]
