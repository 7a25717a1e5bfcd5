"""Flower is not drowned by sweeps: the sweep sends no task events, and beat sends no task-sent
events (tasks/sweep.py); every other task keeps its events. tests/integration/test_flower.py checks
Flower's own task list."""

from __future__ import annotations

from types import SimpleNamespace

import tasks.backfill
import tasks.flush
import tasks.ingest
import tasks.poll
import tasks.sweep


def test_only_the_sweep_sends_no_task_events() -> None:
    assert tasks.sweep.sweep.send_events is False
    for task in (
        tasks.ingest.ingest,
        tasks.flush.flush,
        tasks.poll.poll_key,
        tasks.poll.poll,
        tasks.backfill.backfill,
    ):
        assert task.send_events is True, task.name


def test_beat_turns_off_task_sent_events_in_its_own_process_only() -> None:
    conf = {"task_send_sent_event": True}
    beat_service = SimpleNamespace(app=SimpleNamespace(conf=SimpleNamespace(**conf)))
    tasks.sweep._beat_sends_no_sent_events(sender=beat_service)
    assert beat_service.app.conf.task_send_sent_event is False
    tasks.sweep._beat_sends_no_sent_events(sender=None)  # no app: nothing to do, no error
