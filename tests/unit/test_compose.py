"""docker-compose.yml against the Compose Specification's JSON schema (vendored, offline), what the
deployment promises on top of it, and the image's user and health check (Dockerfile).

With a Docker that has the compose plugin, ``docker compose config`` checks the file as well.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
SCHEMA = ROOT / "tests" / "schemas" / "compose-spec.json"
#: Services run from this repository's image (everything but Redis).
APP_SERVICES = ("worker", "worker-backfill", "beat", "flower", "webhook", "metrics", "sandbox")


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())  # merge keys (<<: *app) resolved
    return doc


def services() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose()["services"]
    return found


def test_docker_compose_yml_follows_the_compose_specification() -> None:
    schema = json.loads(SCHEMA.read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(compose()), key=lambda e: list(e.path))
    assert not errors, [f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors]


def test_the_schema_check_catches_a_misspelt_key() -> None:
    """The check can fail: a key the specification does not know is refused."""
    schema = json.loads(SCHEMA.read_text())
    doc = compose()
    doc["services"]["worker"]["stop_grace_periods"] = "10s"
    assert not jsonschema.Draft7Validator(schema).is_valid(doc)


def test_app_services_start_once_redis_answers_and_come_back_after_exiting() -> None:
    svc = services()
    assert svc["redis"]["healthcheck"]["test"], "redis needs a healthcheck for service_healthy"
    for name in APP_SERVICES:
        assert svc[name]["depends_on"] == {"redis": {"condition": "service_healthy"}}, name
    for name, spec in svc.items():
        assert spec.get("restart") == "unless-stopped", name


def test_every_service_has_a_health_check() -> None:
    dockerfile = ROOT / "Dockerfile"
    sandbox_stage = dockerfile.read_text().split("AS sandbox", 1)[1].split("\nFROM ", 1)[0]
    for name, spec in services().items():
        if name == "sandbox":  # the sandbox stage of the Dockerfile carries its own
            assert "HEALTHCHECK" in sandbox_stage
            continue
        assert spec.get("healthcheck", {}).get("test"), name


def test_secrets_are_required_not_defaulted_to_empty() -> None:
    svc = services()
    webhook = svc["webhook"]["environment"]["WEBHOOK_TOKEN"]
    flower = svc["flower"]["environment"]["FLOWER_BASIC_AUTH"]
    for value in (webhook, flower, svc["worker"]["environment"]["EXPORT_SECRET_KEY"]):
        assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", value), value  # compose stops without it
    assert "EXPORT_SECRET_KEY" not in svc["flower"]["environment"]


def test_workers_can_reach_lytics_with_the_token_the_sandbox_accepts() -> None:
    svc = services()
    env = svc["worker"]["environment"]
    assert env["LYTICS_API_URL"].startswith("${LYTICS_API_URL:-")
    token = env["LYTICS_API_TOKEN"]
    command = svc["sandbox"]["command"]
    assert command[command.index("--lytics-token") + 1] == token


def test_workers_get_time_to_stop_gracefully_and_beat_can_write_its_schedule() -> None:
    from worker.celeryconfig import task_annotations, task_time_limit

    svc = services()
    longest = max([task_time_limit, *(a.get("time_limit", 0) for a in task_annotations.values())])
    for name in ("worker", "worker-backfill"):
        seconds = int(svc[name]["stop_grace_period"].removesuffix("s"))
        assert seconds > longest, name  # a warm shutdown is never cut short by SIGKILL
    beat = svc["beat"]["command"]
    assert beat[beat.index("-s") + 1].startswith("/tmp/")  # the image's user cannot write /app


def test_the_image_runs_as_an_unprivileged_user_with_a_health_check() -> None:
    stages = re.split(r"^FROM ", (ROOT / "Dockerfile").read_text(), flags=re.M)[1:]
    by_name = {s.split("\n", 1)[0].split(" AS ")[-1].strip(): s for s in stages}
    assert set(by_name) == {"app", "sandbox", "production"}
    for name in ("app", "sandbox"):
        users = re.findall(r"^USER (\S+)", by_name[name], flags=re.M)
        assert users and users[-1].split(":")[0] not in ("0", "root"), name  # the last USER wins
    assert by_name["production"].startswith("app AS production")  # inherits app's USER and check
    assert "HEALTHCHECK" in by_name["app"] and '"health", "worker"' in by_name["app"]
    assert re.search(r"^CMD \[", by_name["app"], flags=re.M)


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker")
def test_docker_compose_config_accepts_the_file() -> None:
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip("docker has no compose plugin")
    env = {
        **os.environ,
        "EXPORT_SECRET_KEY": "x" * 44,
        "WEBHOOK_TOKEN": "t" * 32,
        "FLOWER_BASIC_AUTH": "ops:secret",
    }
    out = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr


def test_every_queue_has_a_worker_and_backfill_steps_have_their_own() -> None:
    from worker.celeryconfig import task_routes

    svc = services()

    def queues(name: str) -> set[str]:
        command = svc[name]["command"]
        return set(command[command.index("-Q") + 1].split(","))

    routed = {route["queue"] for route in task_routes.values()}
    assert routed <= queues("worker") | queues("worker-backfill")
    assert queues("worker-backfill") == {"backfill"} and "backfill" not in queues("worker")
