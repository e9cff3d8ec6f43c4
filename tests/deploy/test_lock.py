"""requirements/: the hashed lock files that the image, the venv and CI install, in agreement
with pyproject.toml.

`make lock` writes them with pip-compile. A dependency added to or dropped from pyproject.toml,
or a bound that the pinned version no longer meets, fails here until the locks are written
again; so does a venv that is not the locked one.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Callable, Iterable

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .dockerfile import parse
from .files import (
    BALENA,
    DEVICE_ARCHITECTURES,
    DOCKERFILE,
    REQUIREMENTS,
    load_yaml,
    makefile_variable,
    mapping,
    pyproject,
    sequence,
)
from .locks import Lock, read_lock

LOCK_FILES = ("runtime.txt", "build.txt", "sandbox.txt", "dev.txt", "mutation.txt")
# What pip-compile writes as the reason for a pin that pyproject.toml asks for itself.
FROM_DEPENDENCIES = "balena-registry-proxy (pyproject.toml)"
FROM_BUILD_SYSTEM = "balena-registry-proxy (pyproject.toml::build-system.requires)"


def image_python() -> str:
    """The ``X.Y`` of the Python the image runs (its final stage's python:X.Y.Z base)."""
    image = parse(DOCKERFILE)[-1].image
    match = re.match(r"python:(\d+\.\d+)\.", image)
    assert match, image
    return match[1]


def applies_to_the_image(requirement: Requirement) -> bool:
    """Whether ``requirement``'s marker holds in the image: CPython on Linux."""
    if requirement.marker is None:
        return True
    environment = {key: str(value) for key, value in default_environment().items()}
    environment.update(
        python_version=image_python(),
        sys_platform="linux",
        platform_system="Linux",
        os_name="posix",
    )
    return requirement.marker.evaluate(environment)


def requirements(texts: Iterable[str]) -> list[Requirement]:
    """The requirements among ``texts`` that the image (or this venv on Linux) needs."""
    parsed = [Requirement(text) for text in texts]
    return [requirement for requirement in parsed if applies_to_the_image(requirement)]


def runtime_requirements() -> list[Requirement]:
    return requirements(pyproject()["project"]["dependencies"])


def build_requirements() -> list[Requirement]:
    return requirements(pyproject()["build-system"]["requires"])


def sandbox_requirements() -> list[Requirement]:
    """What the demo's venv runs: the dependencies and the sandbox extra."""
    extras = pyproject()["project"]["optional-dependencies"]
    return [*runtime_requirements(), *requirements(extras["sandbox"])]


def venv_requirements() -> list[Requirement]:
    """What the Makefile's venv installs: the dependencies, the sandbox, dev and bench extras,
    and the build backend (it installs the project itself without build isolation)."""
    extras = pyproject()["project"]["optional-dependencies"]
    return [
        *sandbox_requirements(),
        *requirements(extras["dev"]),
        *requirements(extras["bench"]),
        *build_requirements(),
    ]


@pytest.fixture(scope="module")
def locks() -> dict[str, Lock]:
    return {name: read_lock(REQUIREMENTS / name) for name in LOCK_FILES}


def unmet(wanted: list[Requirement], lock: Lock) -> list[str]:
    """The requirements of ``wanted`` that ``lock`` does not pin at a version they accept."""
    problems: list[str] = []
    for requirement in wanted:
        pin = lock.pins.get(canonicalize_name(requirement.name))
        if pin is None:
            problems.append(f"{requirement} is not pinned")
        elif not requirement.specifier.contains(pin.version, prereleases=True):
            problems.append(f"{requirement} is pinned at {pin.version}")
    return problems


@pytest.mark.parametrize("name", LOCK_FILES)
def test_every_pin_is_hashed_and_compiled_for_the_image_python(
    locks: dict[str, Lock], name: str
) -> None:
    lock = locks[name]
    assert lock.pins
    assert lock.python == image_python(), f"{name}: run make lock with Python {image_python()}"
    assert [pin.name for pin in lock.pins.values() if not pin.hashes] == []


@pytest.mark.parametrize(
    ("name", "wanted"),
    [
        ("runtime.txt", runtime_requirements),
        ("build.txt", build_requirements),
        ("sandbox.txt", sandbox_requirements),
        ("dev.txt", venv_requirements),
    ],
)
def test_lock_pins_what_pyproject_asks_for(
    locks: dict[str, Lock], name: str, wanted: Callable[[], list[Requirement]]
) -> None:
    assert unmet(wanted(), locks[name]) == [], "pyproject.toml changed: run make lock"


def mutation_requirements() -> list[Requirement]:
    """What ``make mutation``'s own venv asks for (requirements/mutation.in)."""
    lines = (REQUIREMENTS / "mutation.in").read_text(encoding="utf-8").splitlines()
    return requirements(line for line in lines if line.strip() and not line.startswith("#"))


def test_the_mutation_tools_lock_pins_what_they_ask_for(locks: dict[str, Lock]) -> None:
    wanted = mutation_requirements()
    assert wanted, "requirements/mutation.in names no tool"
    assert unmet(wanted, locks["mutation.txt"]) == [], "mutation.in changed: run make lock"
    named = {canonicalize_name(requirement.name) for requirement in wanted}
    asked = {pin.name for pin in locks["mutation.txt"].pins.values() if "-r " in " ".join(pin.via)}
    assert asked <= named, f"mutation.txt pins {asked - named} for mutation.in: run make lock"


def test_a_changed_bound_is_caught(locks: dict[str, Lock]) -> None:
    pinned = locks["runtime.txt"].pins["aiohttp"].version
    assert unmet([Requirement(f"aiohttp>{pinned}")], locks["runtime.txt"])
    assert unmet([Requirement("not-a-dependency-yet")], locks["runtime.txt"])


@pytest.mark.parametrize(
    ("name", "reason", "wanted"),
    [
        ("runtime.txt", FROM_DEPENDENCIES, runtime_requirements),
        ("build.txt", FROM_BUILD_SYSTEM, build_requirements),
        ("sandbox.txt", FROM_DEPENDENCIES, sandbox_requirements),
        ("dev.txt", FROM_DEPENDENCIES, venv_requirements),
        ("dev.txt", FROM_BUILD_SYSTEM, build_requirements),
    ],
)
def test_lock_keeps_nothing_pyproject_dropped(
    locks: dict[str, Lock], name: str, reason: str, wanted: Callable[[], list[Requirement]]
) -> None:
    named = {canonicalize_name(requirement.name) for requirement in wanted()}
    asked = {pin.name for pin in locks[name].pins.values() if reason in pin.via}
    assert asked <= named, f"{name} pins {asked - named} for pyproject.toml: run make lock"


@pytest.mark.parametrize("name", ["runtime.txt", "build.txt", "sandbox.txt"])
def test_the_venv_gets_the_versions_and_files_of_the_image(
    locks: dict[str, Lock], name: str
) -> None:
    def files(lock: Lock) -> dict[str, tuple[str, frozenset[str]]]:
        return {pin.name: (pin.version, pin.hashes) for pin in lock.pins.values()}

    image = files(locks[name])
    development = files(locks["dev.txt"])
    assert {key: development.get(key) for key in image} == image


def test_lock_is_checked_on_every_device_architecture() -> None:
    # `make lock` downloads the runtime lock for each of these, hashes checked.
    checked = set(makefile_variable("IMAGE_ARCHES").split())
    assert makefile_variable("IMAGE_PYTHON") == image_python()
    data = mapping(load_yaml(BALENA)["data"], "data")
    supported = sequence(data["supportedDeviceTypes"], "supportedDeviceTypes")
    assert {DEVICE_ARCHITECTURES[device] for device in supported} <= checked


def test_this_environment_is_the_locked_one(locks: dict[str, Lock]) -> None:
    different: dict[str, tuple[str, str | None]] = {}
    for pin in locks["dev.txt"].pins.values():
        if pin.marker is not None and not pin.marker.evaluate():
            continue
        try:
            installed: str | None = importlib.metadata.version(pin.name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed != pin.version:
            different[pin.name] = (pin.version, installed)
    assert different == {}, "(locked, installed): make .venv/.installed installs the lock"
