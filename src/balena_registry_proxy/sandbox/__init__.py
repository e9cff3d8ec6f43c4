"""A local stand-in for balenaCloud: a real registry, a faithful balena API, seeded images.

Used by the end-to-end tests and the demo::

    async with Sandbox.start() as sb:
        ...  # sb.registry_url, sb.token_url, sb.api_url + "/v7/release", sb.seed[commit].digest

or, from synchronous code, ``with sandbox_in_thread() as sb: ...``.
"""

from .catalog import Catalog, CatalogError, default_catalog_path, load_catalog
from .environment import DEFAULT_ISSUER, DEFAULT_SERVICE, Sandbox
from .keys import SigningKey, generate_signing_key, libtrust_key_id
from .registry import RegistryNotInstalledError, find_registry_binary
from .seed import SeededImage, SeedResult
from .threaded import sandbox_in_thread
from .token_service import TokenIssuer, create_token_app

__all__ = [
    "DEFAULT_ISSUER",
    "DEFAULT_SERVICE",
    "Catalog",
    "CatalogError",
    "RegistryNotInstalledError",
    "Sandbox",
    "SeedResult",
    "SeededImage",
    "SigningKey",
    "TokenIssuer",
    "create_token_app",
    "default_catalog_path",
    "find_registry_binary",
    "generate_signing_key",
    "libtrust_key_id",
    "load_catalog",
    "sandbox_in_thread",
]
