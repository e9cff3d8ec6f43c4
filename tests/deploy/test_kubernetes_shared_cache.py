"""deploy/kubernetes/shared-cache: the manifests as replicas sharing one cache (S3 and Redis).

Each file of the overlay is read on its own (strict schemas for what is a whole manifest; every
variable a setting of config.py or an AWS credential; every secret from the Secret, never a
literal), then kustomize renders the overlay and the result is checked as the cluster would get
it: valid for every Kubernetes version, and its environment, with the Secret's placeholders
filled and the pod's address given, loads as the settings of a shared cache whose Redis, peer
URL and spool are the ones the other manifests provide.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

import pytest

from balena_registry_proxy.config import OPTIONS, ConfigError, load_settings, worker_count

from .files import (
    KUBERNETES,
    SETTINGS,
    Image,
    image,
    load_yaml,
    mapping,
    proxy_environment,
    sequence,
)
from .test_kubernetes import (
    NAME,
    by_kind_and_name,
    container_port,
    cpu_cores,
    kubernetes_versions,
    memory_bytes,
    render,
    schema_error,
)

FOLDER = "shared-cache"
OVERLAY = KUBERNETES / FOLDER
SECRET = "balena-registry-proxy-cache"
REDIS = "balena-registry-proxy-redis"
# Whole manifests the overlay adds, and the patches it applies to ../base.
MANIFESTS = {
    "secret.yaml": ("v1", "Secret", NAME),
    "redis-deployment.yaml": ("apps/v1", "Deployment", REDIS),
    "redis-service.yaml": ("v1", "Service", REDIS),
}
PATCHES = ["configmap-patch.yaml", "deployment-patch.yaml", "hpa-patch.yaml"]
# Read by botocore, not by the proxy's settings.
AWS_CREDENTIALS = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"})
# Secret-flagged settings and the credentials: only ever from the Secret.
SECRETS = frozenset(option.env for option in OPTIONS if option.secret) | AWS_CREDENTIALS
# Set by the downward API, for $(POD_IP) in CACHE_PEER_URL; the proxy ignores it.
DOWNWARD = {"POD_IP": "status.podIP"}
PLACEHOLDER = "REPLACE-ME"
# What a user puts in place of each placeholder, and the address a pod gets.
FILLED = "0123456789abcdef" * 2
POD_IP = "10.1.2.3"
SPOOL_AT_LEAST = 4 * 2**30


def load(name: str) -> dict[str, Any]:
    return load_yaml(OVERLAY / name)


def the_container(deployment: Mapping[str, Any], name: str) -> dict[str, Any]:
    containers = sequence(deployment["spec"]["template"]["spec"]["containers"], "containers")
    (container,) = [entry for entry in containers if entry["name"] == name]
    return mapping(container, name)


def unknown_variables(names: Iterable[str]) -> set[str]:
    """Variables the overlay sets that neither the proxy nor botocore reads."""
    return set(names) - SETTINGS - AWS_CREDENTIALS - set(DOWNWARD)


def literal_secrets(configmap: Mapping[str, str], env: Iterable[Mapping[str, Any]]) -> set[str]:
    """Secrets given as plain values (in the ConfigMap, or an env ``value``) or from anywhere
    but the Secret's own key of that name."""
    found = set(SECRETS & set(configmap))
    for entry in env:
        if entry["name"] in SECRETS:
            reference = entry.get("valueFrom", {}).get("secretKeyRef")
            if reference != {"name": SECRET, "key": entry["name"]} or "value" in entry:
                found.add(entry["name"])
    return found


def expand(value: str, defined: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) in an env value: only variables defined before it are replaced (any
    other stays as it is, and the proxy would get it literally)."""

    def replace(match: re.Match[str]) -> str:
        assert match[1] in defined, f"$({match[1]}) is not defined before it is used"
        return defined[match[1]]

    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", replace, value)


def filled(secret: Mapping[str, str]) -> dict[str, str]:
    return {key: value.replace(PLACEHOLDER, FILLED) for key, value in secret.items()}


def pod_environment(
    container: Mapping[str, Any], configmap: Mapping[str, str], secret: Mapping[str, str]
) -> dict[str, str]:
    """The container's variables as the kubelet would set them (envFrom, then env in order)."""
    environment = dict(configmap)
    for entry in sequence(container.get("env", []), "env"):
        name = entry["name"]
        source = entry.get("valueFrom", {})
        if "secretKeyRef" in source:
            environment[name] = secret[source["secretKeyRef"]["key"]]
        elif "fieldRef" in source:
            assert source["fieldRef"]["fieldPath"] == DOWNWARD[name]
            environment[name] = POD_IP
        else:
            environment[name] = expand(entry["value"], environment)
    return environment


@pytest.fixture(scope="module")
def the_image() -> Image:
    return image()


@pytest.fixture(scope="module")
def rendered() -> dict[tuple[str, str], dict[str, Any]]:
    return by_kind_and_name(render(FOLDER))


@pytest.fixture(scope="module")
def secret() -> dict[str, str]:
    data = mapping(load("secret.yaml")["stringData"], "Secret stringData")
    assert all(isinstance(value, str) for value in data.values())
    return data


def test_kustomization_lists_every_file() -> None:
    kustomization = load("kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    resources = sequence(kustomization["resources"], "resources")
    patches = [mapping(patch, "patch")["path"] for patch in kustomization["patches"]]
    assert resources == ["../base", *MANIFESTS]
    assert sorted(patches) == sorted(PATCHES)
    on_disk = {path.name for path in OVERLAY.iterdir()} - {"kustomization.yaml"}
    assert on_disk == {*MANIFESTS, *PATCHES}


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_manifest_is_valid_for_every_kubernetes_version(name: str) -> None:
    document = load(name)
    api_version, kind, label = MANIFESTS[name]
    assert (document["apiVersion"], document["kind"]) == (api_version, kind)
    assert document["metadata"]["labels"] == {"app.kubernetes.io/name": label}
    errors = {version: schema_error(document, version) for version in kubernetes_versions()}
    assert {version: error for version, error in errors.items() if error} == {}


def test_every_variable_is_a_setting_or_a_credential() -> None:
    configmap = mapping(load("configmap-patch.yaml")["data"], "ConfigMap data")
    env = sequence(the_container(load("deployment-patch.yaml"), "registry-proxy")["env"], "env")
    names = [entry["name"] for entry in env]
    assert len(names) == len(set(names)), "a variable twice"
    assert not unknown_variables([*configmap, *names])
    assert not set(configmap) & set(names), "a setting both in the ConfigMap and in env"
    assert {"CACHE_S3_URL", "CACHE_S3_BUCKET", "CACHE_DIR"} <= set(configmap)
    assert {"CACHE_REDIS_URL", "CACHE_PEER_SECRET", "CACHE_PEER_URL"} <= set(names)


def test_a_misspelt_setting_is_caught() -> None:
    assert unknown_variables(["CACHE_S3_BUKET", "CACHE_S3_BUCKET", "POD_IP"]) == {"CACHE_S3_BUKET"}


def test_secrets_come_only_from_the_secret(secret: dict[str, str]) -> None:
    configmap = mapping(load("configmap-patch.yaml")["data"], "ConfigMap data")
    env = sequence(the_container(load("deployment-patch.yaml"), "registry-proxy")["env"], "env")
    assert literal_secrets(configmap, env) == set()
    redis = the_container(load("redis-deployment.yaml"), "redis")
    referenced = {
        entry["valueFrom"]["secretKeyRef"]["key"]
        for entry in [*env, *redis["env"]]
        if "secretKeyRef" in entry.get("valueFrom", {})
    }
    # Every key of the Secret is used, and every one used is there.
    assert referenced == set(secret)


def test_a_literal_secret_is_caught() -> None:
    reference = {"secretKeyRef": {"name": SECRET, "key": "CACHE_PEER_SECRET"}}
    assert literal_secrets({"CACHE_REDIS_URL": "redis://:pw@redis:6379"}, []) == {"CACHE_REDIS_URL"}
    assert literal_secrets({}, [{"name": "CACHE_PEER_SECRET", "value": FILLED}]) == {
        "CACHE_PEER_SECRET"
    }
    assert literal_secrets({}, [{"name": "AWS_ACCESS_KEY_ID", "valueFrom": reference}]) == {
        "AWS_ACCESS_KEY_ID"
    }
    assert literal_secrets({}, [{"name": "CACHE_PEER_SECRET", "valueFrom": reference}]) == set()


def test_the_example_secret_is_marked_and_refused_as_it_is(
    rendered: dict[tuple[str, str], dict[str, Any]], the_image: Image, secret: dict[str, str]
) -> None:
    assert all(PLACEHOLDER in value for value in secret.values()), secret
    deployment = rendered[("Deployment", NAME)]
    configmap = mapping(rendered[("ConfigMap", NAME)]["data"], "ConfigMap data")
    environment = pod_environment(the_container(deployment, "registry-proxy"), configmap, secret)
    # Applied unchanged, the proxy does not start with a secret everyone can read here.
    with pytest.raises(ConfigError, match="CACHE_PEER_SECRET"):
        load_settings({**proxy_environment(the_image.environment), **environment}, {})


def test_rendered_manifests_are_valid_for_every_kubernetes_version(
    rendered: dict[tuple[str, str], dict[str, Any]],
) -> None:
    assert set(rendered) == {
        ("ConfigMap", NAME),
        ("Secret", SECRET),
        ("Deployment", NAME),
        ("Service", NAME),
        ("HorizontalPodAutoscaler", NAME),
        ("PodDisruptionBudget", NAME),
        ("Deployment", REDIS),
        ("Service", REDIS),
    }
    versions = kubernetes_versions()
    errors = {
        (key, version): error
        for key, document in rendered.items()
        for version in versions
        if (error := schema_error(document, version))
    }
    assert errors == {}


def test_the_pods_environment_is_a_shared_cache(
    rendered: dict[tuple[str, str], dict[str, Any]], the_image: Image, secret: dict[str, str]
) -> None:
    deployment = rendered[("Deployment", NAME)]
    # A patch naming another container would add one instead of changing the proxy's.
    assert len(deployment["spec"]["template"]["spec"]["containers"]) == 1
    container = the_container(deployment, "registry-proxy")
    # The base's ConfigMap still comes in whole, the overlay's settings merged into it.
    assert container["envFrom"] == [{"configMapRef": {"name": NAME}}]
    configmap = mapping(rendered[("ConfigMap", NAME)]["data"], "ConfigMap data")
    assert {"REGISTRY2_HOST", "CACHE_S3_URL"} <= set(configmap)
    environment = pod_environment(container, configmap, filled(secret))
    settings = load_settings({**proxy_environment(the_image.environment), **environment}, {})
    assert settings.cache_s3_url is not None
    assert settings.cache_s3_bucket is not None
    assert settings.cache_redis_url is not None
    assert settings.cache_peer_secret == FILLED
    assert worker_count(settings, 8) == 1
    # The other replicas reach this pod itself, at the port it listens on.
    assert settings.cache_peer_url == f"http://{POD_IP}:{the_image.port}"
    assert container_port(container, the_image.port) == settings.port
    # Downloads in progress go to the spool volume, the only writable place.
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    assert settings.cache_dir in mounts
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    pod = deployment["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    spool = mapping(volumes[mounts[settings.cache_dir]]["emptyDir"], "spool emptyDir")
    limit = memory_bytes(spool["sizeLimit"])
    assert limit >= SPOOL_AT_LEAST
    # Reserved on the node: the kubelet evicts a pod whose emptyDir outgrows sizeLimit.
    requests = container["resources"]["requests"]
    assert memory_bytes(requests["ephemeral-storage"]) >= limit


def test_redis_url_names_the_redis_service_and_its_password(
    rendered: dict[tuple[str, str], dict[str, Any]], secret: dict[str, str]
) -> None:
    url = urlsplit(secret["CACHE_REDIS_URL"])
    service = rendered[("Service", REDIS)]
    (port,) = sequence(service["spec"]["ports"], "redis service ports")
    assert (url.hostname, url.port) == (service["metadata"]["name"], port["port"])
    assert url.password == secret["REDIS_PASSWORD"]
    redis_deployment = rendered[("Deployment", REDIS)]
    redis = the_container(redis_deployment, "redis")
    assert container_port(redis, port["targetPort"]) == 6379
    args = sequence(redis["args"], "redis args")
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert [entry["name"] for entry in redis["env"]] == ["REDIS_PASSWORD"]
    # Writes fail before the container reaches its memory limit (the proxy goes on without).
    maxmemory = args[args.index("--maxmemory") + 1]
    assert re.fullmatch(r"\d+mb", maxmemory)
    limit = memory_bytes(redis["resources"]["limits"]["memory"])
    assert int(maxmemory[:-2]) * 2**20 < limit
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"


def test_selectors_keep_the_proxy_and_redis_apart(
    rendered: dict[tuple[str, str], dict[str, Any]],
) -> None:
    def pod_labels(name: str) -> dict[str, Any]:
        deployment = rendered[("Deployment", name)]
        return mapping(deployment["spec"]["template"]["metadata"]["labels"], name)

    proxy, redis = pod_labels(NAME), pod_labels(REDIS)
    selectors = {
        NAME: [
            rendered[("Service", NAME)]["spec"]["selector"],
            rendered[("PodDisruptionBudget", NAME)]["spec"]["selector"]["matchLabels"],
            rendered[("Deployment", NAME)]["spec"]["selector"]["matchLabels"],
        ],
        REDIS: [
            rendered[("Service", REDIS)]["spec"]["selector"],
            rendered[("Deployment", REDIS)]["spec"]["selector"]["matchLabels"],
        ],
    }
    for owner, own, other in ((NAME, proxy, redis), (REDIS, redis, proxy)):
        for selector in selectors[owner]:
            assert selector.items() <= own.items(), owner
            assert not selector.items() <= other.items(), owner


def test_redis_runs_once_non_root_on_a_read_only_filesystem(
    rendered: dict[tuple[str, str], dict[str, Any]],
) -> None:
    deployment = rendered[("Deployment", REDIS)]
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    redis = the_container(deployment, "redis")
    security = redis["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    args = sequence(redis["args"], "redis args")
    (mount,) = redis["volumeMounts"]
    assert mount["mountPath"] == args[args.index("--dir") + 1]
    (volume,) = pod["volumes"]
    assert volume["name"] == mount["name"]
    assert "emptyDir" in volume
    resources = redis["resources"]
    assert cpu_cores(resources["requests"]["cpu"]) <= cpu_cores(resources["limits"]["cpu"])
    for probe in ("readinessProbe", "livenessProbe"):
        assert container_port(redis, redis[probe]["tcpSocket"]["port"]) == 6379, probe


def test_autoscaler_keeps_several_replicas_and_scales_down_gently(
    rendered: dict[tuple[str, str], dict[str, Any]],
) -> None:
    spec = rendered[("HorizontalPodAutoscaler", NAME)]["spec"]
    deployment = rendered[("Deployment", NAME)]
    assert 3 <= spec["minReplicas"] == deployment["spec"]["replicas"] < spec["maxReplicas"]
    # The base's CPU target is kept.
    (metric,) = sequence(spec["metrics"], "metrics")
    assert metric["resource"]["name"] == "cpu"
    (policy,) = sequence(spec["behavior"]["scaleDown"]["policies"], "scale-down policies")
    assert (policy["type"], policy["value"]) == ("Pods", 1)
    budget = rendered[("PodDisruptionBudget", NAME)]["spec"]
    assert budget["minAvailable"] < spec["minReplicas"]
    container = the_container(deployment, "registry-proxy")
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    assert cpu_cores(requests["cpu"]) <= cpu_cores(limits["cpu"])
    assert memory_bytes(requests["memory"]) <= memory_bytes(limits["memory"])
