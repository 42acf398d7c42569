"""deploy/k8s, rendered for each overlay (conftest.py), is valid Kubernetes and runs the server and the
workers the way their code expects: probes on the real health routes and port, a grace period longer than
the server's drain, one Recreate worker per Deployment, budgets and autoscaling on the server pods only,
secrets only in Secrets, every variable a real setting."""

from __future__ import annotations

import base64
import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import typer
import typer.main
from pydantic import ValidationError

from fmlora._version import __version__
from fmlora.cli import app as fmlora_cli
from server.api.settings import Settings
from server.cli import register

from .conftest import K8S, OVERLAYS, ROOT
from .kustomize import parse_env_file

# The oldest Kubernetes the manifests claim (the preStop `sleep` action is on by default from 1.30) and the
# newest schema kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.30", kubernetes_validate.utils.latest_version())

SERVE = ["fmlora", "serve", "--no-worker", "--host", "0.0.0.0", "--port", "8000"]
WORKER = ["fmlora", "worker"]
KEYS = {"FMLORA_ADMIN_KEY", "FMLORA_API_KEY"}
BACKENDS = {
    "FMLORA_REGISTRY_URL",
    "FMLORA_STORE_URL",
    "FMLORA_S3_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
}
# Settings that issue 15 adds to the server and `fmlora worker` (registry and store backends). Until they
# are fields of Settings and options of the worker, they are accepted by name here.
# Standard variables of the AWS clients, not fmlora settings.
AWS_VARIABLES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_DEFAULT_REGION"}
IMAGE_UID = 10001  # the Dockerfile's USER


# ----------------------------------------------------------------------------------------------------
# Helpers over rendered objects
# ----------------------------------------------------------------------------------------------------


def objects(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = objects(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, deployment["metadata"]["name"]
    return containers[0]


def servers(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in objects(docs, "Deployment") if container(d)["command"][:2] == SERVE[:2]]


def workers(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in objects(docs, "Deployment") if container(d)["command"][:2] == WORKER]


def server(docs: list[dict[str, Any]]) -> dict[str, Any]:
    found = servers(docs)
    assert len(found) == 1
    return found[0]


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) == {"matchLabels"}, "only matchLabels selectors are used (and checked)"
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


def config_map(docs: list[dict[str, Any]]) -> dict[str, str]:
    return one(docs, "ConfigMap")["data"]


def environment(docs: list[dict[str, Any]], deployment: dict[str, Any]) -> set[str]:
    """Every variable a Deployment's container gets: its env and the keys of the ConfigMaps it loads."""
    c = container(deployment)
    names = {e["name"] for e in c.get("env", [])}
    maps = {m["metadata"]["name"]: m["data"] for m in objects(docs, "ConfigMap")}
    for source in c.get("envFrom", []):
        assert set(source) == {"configMapRef"}, "Secrets are mounted key by key, never whole"
        names |= set(maps[source["configMapRef"]["name"]])
    return names


def resolve_port(deployment: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    ports = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
    return ports[port]


def option_value(command: list[str], option: str) -> str:
    return command[command.index(option) + 1]


def command_options(name: str) -> set[str]:
    full = typer.Typer()
    full.registered_callback = fmlora_cli.registered_callback
    full.registered_commands = list(fmlora_cli.registered_commands)
    register(full)
    command = typer.main.get_command(full).commands[name]
    return {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}


def known_settings() -> tuple[set[str], set[str]]:
    """FMLORA_* variables read by the server (Settings) and by `fmlora worker` (its options' envvars)."""
    server_vars = {f"FMLORA_{name.upper()}" for name in Settings.model_fields}
    full = typer.Typer()
    full.registered_commands = list(fmlora_cli.registered_commands)
    worker = typer.main.get_command(full).commands["worker"]
    worker_vars = set()
    for param in worker.params:
        envvar = param.envvar or []
        worker_vars |= {envvar} if isinstance(envvar, str) else set(envvar)
    return server_vars, worker_vars


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest, rendered: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return rendered[request.param]


# ----------------------------------------------------------------------------------------------------
# Valid Kubernetes
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_validates_against_the_kubernetes_schema(overlay, version):
    kinds = set()
    for doc in overlay:
        # strict: unknown fields fail too (a typo such as `readinesProbe` would be silently dropped by a cluster)
        kubernetes_validate.validate(doc, version, strict=True)
        kinds.add(doc["kind"])
    assert kinds == {
        "Namespace",
        "ConfigMap",
        "Secret",
        "Service",
        "Deployment",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
    }


def test_the_validator_rejects_a_broken_object(overlay):
    """The check above can fail: a misspelt field and a wrong type are both refused."""
    deployment = server(overlay)
    broken = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)
    hpa = one(overlay, "HorizontalPodAutoscaler")
    broken = {**hpa, "spec": {**hpa["spec"], "minReplicas": "two"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def test_every_object_is_labelled_and_namespaced(overlay):
    namespace = one(overlay, "Namespace")["metadata"]["name"]
    for doc in overlay:
        assert doc["metadata"].get("labels", {}).get("app.kubernetes.io/name") == "fmlora" or doc["kind"] in (
            "ConfigMap",
            "Secret",
        ), doc["metadata"]["name"]
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == namespace
    for deployment in objects(overlay, "Deployment"):
        assert selects(deployment["spec"]["selector"], pod_labels(deployment)), deployment["metadata"]["name"]
        assert pod_labels(deployment)["app.kubernetes.io/name"] == "fmlora"


# ----------------------------------------------------------------------------------------------------
# The server
# ----------------------------------------------------------------------------------------------------


def test_server_command_is_the_cli(overlay):
    c = container(server(overlay))
    assert c["command"] == SERVE
    assert "args" not in c
    options = command_options("serve")
    assert {a for a in c["command"] if a.startswith("--")} <= options


def test_probes_use_the_servers_health_routes_and_port(overlay):
    from server.api.auth import require_api_key
    from server.api.routes import health

    deployment = server(overlay)
    c = container(deployment)
    port = int(option_value(c["command"], "--port"))
    assert [p["containerPort"] for p in c["ports"]] == [port]
    probes = {kind: c[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["startupProbe"]["path"] == "/healthz"
    for probe in probes.values():
        assert resolve_port(deployment, probe["port"]) == port
        assert probe.get("scheme", "HTTP") == "HTTP"
    # The kubelet sends no key: both routes exist and need none.
    routes = {r.path: r for r in health.router.routes}
    for path in ("/readyz", "/healthz"):
        calls = {d.call for d in routes[path].dependant.dependencies}
        assert require_api_key not in calls, path
    # Liveness must not restart a replica that is only slow to load its model: that is readiness's job.
    assert c["livenessProbe"]["httpGet"]["path"] != "/readyz"


def test_grace_period_covers_prestop_and_the_servers_drain(overlay):
    """SIGKILL must come after the whole shutdown: the preStop sleep (while endpoints drop the pod), then
    uvicorn's graceful drain (``fmlora serve`` gives it max(1, round(FMLORA_SHUTDOWN_TIMEOUT_S))), then
    the engine's stop (up to FMLORA_SHUTDOWN_TIMEOUT_S again)."""
    deployment = server(overlay)
    pod = deployment["spec"]["template"]["spec"]
    c = container(deployment)
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    timeout = Settings(shutdown_timeout_s=config_map(overlay)["FMLORA_SHUTDOWN_TIMEOUT_S"]).shutdown_timeout_s
    drain = max(1, round(timeout)) + timeout
    assert pre_stop >= 5, "endpoint controllers and proxies need a few seconds to stop sending traffic"
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain
    # A probe that fails during the drain would not be fatal, but the readiness probe must stop traffic
    # well before the drain ends: it reacts within period x threshold.
    readiness = c["readinessProbe"]
    assert readiness["periodSeconds"] * readiness.get("failureThreshold", 3) < timeout


def test_the_shutdown_timeout_is_read_from_the_config_map():
    """The figure the grace period is sized from is the one the test reads: FMLORA_SHUTDOWN_TIMEOUT_S is
    a real setting, and its default is what config.env sets, so dropping the line changes nothing."""
    env = dict(parse_env_file((K8S / "base" / "config.env").read_text()))
    assert float(env["FMLORA_SHUTDOWN_TIMEOUT_S"]) == Settings.model_fields["shutdown_timeout_s"].default


def test_rollouts_keep_capacity(overlay):
    deployment = server(overlay)
    strategy = deployment["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0 and strategy["rollingUpdate"]["maxSurge"] >= 1


def test_hpa_owns_the_server_replica_count(overlay):
    deployment = server(overlay)
    hpa = one(overlay, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"],
        "Deployment",
        deployment["metadata"]["name"],
    )
    assert "replicas" not in deployment["spec"], "kubectl apply would reset what the HPA scaled"
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    requests = container(deployment)["resources"]["requests"]
    for metric in hpa["spec"]["metrics"]:
        assert metric["type"] == "Resource", "only resource metrics need no adapter"
        # Utilization is relative to the request: a metric without a request never scales.
        assert metric["resource"]["name"] in requests


def test_example_runs_three_server_replicas(rendered):
    assert one(rendered["example"], "HorizontalPodAutoscaler")["spec"]["minReplicas"] == 3


def test_pdb_covers_the_server_pods_only(overlay):
    pdb = one(overlay, "PodDisruptionBudget")
    hpa = one(overlay, "HorizontalPodAutoscaler")
    selector = pdb["spec"]["selector"]
    assert selects(selector, pod_labels(server(overlay)))
    for worker in workers(overlay):
        assert not selects(selector, pod_labels(worker))
    # One replica may go at a time, and one stays: minReplicas exceeds what the budget lets go.
    assert pdb["spec"]["maxUnavailable"] == 1 < hpa["spec"]["minReplicas"]
    assert "minAvailable" not in pdb["spec"]


def test_service_reaches_the_server_pods_only(overlay):
    service = one(overlay, "Service")
    deployment = server(overlay)
    selector = {"matchLabels": service["spec"]["selector"]}
    assert selects(selector, pod_labels(deployment))
    for worker in workers(overlay):
        assert not selects(selector, pod_labels(worker))
    (port,) = service["spec"]["ports"]
    assert resolve_port(deployment, port["targetPort"]) == int(option_value(SERVE, "--port"))


# ----------------------------------------------------------------------------------------------------
# The workers
# ----------------------------------------------------------------------------------------------------


def test_two_workers_one_replica_each_recreated(overlay):
    found = workers(overlay)
    assert len(found) == 2, "a worker and its standby"
    for deployment in found:
        assert container(deployment)["command"] == WORKER
        assert deployment["spec"]["replicas"] == 1
        assert deployment["spec"]["strategy"] == {"type": "Recreate"}
        assert set(container(deployment)["command"][2:]) <= command_options("worker")
    first, second = found
    # Disjoint selectors: each Deployment owns its own pod, neither adopts the other's.
    assert not selects(first["spec"]["selector"], pod_labels(second))
    assert not selects(second["spec"]["selector"], pod_labels(first))


def test_the_standby_is_the_same_pod(overlay):
    first, second = workers(overlay)

    def without_slot(deployment: dict[str, Any]) -> dict[str, Any]:
        template = deployment["spec"]["template"]
        labels = {k: v for k, v in template["metadata"]["labels"].items() if k != "fmlora.io/worker-slot"}
        return {"labels": labels, "spec": template["spec"]}

    assert without_slot(first) == without_slot(second)
    assert {pod_labels(d)["fmlora.io/worker-slot"] for d in (first, second)} == {"primary", "standby"}
    # The anti-affinity that spreads them selects both.
    term = first["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    (preferred,) = term["preferredDuringSchedulingIgnoredDuringExecution"]
    assert all(selects(preferred["podAffinityTerm"]["labelSelector"], pod_labels(d)) for d in (first, second))


def test_worker_grace_lets_it_requeue(overlay):
    for deployment in workers(overlay):
        assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 30
        assert "ports" not in container(deployment), "the worker has no HTTP surface"


# ----------------------------------------------------------------------------------------------------
# Settings, Secrets, ConfigMap
# ----------------------------------------------------------------------------------------------------


def test_settings_reach_the_containers_by_env(overlay):
    assert environment(overlay, server(overlay)) >= BACKENDS | KEYS
    for worker in workers(overlay):
        names = environment(overlay, worker)
        assert names >= BACKENDS
        assert not names & KEYS, "API keys never go to the worker"


def test_every_fmlora_variable_is_a_real_setting(overlay):
    server_vars, worker_vars = known_settings()
    assert "FMLORA_SHUTDOWN_TIMEOUT_S" in server_vars and "FMLORA_WORKER_EPOCHS" in worker_vars
    for deployment in objects(overlay, "Deployment"):
        known = server_vars if deployment in servers(overlay) else worker_vars
        for name in environment(overlay, deployment):
            if name in config_map(overlay):
                # One ConfigMap for all: each variable must be read by the server or the worker.
                assert name in server_vars | worker_vars | AWS_VARIABLES, name
            else:
                assert name in known | AWS_VARIABLES, f"{deployment['metadata']['name']}: {name}"


def test_config_values_are_valid_settings(overlay, monkeypatch):
    for name, value in config_map(overlay).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("FMLORA_ADMIN_KEY", "k" * 32)
    settings = Settings()  # raises on a value the server would refuse
    data = config_map(overlay)
    assert str(settings.home) == data["FMLORA_HOME"]
    assert data["FMLORA_STORE_URL"].startswith("s3://") and len(data["FMLORA_STORE_URL"]) > len("s3://x")
    assert re.fullmatch(r"https?://[^/@]+(:\d+)?/?", data["FMLORA_S3_ENDPOINT_URL"])


def test_secret_references_resolve(overlay):
    secrets = {s["metadata"]["name"]: set(s["data"]) for s in objects(overlay, "Secret")}
    maps = {m["metadata"]["name"] for m in objects(overlay, "ConfigMap")}
    used: dict[str, set[str]] = {name: set() for name in secrets}
    for deployment in objects(overlay, "Deployment"):
        c = container(deployment)
        for source in c.get("envFrom", []):
            assert source["configMapRef"]["name"] in maps
        for env in c.get("env", []):
            ref = env["valueFrom"]["secretKeyRef"]
            assert ref["name"] in secrets, ref
            assert env["name"] == ref["key"], "a variable and its Secret key share a name"
            assert ref["key"] in secrets[ref["name"]] or ref.get("optional"), ref
            used[ref["name"]].add(ref["key"])
            if ref["key"] == "FMLORA_API_KEY":
                assert ref.get("optional") is True, "serving without an API key is allowed"
            else:
                assert not ref.get("optional"), f"{ref['key']} is required"
    assert used == secrets, "every Secret key is read by some container"


def test_config_map_holds_no_secrets(overlay):
    decoded = {base64.b64decode(v).decode() for s in objects(overlay, "Secret") for v in s["data"].values()}
    for config in objects(overlay, "ConfigMap"):
        for key, value in config["data"].items():
            assert not re.search(r"KEY|SECRET|PASSWORD|TOKEN|CREDENTIAL|REGISTRY_URL", key), key
            assert not re.search(r"://[^/@\s]*:[^/@\s]*@", value), f"{key} holds a password"
            assert value not in decoded, key


# ----------------------------------------------------------------------------------------------------
# Images and GPUs
# ----------------------------------------------------------------------------------------------------


def test_one_image_per_overlay_tagged_with_the_package_version(rendered):
    version = __version__
    image = f"registry.example.com/fmlora:{version}"
    expected = {"example": image, "example-gpu": f"{image}-cuda"}
    for name, docs in rendered.items():
        images = {container(d)["image"] for d in objects(docs, "Deployment")}
        assert images == {expected[name]}, name
        for deployment in objects(docs, "Deployment"):
            assert container(deployment)["imagePullPolicy"] == "IfNotPresent"
    base = (K8S / "base" / "server-deployment.yaml").read_text()
    assert f"image: fmlora:{version}" in base, "the base names the image as the Dockerfile's comments build it"


def test_gpu_overlay_requests_one_gpu_per_pod(rendered):
    for deployment in objects(rendered["example-gpu"], "Deployment"):
        resources = container(deployment)["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "1"
        tolerations = deployment["spec"]["template"]["spec"]["tolerations"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    data = config_map(rendered["example-gpu"])
    assert data["FMLORA_DEVICE"] == data["FMLORA_WORKER_DEVICE"] == "cuda"
    for deployment in objects(rendered["example"], "Deployment"):
        resources = container(deployment)["resources"]
        assert not any("gpu" in k for part in resources.values() for k in part), "the CPU overlay needs no GPU"


def test_resources_are_requested(overlay):
    for deployment in objects(overlay, "Deployment"):
        resources = container(deployment)["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"])
        assert "memory" in resources["limits"]


# ----------------------------------------------------------------------------------------------------
# Pod security
# ----------------------------------------------------------------------------------------------------


def test_pods_meet_the_restricted_pod_security_standard(overlay):
    namespace = one(overlay, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    home = config_map(overlay)["FMLORA_HOME"]
    for deployment in objects(overlay, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        c = container(deployment)
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == IMAGE_UID
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["automountServiceAccountToken"] is False
        assert not {"hostNetwork", "hostPID", "hostIPC"} & set(pod)
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        # A read-only root needs a writable FMLORA_HOME, HOME (caches) and /tmp.
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"]}
        for path in (home, "/home/fmlora", "/tmp"):
            assert "emptyDir" in mounts[path], path


def test_image_user_and_home_match_the_dockerfile():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"USER {IMAGE_UID}:{IMAGE_UID}" in dockerfile
    assert "HOME=/home/fmlora" in dockerfile


# ----------------------------------------------------------------------------------------------------
# The example Secrets and the README's commands
# ----------------------------------------------------------------------------------------------------


def example_secrets() -> dict[str, str]:
    values: dict[str, str] = {}
    for path in sorted((K8S / "overlays" / "example").glob("*.env.example")):
        values.update(parse_env_file(path.read_text()))
    return values


def test_example_secrets_are_placeholders_the_server_refuses():
    values = example_secrets()
    assert set(values) == KEYS | {"FMLORA_REGISTRY_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    for name, value in values.items():
        assert "CHANGE" in value and "not a real" in value.replace("-", " "), name
    for name in KEYS:
        # An unedited copy cannot go live with a published key: the server refuses it at start-up.
        with pytest.raises(ValidationError, match=name.removeprefix("FMLORA_").lower()):
            Settings(**{name.removeprefix("FMLORA_").lower(): values[name]})
    # A reserved top-level domain: the placeholder database can never resolve.
    assert re.fullmatch(r"postgresql://[^:]+:[^@]+@[\w.-]+\.invalid:\d+/\w+", values["FMLORA_REGISTRY_URL"])


def test_real_secret_files_are_ignored_by_git():
    overlay = K8S / "overlays" / "example"
    for name in ("keys.env", "backends.env"):
        result = subprocess.run(
            ["git", "check-ignore", "-q", str(overlay / name)], cwd=ROOT, capture_output=True, check=False
        )
        assert result.returncode == 0, f"{name} would be committed"
    tracked = subprocess.run(
        ["git", "ls-files", str(overlay)], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert not [t for t in tracked if t.endswith(("/keys.env", "/backends.env"))]


def test_readme_secret_commands_create_what_the_deployments_read(rendered):
    """deploy/k8s/README.md's `kubectl create secret` commands make Secrets with the names and keys that the
    Deployments read (without the generator's hash suffix)."""
    readme = (K8S / "README.md").read_text()
    commands = re.findall(r"kubectl -n \S+ create secret generic (\S+)((?:\s+\\?\s*--from-literal=\w+=\S+)+)", readme)
    created = {name: set(re.findall(r"--from-literal=(\w+)=", rest)) for name, rest in commands}
    wanted: dict[str, set[str]] = {}
    for deployment in objects(rendered["example"], "Deployment"):
        for env in container(deployment).get("env", []):
            ref = env["valueFrom"]["secretKeyRef"]
            wanted.setdefault(ref["name"].rsplit("-", 1)[0], set()).add(ref["key"])
    assert created == wanted
    assert "kubectl apply -k deploy/k8s/overlays/example" in readme


def test_readme_names_files_that_exist():
    readme = (K8S / "README.md").read_text()
    for path in re.findall(r"`(deploy/k8s/[\w./-]+)`", readme):
        assert (ROOT / path).exists(), path
    assert Path(K8S / "overlays" / "example" / "keys.env.example").exists()
