"""Session-wide fixtures: the sandbox (real registry + token service) and the real clients.

Where a real part is missing the tests that need it skip with the install line, except under
``REQUIRE_E2E=1`` (set by CI), where a missing part fails the run instead of hiding it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import aiohttp
import pytest
from hypothesis import settings

from balena_registry_proxy.sandbox import (
    RegistryNotInstalledError,
    Sandbox,
    find_registry_binary,
    sandbox_in_thread,
)

from . import matrix

if TYPE_CHECKING:
    from .e2e.moto_s3 import MotoS3
    from .redis_server import RedisServer

# `make mutation` runs the unit tests once per mutant: the same examples every time, so that a
# mutant's verdict repeats, and no example database carried from one mutant to the next.
settings.register_profile("mutation", derandomize=True, database=None)


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
        binary = find_registry_binary()
    except RegistryNotInstalledError as error:
        missing(str(error))
    matrix.note_version(matrix.DEFAULT_UPSTREAM, [str(binary), "--version"])
    return binary


@pytest.fixture(scope="session")
def sandbox(registry_binary: Path) -> Iterator[Sandbox]:
    """A seeded sandbox shared by the whole session, on its own event loop in a thread."""
    with sandbox_in_thread() as running:
        yield running


@pytest.fixture(scope="session")
def skopeo() -> str:
    """Path of the skopeo binary."""
    binary = require_binary("skopeo", "skopeo")
    matrix.note_version("skopeo", [binary, "--version"])
    return binary


# Anything that looks like a credential: a JWT (their JSON header always encodes to "eyJ"),
# an Authorization value, a demo API key of the sandbox's catalog, a password used in a test.
_SECRET = re.compile(
    r"eyJ[A-Za-z0-9_-]{8,}\.|brp1\.[A-Za-z0-9_-]{8}|Bearer [A-Za-z0-9]|Basic [A-Za-z0-9]"
    r"|sandbox-api-key|hunter2|seal-secret"
)
PROXY_LOG_FILES: list[Path] = []


def register_log(path: Path) -> Path:
    """Have the session-wide secret check read ``path`` (a proxy process's log) at the end."""
    PROXY_LOG_FILES.append(path)
    return path


class _Collect(logging.Handler):
    """Keeps every record of the proxy's loggers, as its ``name: message`` line."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        # aiohttp.access is left out: only the tests' fake upstreams use it, the proxy logs
        # its access lines under its own name.
        if record.name.startswith(("balena_registry_proxy", "aiohttp.server", "aiohttp.web")):
            self.lines.append(f"{record.name}: {self.format(record)}")


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_any_log() -> Iterator[None]:
    """After the whole suite: no log line of the proxy, in-process or as a process, has a secret
    or shows a fault of the proxy's own.

    Every token, API key and password the tests use passes through the proxy somewhere; this
    reads every line the proxy logged while they did.
    """
    collect = _Collect()
    root = logging.getLogger()
    previous = root.level
    root.addHandler(collect)
    root.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        root.removeHandler(collect)
        root.setLevel(previous)
    lines = list(collect.lines)
    processes = []
    for path in PROXY_LOG_FILES:
        if path.exists():
            processes += path.read_text(errors="replace").splitlines()
    lines += processes
    leaked = [line for line in lines if _SECRET.search(line)]
    assert not leaked, f"{len(leaked)} log lines carry secrets, e.g. {leaked[0][:200]}"
    # Nor a fault of its own: whatever the tests did to it, the proxy answered or logged a
    # warning, never a traceback or an unexpected error. (In this process aiohttp's own
    # loggers serve the tests' fake upstreams too, whose faults are on purpose.)
    own = [line for line in collect.lines if line.startswith("balena_registry_proxy")]
    faults = [line for line in own + processes if "Traceback" in line or "unexpected error" in line]
    assert not faults, f"{len(faults)} log lines show faults:\n" + "\n".join(faults)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Record the outcome of every client matrix case (see ``matrix``)."""
    report = yield
    matrix.observe(item, report)
    return report


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Write the client matrix records of this session."""
    matrix.write()


async def until_serving(base_url: str) -> None:
    """Wait until a proxy at ``base_url`` answers ``/ping`` (30 s at most)."""
    async with aiohttp.ClientSession() as session:
        for _ in range(300):
            try:
                async with session.get(f"{base_url}/ping") as ping:
                    if await ping.text() == "pong":
                        return
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.1)
    raise AssertionError(f"nothing answered {base_url}/ping within 30 s")


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server of the test module's own."""
    # Imported here: the module imports this one's helpers.
    from .redis_server import running_redis

    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    """moto's S3 server, of the test module's own."""
    from .e2e.moto_s3 import MOTO_MISSING, moto_available, run_moto_s3

    if not moto_available():
        missing(MOTO_MISSING)
    with run_moto_s3(tmp_path_factory.mktemp("moto")) as server:
        yield server
