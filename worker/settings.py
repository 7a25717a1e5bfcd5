"""Process settings: one validated model of the environment, checked when a process starts.

Every knob a deployment can turn lives here, with its default, its allowed range and a one-line
reason. Workers are stateless (DESIGN.md invariant 7): nothing here is per-job; per-job settings
live on the export job.

Every process reads its settings through :func:`load_settings` when it starts, so a bad value stops
it at once with one line naming the variable (``ATTENTIVE_RATE_LIMIT: must be a number greater
than 0 (got 'abc')``) instead of failing every task later:

- Celery worker, beat and flower: on importing :mod:`worker.celeryconfig` (exit with that line);
- the worker, in addition, refuses to start without ``EXPORT_SECRET_KEY``
  (:meth:`Settings.require_secret_key`, called from ``worker_init`` in :mod:`worker.app`);
- ``attentive-export`` (any command): ``error: <line>``, exit status 2;
- the webhook receiver (``serve`` or ``uvicorn worker.webhook.receiver:app``): ``error: <line>``.

Rules shared by every variable: an empty or blank value counts as unset (the default applies),
values are stripped, Attentive's and Lytics' URLs lose a trailing slash. Secrets (``EXPORT_SECRET_KEY``, ``WEBHOOK_TOKEN``)
are :class:`~pydantic.SecretStr`: never in ``repr``, ``str``, logs or error messages.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import urlsplit

from cryptography.fernet import Fernet
from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticUseDefault
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Attentive's production host. The v2 paths carry their own ``/v2`` prefix (CONTRACT.md §0).
DEFAULT_ATTENTIVE_API_URL = "https://api.attentivemobile.com"
#: Lytics' API host, for the segment scan behind backfills.
DEFAULT_LYTICS_API_URL = "https://api.lytics.io"
#: Local Redis, database 0. Tests override it with ``TEST_REDIS_URL``.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
#: Attentive allows 100 requests/s per key on the bulk and job-status endpoints; stay 10% under.
DEFAULT_RATE_LIMIT_PER_SECOND = 90.0
#: Longest allowed ``ATTENTIVE_POLL_CAP_SECONDS``: a batch at Attentive is checked at least every
#: six hours (the schedule lives in Redis, so no broker countdown bounds it).
MAX_POLL_CAP_SECONDS = 6 * 3600.0
#: Longest allowed ``SWEEP_INTERVAL_SECONDS``: time-based flushes, crash recovery and starting
#: pollers all wait for the sweep, and a job's flush interval can be as short as 1 s.
MAX_SWEEP_INTERVAL_SECONDS = 60.0
#: 5 MiB: a Lytics batch of 1,000 triggers with a few dozen profile fields fits comfortably.
DEFAULT_WEBHOOK_MAX_BYTES = 5 * 1024 * 1024
#: How long after a webhook its drain starts, by default (worker.pipeline.inbox).
DEFAULT_DRAIN_GATHER_SECONDS = 0.25
#: Longest a webhook waits for the drain that ingests it (it gathers the requests arriving meanwhile):
#: well within the 30 s flush interval, and far from the minute after which the sweep re-drives.
MAX_DRAIN_GATHER_SECONDS = 10.0
#: A webhook token shorter than this is too easy to guess for an endpoint on the internet.
MIN_WEBHOOK_TOKEN_LENGTH = 16
#: Dead letters kept per job (the oldest go beyond it; their counts by reason stay exact).
DEFAULT_DEADLETTER_CAP = 100_000
#: A cap above this would let one job's dead letters take gigabytes (DESIGN.md invariant 8).
MAX_DEADLETTER_CAP = 10_000_000
#: Methods Lytics can be configured to use (``POST`` is its default and always accepted).
WEBHOOK_METHODS = ("POST", "GET", "PUT", "PATCH", "DELETE")
#: ``LOG_FORMAT``: readable lines, or one JSON object per line (worker/logs.py).
LOG_FORMATS = ("text", "json")

_TOKEN_HINT = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
#: ``attentive-export secret-key`` needs no settings, so it runs while the bad key is still set.
_SECRET_KEY_HINT = "make one with: attentive-export secret-key"


class SettingsError(Exception):
    """A setting is missing or wrong; ``str(exc)`` is one line naming the variable (no secret in it)."""


#: What a valid value looks like, per variable, for errors raised by pydantic itself (a number that
#: is not one, out of range...). Errors raised by the validators below carry their own text.
_RULES = {
    "REDIS_URL": "must be a redis://, rediss:// or unix:// URL, or redis+cluster:// or rediss+cluster:// for a Redis Cluster",
    "CELERY_BROKER_URL": "must be a broker URL such as redis://host:6379/0 or amqp://user:password@host:5672//",
    "ATTENTIVE_API_URL": "must be an http:// or https:// URL",
    "LYTICS_API_URL": "must be an http:// or https:// URL",
    "ATTENTIVE_RATE_LIMIT": "must be a number greater than 0",
    "ATTENTIVE_FIRST_POLL_SECONDS": "must be a number of seconds greater than 0",
    "ATTENTIVE_POLL_CAP_SECONDS": f"must be a number of seconds greater than 0 and at most {MAX_POLL_CAP_SECONDS:g}",
    "FLUSH_LEASE_SECONDS": "must be a number of seconds, at least 1",
    "SWEEP_INTERVAL_SECONDS": f"must be a number of seconds greater than 0 and at most {MAX_SWEEP_INTERVAL_SECONDS:g}",
    "WEBHOOK_MAX_BYTES": "must be a whole number of bytes, at least 1",
    "WEBHOOK_METHOD": f"must be one of {', '.join(WEBHOOK_METHODS)}",
    "WEBHOOK_DRAIN_GATHER_SECONDS": f"must be a number of seconds, at least 0 and at most {MAX_DRAIN_GATHER_SECONDS:g}",
    "DEADLETTER_CAP": f"must be a whole number of entries, at least 1 and at most {MAX_DEADLETTER_CAP}",
    "LOG_FORMAT": f"must be one of {', '.join(LOG_FORMATS)}",
    "BACKFILL_FILE_MAX_STAGED_LINES": "must be a whole number of lines, at least 1",
}
#: Variables whose value never appears in an error message.
_SECRETS = frozenset({"EXPORT_SECRET_KEY", "WEBHOOK_TOKEN"})
#: Variables that may carry a password (``redis://:password@host``); it is masked in error messages.
_URLS = frozenset({"REDIS_URL", "CELERY_BROKER_URL", "ATTENTIVE_API_URL", "LYTICS_API_URL"})
_URL_PASSWORD = re.compile(r"(://[^/@:]*:)[^@/]*@")


#: ``REDIS_URL`` schemes that name a node of a Redis Cluster (``worker.store.connection``), each
#: with the scheme of a single server it speaks otherwise.
REDIS_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
#: Celery's Redis transport does not support Redis Cluster: its broker is a server of its own.
_CLUSTER_BROKER = (
    "Celery's Redis transport does not support Redis Cluster; give a plain Redis "
    "(redis://host:6379/0) or RabbitMQ (amqp://user:password@host:5672//)"
)


def is_cluster_url(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster (``redis+cluster://`` or ``rediss+cluster://``)."""
    return urlsplit(url).scheme.lower() in REDIS_CLUSTER_SCHEMES


#: kombu transports (URL schemes) that speak to Redis, and to RabbitMQ (AMQP 0-9-1).
REDIS_BROKER_SCHEMES = frozenset({"redis", "rediss", "sentinel", "redis+socket"})
AMQP_BROKER_SCHEMES = frozenset({"amqp", "amqps", "pyamqp", "librabbitmq"})


def broker_kind(url: str) -> str:
    """``"redis"`` or ``"amqp"`` (RabbitMQ) for a Celery broker URL, else its scheme. Of a
    failover list (``amqp://a;amqp://b``) the first URL decides."""
    scheme = url.split(";", 1)[0].strip().partition("://")[0].lower()
    if scheme in REDIS_BROKER_SCHEMES:
        return "redis"
    if scheme in AMQP_BROKER_SCHEMES:
        return "amqp"
    return scheme


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(_RULES["ATTENTIVE_API_URL"])
    return value.rstrip("/")


class Settings(BaseSettings):
    """Typed, validated view of the environment.

    ``Settings()`` reads the environment; keyword arguments by field name override it
    (``Settings(rate_limit_per_second=5)``, as tests do). Processes use :func:`load_settings`, which
    turns a validation error into one :class:`SettingsError` line.
    """

    model_config = SettingsConfigDict(
        case_sensitive=True,  # REDIS_URL, not redis_url: like os.environ on Linux
        env_ignore_empty=True,  # empty = unset (blank too: see _blank_is_unset)
        extra="forbid",  # a misspelt keyword argument is an error, not silently ignored
        frozen=True,
        hide_input_in_errors=True,  # a ValidationError's text never shows a value (secrets)
        # Not validate_by_name/populate_by_name: the environment would then also be searched for
        # "secret_key", "redis_url"... Keyword arguments by field name are mapped to variable names
        # in __init__ instead, so variables are read by their names only.
    )

    #: All state: buffers, batches, jobs, authorizations, status. One server, or any node of a Redis
    #: Cluster (``redis+cluster://host:port``: the client finds the other nodes).
    redis_url: str = Field(DEFAULT_REDIS_URL, validation_alias="REDIS_URL")
    #: Celery's broker; defaults to ``REDIS_URL``.
    broker_url: str = Field("", validation_alias="CELERY_BROKER_URL", validate_default=True)
    attentive_api_url: str = Field(DEFAULT_ATTENTIVE_API_URL, validation_alias="ATTENTIVE_API_URL")
    lytics_api_url: str = Field(DEFAULT_LYTICS_API_URL, validation_alias="LYTICS_API_URL")
    #: Fernet key(s) (urlsafe base64, 32 bytes; comma-separated to rotate, the first encrypts) that
    #: encrypt stored API keys. Never logged. Read it with :meth:`secret_key_value`.
    secret_key: SecretStr | None = Field(None, validation_alias="EXPORT_SECRET_KEY")
    #: Requests/s per API key for all workers together (Attentive allows 100).
    rate_limit_per_second: float = Field(
        DEFAULT_RATE_LIMIT_PER_SECOND, validation_alias="ATTENTIVE_RATE_LIMIT", gt=0, allow_inf_nan=False
    )
    #: First status check of an Attentive batch job; later ones come after a quarter of the batch's
    #: age, up to the cap, and further apart when many batches are out (worker.pipeline.poll).
    first_poll_seconds: float = Field(
        2.0, validation_alias="ATTENTIVE_FIRST_POLL_SECONDS", gt=0, allow_inf_nan=False
    )
    #: Longest wait between two status checks of one batch job, unless the number of batches at
    #: Attentive needs longer to fit the poll share.
    poll_cap_seconds: float = Field(
        900.0,
        validation_alias="ATTENTIVE_POLL_CAP_SECONDS",
        gt=0,
        le=MAX_POLL_CAP_SECONDS,
        validate_default=True,  # checked against ATTENTIVE_FIRST_POLL_SECONDS when left at its default
    )
    #: Share of the key's rate that status checks may take while batches wait to be sent (sends keep
    #: the rest); with nothing waiting, checks use spare tokens only.
    poll_share: float = Field(0.1, validation_alias="ATTENTIVE_POLL_SHARE", gt=0, le=1, allow_inf_nan=False)
    #: A backfill step waits while a job's sealed batches carry more users than this: a live change
    #: then waits behind at most this many (about 2 s of sending at full rate with the default).
    backfill_max_queued_users: int = Field(50_000, validation_alias="BACKFILL_MAX_QUEUED_USERS", ge=1)
    #: A file backfill (``attentive-export backfill``) waits while this many of the job's file lines
    #: are staged in Redis and not yet taken by a backfill step: at about 1 KB a line, 50,000 is
    #: ~50 MB per job, yet ten steps of work ahead of the backfill (it never waits on the command).
    backfill_file_max_staged_lines: int = Field(
        50_000, validation_alias="BACKFILL_FILE_MAX_STAGED_LINES", ge=1
    )
    #: How long a flush owns a claimed batch before the sweep hands it to another worker.
    lease_seconds: float = Field(60.0, validation_alias="FLUSH_LEASE_SECONDS", ge=1, allow_inf_nan=False)
    #: After a send whose answer never came (the connection dropped after the request went out),
    #: Attentive may run a job nobody knows the id of. Its users are held at least this long (or
    #: twice the longest Attentive job seen for the export job, if longer) before anything newer is
    #: sent for them, so such a job can never overwrite a newer change (worker.pipeline.flush).
    uncertain_send_hold_seconds: float = Field(
        600.0, validation_alias="ATTENTIVE_UNCERTAIN_HOLD_SECONDS", gt=0, allow_inf_nan=False
    )
    #: How often beat runs the sweep (time-based seals, expired leases, starting pollers).
    sweep_interval_seconds: float = Field(
        1.0, validation_alias="SWEEP_INTERVAL_SECONDS", gt=0, le=MAX_SWEEP_INTERVAL_SECONDS
    )
    #: Shared secret(s) of the webhook receiver, comma-separated (rotation). Never logged. Read the
    #: tokens with :meth:`webhook_token_values`.
    webhook_token: SecretStr | None = Field(None, validation_alias="WEBHOOK_TOKEN")
    #: Largest webhook body; a larger one gets 413.
    webhook_max_bytes: int = Field(DEFAULT_WEBHOOK_MAX_BYTES, validation_alias="WEBHOOK_MAX_BYTES", ge=1)
    #: The method configured in Lytics, accepted besides POST.
    webhook_method: str = Field("POST", validation_alias="WEBHOOK_METHOD")
    #: How long after a webhook its drain starts, ingesting every request that arrived meanwhile in
    #: one task (worker.pipeline.inbox): longer means fewer tasks under load, and that much latency.
    webhook_drain_gather_seconds: float = Field(
        DEFAULT_DRAIN_GATHER_SECONDS,
        validation_alias="WEBHOOK_DRAIN_GATHER_SECONDS",
        ge=0,
        le=MAX_DRAIN_GATHER_SECONDS,
        allow_inf_nan=False,
    )
    #: Dead letters kept per job; beyond it the oldest are dropped, counts by reason stay exact.
    deadletter_cap: int = Field(
        DEFAULT_DEADLETTER_CAP, validation_alias="DEADLETTER_CAP", ge=1, le=MAX_DEADLETTER_CAP
    )

    #: Log lines as readable text or one JSON object per line with ids as fields (worker/logs.py).
    log_format: Literal["text", "json"] = Field("text", validation_alias="LOG_FORMAT")

    def __init__(self, **values: Any) -> None:
        super().__init__(**{_ENV_NAMES.get(name, name): value for name, value in values.items()})

    @field_validator("redis_url", mode="before")
    @classmethod
    def _redis_scheme(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        parts = urlsplit(value)
        if parts.scheme.lower() in REDIS_CLUSTER_SCHEMES:
            if not parts.hostname:
                raise ValueError("a Redis Cluster URL must name a node: redis+cluster://host:port")
            if parts.path.strip("/") not in ("", "0"):
                raise ValueError("a Redis Cluster has database 0 only: leave the path out")
        elif parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(_RULES["REDIS_URL"])
        return value

    @field_validator("broker_url", mode="before")
    @classmethod
    def _broker_url_shape(cls, value: Any) -> Any:
        if isinstance(value, str) and value and "://" not in value:
            raise ValueError(_RULES["CELERY_BROKER_URL"])
        if isinstance(value, str) and is_cluster_url(value.split(";", 1)[0].strip()):
            raise ValueError(f"cannot be a Redis Cluster: {_CLUSTER_BROKER}")
        return value

    @field_validator("broker_url", mode="after")
    @classmethod
    def _broker_defaults_to_redis(cls, value: str, info: ValidationInfo) -> str:
        redis_url = str(info.data.get("redis_url", ""))
        if not value and is_cluster_url(redis_url):
            raise ValueError(f"must be set when REDIS_URL is a Redis Cluster: {_CLUSTER_BROKER}")
        return value or redis_url

    @field_validator("attentive_api_url", "lytics_api_url", mode="before")
    @classmethod
    def _api_url(cls, value: Any) -> Any:
        return _http_url(value) if isinstance(value, str) else value

    @field_validator("secret_key", mode="before")
    @classmethod
    def _fernet_keys(cls, value: Any) -> Any:
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        if not isinstance(raw, str):
            return value
        parts = [p.strip() for p in raw.split(",") if p.strip()]
        if not parts:
            raise PydanticUseDefault()
        for position, part in enumerate(parts, start=1):
            try:
                Fernet(part.encode("ascii"))
            except (ValueError, UnicodeEncodeError):
                where = f" (key {position} of {len(parts)})" if len(parts) > 1 else ""
                raise ValueError(
                    f"must be a Fernet key{where}: 32 url-safe base64-encoded bytes (44 characters); "
                    f"{_SECRET_KEY_HINT}"
                ) from None
        return ",".join(parts)

    @field_validator("poll_cap_seconds", mode="after")
    @classmethod
    def _cap_not_below_first(cls, value: float, info: ValidationInfo) -> float:
        first = info.data.get("first_poll_seconds")
        if first is not None and value < first:
            raise ValueError(f"must be at least ATTENTIVE_FIRST_POLL_SECONDS ({first:g})")
        return value

    @field_validator("webhook_token", mode="before")
    @classmethod
    def _tokens(cls, value: Any) -> Any:
        if isinstance(value, tuple | list):  # Settings(webhook_token=("t1", "t2"))
            value = ",".join(v.get_secret_value() if isinstance(v, SecretStr) else str(v) for v in value)
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        if not isinstance(raw, str):
            return value
        tokens = [t.strip() for t in raw.split(",") if t.strip()]
        if not tokens:
            raise PydanticUseDefault()
        for token in tokens:
            if len(token) < MIN_WEBHOOK_TOKEN_LENGTH or any(c.isspace() for c in token):
                raise ValueError(
                    f"each token must be at least {MIN_WEBHOOK_TOKEN_LENGTH} characters without spaces "
                    f"(make one with: {_TOKEN_HINT})"
                )
        return ",".join(tokens)

    @field_validator("webhook_method", mode="before")
    @classmethod
    def _method(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        method = value.upper()
        if method not in WEBHOOK_METHODS:
            raise ValueError(_RULES["WEBHOOK_METHOD"])
        return method

    @field_validator("log_format", mode="before")
    @classmethod
    def _log_format(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        if value.lower() not in LOG_FORMATS:
            raise ValueError(_RULES["LOG_FORMAT"])
        return value.lower()

    # Before-validators run last-defined first: this one runs before the field-specific ones above.
    @field_validator("*", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str):
            value = value.strip()
            if not value:
                if info.field_name == "broker_url":
                    return ""  # its default is REDIS_URL: _broker_defaults_to_redis
                raise PydanticUseDefault()
        return value

    # --- reading ---------------------------------------------------------------------------------

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """The settings from ``env`` (default: this process's environment), validated.

        Raises:
            SettingsError: a value is wrong; the message is one line naming the variable.
        """
        try:
            if env is None:
                return cls()
            # Every variable is given, those missing from ``env`` as unset (blank), so nothing is
            # read from os.environ (keyword arguments win over the environment).
            return cls(**{name: env.get(name, "") for name in _ENV_NAMES.values()})
        except ValidationError as exc:
            raise SettingsError(describe_error(exc)) from None

    def secret_key_value(self) -> str | None:
        """``EXPORT_SECRET_KEY`` in clear, for :class:`worker.setup.crypto.Cipher` only."""
        return self.secret_key.get_secret_value() if self.secret_key is not None else None

    def webhook_token_values(self) -> tuple[str, ...]:
        """``WEBHOOK_TOKEN``'s tokens in clear, for the receiver's comparison only."""
        if self.webhook_token is None:
            return ()
        return tuple(self.webhook_token.get_secret_value().split(","))

    def require_secret_key(self) -> None:
        """Raise :class:`SettingsError` unless ``EXPORT_SECRET_KEY`` is set.

        Where a missing key stops a process: a Celery *worker* refuses to start without it (every
        flush and poll decrypts a stored API key, so a worker without it could only fail or pause
        every job), see ``worker_init`` in :mod:`worker.app`. Beat, flower and the webhook receiver
        never decrypt a key and start without it; a CLI command that stores or reads an API key
        stops with its own one-line error (``worker.setup.crypto.SecretKeyMissing``).
        """
        if self.secret_key is None:
            raise SettingsError(
                "EXPORT_SECRET_KEY: not set; a worker needs it to decrypt the stored Attentive API keys "
                f"(use the key the authorizations were saved with, or {_SECRET_KEY_HINT})"
            )


#: Field name -> environment variable.
_ENV_NAMES: dict[str, str] = {
    name: str(field.validation_alias) for name, field in Settings.model_fields.items()
}


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """This process's settings, validated (see the module doc for where each process calls it).

    Raises:
        SettingsError: one line naming the variable and what is wrong with it.
    """
    return Settings.from_env(env)


def describe_error(exc: ValidationError) -> str:
    """One line for a validation error: ``VARIABLE: what is wrong (got 'value')``, ``; ``-separated
    when several variables are wrong. Secret values are never shown; URL passwords are masked."""
    problems: dict[str, str] = {}
    for error in exc.errors(include_url=False):
        name = str(error["loc"][0]) if error["loc"] else "settings"
        if name in problems:
            continue
        if error["type"] == "value_error":
            what = str(error.get("ctx", {}).get("error", error["msg"]))
        elif error["type"] == "extra_forbidden":
            problems[name] = f"{name}: not a setting"
            continue
        else:
            what = _RULES.get(name, error["msg"])
        got = ""
        if name not in _SECRETS and "input" in error and error["loc"]:
            shown = repr(error["input"])
            if name in _URLS:
                shown = _URL_PASSWORD.sub(r"\1***@", shown)
            got = f" (got {shown[:77] + '...' if len(shown) > 80 else shown})"
        problems[name] = f"{name}: {what}{got}"
    return "; ".join(problems.values()) or "invalid settings"
