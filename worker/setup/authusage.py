"""Deleting an authorization that export jobs still use.

A job names its authorization by label or id and reads the API key each time a worker builds its
client. Deleting the authorization under a running job used to go unnoticed until that job quietly
stopped delivering. So a delete is refused while any job that is not stopped names it, and the
refusal lists those jobs; with ``force`` the jobs that send (running, backfilling) are paused first,
with a reason that says what to do, and the others (created, paused) are listed: they stay as they
are and would be blocked if resumed without a new authorization (worker/pipeline/attentive_calls.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import redis

from worker.setup.authorizations import Authorization, AuthorizationError, AuthorizationStore
from worker.setup.jobconfig import JobState
from worker.setup.jobs import SENDING_STATES, ExportJob, JobStore


class AuthorizationInUse(AuthorizationError):
    """Export jobs use the authorization; ``jobs`` lists them. ``str(exc)`` is one line."""

    def __init__(self, record: Authorization, jobs: list[ExportJob]) -> None:
        listed = ", ".join(f"{j.id} ({j.state}, {j.config.label!r})" for j in jobs)
        super().__init__(
            f"authorization {record.label!r} ({record.id}) is used by {len(jobs)} export "
            f"job{'s' if len(jobs) != 1 else ''}: {listed}; stop or delete them first, or pass --force "
            "to pause them and delete it anyway"
        )
        self.jobs = jobs


@dataclass
class DeletedAuthorization:
    record: Authorization
    #: Jobs that were sending and are now paused.
    paused: list[ExportJob] = field(default_factory=list)
    #: Jobs that name it and were left as they were (created, or paused already).
    left: list[ExportJob] = field(default_factory=list)


def names(job: ExportJob, record: Authorization) -> bool:
    """Whether ``job`` uses ``record`` (its configuration names the id, or the label in any case)."""
    wanted = job.config.authorization.strip()
    return wanted == record.id or wanted.casefold() == record.label.casefold()


def jobs_using(jobs: Iterable[ExportJob], record: Authorization) -> list[ExportJob]:
    """The jobs that are not stopped and name ``record``."""
    return [j for j in jobs if j.state is not JobState.STOPPED and names(j, record)]


def pause_reason(job: ExportJob, record: Authorization) -> str:
    """What a job paused by a forced delete shows in status."""
    if job.config.authorization.strip() == record.id:
        fix = "it names the deleted id, so stop it and create a new job with a saved authorization"
    else:
        fix = (
            f"save an authorization labelled {record.label!r} again (`attentive-export auth add`), "
            f"then `attentive-export jobs resume {job.id}`"
        )
    return f"its authorization {record.label!r} ({record.id}) was deleted with --force: {fix}"


def delete_authorization(
    client: redis.Redis, secret_key: str | None, id_or_label: str, force: bool = False
) -> DeletedAuthorization:
    """Delete an authorization no job uses, or (``force``) pause the sending jobs using it first.

    Raises:
        AuthorizationNotFound: no such id or label.
        AuthorizationInUse: jobs use it and ``force`` is not set; nothing changed.
    """
    store = AuthorizationStore(client, secret_key)
    record = store.get(id_or_label)
    job_store = JobStore(client)
    using = jobs_using(job_store.list(), record)
    if using and not force:
        raise AuthorizationInUse(record, using)
    done = DeletedAuthorization(record)
    for job in using:
        if job_store.set_state_if(job.id, JobState.PAUSED, SENDING_STATES, pause_reason(job, record)):
            done.paused.append(job)
        else:
            done.left.append(job)
    store.delete(record.id)
    return done
