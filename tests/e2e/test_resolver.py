"""Resolver mode with the real clients: tags listed then each pulled, services of a
multi-container release, private apps, replicas behind HAProxy, and the API going away.

Every pull is checked by digest against what the sandbox seeded for the release the name and
tag mean (``Sandbox.expected_images``), so a proxy that served another release fails the test
even when the client exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from balena_registry_proxy.release_names import KEYWORDS
from balena_registry_proxy.sandbox import Sandbox
from balena_registry_proxy.sandbox.catalog import ReleaseStatus
from balena_registry_proxy.sandbox.ports import free_port

from .. import matrix
from .clients import (
    CTR2,
    CTR16,
    Containerd,
    Ctr,
    containerd2_daemon,
    debian_containerd,
    namespace_for,
)
from .conftest import RunningProxy, Skopeo, haproxy_in_front, proxy_process, resolver_env
from .go_clients import Crane
from .go_tools import go_tool
from .test_clients import Podman, new_podman
from .test_pull import ALICE

pytestmark = pytest.mark.e2e

TAGS = "resolver mode: list tags, pull each"
SERVICES = "resolver mode: each service of a release"
PRIVATE = "resolver mode: private app, with and without login"
# Listed names: an app, a service of a multi-container app, a multi-platform app.
LISTED = ("gh_acme/web", "gh_acme/stack/api", "gh_acme/multi")
STACK_SERVICES = ("api", "db", "frontend")
PRIVATE_NAME = "gh_acme/backoffice/worker"


def listed(sandbox: Sandbox, name: str) -> list[str]:
    """The tags a listing of ``name`` shows, from the catalog itself."""
    org, app_name, *service = name.split("/")
    app = sandbox.catalog.app(f"{org}/{app_name}")
    assert app is not None
    good = [
        r
        for r in app.releases
        if r.status is ReleaseStatus.SUCCESS
        and (not service or service[0] in {i.service for i in r.images})
    ]
    tags = {r.semver for r in good if r.is_final and not r.invalidated}
    if app.pinned_release in good:
        tags |= KEYWORDS
    return sorted(tags)


def expected_digest(sandbox: Sandbox, name: str, tag: str = "latest") -> str:
    """The manifest digest ``name:tag`` pulls: the release the name (or else the tag) means."""
    org, app_name, *rest = name.split("/")
    service = rest[-1] if rest and not (len(rest) == 1 and _is_version(rest[0])) else None
    version = rest[0] if rest and _is_version(rest[0]) else tag
    images = sandbox.expected_images(f"{org}/{app_name}/{version}", _user(name))
    image = images[service] if service else next(iter(images.values()))
    return image.digest


def _is_version(text: str) -> bool:
    return text in KEYWORDS or text[0].isdigit()


def _user(name: str) -> str | None:
    return "alice" if name.startswith("gh_acme/backoffice") else None


# ---------------------------------------------------------------------------------- skopeo


@pytest.fixture(scope="module")
def skopeo_r(
    resolver_proxy: RunningProxy, skopeo: str, tmp_path_factory: pytest.TempPathFactory
) -> Skopeo:
    workdir = tmp_path_factory.mktemp("skopeo-resolver")
    (workdir / "auth.json").write_text("{}")
    return Skopeo(skopeo, resolver_proxy.host, workdir)


def skopeo_tags(client: Skopeo, name: str, *options: str) -> subprocess.CompletedProcess[str]:
    return client.run("list-tags", "--tls-verify=false", *options, client.ref(name))


@pytest.mark.matrix("skopeo", TAGS)
def test_skopeo_lists_then_pulls_every_tag(
    skopeo_r: Skopeo, sandbox: Sandbox, tmp_path: Path
) -> None:
    for name in LISTED:
        result = skopeo_tags(skopeo_r, name)
        assert result.returncode == 0, result.stderr
        tags = json.loads(result.stdout)["Tags"]
        assert tags == listed(sandbox, name)
        for tag in tags:
            folder = tmp_path / f"{name.replace('/', '_')}-{tag}"
            pulled = skopeo_r.pull(f"{name}:{tag}", folder, "--all")
            assert pulled.returncode == 0, f"{name}:{tag}: {pulled.stderr}"
            manifest = (folder / "manifest.json").read_bytes()
            assert _sha256(manifest) == expected_digest(sandbox, name, tag), f"{name}:{tag}"


@pytest.mark.matrix("skopeo", SERVICES)
def test_skopeo_pulls_each_service(skopeo_r: Skopeo, sandbox: Sandbox, tmp_path: Path) -> None:
    for service in STACK_SERVICES:
        for name in (f"gh_acme/stack/{service}", f"gh_acme/stack/1.0.0/{service}"):
            folder = tmp_path / name.replace("/", "_")
            pulled = skopeo_r.pull(name, folder)
            assert pulled.returncode == 0, pulled.stderr
            manifest = (folder / "manifest.json").read_bytes()
            assert _sha256(manifest) == expected_digest(sandbox, name)
    unknown = skopeo_r.pull("gh_acme/stack/nope", tmp_path / "nope")
    assert unknown.returncode != 0
    assert "its services are api, db, frontend" in unknown.stderr
    several = skopeo_r.pull("gh_acme/stack", tmp_path / "several")
    assert "has several services (api, db, frontend)" in several.stderr


@pytest.mark.matrix("skopeo", PRIVATE)
def test_skopeo_private_app(skopeo_r: Skopeo, sandbox: Sandbox, tmp_path: Path) -> None:
    anonymous = skopeo_tags(skopeo_r, PRIVATE_NAME)
    assert anonymous.returncode != 0
    assert "docker login" in anonymous.stderr
    logged_in = skopeo_tags(skopeo_r, PRIVATE_NAME, f"--creds={ALICE}")
    assert logged_in.returncode == 0, logged_in.stderr
    tags = json.loads(logged_in.stdout)["Tags"]
    assert tags == listed(sandbox, PRIVATE_NAME)
    pulled = skopeo_r.pull(f"{PRIVATE_NAME}:0.1.0", tmp_path / "p", f"--src-creds={ALICE}")
    assert pulled.returncode == 0, pulled.stderr
    manifest = (tmp_path / "p" / "manifest.json").read_bytes()
    assert _sha256(manifest) == expected_digest(sandbox, PRIVATE_NAME, "0.1.0")


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------- podman


@pytest.fixture
def podman_r(resolver_proxy: RunningProxy) -> Iterator[Podman]:
    with new_podman(resolver_proxy.host) as client:
        yield client


@pytest.mark.matrix("podman", TAGS)
def test_podman_lists_then_pulls_every_tag(podman_r: Podman, sandbox: Sandbox) -> None:
    name = "gh_acme/web"
    result = podman_r.run(
        "search",
        "--tls-verify=false",
        "--list-tags",
        "--limit=100",
        podman_r.ref(name),
    )
    assert result.returncode == 0, result.stderr
    # A table, NAME and TAG; podman 4.3 ignores --format with --list-tags.
    tags = [line.split()[1] for line in result.stdout.splitlines()[1:]]
    assert tags == listed(sandbox, name)
    for tag in tags:
        pulled = podman_r.pull(f"{name}:{tag}")
        assert pulled.returncode == 0, pulled.stderr
        assert podman_r.inspect(f"{name}:{tag}")["Digest"] == expected_digest(sandbox, name, tag)


@pytest.mark.matrix("podman", SERVICES)
def test_podman_pulls_each_service(podman_r: Podman, sandbox: Sandbox) -> None:
    for service in STACK_SERVICES:
        name = f"gh_acme/stack/{service}"
        pulled = podman_r.pull(name)
        assert pulled.returncode == 0, pulled.stderr
        assert podman_r.inspect(name)["Digest"] == expected_digest(sandbox, name)
    unknown = podman_r.pull("gh_acme/stack/nope")
    assert "its services are api, db, frontend" in unknown.stderr


@pytest.mark.matrix("podman", PRIVATE)
def test_podman_private_app(podman_r: Podman, sandbox: Sandbox) -> None:
    anonymous = podman_r.pull(PRIVATE_NAME)
    assert anonymous.returncode != 0
    assert podman_r.run("image", "exists", podman_r.ref(PRIVATE_NAME)).returncode == 1
    pulled = podman_r.pull(PRIVATE_NAME, f"--creds={ALICE}")
    assert pulled.returncode == 0, pulled.stderr
    assert podman_r.inspect(PRIVATE_NAME)["Digest"] == expected_digest(sandbox, PRIVATE_NAME)


# -------------------------------------------------------------------------- ctr 1.6 and 2


@pytest.fixture(scope="module")
def containerd16() -> Iterator[Containerd]:
    with debian_containerd() as running:
        yield running


@pytest.fixture(scope="module")
def containerd2() -> Iterator[Containerd]:
    with containerd2_daemon() as running:
        yield running


@pytest.fixture(params=[CTR16, CTR2])
def ctr(request: pytest.FixtureRequest, resolver_proxy: RunningProxy) -> Ctr:
    """Each ctr in a namespace of its own: Debian's containerd 1.6, then containerd 2."""
    daemon = "containerd16" if request.param == CTR16 else "containerd2"
    containerd: Containerd = request.getfixturevalue(daemon)
    return containerd.client(namespace_for(request), resolver_proxy.host)


@pytest.mark.matrix(TAGS)
def test_ctr_pulls_every_listed_tag(ctr: Ctr, skopeo_r: Skopeo, sandbox: Sandbox) -> None:
    """ctr lists nothing: the tags come from skopeo, each is pulled with ctr."""
    name = "gh_acme/web"
    tags = json.loads(skopeo_tags(skopeo_r, name).stdout)["Tags"]
    assert tags == listed(sandbox, name)
    for tag in tags:
        result = ctr.pull(f"{name}:{tag}")
        assert result.returncode == 0, f"{tag}: {result.stderr}"
        assert ctr.image_digest(f"{name}:{tag}") == expected_digest(sandbox, name, tag)
    assert ctr.unpacked(f"{name}:1.3.0")


@pytest.mark.matrix(SERVICES)
def test_ctr_pulls_each_service(ctr: Ctr, sandbox: Sandbox) -> None:
    for service in STACK_SERVICES:
        name = f"gh_acme/stack/{service}:1.0.0"
        result = ctr.pull(name)
        assert result.returncode == 0, result.stderr
        assert ctr.image_digest(name) == expected_digest(sandbox, name.split(":")[0], "1.0.0")


@pytest.mark.matrix(PRIVATE)
def test_ctr_private_app(ctr: Ctr, sandbox: Sandbox) -> None:
    refused = ctr.pull(PRIVATE_NAME)
    assert refused.returncode != 0
    assert ctr.content() == set()
    result = ctr.pull(PRIVATE_NAME, f"--user={ALICE}")
    assert result.returncode == 0, result.stderr
    assert ctr.image_digest(PRIVATE_NAME) == expected_digest(sandbox, PRIVATE_NAME)


# ----------------------------------------------------------------------------------- crane


@pytest.fixture(scope="module")
def crane_r(resolver_proxy: RunningProxy, tmp_path_factory: pytest.TempPathFactory) -> Crane:
    """crane, addressing the proxy as ``localhost``: it refuses a token realm on a private IP
    literal, and in resolver mode the realm is the proxy as the client addressed it."""
    binary = go_tool("crane")
    matrix.note_version("crane", [str(binary), "version"])
    home = tmp_path_factory.mktemp("crane-resolver")
    return Crane(binary, resolver_proxy.host.replace("127.0.0.1", "localhost", 1), home)


@pytest.mark.matrix("crane", TAGS)
def test_crane_lists_then_pulls_every_tag(crane_r: Crane, sandbox: Sandbox, tmp_path: Path) -> None:
    for name in LISTED:
        result = crane_r.run("ls", crane_r.ref(name))
        assert result.returncode == 0, result.stderr
        tags = result.stdout.split()
        assert tags == listed(sandbox, name)
        for tag in tags:
            digest = crane_r.run("digest", crane_r.ref(f"{name}:{tag}"))
            assert digest.stdout.strip() == expected_digest(sandbox, name, tag), f"{name}:{tag}"
        source = f"{name}:1.3.0" if name == "gh_acme/web" else name
        layout = crane_r.pull(source, tmp_path / name.replace("/", "_"))
        assert layout.blobs()


@pytest.mark.matrix("crane", SERVICES)
def test_crane_pulls_each_service(crane_r: Crane, sandbox: Sandbox, tmp_path: Path) -> None:
    for service in STACK_SERVICES:
        name = f"gh_acme/stack/{service}"
        layout = crane_r.pull(name, tmp_path / service)
        assert layout.only() == expected_digest(sandbox, name)
    unknown = crane_r.run("digest", crane_r.ref("gh_acme/stack/nope"))
    assert "its services are api, db, frontend" in unknown.stderr


@pytest.mark.matrix("crane", PRIVATE)
def test_crane_private_app(crane_r: Crane, sandbox: Sandbox, tmp_path: Path) -> None:
    refused = crane_r.run("ls", crane_r.ref(PRIVATE_NAME))
    assert refused.returncode != 0
    listed_tags = crane_r.run("ls", crane_r.ref(PRIVATE_NAME), credentials=ALICE)
    assert listed_tags.stdout.split() == listed(sandbox, PRIVATE_NAME)
    layout = crane_r.pull(PRIVATE_NAME, tmp_path / "p", credentials=ALICE)
    assert layout.only() == expected_digest(sandbox, PRIVATE_NAME)


# ------------------------------------------------------------------------ replicas and API


@pytest.fixture(scope="module")
def replicas(
    sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, list[RunningProxy]]]:
    """Two resolver-mode proxies sharing a sealing key, behind HAProxy's round robin."""
    directory = tmp_path_factory.mktemp("resolver-replicas")
    with contextlib.ExitStack() as stack:
        proxies = [
            stack.enter_context(proxy_process(resolver_env(sandbox), directory / f"r{n}.log"))
            for n in range(2)
        ]
        yield stack.enter_context(haproxy_in_front(proxies, directory)), proxies


def test_two_replicas_serve_one_pull_alternately(
    replicas: tuple[str, list[RunningProxy]], skopeo_r: Skopeo, sandbox: Sandbox, tmp_path: Path
) -> None:
    host, proxies = replicas
    # A tag that is not the pinned release: its blobs, asked for under gh_acme/web, are found
    # by the replica that did not resolve the tag too.
    for name, tag in (("gh_acme/web", "1.3.0"), ("gh_acme/stack/frontend", "1.1.0")):
        pulled = skopeo_r.pull(f"{name}:{tag}", tmp_path / tag, f"--src-creds={ALICE}", host=host)
        assert pulled.returncode == 0, pulled.stderr
        manifest = (tmp_path / tag / "manifest.json").read_bytes()
        assert _sha256(manifest) == expected_digest(sandbox, name, tag)
    for proxy in proxies:
        served = [line for line in proxy.log().splitlines() if "/blobs/sha256:" in line]
        assert served, "each replica should have served blobs of the pulls"
        assert " 200 " in "\n".join(served)


class Forwarder:
    """A TCP forwarder to the sandbox's API that the test can stop and start again: the API
    going away mid-run, as a proxy sees it."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self._target = target_port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def start(self) -> None:
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)

    def close(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self._target)
        self._writers |= {writer, upstream_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))
        self._writers -= {writer, upstream_writer}


def test_the_api_stopped_mid_run(sandbox: Sandbox, skopeo_r: Skopeo, tmp_path: Path) -> None:
    """With the API gone, names not yet resolved fail at once with a message that names the
    API, never a hang; names resolved a moment ago keep pulling; the API back, all pull."""
    forwarder = Forwarder(int(sandbox.api_url.rsplit(":", 1)[1]))
    forwarder.start()
    env = resolver_env(sandbox, BALENA_API_URL=f"http://127.0.0.1:{forwarder.port}")
    try:
        with proxy_process(env, tmp_path / "proxy.log") as proxy:
            client = Skopeo(skopeo_r.binary, proxy.host, skopeo_r.workdir)
            assert client.pull("gh_acme/web:1.3.0", tmp_path / "before").returncode == 0
            forwarder.stop()
            started = time.monotonic()
            failed = client.pull("gh_acme/multi", tmp_path / "during")
            assert failed.returncode != 0
            # skopeo shows the status only; the message is in the answer and the log.
            assert "503 Service Unavailable" in failed.stderr, failed.stderr
            assert "the balena API (127.0.0.1) cannot be reached" in proxy.log()
            assert time.monotonic() - started < 30
            kept = client.pull("gh_acme/web:1.3.0", tmp_path / "kept")
            assert kept.returncode == 0, kept.stderr
            forwarder.start()
            after = client.pull("gh_acme/multi", tmp_path / "after")
            assert after.returncode == 0, after.stderr
    finally:
        forwarder.close()
