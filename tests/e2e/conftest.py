"""The proxy, run as its own command, in front of the sandbox's real registry."""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from balena_registry_proxy.sandbox import Sandbox, sandbox_in_thread
from balena_registry_proxy.sandbox.ports import free_port

from .. import matrix
from ..conftest import register_log, require_binary
from .go_clients import Crane, LayoutClient, Oras
from .go_tools import go_tool


@dataclass(frozen=True)
class RunningProxy:
    """A proxy process: where it listens and where it logs."""

    host: str
    log_path: Path
    process: subprocess.Popen[bytes]

    def log(self) -> str:
        """Everything the proxy has logged so far."""
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="session")
def proxy(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningProxy]:
    """``balena-registry-proxy`` listening on loopback, upstream the sandbox registry."""
    log_path = tmp_path_factory.mktemp("proxy") / "proxy.log"
    with proxy_process({"REGISTRY_URL": sandbox.registry_url}, log_path) as running:
        yield running


@pytest.fixture(scope="session")
def edge_proxy(
    sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningProxy]:
    """A proxy in edge mode (``--proxy-auth``) in front of the sandbox."""
    directory = tmp_path_factory.mktemp("edge")
    env = {"REGISTRY_URL": sandbox.registry_url, "PROXY_AUTH": "true"}
    with proxy_process(env, directory / "proxy.log") as running:
        yield running


# Resolver mode's sealing key in these tests: every replica of one test shares it.
SEAL_KEY = "e2e-resolver-seal-secret-0001"


def resolver_env(sandbox: Sandbox, **more: str) -> dict[str, str]:
    """The environment of a proxy in resolver mode in front of ``sandbox``."""
    return {
        "REGISTRY_URL": sandbox.registry_url,
        "RESOLVE": "true",
        "BALENA_API_URL": sandbox.api_url,
        "TOKEN_SEAL_KEY": SEAL_KEY,
        **more,
    }


@pytest.fixture(scope="session")
def resolver_proxy(
    sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningProxy]:
    """A proxy in resolver mode in front of the shared sandbox."""
    log_path = tmp_path_factory.mktemp("resolver") / "proxy.log"
    with proxy_process(resolver_env(sandbox), log_path) as running:
        yield running


@dataclass(frozen=True)
class Upstream:
    """A sandbox with a proxy in front, for the Go clients, the upstream registry chosen.

    The token realm names the token service ``localhost``, a host name as balenaCloud's is, and
    clients address the proxy as ``localhost`` too: crane refuses a realm on a private IP literal
    and oras one that resolves to loopback, unless it is the registry's own host (see the
    README's client notes).
    """

    key: str
    version: str
    sandbox: Sandbox
    proxy: RunningProxy

    @property
    def host(self) -> str:
        """The proxy's ``localhost:<port>``."""
        return self.proxy.host.replace("127.0.0.1", "localhost", 1)


@pytest.fixture(scope="session", params=["registry2", "registry3"])
def go_upstream(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Upstream]:
    """The proxy in front of Debian's registry 2.8, then in front of distribution 3."""
    key: str = request.param
    if key == "registry2":
        binary: Path = request.getfixturevalue("registry_binary")
    else:
        binary = go_tool("registry")
    version = matrix.note_version(key, [str(binary), "--version"])
    with sandbox_in_thread(registry_binary=binary, realm_host="localhost") as sandbox:
        log_path = tmp_path_factory.mktemp(f"proxy-{key}") / "proxy.log"
        with proxy_process({"REGISTRY_URL": sandbox.registry_url}, log_path) as proxy:
            yield Upstream(key, version, sandbox, proxy)


@contextlib.contextmanager
def proxy_process(
    env: dict[str, str], log_path: Path, cafile: Path | None = None, port: int | None = None
) -> Iterator[RunningProxy]:
    """A proxy process on ``port`` (a free loopback one by default), ``env`` on top of ours,
    once it answers /ping.

    Its log goes to ``log_path``, which the session-wide secret check reads at the end.
    """
    port = port or free_port()
    scheme = "https" if cafile else "http"
    with register_log(log_path).open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "balena_registry_proxy", "--host", "127.0.0.1"],
            # One process unless a test asks for workers: most tests count what one process
            # holds (connections, caches); test_workers.py runs the default.
            env={
                **os.environ,
                "PROXY_PORT": str(port),
                "LOG_LEVEL": "info",
                "WORKERS": "1",
                **env,
            },
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_ping(f"{scheme}://127.0.0.1:{port}/ping", process, cafile=cafile)
        yield RunningProxy(f"127.0.0.1:{port}", log_path, process)
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(30)


def settled(cache: Path, timeout: float = 60.0) -> None:
    """Wait until a caching proxy has kept what it downloaded.

    A filled blob is flushed to disk and renamed into place just after its clients have their
    last byte, so a pull can end a moment before its layers show in the cache folder.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(path.suffix == ".part" for path in (cache / "tmp").iterdir()):
            break
        time.sleep(0.02)
    time.sleep(0.1)


def wait_for_ping(url: str, process: subprocess.Popen[bytes], cafile: Path | None = None) -> None:
    """Wait until the proxy answers ``/ping`` at ``url`` (trusting ``cafile`` for HTTPS)."""
    context = ssl.create_default_context(cafile=str(cafile)) if cafile else None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the proxy exited with {process.returncode} during start-up")
        try:
            with urllib.request.urlopen(url, timeout=1, context=context) as response:  # noqa: S310
                if response.read() == b"pong":
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("the proxy did not answer /ping within 30 s")


@dataclass(frozen=True)
class Skopeo:
    """The real skopeo client, pointed at the proxy over plain HTTP."""

    binary: str
    host: str
    workdir: Path

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run a skopeo command; never raises, the caller checks the outcome."""
        command = [self.binary, "--debug"] if os.environ.get("SKOPEO_DEBUG") else [self.binary]
        return subprocess.run(
            [*command, *args],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            # No shared auth file or policy on the machine may change what the test sees.
            env={**os.environ, "REGISTRY_AUTH_FILE": str(self.workdir / "auth.json")},
        )

    def pull(
        self, name: str, destination: Path, *options: str, host: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``skopeo copy`` of ``name`` from a proxy (this one unless ``host``) into a folder."""
        source = f"docker://{host or self.host}/{name}"
        return self.run("copy", "--src-tls-verify=false", *options, source, f"dir:{destination}")

    def inspect(self, name: str, *extra: str, creds: str | None = None) -> dict[str, object]:
        """``skopeo inspect`` of ``name`` through the proxy; fails the test if skopeo fails."""
        options = [f"--creds={creds}"] if creds else []
        result = self.run("inspect", "--tls-verify=false", *options, *extra, self.ref(name))
        assert result.returncode == 0, result.stderr
        document: dict[str, object] = json.loads(result.stdout)
        return document

    def ref(self, name: str) -> str:
        """A ``docker://`` reference to ``name`` on the proxy."""
        return f"docker://{self.host}/{name}"


@pytest.fixture(scope="session")
def client(proxy: RunningProxy, skopeo: str, tmp_path_factory: pytest.TempPathFactory) -> Skopeo:
    """skopeo, talking to the proxy."""
    workdir = tmp_path_factory.mktemp("skopeo")
    (workdir / "auth.json").write_text("{}")
    return Skopeo(skopeo, proxy.host, workdir)


def _go_client_parts(name: str, upstream: Upstream, tmp_path: Path) -> tuple[Path, str, Path]:
    """A Go client's binary (its version noted), the proxy's host and a new home for it."""
    binary = go_tool(name)
    matrix.note_version(name, [str(binary), "version"])
    home = tmp_path / name
    home.mkdir()
    return binary, upstream.host, home


@pytest.fixture
def crane(go_upstream: Upstream, tmp_path: Path) -> Crane:
    """crane, talking to the proxy in front of ``go_upstream``."""
    return Crane(*_go_client_parts("crane", go_upstream, tmp_path))


@pytest.fixture
def oras(go_upstream: Upstream, tmp_path: Path) -> Oras:
    """oras, talking to the proxy in front of ``go_upstream``."""
    return Oras(*_go_client_parts("oras", go_upstream, tmp_path))


@pytest.fixture(params=["crane", "oras"])
def layout_client(request: pytest.FixtureRequest) -> LayoutClient:
    """crane, then oras: the cases both clients run alike."""
    client: LayoutClient = request.getfixturevalue(request.param)
    return client


def _haproxy_config(port: int, backends: list[int]) -> str:
    servers = "\n".join(
        f"    server p{n} 127.0.0.1:{backend} check inter 200ms fall 1 rise 2"
        for n, backend in enumerate(backends)
    )
    return f"""\
global
    maxconn 512

defaults
    mode http
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    retries 3
    option redispatch

frontend registry
    bind 127.0.0.1:{port}
    default_backend proxies

backend proxies
    balance roundrobin
    option httpchk GET /ping
{servers}
"""


@contextlib.contextmanager
def haproxy_in_front(proxies: list[RunningProxy], directory: Path) -> Iterator[str]:
    """HAProxy balancing round robin over ``proxies`` (health-checked on /ping): its host."""
    haproxy = require_binary("haproxy", "haproxy")
    port = free_port()
    config = directory / "haproxy.cfg"
    backends = [int(proxy.host.rsplit(":", 1)[1]) for proxy in proxies]
    config.write_text(_haproxy_config(port, backends))
    balancer = subprocess.Popen(
        [haproxy, "-f", str(config), "-db"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for_ping(f"http://127.0.0.1:{port}/ping", balancer)
        yield f"127.0.0.1:{port}"
    finally:
        balancer.terminate()
        balancer.wait(30)
