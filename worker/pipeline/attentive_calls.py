"""What flush and poll share when they call Attentive: how long a call may wait for a rate-limit
token, how late a poll may be before the sweep re-drives it, and pausing a job whose key Attentive
refuses. One module, so neither stage reaches into the other's internals.
"""

from __future__ import annotations

import logging

from worker.clients.attentive import AttentiveError, Unauthorized
from worker.runtime import Runtime
from worker.setup.jobconfig import JobState
from worker.setup.jobs import SENDING_STATES, ExportJob
from worker.store import keys

log = logging.getLogger(__name__)

#: Longest a flush or poll waits for a rate-limit token before giving its work back.
TOKEN_WAIT_SECONDS = 5.0
#: Grace after a poll's due time before the sweep re-drives it (its task was lost).
POLL_GRACE_MS = 120_000


def pause_for_auth_error(rt: Runtime, job: ExportJob, exc: AttentiveError) -> str:
    """Pause the job after a 401/403 (retrying would only storm Attentive); returns the reason."""
    reason = _pause_reason(exc)
    rt.jobs.set_state_if(job.id, JobState.PAUSED, SENDING_STATES, reason)
    rt.forget_client(job)
    rt.redis.hset(keys.job_status(job.id), "last_error", reason)
    log.warning("job %s paused: %s", job.id, reason)
    return reason


def _pause_reason(exc: AttentiveError) -> str:
    if isinstance(exc, Unauthorized):
        return (
            "Attentive rejected the API key (401 Unauthorized): it is unknown or revoked. "
            "Save a valid key in the authorization, then resume the job."
        )
    return (
        "Attentive refused the write (403 Forbidden): the key lacks Custom Attributes and Subscribers "
        "write permission. Fix the app's permissions, then resume the job."
    )
