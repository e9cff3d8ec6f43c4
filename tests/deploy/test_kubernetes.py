"""deploy/kubernetes: valid for Kubernetes 1.25 and later, and consistent with the image.

Each manifest is validated against the Kubernetes OpenAPI schemas (strict: no unknown field)
that the PyPI package kubernetes-validate ships for every Kubernetes version it knows, offline.
Then the rules a schema cannot state: probes on the proxy's own health, ports that meet, labels
that select, resources, a non-root read-only container, a grace period longer than the drain,
Prometheus' scrape annotations, and an Ingress that streams and outwaits the proxy's timeouts.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from packaging.version import Version

from balena_registry_proxy.config import load_settings

from ..e2e.go_tools import go_tool
from .files import (
    KUBERNETES,
    KUBERNETES_BASE,
    PUBLIC_PORT,
    SETTINGS,
    Image,
    environment_of,
    image,
    load_yaml,
    mapping,
    package_version,
    proxy_environment,
    sequence,
)

NAME = "balena-registry-proxy"
# deploy/kubernetes/base: the manifests, which deploy/kubernetes and each overlay name.
KINDS = {
    "base/configmap.yaml": ("v1", "ConfigMap"),
    "base/deployment.yaml": ("apps/v1", "Deployment"),
    "base/service.yaml": ("v1", "Service"),
    "base/hpa.yaml": ("autoscaling/v2", "HorizontalPodAutoscaler"),
    "base/pdb.yaml": ("policy/v1", "PodDisruptionBudget"),
}
# deploy/kubernetes/ingress-nginx: an overlay of the manifests above with an Ingress.
INGRESS = "ingress-nginx/ingress.yaml"
MANIFESTS = {**KINDS, INGRESS: ("networking.k8s.io/v1", "Ingress")}
OLDEST_KUBERNETES = Version("1.25")


def kubernetes_versions() -> list[str]:
    """The Kubernetes versions kubernetes-validate has schemas for, from the oldest supported."""
    known: list[str] = kubernetes_validate.utils.all_versions()
    return [version for version in known if Version(version) >= OLDEST_KUBERNETES]


def schema_error(document: dict[str, Any], version: str) -> str | None:
    """Why ``document`` is not valid for Kubernetes ``version`` (strict), or None."""
    try:
        kubernetes_validate.validate(document, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        where = "/".join(str(part) for part in error.absolute_path) or "<root>"
        return f"{where}: {error.message}"
    except kubernetes_validate.SchemaNotFoundError as error:
        return str(error.message)
    return None


def load(name: str) -> dict[str, Any]:
    return load_yaml(KUBERNETES / name)


@pytest.fixture(scope="module")
def the_image() -> Image:
    return image()


@pytest.fixture(scope="module")
def deployment() -> dict[str, Any]:
    return load("base/deployment.yaml")


@pytest.fixture(scope="module")
def pod(deployment: dict[str, Any]) -> dict[str, Any]:
    return mapping(deployment["spec"]["template"]["spec"], "pod spec")


@pytest.fixture(scope="module")
def container(pod: dict[str, Any]) -> dict[str, Any]:
    containers = sequence(pod["containers"], "containers")
    assert len(containers) == 1
    return mapping(containers[0], "container")


@pytest.fixture(scope="module")
def configmap() -> dict[str, str]:
    document = load("base/configmap.yaml")
    return environment_of(mapping(document["data"], "ConfigMap data"), "configmap.yaml")


def cpu_cores(quantity: object) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def memory_bytes(quantity: object) -> int:
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|K|M|G)?", str(quantity))
    assert match, f"not a memory quantity: {quantity!r}"
    factors = {None: 1, "K": 10**3, "M": 10**6, "G": 10**9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    return int(match[1]) * factors[match[2]]


def container_port(container: dict[str, Any], port: object) -> int:
    """A probe's or Service's ``port`` (a number or a port name) as the container's number."""
    ports = sequence(container["ports"], "ports")
    if isinstance(port, int):
        assert any(entry["containerPort"] == port for entry in ports), port
        return port
    named = [entry["containerPort"] for entry in ports if entry.get("name") == port]
    assert len(named) == 1, f"no container port named {port!r}"
    return int(named[0])


def kustomization(folder: str) -> dict[str, Any]:
    document = load(f"{folder}/kustomization.yaml")
    assert document["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert document["kind"] == "Kustomization"
    return document


def test_kustomization_lists_every_manifest() -> None:
    resources = sequence(kustomization("base")["resources"], "resources")
    on_disk = {path.name for path in KUBERNETES_BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(resources) == sorted(on_disk) == sorted(Path(name).name for name in KINDS)
    assert not list(KUBERNETES.rglob("*.yml")), "use .yaml, as the kustomizations do"
    # deploy/kubernetes itself is the base, which the overlays beside it name as ../base.
    assert sequence(kustomization(".")["resources"], "resources") == ["base"]
    on_disk = {path.name for path in KUBERNETES.glob("*.yaml")}
    assert on_disk == {"kustomization.yaml"}, "manifests go in base/"


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_manifest_is_valid_for_every_kubernetes_version(name: str) -> None:
    document = load(name)
    assert (document["apiVersion"], document["kind"]) == MANIFESTS[name]
    assert document["metadata"]["name"] == NAME
    assert document["metadata"]["labels"] == {"app.kubernetes.io/name": NAME}
    versions = kubernetes_versions()
    assert versions, "kubernetes-validate knows no Kubernetes version"
    errors = {version: schema_error(document, version) for version in versions}
    assert {version: error for version, error in errors.items() if error} == {}


def test_the_validator_catches_a_typo(deployment: dict[str, Any]) -> None:
    broken = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    error = schema_error(broken, kubernetes_versions()[-1])
    assert error is not None
    assert "replica" in error


def test_selectors_match_the_pods(deployment: dict[str, Any]) -> None:
    labels = mapping(deployment["spec"]["template"]["metadata"]["labels"], "pod labels")
    selectors = {
        "deployment": deployment["spec"]["selector"]["matchLabels"],
        "service": load("base/service.yaml")["spec"]["selector"],
        "pdb": load("base/pdb.yaml")["spec"]["selector"]["matchLabels"],
    }
    for owner, selector in selectors.items():
        assert mapping(selector, owner).items() <= labels.items(), owner


def test_container_runs_the_image_of_this_version(container: dict[str, Any]) -> None:
    assert container["image"] == f"{NAME}:{package_version()}"
    assert not {"command", "args"} & set(container), "the image's ENTRYPOINT runs it"


def test_settings_come_from_the_configmap(
    container: dict[str, Any], configmap: dict[str, str], the_image: Image
) -> None:
    sources = sequence(container["envFrom"], "envFrom")
    assert sources == [{"configMapRef": {"name": NAME}}]
    assert set(configmap) <= SETTINGS, set(configmap) - SETTINGS
    assert "REGISTRY2_HOST" in configmap
    settings = load_settings({**proxy_environment(the_image.environment), **configmap}, {})
    assert settings.port == the_image.port


def test_ports_meet(container: dict[str, Any], the_image: Image) -> None:
    ports = sequence(container["ports"], "ports")
    assert [(entry["name"], entry["containerPort"]) for entry in ports] == [
        ("http", the_image.port)
    ]
    service = load("base/service.yaml")["spec"]
    assert service["type"] == "ClusterIP"
    (port,) = sequence(service["ports"], "service ports")
    assert port["port"] == PUBLIC_PORT
    assert container_port(container, port["targetPort"]) == the_image.port


@pytest.mark.parametrize("probe", ["readinessProbe", "livenessProbe"])
def test_probes_ask_the_proxys_own_health(
    container: dict[str, Any], the_image: Image, probe: str
) -> None:
    check = mapping(container[probe], probe)
    # Not /ready: it fails on every pod at once while the upstream is unreachable, and a Service
    # without endpoints refuses connections where the proxy would answer 502/503.
    assert check["httpGet"]["path"] == "/ping"
    assert container_port(container, check["httpGet"]["port"]) == the_image.port
    assert check["timeoutSeconds"] < check["periodSeconds"]


def test_an_unanswering_pod_leaves_the_service_before_it_is_restarted(
    container: dict[str, Any],
) -> None:
    def seconds_to_fail(probe: str) -> int:
        check = mapping(container[probe], probe)
        return int(check["periodSeconds"]) * int(check["failureThreshold"])

    assert seconds_to_fail("readinessProbe") < seconds_to_fail("livenessProbe")


def test_prometheus_scrapes_each_pod(
    deployment: dict[str, Any], container: dict[str, Any], the_image: Image
) -> None:
    metadata = mapping(deployment["spec"]["template"]["metadata"], "pod metadata")
    annotations = mapping(metadata["annotations"], "pod annotations")
    assert annotations["prometheus.io/scrape"] == "true"
    port = int(annotations["prometheus.io/port"])
    assert container_port(container, port) == the_image.port
    # test_health.py GETs this path from a running proxy.
    assert annotations["prometheus.io/path"] == "/metrics"


def test_resources_are_requested_and_limited(container: dict[str, Any]) -> None:
    resources = mapping(container["resources"], "resources")
    requests = mapping(resources["requests"], "requests")
    limits = mapping(resources["limits"], "limits")
    assert set(requests) == set(limits) == {"cpu", "memory"}
    assert 0 < cpu_cores(requests["cpu"]) <= cpu_cores(limits["cpu"])
    assert 0 < memory_bytes(requests["memory"]) <= memory_bytes(limits["memory"])


def test_runs_as_non_root_on_a_read_only_filesystem(
    pod: dict[str, Any], container: dict[str, Any], the_image: Image
) -> None:
    pod_security = mapping(pod["securityContext"], "pod securityContext")
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["runAsUser"] == the_image.uid != 0
    security = mapping(container["securityContext"], "container securityContext")
    assert security["runAsNonRoot"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    # Only a port below 1024 would need a capability back; the image uses an unprivileged one.
    assert "add" not in security["capabilities"]
    assert the_image.port >= 1024
    assert pod["automountServiceAccountToken"] is False
    # Service links would set <SERVICE>_PORT variables: a Service named "proxy" sets PROXY_PORT.
    assert pod["enableServiceLinks"] is False


def test_grace_period_covers_pre_stop_and_drain(
    pod: dict[str, Any], container: dict[str, Any], configmap: dict[str, str], the_image: Image
) -> None:
    settings = load_settings({**proxy_environment(the_image.environment), **configmap}, {})
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + settings.shutdown_timeout


def test_autoscaler_scales_the_deployment_on_cpu(
    deployment: dict[str, Any], container: dict[str, Any]
) -> None:
    spec = load("base/hpa.yaml")["spec"]
    target = spec["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"],
        deployment["kind"],
        deployment["metadata"]["name"],
    )
    assert (spec["minReplicas"], spec["maxReplicas"]) == (2, 10)
    assert deployment["spec"]["replicas"] == spec["minReplicas"]
    (metric,) = sequence(spec["metrics"], "metrics")
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}
    # Utilization is relative to the request.
    assert "cpu" in container["resources"]["requests"]


def test_disruption_budget_leaves_room_to_drain() -> None:
    budget = load("base/pdb.yaml")["spec"]
    minimum = load("base/hpa.yaml")["spec"]["minReplicas"]
    assert budget["minAvailable"] == 1 < minimum


def render(folder: str) -> list[dict[str, Any]]:
    """What ``kubectl apply -k deploy/kubernetes/<folder>`` would apply: kustomize's output."""
    command = [str(go_tool("kustomize")), "build", str(KUBERNETES / folder)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"{' '.join(command)}: {result.stderr}"
    documents = list(yaml.load_all(result.stdout, Loader=yaml.SafeLoader))
    return [mapping(document, f"{folder}: a rendered document") for document in documents]


def by_kind_and_name(documents: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    keyed = {(document["kind"], document["metadata"]["name"]): document for document in documents}
    assert len(keyed) == len(documents), "a kind and name twice"
    return keyed


@pytest.mark.parametrize(
    ("folder", "extra"), [(".", []), ("base", []), ("ingress-nginx", [INGRESS])]
)
def test_kustomize_renders_the_manifests(folder: str, extra: list[str]) -> None:
    # kustomize refuses what a look at the files misses: an overlay naming its own parent
    # folder, a resource outside the kustomization's folder, a patch that matches nothing.
    expected = by_kind_and_name([load(name) for name in [*KINDS, *extra]])
    assert by_kind_and_name(render(folder)) == expected


def test_ingress_overlay_adds_the_ingress_to_the_manifests() -> None:
    overlay = kustomization(str(Path(INGRESS).parent))
    assert sequence(overlay["resources"], "resources") == ["../base", Path(INGRESS).name]


def test_ingress_routes_everything_to_the_service() -> None:
    spec = load(INGRESS)["spec"]
    service = load("base/service.yaml")
    (rule,) = sequence(spec["rules"], "rules")
    (path,) = sequence(rule["http"]["paths"], "paths")
    assert (path["path"], path["pathType"]) == ("/", "Prefix")
    backend = path["backend"]["service"]
    assert backend["name"] == service["metadata"]["name"]
    names = [port["name"] for port in sequence(service["spec"]["ports"], "service ports")]
    assert backend["port"] == {"name": names[0]}
    (tls,) = sequence(spec["tls"], "tls")
    assert tls["hosts"] == [rule["host"]]


def test_ingress_streams_and_outwaits_the_proxy(
    configmap: dict[str, str], the_image: Image
) -> None:
    annotations = mapping(load(INGRESS)["metadata"]["annotations"], "ingress annotations")
    prefix = "nginx.ingress.kubernetes.io/"
    # Buffered, a multi-GiB layer would be spooled to the controller's disk first.
    assert annotations[prefix + "proxy-buffering"] == "off"
    settings = load_settings({**proxy_environment(the_image.environment), **configmap}, {})
    # The proxy's own 504 or cut must come first: it says what went wrong upstream.
    read_timeout = float(annotations[prefix + "proxy-read-timeout"])
    assert read_timeout > max(settings.read_timeout, settings.first_byte_timeout)
