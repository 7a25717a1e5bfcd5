"""Prometheus metrics, computed from Redis at scrape time.

All state lives in Redis (DESIGN.md invariant 7), so the metrics do too: one custom collector reads
the counters the pipeline already keeps for ``status`` and the live structures (buffers, schedules,
heartbeats) when Prometheus scrapes. Any number of workers therefore needs no multiprocess mode, a
restarted process loses nothing, and ``/metrics`` on any webhook receiver or the standalone exporter
(``attentive-export metrics``) shows the same numbers as ``attentive-export status``.

Labels stay bounded: ``export_job`` (the export job's id; not ``job``, which Prometheus gives the
scrape job), ``key_hash`` (the API key's hash, never the key), ``worker`` (Celery node, for an hour
after its last beat), and reason labels from fixed vocabularies, each capped at
:data:`MAX_LABEL_VALUES` with the rest summed under ``other``. No user id is ever a label.

A scrape reads each job's keys in one pipelined round trip. With Redis unreachable it still answers,
with ``attentive_export_redis_up 0`` and nothing else, so the scrape itself does not fail.
Structures that newer code adds (a job's "in flight since" schedule, dead-letter counts by reason,
parked polls) are read only when :mod:`worker.store.keys` names them; their metrics are left out
otherwise, and a status field nobody writes yet (``users_sent``, ``last_error_at_ms``) likewise.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector, CollectorRegistry

from worker.observe import heartbeat
from worker.settings import DEFAULT_RATE_LIMIT_PER_SECOND
from worker.setup.authorizations import AuthorizationStore
from worker.setup.jobconfig import JobState
from worker.setup.jobs import ExportJob, JobStore
from worker.store import keys
from worker.store.connection import memory_info
from worker.store.joberrors import BLOCKED_REASON, error_recovered
from worker.store.ratelimit import DEFAULT_BURST
from worker.store.replies import decode_hash, text

log = logging.getLogger(__name__)

PREFIX = "attentive_export_"
#: Most values one reason label takes per job and metric; the rest are summed under ``other``.
MAX_LABEL_VALUES = 50
OTHER = "other"
#: Celery queues whose depth is read when the broker is Redis (kombu keeps one list per queue and
#: priority step, named ``<queue>`` and ``<queue>\x06\x16<step>``).
QUEUES = ("ingest", "flush", "poll", "sweep", "backfill")
_PRIORITY_STEPS = ("", "\x06\x163", "\x06\x166", "\x06\x169")
#: A batch at Attentive this long is overdue, and this long an alert (Attentive takes hours, not days).
OVERDUE_SECONDS = 12 * 3600
ALERT_SECONDS = 24 * 3600


@dataclass(frozen=True)
class _StatusMetric:
    """A metric read straight from fields of a job's status hash (``keys.job_status``).

    ``fields`` maps each field to its value of ``label``; without a label, one field, value ``""``.
    ``optional``: left out while the field is absent (nobody writes it yet), instead of 0.
    """

    name: str
    doc: str
    fields: Mapping[str, str]
    label: str = ""
    gauge: bool = False
    scale: float = 1.0
    optional: bool = False


_STATUS_METRICS = (
    _StatusMetric(
        "transitions_received", "Transitions routed to the job and mapped to a record.", {"received": ""}
    ),
    _StatusMetric(
        "transitions_merged",
        "Accepted transitions merged into the user's pending entry (another audience).",
        {"merged": ""},
    ),
    _StatusMetric(
        "transitions_queued_behind",
        "Accepted transitions held until the user's unfinished Attentive job completes.",
        {"queued_behind_unfinished": ""},
    ),
    _StatusMetric(
        "transitions_coalesced",
        "Held changes replaced by a newer one for the same user and audience.",
        {"coalesced_while_held": ""},
    ),
    _StatusMetric(
        "batches",
        "Batch events: sealed, submitted to Attentive, completed, resent after a failed or lost "
        "Attentive job, dead-lettered after the last attempt.",
        {
            "batches_sealed": "sealed",
            "batches_submitted": "submitted",
            "batches_completed": "completed",
            "batches_resent": "resent",
            "batches_deadlettered": "deadlettered",
        },
        label="event",
    ),
    _StatusMetric(
        "send_problems",
        "Sends cut off mid-way, sends whose answer never came, flush leases that expired, results "
        "files that could not be read.",
        {
            "sends_interrupted": "interrupted",
            "sends_uncertain": "uncertain",
            "leases_expired": "lease_expired",
            "results_unavailable": "results_unavailable",
        },
        label="kind",
    ),
    _StatusMetric(
        "users_sent", "Users sent in bulk requests Attentive accepted.", {"users_sent": ""}, optional=True
    ),
    _StatusMetric("users_delivered", "Users Attentive reported processed.", {"users_delivered": ""}),
    _StatusMetric(
        "records_refused", "Records Attentive refused in a completed job's results.", {"record_failures": ""}
    ),
    _StatusMetric(
        "deadletters",
        "Users dead-lettered (they will not reach Attentive); exact, beyond the kept list's cap too.",
        {"deadlettered_users": ""},
    ),
    _StatusMetric(
        "consecutive_failures",
        "Sends failing in a row: 429s, or 5xx/timeouts/connection errors; 0 after a success.",
        {"consecutive_429": "429", "consecutive_errors": "error"},
        label="kind",
        gauge=True,
    ),
    _StatusMetric(
        "longest_attentive_job_seconds",
        "Longest an Attentive job of this export job took to finish.",
        {"longest_attentive_job_ms": ""},
        gauge=True,
        scale=0.001,
        optional=True,
    ),
    _StatusMetric(
        "last_flush_timestamp_seconds",
        "Unix time of the job's last accepted bulk request.",
        {"last_flush_at": ""},
        gauge=True,
        scale=0.001,
        optional=True,
    ),
    _StatusMetric(
        "last_poll_timestamp_seconds",
        "Unix time Attentive last answered a status check of one of the job's batches.",
        {"last_poll_at": ""},
        gauge=True,
        scale=0.001,
        optional=True,
    ),
    _StatusMetric(
        "last_ingest_timestamp_seconds",
        "Unix time the job last took a transition into its buffer.",
        {"last_ingest_at": ""},
        gauge=True,
        scale=0.001,
        optional=True,
    ),
    _StatusMetric(
        "last_error_timestamp_seconds",
        "Unix time of the job's last error (its text is in `attentive-export status`).",
        {"last_error_at_ms": ""},
        gauge=True,
        scale=0.001,
        optional=True,
    ),
)

#: Per-key metrics of a job: labelled ``job`` and ``key_hash``.
_KEY_STATUS_METRICS = (
    _StatusMetric("responses_429", "429 answers from Attentive.", {"responses_429": ""}),
    _StatusMetric(
        "rate_limited_seconds",
        "Seconds every worker was held off the key after this job's 429s.",
        {"rate_limited_seconds": ""},
    ),
)


def _num(value: object) -> float:
    try:
        number = float(text(value))
    except ValueError:
        return 0.0
    return number if math.isfinite(number) else 0.0


def _counts(raw: Any) -> dict[str, float]:
    return {k: _num(v) for k, v in decode_hash(raw).items()}


def capped(counts: Mapping[str, float], limit: int = MAX_LABEL_VALUES) -> dict[str, float]:
    """``counts`` with at most ``limit`` labels: the largest kept, the rest summed under ``other``."""
    if len(counts) <= limit:
        return dict(counts)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    kept = dict(ranked[: limit - 1])
    kept[OTHER] = kept.get(OTHER, 0.0) + sum(v for _, v in ranked[limit - 1 :])
    return kept


def _age_seconds(now_ms: int, since_ms: float) -> float:
    return max(0.0, (now_ms - since_ms) / 1000)


class _Families:
    """Metric families of one scrape, created on first use and yielded in creation order."""

    def __init__(self) -> None:
        self._families: dict[str, Metric] = {}

    def add(
        self, kind: Callable[..., Metric], name: str, doc: str, labels: Mapping[str, str], value: float
    ) -> None:
        family: Any = self._families.get(name)
        if family is None:
            family = kind(PREFIX + name, doc, labels=list(labels))
            self._families[name] = family
        family.add_metric(list(labels.values()), value)

    def counter(self, name: str, doc: str, labels: Mapping[str, str], value: float) -> None:
        self.add(CounterMetricFamily, name, doc, labels, value)

    def gauge(self, name: str, doc: str, labels: Mapping[str, str], value: float) -> None:
        self.add(GaugeMetricFamily, name, doc, labels, value)

    def by_label(
        self, name: str, doc: str, labels: Mapping[str, str], label: str, counts: Mapping[str, float]
    ) -> None:
        """One counter sample per (capped) value of ``label``."""
        for value, n in capped(counts).items():
            self.counter(name, doc, {**labels, label: value}, n)

    def from_status(self, spec: _StatusMetric, labels: Mapping[str, str], status: Mapping[str, str]) -> None:
        for field, value in spec.fields.items():
            if spec.optional and field not in status:
                continue
            where = {**labels, spec.label: value} if spec.label else dict(labels)
            number = _num(status.get(field, 0)) * spec.scale
            self.add(
                GaugeMetricFamily if spec.gauge else CounterMetricFamily, spec.name, spec.doc, where, number
            )

    def __iter__(self) -> Iterator[Metric]:
        return iter(self._families.values())


#: A read queued on a pipeline; its reply is stored under the same name.
_Read = Callable[[Any], Any]


def _job_reads(job_id: str, now: int) -> dict[str, _Read]:
    """Every read of one job's keys, by name; optional structures only where ``keys`` has them."""
    reads: dict[str, _Read] = {
        "status": lambda p: p.hgetall(keys.job_status(job_id)),
        "skips": lambda p: p.hgetall(keys.job_skips(job_id)),
        "drops": lambda p: p.hgetall(keys.job_field_drops(job_id)),
        "open_users": lambda p: p.llen(keys.open_order(job_id)),
        "open_since": lambda p: p.get(keys.open_since(job_id)),
        "sealed": lambda p: p.llen(keys.sealed(job_id)),
        "leases": lambda p: p.zcard(keys.leases(job_id)),
        "polls": lambda p: p.zcard(keys.polls(job_id)),
        "outstanding": lambda p: p.hlen(keys.outstanding(job_id)),
        "waiting": lambda p: p.hlen(keys.waiting(job_id)),
        "deadletters_kept": lambda p: p.llen(keys.job_deadletters(job_id)),
    }
    # (read name, function of worker.store.keys naming the structure, read)
    optional: tuple[tuple[str, str, Callable[[Any, str], Any]], ...] = (
        ("in_flight", "in_flight", lambda p, k: p.zrange(k, 0, 0, withscores=True)),
        ("overdue", "in_flight", lambda p, k: p.zcount(k, "-inf", now - OVERDUE_SECONDS * 1000)),
        ("alerting", "in_flight", lambda p, k: p.zcount(k, "-inf", now - ALERT_SECONDS * 1000)),
        ("deadletter_counts", "job_deadletter_counts", lambda p, k: p.hgetall(k)),
        ("parked_polls", "parked_polls", lambda p, k: p.zcard(k)),
    )
    for name, key_name, read in optional:
        make_key = getattr(keys, key_name, None)
        if callable(make_key):
            reads[name] = _bound(read, str(make_key(job_id)))
    return reads


def _bound(read: Callable[[Any, str], Any], key: str) -> _Read:
    return lambda pipe: read(pipe, key)


class ExportCollector(Collector):
    """Reads every metric from Redis on each :meth:`collect` (one scrape).

    Args:
        client: the service's Redis (``REDIS_URL``), either ``decode_responses`` setting.
        broker: the Celery broker when it is Redis, for queue depths (None: not reported).
        rate_per_second: ``ATTENTIVE_RATE_LIMIT``, to turn the shared schedule into a wait.
        clock: wall-clock seconds (tests pass a fixed one).
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        broker: redis.Redis | None = None,
        rate_per_second: float = DEFAULT_RATE_LIMIT_PER_SECOND,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = client
        self._broker = broker
        self._slack_us = (DEFAULT_BURST - 1) * max(1, math.ceil(1_000_000 / rate_per_second))
        self._clock = clock

    def describe(self) -> list[Metric]:
        """Nothing up front: registering must not read Redis (the metrics are built per scrape)."""
        return []

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        families = _Families()
        up = 1.0
        try:
            self._collect(families, int(self._clock() * 1000))
        except redis.RedisError as exc:
            log.warning("metrics: Redis unavailable: %s", exc)
            families, up = _Families(), 0.0
        yield from families
        yield GaugeMetricFamily(PREFIX + "redis_up", "1 if this scrape could read Redis, else 0.", up)
        yield GaugeMetricFamily(
            PREFIX + "scrape_duration_seconds",
            "Seconds this scrape spent reading Redis.",
            time.perf_counter() - started,
        )

    def _collect(self, f: _Families, now: int) -> None:
        jobs = JobStore(self._redis).list()
        key_hashes = self._key_hashes()
        self._service(f, now)
        used: set[str] = set()
        for job in jobs:
            auth = job.config.authorization
            key_hash = key_hashes.get(auth) or key_hashes.get(auth.casefold(), "")
            self._job(f, job, key_hash, now)
            used.add(key_hash)
        self._rate_limits(f, sorted(used - {""}))
        if self._broker is not None:
            try:
                self._queues(f, self._broker)
            except redis.RedisError as exc:  # the broker's trouble: the rest of the scrape still holds
                log.warning("metrics: broker unavailable for queue depths: %s", exc)

    def _key_hashes(self) -> dict[str, str]:
        """Authorization id and label (casefolded) -> API key hash; read without the secret key."""
        found: dict[str, str] = {}
        for auth in AuthorizationStore(self._redis, None).list():
            found[auth.id] = auth.key_hash
            found[auth.label.casefold()] = auth.key_hash
        return found

    def _service(self, f: _Families, now: int) -> None:
        """What is not one job's: ingest before routing, the inbox backlog, heartbeats, memory."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.hgetall(keys.ingest_status())
        pipe.zcard(keys.inbox_pending())
        pipe.zrange(keys.inbox_pending(), 0, 0, withscores=True)
        raw_ingest, pending, oldest = pipe.execute()
        ingest = _counts(raw_ingest)
        f.counter(
            "ingest_transitions_received",
            "Transitions read by ingest, before routing.",
            {},
            ingest.get("received", 0),
        )
        f.by_label(
            "ingest_transitions_rejected",
            "Transitions ingest could not use, by reason (not JSON, no audience, bad time...).",
            {},
            "reason",
            {k.removeprefix("rejected:"): v for k, v in ingest.items() if k.startswith("rejected:")},
        )
        f.counter(
            "ingest_transitions_unroutable",
            "Usable transitions for an audience no running, backfilling or paused job exports.",
            {},
            ingest.get("unroutable", 0),
        )
        f.gauge("inbox_chunks_pending", "Inbox chunks written and not yet ingested.", {}, float(pending))
        f.gauge(
            "inbox_oldest_chunk_age_seconds",
            "Age of the oldest pending inbox chunk (0 when none); the sweep re-drives one after 60 s.",
            {},
            _age_seconds(now, float(oldest[0][1])) if oldest else 0.0,
        )

        beats = heartbeat.read(self._redis, now)
        for component, age in ((heartbeat.BEAT, beats.beat), (heartbeat.SWEEP, beats.sweep)):
            if age is not None:
                f.gauge(
                    "heartbeat_age_seconds",
                    "Seconds since beat last published the sweep (beat) or a sweep last ran (sweep).",
                    {"component": component},
                    age,
                )
        for node, age in sorted(beats.workers.items()):
            f.gauge(
                "worker_heartbeat_age_seconds",
                "Seconds since each Celery worker's last heartbeat (workers seen within the hour).",
                {"worker": node},
                age,
            )
        f.gauge(
            "workers_alive",
            f"Workers that beat within the last {heartbeat.WORKER_STALE_SECONDS:g} s.",
            {},
            float(len(beats.workers_alive())),
        )
        try:
            info = memory_info(self._redis)
        except redis.ResponseError:  # INFO renamed or disabled (some managed Redis): no memory figures
            return
        used, maximum = _memory(info)
        f.gauge("redis_used_memory_bytes", "Redis used_memory.", {}, used)
        f.gauge("redis_maxmemory_bytes", "Redis maxmemory (0: no limit).", {}, maximum)

    def _job(self, f: _Families, job: ExportJob, key_hash: str, now: int) -> None:
        reads = _job_reads(job.id, now)
        pipe = self._redis.pipeline(transaction=False)
        for read in reads.values():
            read(pipe)
        got = dict(zip(reads, pipe.execute(), strict=True))
        status = decode_hash(got["status"])
        skips = _counts(got["skips"])
        by_job = {"export_job": job.id}

        f.gauge(
            "job_info",
            "1 per export job, naming its authorization and the hash of its API key.",
            {"export_job": job.id, "authorization": job.config.authorization, "key_hash": key_hash},
            1.0,
        )
        for state in JobState:
            f.gauge(
                "job_state",
                "1 for the export job's current state, 0 for the others.",
                {"export_job": job.id, "state": state.value},
                1.0 if job.state is state else 0.0,
            )
        f.gauge(
            "job_blocked",
            "1 while the job's API key cannot be read (deleted authorization, wrong "
            "EXPORT_SECRET_KEY on a worker): nothing is sent; `attentive-export status` says why.",
            by_job,
            1.0 if status.get(BLOCKED_REASON) else 0.0,
        )
        f.gauge(
            "job_error_active",
            "1 while the job's last error has not been followed by a successful send or status "
            "check; 0 when there is none or it was recovered from.",
            by_job,
            1.0 if error_recovered(status) is False else 0.0,
        )
        for outcome, n in (
            ("accepted", _num(status.get("accepted", 0))),
            ("stale", _num(status.get("stale", 0))),
            ("skipped", sum(skips.values())),
        ):
            f.counter(
                "transitions",
                "Transitions routed to the job, by outcome: accepted into the buffer; stale (not "
                "newer than one accepted for the user and audience); skipped (no record possible).",
                {**by_job, "outcome": outcome},
                n,
            )
        f.by_label(
            "transitions_skipped",
            "Transitions not sent at all, by reason (no identifier, invalid profile...).",
            by_job,
            "reason",
            skips,
        )
        f.by_label(
            "field_drops",
            "Fields left out of a sent record, by reason (invalid phone, bad date...).",
            by_job,
            "reason",
            _counts(got["drops"]),
        )
        for spec in _STATUS_METRICS:
            f.from_status(spec, by_job, status)
        for spec in _KEY_STATUS_METRICS:
            f.from_status(spec, {**by_job, "key_hash": key_hash}, status)
        f.by_label(
            "polls",
            "Status checks by notable outcome (parked for budget, NEEDS_REVIEW, unknown status).",
            by_job,
            "kind",
            {k.removeprefix("polls_"): _num(v) for k, v in status.items() if k.startswith("polls_")},
        )

        f.gauge("open_batch_users", "Users in the open (unsealed) batch.", by_job, float(got["open_users"]))
        open_since = got["open_since"]
        f.gauge(
            "open_batch_age_seconds",
            "Age of the open batch's first entry (0 when empty); sealed after the flush interval.",
            by_job,
            _age_seconds(now, _num(open_since)) if open_since is not None and got["open_users"] else 0.0,
        )
        for where, n in (
            ("waiting", got["sealed"]),
            ("sending", got["leases"]),
            ("at_attentive", got["polls"]),
        ):
            f.gauge(
                "batches_now",
                "Batches by state: sealed and waiting to be sent, being sent (under a flush lease), "
                "at Attentive (submitted, job not finished).",
                {**by_job, "state": where},
                float(n),
            )
        f.gauge(
            "users_in_flight",
            "Users in sealed, sending or submitted batches not yet completed.",
            by_job,
            float(got["outstanding"]),
        )
        f.gauge(
            "users_held",
            "Users whose next change waits for their unfinished Attentive job.",
            by_job,
            float(got["waiting"]),
        )
        if "parked_polls" in got:
            f.gauge(
                "polls_parked",
                "Status checks parked until the key has spare budget.",
                by_job,
                float(got["parked_polls"]),
            )
        if "in_flight" in got:
            first = got["in_flight"]
            f.gauge(
                "oldest_batch_in_flight_seconds",
                "Seconds since the oldest batch still at Attentive was first sent (0 when none).",
                by_job,
                _age_seconds(now, float(first[0][1])) if first else 0.0,
            )
            for over, n in (
                (f"{OVERDUE_SECONDS // 3600}h", got["overdue"]),
                (f"{ALERT_SECONDS // 3600}h", got["alerting"]),
            ):
                f.gauge(
                    "batches_overdue",
                    "Batches at Attentive for longer than `over` (overdue after 12 h, alert after 24 h).",
                    {**by_job, "over": over},
                    float(n),
                )
        f.gauge(
            "deadletters_kept",
            "Dead-letter entries kept for operators to read (capped).",
            by_job,
            float(got["deadletters_kept"]),
        )
        if "deadletter_counts" in got:
            f.by_label(
                "deadletters_by_reason",
                "Dead letters by reason class (since the last purge of that class).",
                by_job,
                "reason",
                _counts(got["deadletter_counts"]),
            )

    def _rate_limits(self, f: _Families, key_hashes: list[str]) -> None:
        """Each API key's shared schedule, on Redis's clock (the one the limiter uses)."""
        if not key_hashes:
            return
        pipe = self._redis.pipeline(transaction=False)
        for key_hash in key_hashes:
            pipe.get(keys.ratelimit(key_hash))
            pipe.get(keys.ratelimit_backoff(key_hash))
            pipe.get(keys.ratelimit_streak(key_hash))
        replies = [_num(v) if v is not None else 0.0 for v in pipe.execute()]
        seconds, micros = self._redis.time()
        now_us = int(seconds) * 1_000_000 + int(micros)
        for i, key_hash in enumerate(key_hashes):
            tat, backoff_until, streak = replies[3 * i : 3 * i + 3]
            by_key = {"key_hash": key_hash}
            f.gauge(
                "ratelimit_wait_seconds",
                "How long a request asking the key's shared schedule for a token now would wait.",
                by_key,
                max(0.0, tat - now_us - self._slack_us, backoff_until - now_us) / 1_000_000,
            )
            f.gauge(
                "ratelimit_backoff_seconds",
                "Seconds left of the hold every worker keeps off the key after 429s.",
                by_key,
                max(0.0, backoff_until - now_us) / 1_000_000,
            )
            f.gauge("ratelimit_429_streak", "429s in a row for the key across all workers.", by_key, streak)

    def _queues(self, f: _Families, broker: redis.Redis) -> None:
        pipe = broker.pipeline(transaction=False)
        for queue in QUEUES:
            for step in _PRIORITY_STEPS:
                pipe.llen(queue + step)
        lengths = pipe.execute()
        per = len(_PRIORITY_STEPS)
        for i, queue in enumerate(QUEUES):
            f.gauge(
                "queue_messages",
                "Messages waiting in the Redis broker's Celery queue (not countdown tasks a worker holds).",
                {"queue": queue},
                float(sum(lengths[i * per : (i + 1) * per])),
            )


def _memory(info: Mapping[str, Any]) -> tuple[float, float]:
    """(used_memory, maxmemory) from ``INFO memory``, summed over nodes for a Redis Cluster reply."""
    if "used_memory" in info:
        return _num(info.get("used_memory", 0)), _num(info.get("maxmemory", 0))
    nodes = [v for v in info.values() if isinstance(v, Mapping)]
    return sum(_num(n.get("used_memory", 0)) for n in nodes), sum(_num(n.get("maxmemory", 0)) for n in nodes)


def registry(
    client: redis.Redis,
    *,
    broker: redis.Redis | None = None,
    rate_per_second: float = DEFAULT_RATE_LIMIT_PER_SECOND,
) -> CollectorRegistry:
    """A registry holding only the export collector (no process metrics: they would describe the
    scraping process, not the service)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(ExportCollector(client, broker=broker, rate_per_second=rate_per_second))
    return reg


def render(reg: CollectorRegistry, accept: str | None = None) -> tuple[bytes, str]:
    """The exposition an ``Accept`` header asks for (Prometheus text or OpenMetrics): body, type."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(reg), content_type


def broker_client(broker_url: str) -> redis.Redis | None:
    """A client for the Celery broker when it is Redis (queue depths), else None (RabbitMQ...)."""
    if not broker_url.startswith(("redis://", "rediss://", "unix://")):
        return None
    return redis.Redis.from_url(broker_url, socket_connect_timeout=2, socket_timeout=5)


def scrape_text(reg: CollectorRegistry) -> str:
    """The Prometheus text exposition, for ``attentive-export metrics --once`` and tests."""
    return render(reg)[0].decode()
