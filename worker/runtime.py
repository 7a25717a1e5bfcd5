"""Per-process wiring: one Redis pool, the job store, Attentive clients and rate limiters.

Everything here is a cache of what Redis says; a process can be killed or added at any time
(invariant 7). Built lazily on first use, after Celery's prefork, so no socket crosses a fork.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from functools import cached_property

import redis
from celery.signals import worker_process_init

from worker.clients.attentive import AttentiveClient
from worker.dispatch import CeleryDispatcher, Dispatcher
from worker.mapping.mapper import compiled_mapper
from worker.settings import Settings, load_settings
from worker.setup.authorizations import AuthorizationNotFound, AuthorizationStore
from worker.setup.crypto import SecretKeyError
from worker.setup.jobs import ExportJob, JobStore
from worker.store.connection import connect
from worker.store.ratelimit import RateLimiter, api_key_hash

log = logging.getLogger(__name__)

#: Redis briefly unavailable. Tasks retry on these with backoff (their message is acknowledged only
#: after they ran, acks_late, so nothing accepted is lost); steps that isolate one job's failure
#: from the others let these through, since they concern every job. On a Redis Cluster, also a
#: failover under way (CLUSTERDOWN, a slot no node serves yet) and a slot being moved (TRYAGAIN),
#: once the cluster client's own retries are spent.
REDIS_DOWN = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.SlotNotCoveredError,
)
#: No command waits forever on a half-open connection (a failover, a NAT or firewall timeout):
#: connecting gives up after 5 s, a reply after 15 s (every command here is a quick one or a short
#: Lua script; none blocks), TCP keepalive notices a dead peer on an idle connection, and a
#: connection idle for 30 s is checked with a PING before use (one server only: a cluster client
#: checks its nodes itself). Each failure is one of REDIS_DOWN, retried like any other Redis outage.
REDIS_CLIENT_OPTIONS = {
    "socket_connect_timeout": 5.0,
    "socket_timeout": 15.0,
    "socket_keepalive": True,
    "health_check_interval": 30,
}
#: The job's API key cannot be read here: its authorization was deleted, or this worker's
#: ``EXPORT_SECRET_KEY`` is missing or not the key it was saved with. Retrying in seconds cannot
#: help, so flush and poll block the job (shown in status, tried again every minute) instead of
#: failing every few seconds (worker/pipeline/attentive_calls.py).
KEY_UNREADABLE = (AuthorizationNotFound, SecretKeyError)
#: A process checks a cached client's authorization record this often: a deleted authorization,
#: or one saved again with another key, is noticed within this time, not at the next restart.
AUTH_RECHECK_SECONDS = 30.0


@dataclass
class _CachedClient:
    key_hash: str
    client: AttentiveClient
    #: The authorization record the client was built from (id and key hash).
    record: tuple[str, str]
    checked_at: float


class Runtime:
    """What a task needs to do its work; tests build one with their own Redis and dispatcher."""

    def __init__(
        self,
        settings: Settings | None = None,
        client: redis.Redis | None = None,
        dispatcher: Dispatcher | None = None,
    ) -> None:
        self.settings = settings or load_settings()
        self.redis = client or connect(self.settings.redis_url, **REDIS_CLIENT_OPTIONS)
        self._dispatcher = dispatcher
        self._clients: dict[str, _CachedClient] = {}
        self._lock = threading.Lock()

    @cached_property
    def jobs(self) -> JobStore:
        return JobStore(self.redis)

    @cached_property
    def authorizations(self) -> AuthorizationStore:
        return AuthorizationStore(self.redis, self.settings.secret_key_value())

    @property
    def dispatch(self) -> Dispatcher:
        if self._dispatcher is None:
            self._dispatcher = CeleryDispatcher()
        return self._dispatcher

    def client_for(self, job: ExportJob) -> AttentiveClient:
        """A pooled Attentive client for the job's authorization (key decrypted once per process).

        The cached client is checked against the authorization's record every
        :data:`AUTH_RECHECK_SECONDS`: a deleted authorization raises ``AuthorizationNotFound``,
        one saved again with another key gets a new client.

        Raises:
            one of :data:`KEY_UNREADABLE` when the key cannot be read.
        """
        auth = job.config.authorization
        with self._lock:
            cached = self._clients.get(auth)
            now = time.monotonic()
            if cached is not None and now - cached.checked_at < AUTH_RECHECK_SECONDS:
                return cached.client
            try:
                record = self.authorizations.get(auth)
            except AuthorizationNotFound:
                self._drop(auth)
                raise
            if cached is not None and cached.record == (record.id, record.key_hash):
                cached.checked_at = now
                return cached.client
            self._drop(auth)
            api_key = self.authorizations.api_key(record.id)
            client = AttentiveClient(api_key, self.settings.attentive_api_url)
            self._clients[auth] = _CachedClient(
                api_key_hash(api_key), client, (record.id, record.key_hash), now
            )
            return client

    def _drop(self, auth: str) -> None:
        """Forget (and close) the cached client of an authorization; call with the lock held."""
        cached = self._clients.pop(auth, None)
        if cached is not None:
            cached.client.close()

    def limiter_for(self, job: ExportJob) -> RateLimiter:
        """The rate limiter shared by every worker using the job's API key.

        Named by the key's hash, stored beside the encrypted key: the sweep asks for limiters of
        jobs whose key it never decrypts (and must not fail on one it cannot decrypt).
        """
        auth = job.config.authorization
        with self._lock:
            cached = self._clients.get(auth)
        key_hash = cached.key_hash if cached else self.authorizations.get(auth).key_hash
        return RateLimiter(self.redis, key_hash, self.settings.rate_limit_per_second)

    def warm_up(self) -> None:
        """Do now what a process's first tasks would otherwise pay for: connect to Redis, load the
        job table, compile each active job's mapping, decrypt its key and build its client.
        """
        self.redis.ping()
        for job in self.jobs.active():
            try:
                compiled_mapper(job.id, job.config)
                if job.sending:
                    self.client_for(job)
            except Exception as exc:  # that job's first task will say what is wrong; warm the rest
                log.warning("warm-up of job %s skipped: %s: %s", job.id, type(exc).__name__, exc)

    def forget_client(self, job: ExportJob) -> None:
        """Drop a cached client (after a 401/403, so a re-authorized key is read afresh)."""
        with self._lock:
            self._drop(job.config.authorization)


_runtime: Runtime | None = None


def runtime() -> Runtime:
    """The process-wide runtime used by Celery tasks."""
    global _runtime
    if _runtime is None:
        _runtime = Runtime()
    return _runtime


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _warm_up(**_kwargs: object) -> None:
    """Each pool process readies its Redis connection, mappings and clients before its first task.

    Connected here rather than in ``worker.app`` so the app module imports nothing of the domain
    (no import cycle); the tasks that every worker loads import this module.
    """
    # Not inside the try: a SettingsError is a configuration error, not a warm-up failure, and is
    # never hidden (the worker's main process validated the same environment before forking, see
    # worker/celeryconfig.py, so it only happens if that check was bypassed).
    rt = runtime()
    try:
        rt.warm_up()
    except Exception as exc:  # Redis down and the like: its tasks retry what failed here
        log.warning("warm-up skipped: %s: %s", type(exc).__name__, exc)
