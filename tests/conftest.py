"""Session-wide fixtures: the sandbox (real registry + token service) and the real clients.

Where a real part is missing the tests that need it skip with the install line, except under
``REQUIRE_E2E=1`` (set by CI), where a missing part fails the run instead of hiding it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from balena_registry_proxy.sandbox import (
    RegistryNotInstalledError,
    Sandbox,
    find_registry_binary,
    sandbox_in_thread,
)


def missing(reason: str) -> NoReturn:
    """Skip the test for a missing real part, or fail it when CI requires every part."""
    if os.environ.get("REQUIRE_E2E") == "1":
        pytest.fail(f"REQUIRE_E2E=1 but {reason}")
    pytest.skip(reason)


def require_binary(name: str, package: str) -> str:
    """The path of executable ``name``, else ``missing`` with the install line for ``package``."""
    path = shutil.which(name)
    if path is None:
        missing(f"{name} not found; install it with: apt-get install {package}")
    return path


@pytest.fixture(scope="session")
def registry_binary() -> Path:
    """The docker-registry executable."""
    try:
        return find_registry_binary()
    except RegistryNotInstalledError as error:
        missing(str(error))


@pytest.fixture(scope="session")
def sandbox(registry_binary: Path) -> Iterator[Sandbox]:
    """A seeded sandbox shared by the whole session, on its own event loop in a thread."""
    with sandbox_in_thread() as running:
        yield running


@pytest.fixture(scope="session")
def skopeo() -> str:
    """Path of the skopeo binary."""
    return require_binary("skopeo", "skopeo")
