"""Run the real Docker distribution registry (``docker-registry`` 2.8) for the sandbox.

The registry is configured for token auth against the sandbox token service, stores blobs on the
local filesystem and listens on 127.0.0.1 only. Its Apache-style access log (stdout, one line per
request) and its diagnostics (stderr) go to separate files so tests can count upstream requests.

Given an :class:`S3Storage` it keeps blobs in an S3 bucket instead, and then answers blob GETs
and HEADs with a 307 to a presigned URL on the bucket's host, as balenaCloud's registry does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from .ports import free_port

__all__ = [
    "DEFAULT_REGISTRY_BINARY",
    "AccessLogEntry",
    "RegistryNotInstalledError",
    "RegistryProcess",
    "RegistrySettings",
    "RegistryStartError",
    "S3Storage",
    "find_registry_binary",
    "parse_access_log",
    "render_config",
    "run_registry",
]

DEFAULT_REGISTRY_BINARY = Path("/usr/bin/docker-registry")
_LOCALHOST = "127.0.0.1"
_START_ATTEMPTS = 3
_POLL_INTERVAL_SECONDS = 0.05
_LOG_TAIL_CHARS = 2000
# "127.0.0.1 - - [26/Nov/2024:18:27:00 +0000] "GET /v2/ HTTP/1.1" 401 87 "" "ua""
_ACCESS_LINE_RE = re.compile(r'^\S+ \S+ \S+ \[[^\]]*\] "(\S+) (\S+) [^"]*" (\d{3}) ')


class RegistryNotInstalledError(RuntimeError):
    """The ``docker-registry`` binary is not available."""


class RegistryStartError(RuntimeError):
    """The registry process exited or never became ready."""


@dataclass(frozen=True)
class RegistrySettings:
    """How the registry authenticates clients: the token service it trusts."""

    realm: str
    service: str
    issuer: str
    root_cert_path: Path
    # Distribution 3 looks a token's ``kid`` up here (2.8 ignores the setting).
    jwks_path: Path | None = None


@dataclass(frozen=True)
class S3Storage:
    """An S3 bucket (AWS or any S3-compatible server) for the registry to keep blobs in.

    The registry's default ``storage.redirect`` stays on, so a blob GET or HEAD answers 307 with
    a presigned URL on ``endpoint``: what balenaCloud's registry does with its own bucket.
    """

    endpoint: str
    """Base URL of the S3 server, e.g. ``http://127.0.0.1:9000``; addressed path-style."""
    bucket: str
    region: str
    access_key: str
    secret_key: str

    def render(self) -> dict[str, Any]:
        """The registry's ``storage.s3`` section."""
        return {
            "accesskey": self.access_key,
            "secretkey": self.secret_key,
            "region": self.region,
            # In distribution 2.8 a regionendpoint also forces path-style addressing, which a
            # server on an IP address needs (no bucket subdomains there).
            "regionendpoint": self.endpoint,
            "bucket": self.bucket,
            "secure": self.endpoint.startswith("https://"),
            "v4auth": True,
        }


@dataclass(frozen=True)
class AccessLogEntry:
    """One request as recorded in the registry's access log."""

    method: str
    path: str
    status: int


def find_registry_binary(binary: Path | str | None = None) -> Path:
    """Return the registry executable, raising :class:`RegistryNotInstalledError` if missing."""
    path = DEFAULT_REGISTRY_BINARY if binary is None else Path(binary)
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise RegistryNotInstalledError(
            f"{path} not found; install it with: apt-get install docker-registry"
        )
    return path


def render_config(
    settings: RegistrySettings,
    *,
    storage_dir: Path,
    port: int,
    http_secret: str,
    s3: S3Storage | None = None,
) -> dict[str, Any]:
    """Build the registry's ``config.yml`` document: blobs in ``storage_dir``, or in ``s3``."""
    driver = (
        {"filesystem": {"rootdirectory": str(storage_dir)}} if s3 is None else {"s3": s3.render()}
    )
    token: dict[str, str] = {
        "realm": settings.realm,
        "service": settings.service,
        "issuer": settings.issuer,
        "rootcertbundle": str(settings.root_cert_path),
    }
    if settings.jwks_path is not None:
        token["jwks"] = str(settings.jwks_path)
    return {
        "version": 0.1,
        "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
        "storage": {
            **driver,
            "delete": {"enabled": False},
            # Background upload purging would only add noise to the logs of short runs.
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {"addr": f"{_LOCALHOST}:{port}", "secret": http_secret},
        "auth": {"token": token},
        # Off for S3 too: its probe would only add requests to the bucket's log.
        "health": {"storagedriver": {"enabled": False}},
    }


def parse_access_log(text: str) -> list[AccessLogEntry]:
    """Extract the requests from access log text, skipping any other line."""
    entries: list[AccessLogEntry] = []
    for line in text.splitlines():
        match = _ACCESS_LINE_RE.match(line)
        if match is not None:
            entries.append(AccessLogEntry(match[1], match[2], int(match[3])))
    return entries


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-_LOG_TAIL_CHARS:]
    except OSError:
        return ""


class RegistryProcess:
    """A running ``docker-registry serve`` child process."""

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        *,
        port: int,
        workdir: Path,
        access_log_path: Path,
        log_path: Path,
    ) -> None:
        self._process = process
        self.port = port
        self.workdir = workdir
        self.storage_dir = workdir / "storage"
        self.access_log_path = access_log_path
        self.log_path = log_path

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:5123``."""
        return f"http://{self.host}"

    @property
    def host(self) -> str:
        """``127.0.0.1:<port>``, the registry host as image references spell it."""
        return f"{_LOCALHOST}:{self.port}"

    @property
    def returncode(self) -> int | None:
        """Exit status, or ``None`` while running."""
        return self._process.returncode

    def access_log(self) -> list[AccessLogEntry]:
        """Every request the registry has logged so far.

        The registry writes a line after sending the response, so a request that just completed
        may show up a few milliseconds later.
        """
        return parse_access_log(self.access_log_path.read_text(errors="replace"))

    @classmethod
    async def start(
        cls,
        settings: RegistrySettings,
        workdir: Path,
        *,
        binary: Path | str | None = None,
        startup_seconds: float = 15.0,
        s3: S3Storage | None = None,
    ) -> RegistryProcess:
        """Write the config into ``workdir``, start the registry and wait until it serves.

        Blobs go to ``workdir/storage``, or to the bucket of ``s3``.
        """
        executable = find_registry_binary(binary)
        attempt = 1
        while True:
            registry = await cls._spawn(executable, settings, workdir, s3)
            try:
                await registry._wait_ready(startup_seconds)
            except RegistryStartError as exc:
                exited = registry.returncode is not None
                await registry.stop()
                # Another process may grab the probed free port first; only that is retried.
                if not (exited and "address already in use" in str(exc)):
                    raise
                if attempt == _START_ATTEMPTS:
                    raise
                attempt += 1
            else:
                return registry

    @classmethod
    async def _spawn(
        cls, executable: Path, settings: RegistrySettings, workdir: Path, s3: S3Storage | None
    ) -> RegistryProcess:
        port = free_port(_LOCALHOST)
        config_path, access_log_path, log_path = _prepare_workdir(workdir, settings, port, s3)
        with access_log_path.open("ab") as stdout, log_path.open("ab") as stderr:
            process = await asyncio.create_subprocess_exec(
                str(executable),
                "serve",
                str(config_path),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                cwd=workdir,
                env=None if s3 is None else _without_aws_settings(os.environ),
            )
        return cls(
            process,
            port=port,
            workdir=workdir,
            access_log_path=access_log_path,
            log_path=log_path,
        )

    async def _wait_ready(self, startup_seconds: float) -> None:
        try:
            async with (
                asyncio.timeout(startup_seconds),
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session,
            ):
                # Polling: the child offers no readiness signal besides answering requests.
                while True:
                    if await self._answers_401(session):
                        return
                    await asyncio.sleep(_POLL_INTERVAL_SECONDS)
        except TimeoutError:
            raise RegistryStartError(
                f"registry not ready after {startup_seconds}s: {_tail(self.log_path)}"
            ) from None

    async def _answers_401(self, session: aiohttp.ClientSession) -> bool:
        if self.returncode is not None:
            raise RegistryStartError(
                f"registry exited with status {self.returncode}: {_tail(self.log_path)}"
            )
        try:
            async with session.get(f"{self.url}/v2/") as response:
                # 401 proves both that it listens and that token auth is configured.
                return response.status == 401
        except aiohttp.ClientError:
            return False

    async def stop(self, grace_seconds: float = 5.0) -> None:
        """Terminate the registry: SIGTERM, then SIGKILL after ``grace_seconds``."""
        if self._process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self._process.terminate()
        try:
            async with asyncio.timeout(grace_seconds):
                await self._process.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()
            await self._process.wait()


def _without_aws_settings(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` less the AWS SDK's variables, which would override the rendered config.

    An ``AWS_CA_BUNDLE`` alone makes the registry panic at start (its S3 client cannot load a
    CA bundle into the registry's own HTTP transport); profiles or keys would change who signs.
    """
    return {name: value for name, value in environ.items() if not name.startswith("AWS_")}


def _prepare_workdir(
    workdir: Path, settings: RegistrySettings, port: int, s3: S3Storage | None = None
) -> tuple[Path, Path, Path]:
    """Create the storage directory and config; return config, access log and log paths."""
    storage_dir = workdir / "storage"
    if s3 is None:
        storage_dir.mkdir(parents=True, exist_ok=True)
    else:
        workdir.mkdir(parents=True, exist_ok=True)
    config = render_config(
        settings, storage_dir=storage_dir, port=port, http_secret=secrets.token_hex(16), s3=s3
    )
    config_path = workdir / "config.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return config_path, workdir / "access.log", workdir / "registry.log"


@contextlib.asynccontextmanager
async def run_registry(
    settings: RegistrySettings,
    workdir: Path | None = None,
    *,
    binary: Path | str | None = None,
    s3: S3Storage | None = None,
) -> AsyncIterator[RegistryProcess]:
    """Run a registry for the duration of the block, keeping blobs in ``s3`` if given.

    Without ``workdir`` a temporary directory is used and removed afterwards; a given
    ``workdir`` is left in place for inspection. The bucket of ``s3`` must exist.
    """
    directory = (
        Path(tempfile.mkdtemp(prefix="balena-sandbox-registry-")) if workdir is None else workdir
    )
    try:
        registry = await RegistryProcess.start(settings, directory, binary=binary, s3=s3)
        try:
            yield registry
        finally:
            await registry.stop()
    finally:
        if workdir is None:
            shutil.rmtree(directory, ignore_errors=True)
