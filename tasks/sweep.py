"""Sweep task, run by beat: time-based seals, expired leases, lost polls, chunks and backfill steps.

It runs every second or so, so it sends no task events: Flower would otherwise list little but
sweeps (755 of 904 tasks in one session). Whether it runs shows in ``attentive-export health`` and
``status`` (the sweep heartbeat) and in the metrics, not in Flower.
"""

from __future__ import annotations

from typing import Any

from celery import shared_task
from celery.signals import beat_init

from worker.backfill.steps import redrive_stalled
from worker.dispatch import SWEEP_TASK
from worker.observe import heartbeat
from worker.pipeline.sweep import sweep as run_sweep
from worker.runtime import runtime


# send_events=False: the worker sends no task-received/started/succeeded events for it.
@shared_task(name=SWEEP_TASK, ignore_result=True, send_events=False)
def sweep() -> None:
    rt = runtime()
    run_sweep(rt, redrive_backfills=lambda now: redrive_stalled(rt.redis, rt.dispatch, now))
    heartbeat.note_sweep(rt.redis)


@beat_init.connect
def _beat_sends_no_sent_events(sender: Any = None, **_kwargs: object) -> None:
    """Beat publishes only the sweep: no ``task-sent`` event for it either (``task_send_sent_event``
    is one switch for a whole process, so it is turned off in beat's process only; workers keep
    sending theirs for the tasks they dispatch)."""
    app = getattr(sender, "app", None)
    if app is not None:
        app.conf.task_send_sent_event = False
