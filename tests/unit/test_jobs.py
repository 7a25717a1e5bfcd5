"""The job store: conditional state changes and the routing table's reload on change."""

from __future__ import annotations

from typing import Any

from worker.setup.jobconfig import JobState, parse_job_config
from worker.setup.jobs import SENDING_STATES, JobStore

CONFIG = {"label": "j", "authorization": "a", "audiences": ["vip"], "identifier_mappings": {"email": "email"}}


def test_conditional_change_never_overwrites_a_state_written_meanwhile(fake_redis: Any) -> None:
    store = JobStore(fake_redis)
    job = store.create(parse_job_config(CONFIG), state=JobState.BACKFILLING)
    store.set_state(job.id, JobState.PAUSED, "401 from Attentive")
    # The backfill finishing must not un-pause the job.
    assert not store.set_state_if(job.id, JobState.RUNNING, {JobState.BACKFILLING})
    assert store.get(job.id).state is JobState.PAUSED
    assert store.get(job.id).pause_reason == "401 from Attentive"
    # A flush pausing must not undo an operator's stop.
    store.set_state(job.id, JobState.STOPPED)
    assert not store.set_state_if(job.id, JobState.PAUSED, SENDING_STATES, "403")
    assert store.get(job.id).state is JobState.STOPPED
    job = store.create(parse_job_config({**CONFIG, "label": "j2"}), state=JobState.BACKFILLING)
    assert store.set_state_if(job.id, JobState.RUNNING, {JobState.BACKFILLING})
    assert store.get(job.id).state is JobState.RUNNING


def test_another_process_sees_a_new_job_on_its_next_routing_read(fake_redis: Any) -> None:
    writer, reader = JobStore(fake_redis), JobStore(fake_redis)
    reader.refresh()
    assert reader.routes("vip") == []
    job = writer.create(parse_job_config(CONFIG))
    reader.refresh()
    assert [j.id for j in reader.routes("vip")] == [job.id]
    writer.set_state(job.id, JobState.STOPPED)
    reader.refresh()
    assert reader.routes("vip") == []
