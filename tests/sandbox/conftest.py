"""Fixtures for the sandbox tests; the shared ``sandbox`` fixture is in ``tests/conftest.py``."""

from __future__ import annotations

import pytest

from balena_registry_proxy.sandbox import (
    Catalog,
    load_catalog,
)
from balena_registry_proxy.sandbox.catalog import default_catalog_path


@pytest.fixture(scope="session")
def default_catalog() -> Catalog:
    """The packaged default catalog."""
    return load_catalog(default_catalog_path())
