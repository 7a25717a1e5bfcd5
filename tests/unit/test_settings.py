"""One settings model (worker/settings.py), validated when a process starts.

Unit tests read explicit mappings (``load_settings(env)``), which never look at ``os.environ``, or set
the environment with monkeypatch. The integration test starts real ``celery worker`` and ``celery
beat`` processes with a bad value and checks they stop with the one line.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from typing import Any

import pytest
import redis
from pydantic import SecretStr, ValidationError

import worker.runtime
from tests.celeryproc import ROOT, CeleryProcesses
from worker.cli.main import main as cli_main
from worker.settings import (
    DEFAULT_ATTENTIVE_API_URL,
    DEFAULT_LYTICS_API_URL,
    DEFAULT_RATE_LIMIT_PER_SECOND,
    DEFAULT_REDIS_URL,
    DEFAULT_WEBHOOK_MAX_BYTES,
    Settings,
    SettingsError,
    load_settings,
)
from worker.setup.crypto import generate_secret_key
from worker.webhook.receiver import WebhookConfigError, WebhookSettings, WebhookStartupError

KEY = generate_secret_key()
TOKEN = "tok-0123456789abcdef-secret"
OTHER_TOKEN = "tok-fedcba9876543210-secret"

#: Every variable of README's Environment table.
VARIABLES = (
    "REDIS_URL",
    "CELERY_BROKER_URL",
    "ATTENTIVE_API_URL",
    "LYTICS_API_URL",
    "EXPORT_SECRET_KEY",
    "ATTENTIVE_RATE_LIMIT",
    "ATTENTIVE_FIRST_POLL_SECONDS",
    "ATTENTIVE_POLL_CAP_SECONDS",
    "ATTENTIVE_POLL_SHARE",
    "FLUSH_LEASE_SECONDS",
    "ATTENTIVE_UNCERTAIN_HOLD_SECONDS",
    "SWEEP_INTERVAL_SECONDS",
    "WEBHOOK_TOKEN",
    "WEBHOOK_MAX_BYTES",
    "WEBHOOK_METHOD",
    "WEBHOOK_DRAIN_GATHER_SECONDS",
    "DEADLETTER_CAP",
    "BACKFILL_MAX_QUEUED_USERS",
    "BACKFILL_FILE_MAX_STAGED_LINES",
    "LOG_FORMAT",
)

DEFAULTS: dict[str, Any] = {
    "redis_url": DEFAULT_REDIS_URL,
    "broker_url": DEFAULT_REDIS_URL,
    "attentive_api_url": DEFAULT_ATTENTIVE_API_URL,
    "lytics_api_url": DEFAULT_LYTICS_API_URL,
    "secret_key": None,
    "rate_limit_per_second": DEFAULT_RATE_LIMIT_PER_SECOND,
    "first_poll_seconds": 2.0,
    "poll_cap_seconds": 900.0,
    "poll_share": 0.1,
    "lease_seconds": 60.0,
    "uncertain_send_hold_seconds": 600.0,
    "sweep_interval_seconds": 1.0,
    "webhook_token": None,
    "webhook_max_bytes": DEFAULT_WEBHOOK_MAX_BYTES,
    "webhook_method": "POST",
    "webhook_drain_gather_seconds": 0.25,
    "deadletter_cap": 100_000,
    "backfill_max_queued_users": 50_000,
    "backfill_file_max_staged_lines": 50_000,
    "log_format": "text",
}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No settings variable in this process's environment."""
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def values(settings: Settings) -> dict[str, Any]:
    return {name: getattr(settings, name) for name in DEFAULTS}


# --- defaults and parsing ---------------------------------------------------------------------------


def test_defaults() -> None:
    assert values(load_settings({})) == DEFAULTS
    assert values(Settings.from_env({})) == DEFAULTS


def test_defaults_from_an_empty_environment(clean_env: pytest.MonkeyPatch) -> None:
    assert values(Settings()) == DEFAULTS
    assert values(load_settings()) == DEFAULTS


def test_every_readme_variable_is_a_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("### Environment") :]
    table = table[: table.index("\n\n", table.index("| variable |"))]
    listed = {line.split("`")[1] for line in table.splitlines() if line.startswith("| `")}
    aliases = {str(field.validation_alias) for field in Settings.model_fields.values()}
    assert listed == set(VARIABLES) == aliases


@pytest.mark.parametrize(
    ("variable", "raw", "attribute", "expected"),
    [
        ("REDIS_URL", "redis://cache:6380/3", "redis_url", "redis://cache:6380/3"),
        ("REDIS_URL", " rediss://cache:6380/3 ", "redis_url", "rediss://cache:6380/3"),
        ("REDIS_URL", "unix:///run/redis.sock?db=2", "redis_url", "unix:///run/redis.sock?db=2"),
        (
            "CELERY_BROKER_URL",
            "amqp://guest:guest@rabbit:5672//",
            "broker_url",
            "amqp://guest:guest@rabbit:5672//",
        ),
        ("ATTENTIVE_API_URL", "http://127.0.0.1:8787/", "attentive_api_url", "http://127.0.0.1:8787"),
        ("LYTICS_API_URL", "https://lytics.example//", "lytics_api_url", "https://lytics.example"),
        ("ATTENTIVE_RATE_LIMIT", "45.5", "rate_limit_per_second", 45.5),
        ("ATTENTIVE_RATE_LIMIT", " 10 ", "rate_limit_per_second", 10.0),
        ("ATTENTIVE_FIRST_POLL_SECONDS", "0.3", "first_poll_seconds", 0.3),
        ("ATTENTIVE_POLL_CAP_SECONDS", "2", "poll_cap_seconds", 2.0),
        ("ATTENTIVE_UNCERTAIN_HOLD_SECONDS", "30", "uncertain_send_hold_seconds", 30.0),
        ("FLUSH_LEASE_SECONDS", "3", "lease_seconds", 3.0),
        ("SWEEP_INTERVAL_SECONDS", "0.5", "sweep_interval_seconds", 0.5),
        ("WEBHOOK_MAX_BYTES", "2048", "webhook_max_bytes", 2048),
        ("WEBHOOK_METHOD", " put ", "webhook_method", "PUT"),
        ("WEBHOOK_DRAIN_GATHER_SECONDS", "0", "webhook_drain_gather_seconds", 0.0),
        ("BACKFILL_FILE_MAX_STAGED_LINES", "5000", "backfill_file_max_staged_lines", 5000),
    ],
)
def test_each_variable_is_parsed(variable: str, raw: str, attribute: str, expected: Any) -> None:
    assert getattr(load_settings({variable: raw}), attribute) == expected


def test_the_environment_is_read_like_a_mapping(clean_env: pytest.MonkeyPatch) -> None:
    env = {
        "REDIS_URL": "redis://r:1/2",
        "ATTENTIVE_API_URL": "http://sandbox:8787/",
        "EXPORT_SECRET_KEY": KEY,
        "ATTENTIVE_RATE_LIMIT": "50",
        "SWEEP_INTERVAL_SECONDS": "0.5",
        "WEBHOOK_TOKEN": TOKEN,
    }
    for name, value in env.items():
        clean_env.setenv(name, value)
    assert Settings() == load_settings() == load_settings(env)
    assert load_settings().broker_url == "redis://r:1/2"


def test_broker_defaults_to_redis_url() -> None:
    assert load_settings({"REDIS_URL": "redis://r:1/2"}).broker_url == "redis://r:1/2"
    both = load_settings({"REDIS_URL": "redis://r:1/2", "CELERY_BROKER_URL": "redis://b:1/3"})
    assert (both.redis_url, both.broker_url) == ("redis://r:1/2", "redis://b:1/3")


def test_secret_key_and_tokens_are_read_and_split() -> None:
    rotated = generate_secret_key()
    s = load_settings(
        {"EXPORT_SECRET_KEY": f" {KEY} , {rotated} ", "WEBHOOK_TOKEN": f" {TOKEN} , {OTHER_TOKEN} ,"}
    )
    assert s.secret_key_value() == f"{KEY},{rotated}"
    assert s.webhook_token_values() == (TOKEN, OTHER_TOKEN)
    assert isinstance(s.secret_key, SecretStr) and isinstance(s.webhook_token, SecretStr)


@pytest.mark.parametrize("variable", VARIABLES)
@pytest.mark.parametrize("blank", ["", "   ", "\t"])
def test_empty_means_unset(variable: str, blank: str) -> None:
    assert values(load_settings({variable: blank})) == DEFAULTS


def test_empty_means_unset_in_the_environment(clean_env: pytest.MonkeyPatch) -> None:
    for name in VARIABLES:
        clean_env.setenv(name, " ")
    assert values(load_settings()) == DEFAULTS


def test_a_token_list_of_only_commas_is_unset() -> None:
    assert load_settings({"WEBHOOK_TOKEN": " , ,"}).webhook_token_values() == ()


# --- keyword arguments (tests build Settings this way) ---------------------------------------------


def test_keyword_arguments_by_field_name_override_the_environment(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("ATTENTIVE_RATE_LIMIT", "50")
    clean_env.setenv("FLUSH_LEASE_SECONDS", "5")
    s = Settings(rate_limit_per_second=10_000.0, first_poll_seconds=0.01, secret_key=KEY)
    assert (s.rate_limit_per_second, s.first_poll_seconds, s.lease_seconds) == (10_000.0, 0.01, 5.0)
    assert s.secret_key_value() == KEY
    assert Settings(webhook_token=(TOKEN, OTHER_TOKEN)).webhook_token_values() == (TOKEN, OTHER_TOKEN)


def test_keyword_arguments_are_validated_too(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError):
        Settings(rate_limit_per_second=0)
    with pytest.raises(ValidationError):
        Settings(rate_limt_per_second=5)  # a typo is not silently ignored


def test_variables_are_read_by_their_names_only(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("secret_key", KEY)
    clean_env.setenv("redis_url", "redis://elsewhere:1/0")
    clean_env.setenv("attentive_rate_limit", "1")
    s = Settings()
    assert (s.secret_key, s.redis_url, s.rate_limit_per_second) == (
        None,
        DEFAULT_REDIS_URL,
        DEFAULT_RATE_LIMIT_PER_SECOND,
    )


def test_settings_are_frozen() -> None:
    s = load_settings({})
    with pytest.raises(ValidationError):
        s.rate_limit_per_second = 5  # type: ignore[misc]


# --- bad values: one line naming the variable -------------------------------------------------------


def test_the_one_line_for_a_rate_that_is_not_a_number() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({"ATTENTIVE_RATE_LIMIT": "abc"})
    assert str(info.value) == "ATTENTIVE_RATE_LIMIT: must be a number greater than 0 (got 'abc')"


@pytest.mark.parametrize(
    ("variable", "raw", "says"),
    [
        ("REDIS_URL", "localhost:6379", "must be a redis://, rediss:// or unix:// URL"),
        ("REDIS_URL", "http://cache:6379/0", "must be a redis://, rediss:// or unix:// URL"),
        ("CELERY_BROKER_URL", "localhost", "must be a broker URL"),
        ("ATTENTIVE_API_URL", "api.attentivemobile.com", "must be an http:// or https:// URL"),
        ("LYTICS_API_URL", "ftp://lytics", "must be an http:// or https:// URL"),
        ("EXPORT_SECRET_KEY", "not-a-fernet-key", "must be a Fernet key"),
        ("ATTENTIVE_RATE_LIMIT", "0", "must be a number greater than 0 (got '0')"),
        ("ATTENTIVE_RATE_LIMIT", "-5", "must be a number greater than 0 (got '-5')"),
        ("ATTENTIVE_RATE_LIMIT", "inf", "must be a number greater than 0 (got 'inf')"),
        ("ATTENTIVE_RATE_LIMIT", "nan", "must be a number greater than 0 (got 'nan')"),
        ("ATTENTIVE_FIRST_POLL_SECONDS", "soon", "must be a number of seconds greater than 0"),
        ("ATTENTIVE_FIRST_POLL_SECONDS", "0", "must be a number of seconds greater than 0"),
        ("ATTENTIVE_FIRST_POLL_SECONDS", "1000", "must be at least ATTENTIVE_FIRST_POLL_SECONDS (1000)"),
        ("ATTENTIVE_POLL_CAP_SECONDS", "1", "must be at least ATTENTIVE_FIRST_POLL_SECONDS (2) (got '1')"),
        ("ATTENTIVE_POLL_CAP_SECONDS", "30000", "at most 21600 (got '30000')"),
        ("FLUSH_LEASE_SECONDS", "0.5", "must be a number of seconds, at least 1 (got '0.5')"),
        ("FLUSH_LEASE_SECONDS", "1m", "must be a number of seconds, at least 1 (got '1m')"),
        ("SWEEP_INTERVAL_SECONDS", "0", "greater than 0 and at most 60 (got '0')"),
        ("SWEEP_INTERVAL_SECONDS", "300", "greater than 0 and at most 60 (got '300')"),
        ("WEBHOOK_TOKEN", "short", "each token must be at least 16 characters without spaces"),
        ("WEBHOOK_TOKEN", f"{TOKEN},tok en with spaces inside", "at least 16 characters without spaces"),
        ("WEBHOOK_MAX_BYTES", "5MB", "must be a whole number of bytes, at least 1 (got '5MB')"),
        ("WEBHOOK_MAX_BYTES", "0", "must be a whole number of bytes, at least 1 (got '0')"),
        ("WEBHOOK_METHOD", "OPTIONS", "must be one of POST, GET, PUT, PATCH, DELETE (got 'OPTIONS')"),
        ("BACKFILL_FILE_MAX_STAGED_LINES", "0", "must be a whole number of lines, at least 1 (got '0')"),
        ("BACKFILL_FILE_MAX_STAGED_LINES", "5k", "must be a whole number of lines, at least 1 (got '5k')"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_variable(variable: str, raw: str, says: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({variable: raw})
    message = str(info.value)
    # A first poll above the cap's default is reported on the cap, the variable that must change.
    named = "ATTENTIVE_POLL_CAP_SECONDS" if raw == "1000" else variable
    assert message.startswith(f"{named}: ") and says in message
    assert "\n" not in message


def test_several_bad_values_are_still_one_line() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({"ATTENTIVE_RATE_LIMIT": "abc", "FLUSH_LEASE_SECONDS": "0", "WEBHOOK_METHOD": "x"})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("ATTENTIVE_RATE_LIMIT: ")
    assert "; FLUSH_LEASE_SECONDS: " in message and "; WEBHOOK_METHOD: " in message


def test_the_environment_gives_the_same_line(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("ATTENTIVE_RATE_LIMIT", "abc")
    with pytest.raises(
        SettingsError, match=r"^ATTENTIVE_RATE_LIMIT: must be a number greater than 0 \(got 'abc'\)$"
    ):
        load_settings()
    with pytest.raises(SettingsError):
        Settings.from_env()


# --- secrets ----------------------------------------------------------------------------------------


def test_secrets_never_in_repr_str_or_dump() -> None:
    s = load_settings({"EXPORT_SECRET_KEY": KEY, "WEBHOOK_TOKEN": f"{TOKEN},{OTHER_TOKEN}"})
    for text in (repr(s), str(s), str(s.model_dump()), s.model_dump_json(), repr(s.secret_key)):
        for secret in (KEY, TOKEN, OTHER_TOKEN):
            assert secret not in text
    assert s.secret_key_value() == KEY  # still usable where it is needed


def test_secrets_never_in_error_messages() -> None:
    bad_key = KEY[:-4] + "!!!!"
    with pytest.raises(SettingsError) as info:
        load_settings({"EXPORT_SECRET_KEY": f"{KEY},{bad_key}", "WEBHOOK_TOKEN": "short-secret"})
    message = str(info.value)
    assert "EXPORT_SECRET_KEY: must be a Fernet key (key 2 of 2)" in message
    assert "WEBHOOK_TOKEN: " in message
    for secret in (KEY, bad_key, "short-secret"):
        assert secret not in message
    with pytest.raises(ValidationError) as raw:
        Settings(secret_key=bad_key)
    assert bad_key not in str(raw.value)  # hide_input_in_errors


def test_a_password_in_a_bad_url_is_masked() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({"REDIS_URL": "http://user:hunter2@cache:6379/0"})
    assert "hunter2" not in str(info.value) and "user:***@cache" in str(info.value)


# --- where a missing EXPORT_SECRET_KEY stops a process ---------------------------------------------


def test_a_worker_requires_the_secret_key() -> None:
    with pytest.raises(SettingsError, match=r"^EXPORT_SECRET_KEY: not set; a worker needs it"):
        load_settings({}).require_secret_key()
    load_settings({"EXPORT_SECRET_KEY": KEY}).require_secret_key()


# --- processes: CLI, worker warm-up, webhook receiver, celeryconfig ---------------------------------


@pytest.mark.parametrize("argv", [["status"], ["jobs", "list"], ["serve", "--port", "1"]])
def test_cli_prints_the_one_line_and_exits_2_for_any_command(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    clean_env.setenv("ATTENTIVE_RATE_LIMIT", "abc")
    assert cli_main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err == "error: ATTENTIVE_RATE_LIMIT: must be a number greater than 0 (got 'abc')\n"
    assert captured.out == ""


def test_secret_key_needs_no_settings_so_it_runs_while_a_bad_key_is_set(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The hint of a bad EXPORT_SECRET_KEY names `attentive-export secret-key`: it must then work."""
    clean_env.setenv("EXPORT_SECRET_KEY", "not a key")
    clean_env.setenv("ATTENTIVE_RATE_LIMIT", "abc")
    assert cli_main(["status"]) == 2
    assert "make one with: attentive-export secret-key" in capsys.readouterr().err
    assert cli_main(["secret-key"]) == 0
    printed = capsys.readouterr().out.strip()
    load_settings({"EXPORT_SECRET_KEY": printed}).require_secret_key()


def test_worker_warm_up_does_not_hide_a_settings_error(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("ATTENTIVE_RATE_LIMIT", "abc")
    clean_env.setattr(worker.runtime, "_runtime", None)
    with pytest.raises(SettingsError, match="ATTENTIVE_RATE_LIMIT"):
        worker.runtime._warm_up()


def test_worker_warm_up_still_skips_an_unreachable_redis(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class Down:
        def warm_up(self) -> None:
            raise redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:6379")

    monkeypatch.setattr(worker.runtime, "runtime", lambda: Down())
    with caplog.at_level(logging.WARNING):
        worker.runtime._warm_up()
    assert "warm-up skipped: ConnectionError" in caplog.text


def test_webhook_settings_come_from_the_same_model() -> None:
    s = WebhookSettings.from_env(
        {"WEBHOOK_TOKEN": f"{TOKEN},{OTHER_TOKEN}", "WEBHOOK_MAX_BYTES": "2048", "WEBHOOK_METHOD": "patch"}
    )
    assert (s.tokens, s.max_bytes, s.methods) == ((TOKEN, OTHER_TOKEN), 2048, ("POST", "PATCH"))
    with pytest.raises(WebhookConfigError, match=r"^WEBHOOK_MAX_BYTES: must be a whole number of bytes"):
        WebhookSettings.from_env({"WEBHOOK_TOKEN": TOKEN, "WEBHOOK_MAX_BYTES": "abc"})


def test_the_module_level_webhook_app_exits_with_the_one_line(clean_env: pytest.MonkeyPatch) -> None:
    """``uvicorn worker.webhook.receiver:app`` lets a SystemExit through: one line, exit status 1."""
    import worker.webhook.receiver as webhook

    clean_env.setattr(webhook, "_app", None)
    clean_env.setenv("WEBHOOK_TOKEN", TOKEN)
    clean_env.setenv("WEBHOOK_MAX_BYTES", "abc")
    with pytest.raises(SystemExit) as info:
        _ = webhook.app
    assert isinstance(info.value, WebhookStartupError)
    assert (
        info.value.code == "error: WEBHOOK_MAX_BYTES: must be a whole number of bytes, at least 1 (got 'abc')"
    )


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in VARIABLES}
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_celeryconfig_takes_broker_and_sweep_interval_from_the_settings() -> None:
    done = _python(
        "import worker.celeryconfig as c; print(c.broker_url); print(c.beat_schedule['sweep']['schedule'])",
        {"REDIS_URL": "redis://r:1/2", "SWEEP_INTERVAL_SECONDS": "0.5"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["redis://r:1/2", "0.5"]


def test_importing_celeryconfig_with_a_bad_value_exits_with_the_one_line() -> None:
    done = _python("import worker.celeryconfig", {"ATTENTIVE_RATE_LIMIT": "abc"})
    assert done.returncode == 1
    assert done.stderr == "error: ATTENTIVE_RATE_LIMIT: must be a number greater than 0 (got 'abc')\n"


# --- real Celery processes ------------------------------------------------------------------------

#: Bound on one Celery process starting and exiting.
EXIT_TIMEOUT = 60


def _exit_of(procs: CeleryProcesses, name: str) -> tuple[int, list[str]]:
    try:
        code = procs.procs[name].wait(timeout=EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"celery {name} still running {EXIT_TIMEOUT}s after start:\n{procs.log(name)[-3000:]}")
    return code, [line for line in procs.log(name).splitlines() if line.strip()]


@pytest.mark.integration
def test_celery_worker_and_beat_refuse_to_start_with_a_bad_setting() -> None:
    # Private databases (as the other integration tests), though nothing should get to connect.
    test_redis = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    test_broker = os.environ.get("TEST_BROKER_URL", "redis://127.0.0.1:6379/12")
    line = "error: ATTENTIVE_RATE_LIMIT: must be a number greater than 0 (got 'abc')"
    bad = {
        "REDIS_URL": test_redis,
        "CELERY_BROKER_URL": test_broker,
        "EXPORT_SECRET_KEY": KEY,
        "ATTENTIVE_RATE_LIMIT": "abc",
    }
    procs = CeleryProcesses(bad)
    try:
        procs.worker()
        procs.beat()
        for name in ("w1", "beat"):
            code, lines = _exit_of(procs, name)
            assert (code, lines) == (1, [line]), f"celery {name}"
    finally:
        procs.stop()

    # A worker without EXPORT_SECRET_KEY refuses to start too (beat does not need it).
    procs = CeleryProcesses({**bad, "ATTENTIVE_RATE_LIMIT": "", "EXPORT_SECRET_KEY": ""})
    try:
        procs.worker()
        code, lines = _exit_of(procs, "w1")
        assert code == 1
        assert lines[-1].startswith("error: EXPORT_SECRET_KEY: not set; a worker needs it")
        assert not any("Traceback" in line or "ready." in line for line in lines), lines
    finally:
        procs.stop()
