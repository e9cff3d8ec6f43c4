"""docker-compose.yml: valid Compose (the specification and format 2.1), and fit for balena.

Validated against the JSON schemas vendored in schemas/ (see its README): the Compose
Specification that `docker compose` reads, and Compose file format 2.1, whose fields balena's
supervisor reads.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from jsonschema.validators import validator_for

from balena_registry_proxy.config import load_settings, worker_count

from .files import (
    COMPOSE,
    PUBLIC_PORT,
    SCHEMAS,
    SD_CARD_CACHE_LIMIT,
    SETTINGS,
    Image,
    cache_mount,
    duration_seconds,
    environment_of,
    image,
    load_yaml,
    mapping,
    proxy_environment,
    sequence,
)

# The service fields balena's supervisor supports (docs.balena.io, reference/supervisor/
# docker-compose: "docker-compose.yml fields"); it reads the 2.x format, nothing of version 3.
BALENA_SERVICE_FIELDS = frozenset(
    [
        "build",
        "cap_add",
        "cap_drop",
        "cgroup_parent",
        "command",
        "cpu_shares",
        "cpu_quota",
        "cpuset",
        "devices",
        "depends_on",
        "dns",
        "dns_opt",
        "dns_search",
        "domainname",
        "entrypoint",
        "environment",
        "expose",
        "extra_hosts",
        "group_add",
        "healthcheck",
        "hostname",
        "image",
        "ipc",
        "labels",
        "mac_address",
        "mem_limit",
        "mem_reservation",
        "network_mode",
        "networks",
        "oom_kill_disable",
        "oom_score_adj",
        "pid",
        "pids_limit",
        "ports",
        "privileged",
        "read_only",
        "restart",
        "security_opt",
        "shm_size",
        "stop_grace_period",
        "stop_signal",
        "sysctls",
        "tmpfs",
        "ulimits",
        "user",
        "userns_mode",
        "volumes",
    ]
)
SERVICE = "registry-proxy"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


@pytest.fixture(scope="module")
def service(compose: dict[str, Any]) -> dict[str, Any]:
    services = mapping(compose.get("services"), "services")
    assert list(services) == [SERVICE]
    return mapping(services[SERVICE], SERVICE)


@pytest.fixture(scope="module")
def the_image() -> Image:
    return image()


def schema_errors(document: dict[str, Any], schema_file: str) -> list[str]:
    schema = json.loads((SCHEMAS / schema_file).read_text(encoding="utf-8"))
    validator_class = validator_for(schema)
    validator_class.check_schema(schema)
    validator = validator_class(schema)
    return [
        f"{'/'.join(str(part) for part in error.absolute_path) or '<root>'}: {error.message}"
        for error in validator.iter_errors(document)
    ]


@pytest.mark.parametrize("schema_file", ["compose-spec.json", "compose-v2.1.json"])
def test_valid_against_the_schema(compose: dict[str, Any], schema_file: str) -> None:
    assert schema_errors(compose, schema_file) == []


@pytest.mark.parametrize(
    ("broken", "schema_file"),
    [
        ({"services": {SERVICE: {"build": ".", "deploy": {"replicas": 2}}}}, "compose-v2.1.json"),
        ({"services": {SERVICE: {"build": ".", "ports": [{"bad": 1}]}}}, "compose-spec.json"),
        ({"services": {SERVICE: {"biuld": "."}}}, "compose-spec.json"),
        (
            {"version": "2.1", "services": {SERVICE: {"healthcheck": {"start_period": "5s"}}}},
            "compose-v2.1.json",
        ),
        # Format 2.1 knows only the short volume syntax, and no unknown volume option.
        (
            {"services": {SERVICE: {"volumes": [{"type": "volume", "target": "/c"}]}}},
            "compose-v2.1.json",
        ),
        (
            {"services": {SERVICE: {"build": "."}}, "volumes": {"c": {"drivr": "x"}}},
            "compose-spec.json",
        ),
    ],
)
def test_schemas_catch_mistakes(broken: dict[str, Any], schema_file: str) -> None:
    assert schema_errors(broken, schema_file)


def test_is_format_2_1_with_balena_fields_only(
    compose: dict[str, Any], service: dict[str, Any]
) -> None:
    assert compose["version"] == "2.1"
    assert set(service) <= BALENA_SERVICE_FIELDS, set(service) - BALENA_SERVICE_FIELDS
    assert "deploy" not in service


def test_builds_the_repository_dockerfile(service: dict[str, Any]) -> None:
    assert service["build"] == "."
    assert "image" not in service


def test_publishes_port_80_to_the_image_port(service: dict[str, Any], the_image: Image) -> None:
    ports = sequence(service["ports"], "ports")
    # Strings: YAML 1.1 reads some unquoted "a:b" as base-60 numbers.
    assert all(isinstance(port, str) for port in ports), ports
    assert ports == [f"{PUBLIC_PORT}:{the_image.port}"]


def test_restarts_unless_stopped(service: dict[str, Any]) -> None:
    assert service["restart"] == "unless-stopped"


def test_environment_is_valid_settings(service: dict[str, Any], the_image: Image) -> None:
    environment = environment_of(mapping(service["environment"], "environment"), SERVICE)
    assert set(environment) <= SETTINGS, set(environment) - SETTINGS
    assert {"REGISTRY2_HOST", "TRUST_PROXY"} <= set(environment)
    # What the container gets: the image's ENV, then these.
    settings = load_settings({**proxy_environment(the_image.environment), **environment}, {})
    assert settings.port == the_image.port
    assert settings.registry_url == f"https://{environment['REGISTRY2_HOST']}"


def test_stop_waits_longer_than_the_drain(service: dict[str, Any], the_image: Image) -> None:
    environment = environment_of(mapping(service["environment"], "environment"), SERVICE)
    settings = load_settings({**proxy_environment(the_image.environment), **environment}, {})
    grace = duration_seconds(str(service["stop_grace_period"]))
    assert grace > settings.shutdown_timeout


def test_healthcheck_is_the_image_one(service: dict[str, Any], the_image: Image) -> None:
    check = mapping(service["healthcheck"], "healthcheck")
    test = sequence(check["test"], "healthcheck.test")
    assert test == ["CMD", *the_image.health_command]
    assert any("/ping" in word for word in test)
    assert duration_seconds(check["timeout"]) < duration_seconds(check["interval"])


def test_the_cache_folder_is_a_named_volume(compose: dict[str, Any]) -> None:
    name, target = cache_mount()
    # balena supports named volumes only: a path here would be a bind mount.
    assert name in mapping(compose["volumes"], "volumes"), f"volume {name} is not declared"
    assert not name.startswith(("/", ".", "~")), name
    assert target.startswith("/"), target
    assert ":ro" not in target, "the cache writes to it"


def test_edge_mode_needs_only_the_documented_fleet_variables(
    service: dict[str, Any], the_image: Image
) -> None:
    environment = environment_of(mapping(service["environment"], "environment"), SERVICE)
    # Off as shipped: a cache sends every layer through the device.
    off = load_settings({**proxy_environment(the_image.environment), **environment}, {})
    assert off.cache_dir is None
    assert not off.follows_redirects
    _, folder = cache_mount()
    fleet = {"CACHE_DIR": folder, "PROXY_AUTH": "true"}
    edge = load_settings({**proxy_environment(the_image.environment), **environment, **fleet}, {})
    assert edge.cache_dir == folder
    assert edge.proxy_auth
    assert worker_count(edge, 8) == 1, "the cache works with one worker"
    # Set for the device, not the proxy's general default.
    assert "CACHE_MAX_SIZE" in environment
    assert 0 < edge.cache_max_size <= SD_CARD_CACHE_LIMIT


def test_runs_without_privileges(service: dict[str, Any]) -> None:
    assert service["cap_drop"] == ["ALL"]
    assert "cap_add" not in service
    assert "no-new-privileges:true" in service["security_opt"]
    assert service["read_only"] is True
    assert "privileged" not in service
