"""balena.yml: the fleet metadata that "Deploy with balena" and balenaHub read.

There is no public schema for it: the structure is checked here, after balena's documented
examples (name, type sw.application, description, version, assets, and data with the
fleet's variables and device types).
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from balena_registry_proxy.config import load_settings

from .files import (
    BALENA,
    DEVICE_ARCHITECTURES,
    SETTINGS,
    cache_mount,
    compose_service,
    environment_of,
    image,
    load_yaml,
    mapping,
    package_version,
    proxy_environment,
    sequence,
)

TOP_LEVEL = {"name", "type", "version", "description", "post-provisioning", "joinable"}
OPTIONAL_TOP_LEVEL = {"assets", "data"}
DATA = {
    "applicationEnvironmentVariables",
    "applicationConfigVariables",
    "defaultDeviceType",
    "supportedDeviceTypes",
}


@pytest.fixture(scope="module")
def balena() -> dict[str, Any]:
    return load_yaml(BALENA)


@pytest.fixture(scope="module")
def data(balena: dict[str, Any]) -> dict[str, Any]:
    return mapping(balena["data"], "data")


def test_has_the_required_keys_and_no_others(balena: dict[str, Any]) -> None:
    assert set(balena) >= TOP_LEVEL, TOP_LEVEL - set(balena)
    assert set(balena) <= TOP_LEVEL | OPTIONAL_TOP_LEVEL, set(balena) - TOP_LEVEL
    assert balena["type"] == "sw.application"
    assert balena["joinable"] is False
    for key in ("name", "description", "post-provisioning"):
        assert isinstance(balena[key], str), key
        assert balena[key].strip(), key
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", balena["name"]), balena["name"]


def test_version_is_the_package_version(balena: dict[str, Any]) -> None:
    assert balena["version"] == package_version(), "bump balena.yml with pyproject.toml"


def test_assets_are_real_urls(balena: dict[str, Any]) -> None:
    assets = mapping(balena.get("assets", {}), "assets")
    for name, asset in assets.items():
        entry = mapping(asset, f"assets.{name}")
        assert entry["type"] == "blob.asset"
        url = mapping(entry["data"], f"assets.{name}.data")["url"]
        assert isinstance(url, str), url
        assert url.startswith("https://"), url
        assert not re.search(r"example|<|>|TODO|your-", url, re.IGNORECASE), url


def test_data_keys(data: dict[str, Any]) -> None:
    assert set(data) <= DATA, set(data) - DATA


def fleet_variables(data: dict[str, Any]) -> dict[str, str]:
    """balena.yml's fleet variables (one per entry, each a string), by name."""
    entries = sequence(data["applicationEnvironmentVariables"], "applicationEnvironmentVariables")
    environment: dict[str, str] = {}
    for entry in entries:
        variable = mapping(entry, "applicationEnvironmentVariables entry")
        assert len(variable) == 1, f"one variable per entry: {variable}"
        ((key, value),) = variable.items()
        assert key in SETTINGS, f"{key} is not a setting of the proxy"
        assert isinstance(value, str), f"{key}: quote {value!r} so it stays a string"
        assert key not in environment, f"{key} twice"
        environment[key] = value
    return environment


def test_environment_variables_are_valid_settings(data: dict[str, Any]) -> None:
    environment = fleet_variables(data)
    assert "REGISTRY2_HOST" in environment
    # The image's port is fixed by the compose port mapping: the fleet must not move it.
    assert "PROXY_PORT" not in environment
    built = image()
    settings = load_settings({**proxy_environment(built.environment), **environment}, {})
    assert settings.port == built.port


def test_device_types(data: dict[str, Any]) -> None:
    supported = sequence(data["supportedDeviceTypes"], "supportedDeviceTypes")
    assert supported
    assert len(set(supported)) == len(supported), supported
    assert set(supported) <= set(DEVICE_ARCHITECTURES), set(supported) - set(DEVICE_ARCHITECTURES)
    assert {"generic-amd64", "generic-aarch64", "raspberrypi4-64", "raspberrypi5"} <= set(supported)
    assert data["defaultDeviceType"] == "generic-amd64"
    assert data["defaultDeviceType"] in supported


def test_edge_mode_is_offered(balena: dict[str, Any], data: dict[str, Any]) -> None:
    offered = fleet_variables(data)
    # Shown, and editable, in the "Deploy with balena" dialog; off as shipped.
    assert offered["PROXY_AUTH"] == "false"
    assert "CACHE_DIR" not in offered, "a cache sends every layer through the device"
    # The same defaults as the compose file, which `balena push` deploys without this file.
    compose = environment_of(mapping(compose_service()["environment"], "environment"), "compose")
    shared = set(offered) & set(compose)
    assert "CACHE_MAX_SIZE" in shared
    assert {key: offered[key] for key in shared} == {key: compose[key] for key in shared}
    # The post-provisioning note names the variable values that turn edge mode on.
    _, folder = cache_mount()
    assert f"CACHE_DIR={folder}" in balena["post-provisioning"]
    assert "PROXY_AUTH=true" in balena["post-provisioning"]
