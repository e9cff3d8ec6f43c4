"""The deployment files and what the tests read from them, parsed once and typed.

YAML is read strictly: a key written twice in one mapping is an error (PyYAML would keep the
last one silently, and a hand-edited manifest is where that happens).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tomllib
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest
import yaml

from balena_registry_proxy.config import OPTIONS

from .dockerfile import env_instruction, healthcheck, parse

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
BALENA = ROOT / "balena.yml"
KUBERNETES = ROOT / "deploy" / "kubernetes"
# The manifests themselves; deploy/kubernetes and its overlays name this folder.
KUBERNETES_BASE = KUBERNETES / "base"
MAKEFILE = ROOT / "Makefile"
REQUIREMENTS = ROOT / "requirements"
SCHEMAS = Path(__file__).resolve().parent / "schemas"

# Every variable the proxy reads (README, "Configuration").
SETTINGS = frozenset(option.env for option in OPTIONS)
# The port clients use in front of the container: a balena device's Public Device URL, the
# Kubernetes Service.
PUBLIC_PORT = 80
# balena device types of 64-bit CPUs and the architecture (uname -m) of each: every dependency
# has binary wheels there, so the image builds on balena's builders without a compiler.
DEVICE_ARCHITECTURES = {
    "generic-amd64": "x86_64",
    "genericx86-64-ext": "x86_64",
    "intel-nuc": "x86_64",
    "generic-aarch64": "aarch64",
    "raspberrypi3-64": "aarch64",
    "raspberrypi4-64": "aarch64",
    "raspberrypicm4-ioboard": "aarch64",
    "raspberrypi5": "aarch64",
    "jetson-nano": "aarch64",
    "jetson-xavier": "aarch64",
    "jetson-xavier-nx-devkit": "aarch64",
    "jetson-agx-orin-devkit": "aarch64",
    "jetson-orin-nano-devkit-nvme": "aarch64",
}


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that repeats a key."""


def _mapping_without_repeats(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Hashable] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} repeated", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_repeats
)


def load_yaml_documents(path: Path) -> list[Any]:
    """Every document of the YAML file ``path``."""
    with path.open(encoding="utf-8") as stream:
        return list(yaml.load_all(stream, Loader=_StrictLoader))


def load_yaml(path: Path) -> dict[str, Any]:
    """The one document of ``path``, which must be a mapping."""
    documents = load_yaml_documents(path)
    assert len(documents) == 1, f"{path.name}: expected one YAML document, got {len(documents)}"
    return mapping(documents[0], path.name)


def mapping(value: object, where: str) -> dict[str, Any]:
    """``value`` as a mapping with string keys; fails the test naming ``where`` otherwise."""
    assert isinstance(value, dict), f"{where}: expected a mapping, got {value!r}"
    assert all(isinstance(key, str) for key in value), f"{where}: non-string keys in {value!r}"
    return value


def sequence(value: object, where: str) -> list[Any]:
    """``value`` as a list; fails the test naming ``where`` otherwise."""
    assert isinstance(value, list), f"{where}: expected a list, got {value!r}"
    return value


def pyproject() -> dict[str, Any]:
    """pyproject.toml."""
    with (ROOT / "pyproject.toml").open("rb") as stream:
        return tomllib.load(stream)


def project() -> dict[str, Any]:
    """The ``[project]`` table of pyproject.toml."""
    return mapping(pyproject()["project"], "pyproject.toml [project]")


def makefile_variable(name: str) -> str:
    """The value the Makefile gives ``name`` (a plain ``NAME := value`` line)."""
    found = re.findall(rf"^{name}\s*:?=\s*(.*)$", MAKEFILE.read_text(encoding="utf-8"), re.M)
    assert len(found) == 1, f"Makefile: expected one {name} := ..., found {found}"
    return str(found[0]).strip()


def package_version() -> str:
    """The package version, which the image tag and balena.yml's version follow."""
    version = project()["version"]
    assert isinstance(version, str)
    return version


def duration_seconds(text: str) -> float:
    """A Compose duration (``1m30s``, ``40s``, ``500ms``) in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    assert parts, f"not a duration: {text!r}"
    assert "".join(number + unit for number, unit in parts) == text, f"not a duration: {text!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


def missing(reason: str) -> NoReturn:
    """Skip for a missing tool, or fail under ``REQUIRE_E2E=1`` (CI), like tests/conftest.py."""
    if os.environ.get("REQUIRE_E2E") == "1":
        pytest.fail(f"REQUIRE_E2E=1 but {reason}")
    pytest.skip(reason)


def find_tool(name: str) -> str | None:
    """The executable ``name`` beside this interpreter (a venv's bin/) or on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


def environment_of(entries: Mapping[str, object], where: str) -> dict[str, str]:
    """A Compose/ConfigMap environment mapping, every value a string (no YAML surprises)."""
    environment: dict[str, str] = {}
    for key, value in entries.items():
        assert isinstance(value, str), (
            f"{where}: {key} is {value!r} ({type(value).__name__}); quote it so it stays a string"
        )
        environment[key] = value
    return environment


# The most CACHE_MAX_SIZE a device deployment may default to: a quarter of a 16 GB SD card,
# which also holds balenaOS and the device's own images.
SD_CARD_CACHE_LIMIT = 4 * 2**30


def compose_service() -> dict[str, Any]:
    """The one service of docker-compose.yml."""
    services = mapping(load_yaml(COMPOSE).get("services"), "services")
    assert len(services) == 1, list(services)
    return mapping(next(iter(services.values())), "the compose service")


def cache_mount() -> tuple[str, str]:
    """The named volume of the compose service and where it is mounted: the cache's folder."""
    volumes = sequence(compose_service().get("volumes", []), "volumes")
    assert len(volumes) == 1, f"expected one volume, for the cache: {volumes}"
    (entry,) = volumes
    assert isinstance(entry, str), entry
    name, _, target = entry.partition(":")
    return name, target


@dataclass(frozen=True)
class Image:
    """What the other files must agree with in the Dockerfile's final stage."""

    port: int  # EXPOSE, and PROXY_PORT in its ENV
    environment: dict[str, str]  # its ENV
    uid: int  # USER
    health_command: list[str]  # HEALTHCHECK CMD, exec form


def image() -> Image:
    """The facts of the image the Dockerfile builds."""
    final = parse(DOCKERFILE)[-1]
    environment: dict[str, str] = {}
    for item in final.all("ENV"):
        environment.update(env_instruction(item.value))
    exposed = [word for item in final.all("EXPOSE") for word in item.value.split()]
    assert len(exposed) == 1, f"Dockerfile: expected one EXPOSEd port, got {exposed}"
    user = final.last("USER")
    assert user is not None, "Dockerfile: no USER"
    checks = final.all("HEALTHCHECK")
    assert len(checks) == 1, "Dockerfile: expected one HEALTHCHECK"
    command = healthcheck(checks[0].value).command
    assert command is not None, "Dockerfile: HEALTHCHECK not in exec form"
    return Image(
        port=int(exposed[0].removesuffix("/tcp")),
        environment=environment,
        uid=int(user.value.partition(":")[0]),
        health_command=command,
    )


def proxy_environment(environment: Mapping[str, str]) -> dict[str, str]:
    """The proxy's settings among ``environment`` (the image's ENV has Python's too)."""
    return {key: value for key, value in environment.items() if key in SETTINGS}
