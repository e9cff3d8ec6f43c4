"""The whole sandbox in one context manager: signing key, balena API stand-in, registry, seed.

The API stand-in serves the token endpoint (``/auth/v1/token``) and the read side of ``/v7``
on one port, as api.balena-cloud.com does.

The registry keeps blobs on the local filesystem, or in an S3 bucket (``Sandbox.start(s3=...)``),
where it answers blob requests with redirects to presigned URLs as balenaCloud's registry does.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from .api import add_api_routes
from .catalog import (
    Catalog,
    ScopeRequest,
    User,
    can_read,
    default_catalog_path,
    load_catalog,
    resolve_release,
    resolve_scope,
)
from .keys import SigningKey, generate_signing_key
from .model import build_database
from .registry import AccessLogEntry, RegistryProcess, RegistrySettings, S3Storage, run_registry
from .seed import SeededImage, SeedResult, seed_registry
from .token_service import (
    TOKEN_PATH,
    TOKEN_REQUESTS,
    TokenIssuer,
    TokenRequestRecord,
    create_token_app,
)

__all__ = ["DEFAULT_ISSUER", "DEFAULT_SERVICE", "Sandbox"]

DEFAULT_SERVICE = "registry2.sandbox.local"
DEFAULT_ISSUER = "api.sandbox.local"
_LOCALHOST = "127.0.0.1"


class Sandbox:
    """A running stand-in for balenaCloud's registry and its API.

    Obtain one with ``async with Sandbox.start() as sb``; the attributes are plain values that
    are safe to read from any thread. ``api_url`` is the API's root (``/v7/...`` below it),
    ``token_url`` its token endpoint, the registry's token realm.
    """

    def __init__(
        self,
        *,
        catalog: Catalog,
        token_issuer: TokenIssuer,
        api_url: str,
        token_requests: list[TokenRequestRecord],
        registry: RegistryProcess,
        seed: SeedResult,
        workdir: Path,
    ) -> None:
        self.catalog = catalog
        self.token_issuer = token_issuer
        self.api_url = api_url
        self.token_url = api_url + TOKEN_PATH
        self.token_requests = token_requests
        self.registry = registry
        self.seed = seed
        self.workdir = workdir

    @property
    def signing_key(self) -> SigningKey:
        """The key tokens are signed with; its certificate is the registry's trust root."""
        return self.token_issuer.signing_key

    @property
    def service(self) -> str:
        """The registry's token service name, i.e. the tokens' ``aud``."""
        return self.token_issuer.service

    @property
    def issuer(self) -> str:
        """The tokens' ``iss``."""
        return self.token_issuer.issuer

    @property
    def registry_url(self) -> str:
        """Registry base URL, ``http://127.0.0.1:<port>``."""
        return self.registry.url

    @property
    def registry_host(self) -> str:
        """``127.0.0.1:<port>``, as written in image references."""
        return self.registry.host

    @property
    def registry_log_path(self) -> Path:
        """The registry's access log: one Apache combined-format line per request."""
        return self.registry.access_log_path

    def expected_release(self, name: str, username: str | None = None) -> SeededImage | None:
        """What pulling ``name`` (``org/app[/selector]``) should yield for ``username``.

        Applies the token service's resolution rules, so tests can compare what a client
        received with what was seeded; ``None`` when balena would not serve the name.
        """
        user = self._user(username)
        entry = resolve_scope(self.catalog, ScopeRequest(name, ("pull",)), user)
        if entry is None or entry.alias is None:
            return None
        return self.seed.images[entry.name]

    def expected_images(self, name: str, username: str | None = None) -> dict[str, SeededImage]:
        """The images, by service, of the release ``org/app[/selector]`` names for ``username``.

        The selector rules are the token service's (pinned release for none or a keyword,
        newest revision of a final version, a draft by raw version, a commit; successful
        releases only), without its one-image rule: what a client that resolves releases
        through ``/v7`` and pulls each service by repository should get. Empty when the app
        is unknown, unreadable for ``username``, or has no such release.
        """
        user = self._user(username)
        slug, _, selector = name.partition("/")[2].partition("/")
        app = self.catalog.app(f"{name.split('/')[0]}/{slug}")
        if app is None or not can_read(app, user):
            return {}
        release = resolve_release(app, selector or None, single_image=False)
        return {} if release is None else self.seed.services(release.commit)

    def _user(self, username: str | None) -> User | None:
        user = None if username is None else self.catalog.user(username)
        if username is not None and user is None:
            raise KeyError(username)
        return user

    def registry_requests(self) -> list[AccessLogEntry]:
        """Requests the registry has served so far (see :meth:`RegistryProcess.access_log`)."""
        return self.registry.access_log()

    @classmethod
    @contextlib.asynccontextmanager
    async def start(
        cls,
        catalog_path: Path | str | None = None,
        workdir: Path | str | None = None,
        *,
        registry_binary: Path | str | None = None,
        service: str = DEFAULT_SERVICE,
        issuer: str = DEFAULT_ISSUER,
        s3: S3Storage | None = None,
        realm_host: str = _LOCALHOST,
    ) -> AsyncIterator[Sandbox]:
        """Start the token service and the registry, seed every release, yield the sandbox.

        ``catalog_path`` defaults to the packaged ``default_catalog.yaml``. Without ``workdir``
        all state lives in a temporary directory removed on exit; a given ``workdir`` is kept.
        With ``s3`` the registry keeps blobs in that (existing) bucket, not in ``workdir``; with
        ``registry_binary`` that executable (distribution 3, say) serves instead of Debian's.
        ``realm_host`` is how the token realm names the loopback token service: ``localhost``
        makes it a host name like balenaCloud's, which clients that refuse a realm on a private
        IP literal (crane 0.22) accept.
        """
        catalog = load_catalog(catalog_path or default_catalog_path())
        directory = (
            Path(workdir)
            if workdir is not None
            else Path(tempfile.mkdtemp(prefix="balena-sandbox-"))
        )
        async with contextlib.AsyncExitStack() as stack:
            if workdir is None:
                stack.callback(shutil.rmtree, directory, ignore_errors=True)
            signing_key = await asyncio.to_thread(generate_signing_key)
            cert_path, jwks_path = await asyncio.to_thread(
                _write_keys, signing_key, directory / "keys"
            )
            token_issuer = TokenIssuer(catalog, signing_key, issuer=issuer, service=service)
            token_app = create_token_app(token_issuer)
            # Image locations name the registry by its service name, as REGISTRY2_HOST does.
            database = await asyncio.to_thread(build_database, catalog, service)
            add_api_routes(token_app, catalog, database)
            runner = web.AppRunner(token_app)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            site = web.TCPSite(runner, _LOCALHOST, 0)
            await site.start()
            api_url = f"http://{realm_host}:{runner.addresses[0][1]}"
            token_url = api_url + TOKEN_PATH

            settings = RegistrySettings(
                realm=token_url,
                service=service,
                issuer=issuer,
                root_cert_path=cert_path,
                jwks_path=jwks_path,
            )
            registry = await stack.enter_async_context(
                run_registry(settings, directory / "registry", binary=registry_binary, s3=s3)
            )

            repositories = [image.repository for _, _, image in catalog.all_images()]
            seed = await seed_registry(registry.url, catalog, token_issuer.push_token(repositories))
            yield cls(
                catalog=catalog,
                token_issuer=token_issuer,
                api_url=api_url,
                token_requests=token_app[TOKEN_REQUESTS],
                registry=registry,
                seed=seed,
                workdir=directory,
            )


def _write_keys(signing_key: SigningKey, directory: Path) -> tuple[Path, Path]:
    """Write the key material the registry trusts; return the certificate and JWKS paths."""
    directory.mkdir(parents=True, exist_ok=True)
    _, cert_path = signing_key.write_pem(directory)
    return cert_path, signing_key.write_jwks(directory)
