"""deploy/kubernetes/, checked offline without kubectl or a cluster.

Each kustomization is rendered here (it uses only ``resources`` and ``images``), every core object is
validated against the Kubernetes OpenAPI schemas that the ``kubernetes-validate`` package ships, and
KEDA's ScaledObjects against KEDA's CRD schema kept in tests/schemas/. Schemas cannot see what the
manifests mean for this service, so the cross-references are checked too: probe commands parse as
``attentive-export`` commands, pods set only known variables, selectors find their pods, Services
target named ports, grace periods cover the task time limits, one beat. Each check returns its
problems, and ``test_each_check_catches_a_planted_mistake`` proves that each one can fail.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from worker import celeryconfig
from worker.cli import monitor
from worker.cli.main import build_parser
from worker.settings import Settings, SettingsError, load_settings
from worker.setup.changes import DEFAULT_TOKEN_ENV
from worker.webhook.receiver import HEALTH_PATH

Doc = dict[str, Any]

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
#: Each kustomization a user may apply (README, "Running on Kubernetes"); exactly one at a time.
KUSTOMIZATIONS = {"default": KUBE, "hpa": KUBE / "hpa", "keda-rabbitmq": KUBE / "keda-rabbitmq"}
SECRET_EXAMPLE = KUBE / "secrets.example.yaml"
SECRET_NAME = "attentive-export"
#: Schemas of this Kubernetes release (kubernetes-validate ships them; strict: unknown fields fail,
#: as kubectl's default server-side field validation makes them fail).
KUBERNETES_VERSION = "1.35.0"
#: KEDA's ScaledObject CRD schema and its scalers' metadata keys (tests/schemas/README.md).
KEDA_SCHEMA = ROOT / "tests" / "schemas" / "keda-scaledobject-v2.20.2.json"
KEDA_METADATA = ROOT / "tests" / "schemas" / "keda-scaler-metadata-v2.20.2.json"
KEDA_API_VERSION = "keda.sh/v1alpha1"
#: Time a worker's main process needs after its last task ended (workers.yaml says why 30 s).
GRACE_MARGIN_SECONDS = 30
#: Variables pods may set besides worker/settings.py's, read by another program.
OTHER_VARIABLES = {
    "FLOWER_BASIC_AUTH": "read by Flower itself",
    DEFAULT_TOKEN_ENV: "the Lytics token variable export jobs name by default (lytics_token_env)",
}
#: Flower's unauthenticated health URL path.
FLOWER_HEALTH_PATH = "/healthcheck"
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


# --- rendering -----------------------------------------------------------------------------------
def render(directory: Path) -> list[Doc]:
    """What ``kubectl kustomize directory`` prints, as objects (for the features used here)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - {"apiVersion", "kind", "resources", "images"}
    assert not unsupported, f"{directory}: render() does not apply {sorted(unsupported)}"
    docs: list[Doc] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        assert path.is_relative_to(KUBE), f"{directory}: {entry} is outside deploy/kubernetes"
        docs += render(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for image in kustomization.get("images", []):
        for container in (c for doc in docs for c in containers(doc)):
            if container["image"].split(":", 1)[0] == image["name"]:
                name = image.get("newName", image["name"])
                container["image"] = f"{name}:{image['newTag']}" if "newTag" in image else name
    return docs


def pod_spec(doc: Doc) -> Doc | None:
    if doc["kind"] != "Deployment":
        return None
    spec: Doc = doc["spec"]["template"]["spec"]
    return spec


def containers(doc: Doc) -> list[Doc]:
    spec = pod_spec(doc)
    return [] if spec is None else [*spec.get("initContainers", []), *spec["containers"]]


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def role(container: Doc) -> str:
    """worker, beat, flower or webhook, from the container's command."""
    command = container["command"]
    if command[:3] == ["celery", "-A", "worker.app"] and command[3] in ("worker", "beat", "flower"):
        return str(command[3])
    if command[:2] == ["attentive-export", "serve"]:
        return "webhook"
    raise AssertionError(f"unknown command {command}")


def option(command: list[str], name: str) -> str | None:
    """The value of ``name`` (``-Q x`` or ``--port=x``) in a command line."""
    for i, word in enumerate(command):
        if word == name and i + 1 < len(command):
            return command[i + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    return None


def worker_queues(doc: Doc) -> set[str]:
    queues = option(containers(doc)[0]["command"], "-Q")
    return set(queues.split(",")) if queues else set()


def worker_deployments(docs: list[Doc]) -> list[Doc]:
    return [d for d in of_kind(docs, "Deployment") if role(containers(d)[0]) == "worker"]


def secret_example() -> Doc:
    doc: Doc = yaml.safe_load(SECRET_EXAMPLE.read_text())
    return doc


def config_maps(docs: list[Doc]) -> dict[str, dict[str, str]]:
    return {d["metadata"]["name"]: d.get("data", {}) for d in of_kind(docs, "ConfigMap")}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# --- checks: each returns its problems ----------------------------------------------------------------
def strict(schema: Any) -> Any:
    """The schema refusing unknown fields wherever it lists properties (as the API server does)."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


KEDA_VALIDATOR = jsonschema.Draft7Validator(strict(json.loads(KEDA_SCHEMA.read_text())))
KEDA_KEYS: dict[str, list[str]] = json.loads(KEDA_METADATA.read_text())


def schema_problems(docs: list[Doc]) -> list[str]:
    problems = []
    for doc in docs:
        where = f"{doc.get('kind')} {doc.get('metadata', {}).get('name')}"
        if doc.get("apiVersion", "").startswith("keda.sh/"):
            if doc["apiVersion"] != KEDA_API_VERSION or doc["kind"] != "ScaledObject":
                problems.append(f"{where}: not a {KEDA_API_VERSION} ScaledObject")
            problems += [f"{where}: {e.json_path}: {e.message}" for e in KEDA_VALIDATOR.iter_errors(doc)]
            for trigger in doc.get("spec", {}).get("triggers", []):
                known = KEDA_KEYS.get(trigger.get("type"))
                if known is None:
                    problems.append(f"{where}: trigger type {trigger.get('type')!r} not checked here")
                    continue
                problems += [
                    f"{where}: {trigger['type']} trigger ignores metadata {key!r}"
                    for key in trigger.get("metadata", {})
                    if key not in known
                ]
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{where}: {'/'.join(map(str, exc.path))}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            problems.append(f"{where}: {exc}")
    return problems


def parse_cli(argv: list[str]) -> Any:
    """``attentive-export``'s parse of argv, or None where it refuses them."""
    with contextlib.redirect_stderr(io.StringIO()), contextlib.suppress(SystemExit):
        return build_parser().parse_args(argv)
    return None


def probe_problems(docs: list[Doc]) -> list[str]:
    """Every container has readiness and liveness probes, each a real ``attentive-export health``
    command for that container's component."""
    problems = []
    for doc in of_kind(docs, "Deployment"):
        for container in containers(doc):
            where = f"{doc['metadata']['name']}/{container['name']}"
            kind = role(container)
            expected = {"worker": "worker", "beat": "beat"}.get(kind, "webhook")
            for missing in {"readinessProbe", "livenessProbe"} - set(container):
                problems.append(f"{where}: no {missing}")
            for probe in (p for p in PROBES if p in container):
                command = container[probe].get("exec", {}).get("command", [])
                if command[:1] != ["attentive-export"]:
                    problems.append(f"{where}: {probe} does not run attentive-export: {command}")
                    continue
                args = parse_cli(command[1:])
                if args is None:
                    problems.append(f"{where}: {probe}: `{' '.join(command)}` is refused by the CLI")
                elif args.func is not monitor.cmd_health or args.component != expected:
                    problems.append(f"{where}: {probe} should run `attentive-export health {expected}`")
                elif expected == "webhook":
                    problems += url_problems(where, probe, args.url, container)
    return problems


def url_problems(where: str, probe: str, url: str, container: Doc) -> list[str]:
    """A webhook-style probe asks this container, on the port it listens on, for its health path."""
    parts = urlsplit(url)
    listens = option(container["command"], "--port")
    declared = {p["containerPort"] for p in container.get("ports", [])}
    path = HEALTH_PATH if role(container) == "webhook" else FLOWER_HEALTH_PATH
    if parts.hostname not in ("127.0.0.1", "localhost") or str(parts.port) != listens:
        return [f"{where}: {probe} asks {url}, but the container listens on port {listens}"]
    if parts.port not in declared:
        return [f"{where}: {probe} port {parts.port} is not a declared containerPort"]
    if parts.path != path:
        return [f"{where}: {probe} asks {parts.path}, not {path}"]
    return []


def env_problems(docs: list[Doc]) -> list[str]:
    """Pods set only known variables, from objects and Secret keys that exist; only workers get
    EXPORT_SECRET_KEY, always required."""
    known = {str(f.validation_alias) for f in Settings.model_fields.values()} | set(OTHER_VARIABLES)
    maps = config_maps(docs)
    secret_keys = set(secret_example()["stringData"])
    problems = []
    for doc in of_kind(docs, "Deployment"):
        for container in containers(doc):
            where = f"{doc['metadata']['name']}/{container['name']}"
            names = [e["name"] for e in container.get("env", [])]
            for source in container.get("envFrom", []):
                ref = source.get("configMapRef", {}).get("name")
                if ref not in maps:
                    problems.append(f"{where}: envFrom {source} is not a ConfigMap of the kustomization")
                    continue
                names += list(maps[ref])
            problems += [
                f"{where}: {name} is not a setting (worker/settings.py)"
                for name in names
                if name not in known
            ]
            for entry in container.get("env", []):
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if ref is None:
                    continue
                if ref["name"] != SECRET_NAME:
                    problems.append(f"{where}: {entry['name']} reads Secret {ref['name']}, not {SECRET_NAME}")
                elif not ref.get("optional") and ref["key"] not in secret_keys:
                    problems.append(f"{where}: required key {ref['key']} is not in secrets.example.yaml")
            secret = [e for e in container.get("env", []) if e["name"] == "EXPORT_SECRET_KEY"]
            if role(container) == "worker":
                ref = secret[0].get("valueFrom", {}).get("secretKeyRef", {}) if secret else {}
                if not ref or ref.get("optional"):
                    problems.append(f"{where}: a worker must require EXPORT_SECRET_KEY from the Secret")
            elif secret:
                problems.append(f"{where}: only workers need EXPORT_SECRET_KEY")
    return problems


def selector_problems(docs: list[Doc]) -> list[str]:
    """Each Deployment selects its own pods only; each PDB and Service selects one Deployment's pods;
    a Service targets a named port of those pods; every worker group has a PDB."""
    problems = []
    deployments = of_kind(docs, "Deployment")
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in deployments}
    for doc in deployments:
        name, selector = doc["metadata"]["name"], doc["spec"]["selector"]["matchLabels"]
        matched = [n for n, labels in pods.items() if selects(selector, labels)]
        if matched != [name]:
            problems.append(f"Deployment {name}: its selector matches the pods of {matched}")
    covered = set()
    for doc in [*of_kind(docs, "PodDisruptionBudget"), *of_kind(docs, "Service")]:
        where = f"{doc['kind']} {doc['metadata']['name']}"
        selector = doc["spec"]["selector"]
        selector = selector.get("matchLabels", {}) if doc["kind"] == "PodDisruptionBudget" else selector
        matched = [n for n, labels in pods.items() if selector and selects(selector, labels)]
        if len(matched) != 1:
            problems.append(f"{where}: selects the pods of {matched}, not of one Deployment")
            continue
        if doc["kind"] == "PodDisruptionBudget":
            covered.add(matched[0])
            continue
        target = next(d for d in deployments if d["metadata"]["name"] == matched[0])
        names = {p.get("name") for c in containers(target) for p in c.get("ports", [])}
        for port in doc["spec"]["ports"]:
            if not isinstance(port["targetPort"], str) or port["targetPort"] not in names:
                problems.append(f"{where}: targetPort {port['targetPort']!r} is not a named port of {names}")
    problems += [
        f"Deployment {d['metadata']['name']}: no PodDisruptionBudget"
        for d in worker_deployments(docs)
        if d["metadata"]["name"] not in covered
    ]
    return problems


def longest_time_limit(queues: set[str]) -> int:
    """The longest hard time limit of the tasks routed to these queues (worker/celeryconfig.py)."""
    tasks = [task for task, route in celeryconfig.task_routes.items() if route["queue"] in queues]
    return max(
        celeryconfig.task_annotations.get(task, {}).get("time_limit", celeryconfig.task_time_limit)
        for task in tasks
    )


def worker_problems(docs: list[Doc]) -> list[str]:
    """Worker groups consume every queue between them, each group is given the time to finish its
    longest task, and one beat runs, replaced (never rolled) on updates."""
    problems = []
    every_queue = {q.name for q in celeryconfig.task_queues}
    workers = worker_deployments(docs)
    consumed: set[str] = set()
    for doc in workers:
        name, queues = doc["metadata"]["name"], worker_queues(doc)
        consumed |= queues
        if not queues or queues - every_queue:
            problems.append(f"{name}: -Q {sorted(queues)} names no queue or an unknown one")
            continue
        grace = doc["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
        needed = longest_time_limit(queues) + GRACE_MARGIN_SECONDS
        if grace < needed:
            problems.append(f"{name}: terminationGracePeriodSeconds {grace} < {needed} (time limit + margin)")
        if "replicas" in doc["spec"]:
            problems.append(f"{name}: replicas is set, so every apply resets the autoscaler's count")
    if consumed != every_queue:
        problems.append(f"no worker consumes {sorted(every_queue - consumed)}")
    beats = [d for d in of_kind(docs, "Deployment") if role(containers(d)[0]) == "beat"]
    if len(beats) != 1:
        problems.append(f"{len(beats)} beat Deployments, not 1")
    for doc in beats:
        if doc["spec"].get("replicas") != 1 or doc["spec"].get("strategy", {}).get("type") != "Recreate":
            problems.append(f"{doc['metadata']['name']}: beat needs replicas 1 and strategy Recreate")
    return problems


def autoscaling_problems(docs: list[Doc]) -> list[str]:
    """ScaledObjects and HPAs target worker Deployments, one autoscaler each, and each trigger
    watches a queue its target consumes, or its CPU (which KEDA reads against the CPU request)."""
    problems = []
    workers = {d["metadata"]["name"]: d for d in worker_deployments(docs)}
    scalers = [*of_kind(docs, "ScaledObject"), *of_kind(docs, "HorizontalPodAutoscaler")]
    targets = [s["spec"]["scaleTargetRef"]["name"] for s in scalers]
    for scaler, target in zip(scalers, targets, strict=True):
        where = f"{scaler['kind']} {scaler['metadata']['name']}"
        if target not in workers:
            problems.append(f"{where}: targets {target}, not a worker Deployment")
            continue
        for trigger in scaler["spec"].get("triggers", []):
            if trigger["type"] == "cpu":
                if not all(
                    c.get("resources", {}).get("requests", {}).get("cpu") for c in containers(workers[target])
                ):
                    problems.append(f"{where}: scales on CPU, but {target} requests no CPU")
                continue
            queue = trigger["metadata"].get("listName") or trigger["metadata"].get("queueName")
            if queue not in worker_queues(workers[target]):
                problems.append(f"{where}: watches queue {queue!r}, which {target} does not consume")
    if sorted(targets) != sorted(workers):
        problems.append(f"autoscaler targets {sorted(targets)}, not each worker group once {sorted(workers)}")
    return problems


def pod_security_problems(docs: list[Doc]) -> list[str]:
    """Every pod runs the production image as the image's unprivileged user, read-only, with
    requests no larger than its limits."""
    stages = re.split(r"^FROM ", (ROOT / "Dockerfile").read_text(), flags=re.M)
    uid = int(re.findall(r"^USER (\d+)", next(s for s in stages if " AS app" in s), flags=re.M)[-1])
    problems = []
    images = set()
    for doc in of_kind(docs, "Deployment"):
        spec = pod_spec(doc) or {}
        pod = spec.get("securityContext", {})
        if pod.get("runAsNonRoot") is not True or pod.get("runAsUser") != uid:
            problems.append(f"{doc['metadata']['name']}: pod must run as non-root uid {uid} (Dockerfile)")
        for container in containers(doc):
            where = f"{doc['metadata']['name']}/{container['name']}"
            images.add(container["image"])
            ctx = container.get("securityContext", {})
            if (
                ctx.get("allowPrivilegeEscalation") is not False
                or ctx.get("readOnlyRootFilesystem") is not True
            ):
                problems.append(f"{where}: needs allowPrivilegeEscalation false, readOnlyRootFilesystem true")
            resources = container.get("resources", {})
            for resource in ("cpu", "memory"):
                request = resources.get("requests", {}).get(resource)
                limit = resources.get("limits", {}).get(resource)
                if request is None or limit is None or quantity(request) > quantity(limit):
                    problems.append(f"{where}: {resource} request {request} and limit {limit}")
    if len(images) != 1:
        problems.append(f"containers run {sorted(images)}, not the one production image")
    return problems


def quantity(value: str | int) -> float:
    """A Kubernetes quantity (``500m``, ``2``, ``320Mi``) as a number."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "": 1}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert match, f"not a quantity: {value!r}"
    number, unit = match.groups()
    return float(number) * units[unit]


CHECKS: dict[str, Callable[[list[Doc]], list[str]]] = {
    "schema": schema_problems,
    "probes": probe_problems,
    "env": env_problems,
    "selectors": selector_problems,
    "workers": worker_problems,
    "autoscaling": autoscaling_problems,
    "security": pod_security_problems,
}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Doc]]:
    return {name: render(path) for name, path in KUSTOMIZATIONS.items()}


# --- the manifests as they are --------------------------------------------------------------------
@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize("kustomization", list(KUSTOMIZATIONS))
def test_manifests_pass(rendered: dict[str, list[Doc]], kustomization: str, check: str) -> None:
    assert CHECKS[check](rendered[kustomization]) == []


def test_the_secret_example_follows_the_schema() -> None:
    assert schema_problems([secret_example()]) == []
    assert secret_example()["metadata"]["name"] == SECRET_NAME


def test_the_scale_benchmark_runs_the_worker_groups_kubernetes_runs(rendered: dict[str, list[Doc]]) -> None:
    # bench_scale's default layout stands for this deployment: its figures hold only while both
    # split the queues the same way.
    from bench.bench_scale import WORKER_GROUPS

    deployed = sorted(sorted(worker_queues(d)) for d in worker_deployments(rendered["default"]))
    assert deployed == sorted(sorted(group.split(",")) for group in WORKER_GROUPS.values())


def test_only_one_autoscaler_kind_per_kustomization(rendered: dict[str, list[Doc]]) -> None:
    kinds = {
        name: {d["kind"] for d in docs} & {"ScaledObject", "HorizontalPodAutoscaler"}
        for name, docs in rendered.items()
    }
    assert kinds == {
        "default": {"ScaledObject"},
        "hpa": {"HorizontalPodAutoscaler"},
        "keda-rabbitmq": {"ScaledObject"},
    }
    triggers = {
        name: {t["type"] for d in of_kind(docs, "ScaledObject") for t in d["spec"]["triggers"]}
        for name, docs in rendered.items()
    }
    assert triggers["default"] == {"redis", "cpu"} and triggers["keda-rabbitmq"] == {"rabbitmq", "cpu"}


def test_rabbitmq_triggers_read_the_broker_url_the_workers_get(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["keda-rabbitmq"]
    workers = {d["metadata"]["name"]: d for d in worker_deployments(docs)}
    for scaler in of_kind(docs, "ScaledObject"):
        target = workers[scaler["spec"]["scaleTargetRef"]["name"]]
        variables = {e["name"] for c in containers(target) for e in c.get("env", [])}
        for trigger in scaler["spec"]["triggers"]:
            if trigger["type"] != "cpu":
                assert trigger["metadata"]["hostFromEnv"] == "CELERY_BROKER_URL" in variables


def test_settings_are_valid_and_the_placeholders_fail_loudly(rendered: dict[str, list[Doc]]) -> None:
    """The ConfigMap's values pass the settings' validation; the example Secret's placeholders stop
    the processes that need them, with a line naming the variable, and let no one into Flower."""
    config = config_maps(rendered["default"])["attentive-export-config"]
    example = secret_example()["stringData"]
    placeholders = {k: v for k, v in example.items() if k in ("EXPORT_SECRET_KEY", "WEBHOOK_TOKEN")}
    filled = {k: v for k, v in example.items() if k not in placeholders and k not in OTHER_VARIABLES}
    load_settings({**config, **filled})
    with pytest.raises(SettingsError) as error:
        load_settings({**config, **filled, **placeholders})
    assert "EXPORT_SECRET_KEY: must be a Fernet key" in str(error.value)
    assert "WEBHOOK_TOKEN: each token must be" in str(error.value)
    assert ":" not in example["FLOWER_BASIC_AUTH"]  # Flower compares to user:password: nothing matches


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl")
@pytest.mark.parametrize("kustomization", list(KUSTOMIZATIONS))
def test_render_matches_kubectl_kustomize(rendered: dict[str, list[Doc]], kustomization: str) -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(KUSTOMIZATIONS[kustomization])],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    theirs = sorted((d for d in yaml.safe_load_all(out.stdout) if d), key=identity)
    assert sorted(rendered[kustomization], key=identity) == theirs


def identity(doc: Doc) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


# --- each check can fail ----------------------------------------------------------------------------
#: Path prefixes in MISTAKES: a Deployment's pod spec, and its first container.
PREFIXES = {"pod": "spec/template/spec", "c0": "spec/template/spec/containers/0"}
DELETE = object()
#: (check that must object, the mistake, kind, component label or "", path in it, new value or DELETE),
#: each planted in a copy of the default rendering.
MISTAKES: list[tuple[str, str, str, str, str, Any]] = [
    ("schema", "misspelt field", "Deployment", "worker-ingest", "pod/terminationGracePeriod", 150),
    ("schema", "number for a string", "ConfigMap", "", "data/ATTENTIVE_RATE_LIMIT", 90),
    ("schema", "KEDA metadata not a string", "ScaledObject", "worker-ingest", "spec/triggers/0/metadata/listLength", 10),
    ("schema", "misspelt KEDA field", "ScaledObject", "worker-backfill", "spec/minReplicas", 1),
    ("schema", "misspelt KEDA metadata key", "ScaledObject", "worker-delivery", "spec/triggers/1/metadata/listname", "poll"),
    ("probes", "not a CLI component", "Deployment", "worker-ingest", "c0/livenessProbe/exec/command/2", "workers"),
    ("probes", "another component's check", "Deployment", "beat", "c0/readinessProbe/exec/command/2", "worker"),
    ("probes", "unknown option", "Deployment", "worker-delivery", "c0/startupProbe/exec/command/3", "--silent"),
    ("probes", "wrong port", "Deployment", "webhook", "c0/readinessProbe/exec/command/5", "http://127.0.0.1:8081/healthz"),
    ("probes", "wrong path", "Deployment", "flower", "c0/readinessProbe/exec/command/5", "http://127.0.0.1:5555/"),
    ("probes", "no liveness probe", "Deployment", "flower", "c0/livenessProbe", DELETE),
    ("env", "misspelt setting", "Deployment", "worker-ingest", "c0/env/0/name", "REDIS_ULR"),
    ("env", "misspelt setting in the ConfigMap", "ConfigMap", "", "data/ATTENTIVE_RATE", "90"),
    ("env", "optional secret key", "Deployment", "worker-delivery", "c0/env/2/valueFrom/secretKeyRef/optional", True),
    ("env", "secret key given to beat", "Deployment", "beat", "c0/env/1/name", "EXPORT_SECRET_KEY"),
    ("env", "Secret key not in the example", "Deployment", "webhook", "c0/env/2/valueFrom/secretKeyRef/key", "TOKEN"),
    ("selectors", "PDB selects nothing", "PodDisruptionBudget", "worker-ingest", "spec/selector/matchLabels/app.kubernetes.io~1component", "worker"),
    ("selectors", "Service by port number", "Service", "webhook", "spec/ports/0/targetPort", 8080),
    ("selectors", "Service by unknown name", "Service", "flower", "spec/ports/0/targetPort", "web"),
    ("selectors", "selector misses its pods", "Deployment", "beat", "spec/selector/matchLabels/app.kubernetes.io~1component", "beats"),
    ("workers", "grace below the time limit", "Deployment", "worker-delivery", "pod/terminationGracePeriodSeconds", 120),
    ("workers", "backfill with the flush's grace", "Deployment", "worker-backfill", "pod/terminationGracePeriodSeconds", 150),
    ("workers", "two beats", "Deployment", "beat", "spec/replicas", 2),
    ("workers", "rolling beat", "Deployment", "beat", "spec/strategy", {"type": "RollingUpdate"}),
    ("workers", "a queue nobody consumes", "Deployment", "worker-backfill", "c0/command/5", "backfil"),
    ("workers", "fixed worker count", "Deployment", "worker-ingest", "spec/replicas", 3),
    ("autoscaling", "trigger on another group's queue", "ScaledObject", "worker-ingest", "spec/triggers/0/metadata/listName", "flush"),
    ("autoscaling", "autoscaled beat", "ScaledObject", "worker-backfill", "spec/scaleTargetRef/name", "attentive-export-beat"),
    ("security", "root", "Deployment", "webhook", "pod/securityContext/runAsUser", 0),
    ("security", "writable root filesystem", "Deployment", "flower", "c0/securityContext/readOnlyRootFilesystem", False),
    ("security", "request above limit", "Deployment", "worker-ingest", "c0/resources/requests/memory", "1Gi"),
    ("security", "another image", "Deployment", "beat", "c0/image", "attentive-export-sandbox:0.1.0"),
]  # fmt: skip


def plant(docs: list[Doc], kind: str, component: str, path: str, value: Any) -> None:
    """Set (or delete) ``path`` (``/``-separated, ``~1`` for a ``/`` in a key) in one object."""
    doc: Any = next(
        d
        for d in of_kind(docs, kind)
        if not component or d["metadata"]["labels"].get("app.kubernetes.io/component") == component
    )
    head, _, rest = path.partition("/")
    keys = [*PREFIXES.get(head, head).split("/"), *rest.split("/")]
    steps: list[str | int] = [int(k) if k.isdigit() else k.replace("~1", "/") for k in keys]
    for step in steps[:-1]:
        doc = doc[step]
    if value is DELETE:
        del doc[steps[-1]]
    else:
        doc[steps[-1]] = value


@pytest.mark.parametrize(
    ("check", "what", "kind", "component", "path", "value"), MISTAKES, ids=[m[1] for m in MISTAKES]
)
def test_each_check_catches_a_planted_mistake(
    rendered: dict[str, list[Doc]], check: str, what: str, kind: str, component: str, path: str, value: Any
) -> None:
    docs = copy.deepcopy(rendered["default"])
    plant(docs, kind, component, path, value)
    assert CHECKS[check](docs), f"the {check} check did not notice: {what}"
