"""The Kubernetes manifests in docker/k8s (docs/kubernetes.md), checked offline.

* Every manifest validates against the Kubernetes schemas of one pinned version (kubernetes-validate,
  strict: an unknown field is an error, so a misspelt ``readinesProbe`` cannot pass unnoticed).
* Each variant (cpu, gpu) has what a scaled-out deployment needs: a Deployment whose probes ask
  Triton's health endpoints on the HTTP port, the three ports, requests and limits (a GPU for the GPU
  variant only), the image's user; a Service that selects its pods; a HorizontalPodAutoscaler on the
  Deployment whose metric the Prometheus adapter's rules produce; a PodDisruptionBudget.
* Against a real tritonserver (marker ``triton``): the probe paths answer 200 and the Triton metrics
  the adapter's rules read exist for the ``vlcache`` model.

Nothing here talks to a cluster: the manifests have never been applied.
"""

from __future__ import annotations

import copy
import re
import urllib.request
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "docker" / "k8s"
#: The Kubernetes version whose schemas the manifests must satisfy (kubernetes-validate ships 1.25+).
K8S_VERSION = "1.31"
#: YAML under docker/k8s that is not a Kubernetes manifest (Helm values of the Prometheus adapter).
ADAPTER_VALUES = K8S / "prometheus-adapter" / "values.yaml"
NOT_MANIFESTS = {ADAPTER_VALUES}
VARIANTS = {"cpu": K8S / "cpu" / "vlcache.yaml", "gpu": K8S / "gpu" / "vlcache.yaml"}
DOCKERFILES = {"cpu": REPO / "docker" / "Dockerfile", "gpu": REPO / "docker" / "Dockerfile.gpu"}
PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
READY, LIVE = "/v2/health/ready", "/v2/health/live"


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.y*ml") if p not in NOT_MANIFESTS)


def load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds = [d["kind"] for d in docs]
    assert len(kinds) == len(set(kinds)), f"one of each kind per variant, got {kinds}"
    return {d["kind"]: d for d in docs}


def adapter_rules() -> list[dict[str, Any]]:
    return yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]


def series_name(rule: dict[str, Any]) -> str:
    match = re.match(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", rule["seriesQuery"])
    assert match, rule["seriesQuery"]
    return match.group(1)


def test_the_manifests_are_where_the_docs_say():
    assert set(VARIANTS.values()) <= set(manifest_files())
    assert ADAPTER_VALUES.is_file()


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_validates_against_the_pinned_kubernetes_schemas(path: Path):
    docs = load(path)
    assert docs, f"{path} holds no resource"
    for doc in docs:
        # SchemaNotFoundError (an unknown kind / apiVersion, e.g. a CRD) fails the test too.
        assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True) == K8S_VERSION


def test_validation_rejects_a_misspelt_field_and_a_wrong_type():
    """The schema check is not vacuous: the strict schemas refuse what a typo produces."""
    deployment = by_kind(load(VARIANTS["cpu"]))["Deployment"]
    typo = copy.deepcopy(deployment)
    container = typo["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, K8S_VERSION, strict=True)
    wrong = copy.deepcopy(deployment)
    wrong["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong, K8S_VERSION, strict=True)


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _port(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's target port (a number or a container port's name) as a number."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port in named, f"no container port named {port!r}"
    return named[port]


def _dockerfile_user(variant: str) -> int:
    users = re.findall(r"^USER\s+(\d+)", DOCKERFILES[variant].read_text(), flags=re.M)
    assert users, f"{DOCKERFILES[variant]} has no numeric USER"
    return int(users[-1])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_deployment_probes_ports_resources_and_user(variant: str):
    deployment = by_kind(load(VARIANTS[variant]))["Deployment"]
    pod = deployment["spec"]["template"]
    container = _container(deployment)
    assert deployment["spec"]["replicas"] >= 1
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()

    assert {p["name"]: p["containerPort"] for p in container["ports"]} == PORTS
    for probe, path in (("readinessProbe", READY), ("livenessProbe", LIVE), ("startupProbe", READY)):
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert _port(container, get["port"]) == PORTS["http"], probe
    # The liveness probe must not kill a pod that is still loading: the startup probe covers the load.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300

    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    assert {"cpu", "memory"} <= requests.keys() and "memory" in limits
    if variant == "gpu":
        assert int(requests["nvidia.com/gpu"]) == int(limits["nvidia.com/gpu"]) >= 1
    else:
        assert "nvidia.com/gpu" not in requests and "nvidia.com/gpu" not in limits

    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == _dockerfile_user(variant), "runAsUser differs from the image's USER"
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == PORTS["metrics"]
    mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
    assert "/dev/shm" in mounts, "the Python backend needs more than the default 64 MiB of /dev/shm"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_service_selects_the_pods_and_reaches_every_port(variant: str):
    kinds = by_kind(load(VARIANTS[variant]))
    deployment, service = kinds["Deployment"], kinds["Service"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    container = _container(deployment)
    reached = {p["name"]: (p["port"], _port(container, p["targetPort"])) for p in service["spec"]["ports"]}
    assert reached == {name: (port, port) for name, port in PORTS.items()}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hpa_scales_the_deployment_on_a_metric_the_adapter_serves(variant: str):
    kinds = by_kind(load(VARIANTS[variant]))
    deployment, hpa, pdb = kinds["Deployment"], kinds["HorizontalPodAutoscaler"], kinds["PodDisruptionBudget"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"],
        "Deployment",
        deployment["metadata"]["name"],
    )
    assert 1 <= hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"] < hpa["spec"]["maxReplicas"]
    served = {rule["name"]["as"] for rule in adapter_rules()}
    metrics = hpa["spec"]["metrics"]
    assert metrics
    for metric in metrics:
        assert metric["type"] in ("Pods", "External"), "the HPA scales on the model's queue, not on CPU"
        spec = metric[metric["type"].lower()]
        assert spec["metric"]["name"] in served, f"no adapter rule produces {spec['metric']['name']}"
        assert spec["target"]["type"] == "AverageValue"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_adapter_rules_read_triton_metrics_per_pod():
    rules = adapter_rules()
    assert rules
    for rule in rules:
        series = series_name(rule)
        assert series.startswith("vlcache_"), (
            series
        )  # the model's gauges: Triton's queue never sees the waiting requests
        assert 'model="vlcache"' in rule["seriesQuery"]
        assert re.fullmatch(rule["name"]["matches"], series), "the rule renames a series it does not select"
        overrides = rule["resources"]["overrides"]
        assert overrides["pod"] == {"resource": "pod"} and overrides["namespace"] == {"resource": "namespace"}
        assert "<<.Series>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]


@pytest.mark.triton
def test_probe_paths_and_adapter_metrics_exist_on_a_real_triton_server(checkpoint: Path, tmp_path: Path):
    """What the manifests and the adapter assume of Triton, asked of the real server: the probe
    paths answer 200 and every series an adapter rule reads exists for model="vlcache"."""
    from vlcache.errors import UserError
    from vlcache.serving.server import TritonServer, find_tritonserver

    try:
        find_tritonserver()
        from PIL import Image

        from vlcache.client import Client
    except (UserError, ImportError) as e:  # pragma: no cover - CI installs the serve extra
        pytest.skip(f"no Triton server to run: {e}")
    from tests.serving_helpers import make_artifact

    artifact = make_artifact(checkpoint, tmp_path / "artifact", backend="torch")
    with TritonServer.for_artifact(
        artifact, instances=1, num_threads=1, grpc_port=0, http_port=0, metrics_port=0, startup_timeout=180
    ) as server:
        for path in (READY, LIVE):
            with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}{path}", timeout=10) as response:
                assert response.status == 200, path
        with Client(server.url) as client:
            client.generate(Image.new("RGB", (64, 64), "white"), "how many 3 ?", max_tokens=2)
        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
            metrics = response.read().decode()
    for rule in adapter_rules():
        pattern = rf'^{re.escape(series_name(rule))}\{{[^}}]*model="vlcache"[^}}]*\}} \S+$'
        assert re.search(pattern, metrics, flags=re.M), f"Triton exports no {series_name(rule)} for vlcache"
