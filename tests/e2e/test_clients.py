"""Pulls through the proxy with two more real clients: podman and containerd's ``ctr``.

Each client pulls a public release, a private release (which must be refused without
credentials) and the linux/arm64 child of a multi-platform index. Every pull is checked by
digest against what the sandbox seeded, so a proxy that served the wrong release, or altered a
manifest on the way, fails the test even when the client exits 0.

Both clients keep their state in a fresh directory under /tmp and get their configuration from
flags and environment variables, so the machine's /etc and /run neither influence the result
nor get written to.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from balena_registry_proxy.sandbox import Sandbox
from balena_registry_proxy.sandbox.seed import PushedManifest

from ..conftest import missing, require_binary
from .conftest import RunningProxy
from .test_pull import ALICE, MULTI, REV2, SECRET_PINNED

pytestmark = pytest.mark.e2e

WEB = "gh_acme/web/1.2.3"
SECRET = "gh_acme/secret/0.2.0"
MULTI_NAME = "gh_acme/multi/2.0.0"
ARM64, AMD64 = "linux/arm64", "linux/amd64"
# The proxy's explanation when a name does not resolve for the caller (see ``denial.explain``).
NOT_ALLOWED = "not found, or you are not allowed to pull it"
# Generous: every pull here moves a few KiB; only a hang should ever reach it.
COMMAND_TIMEOUT = 120


def _client_env(**extra: str) -> dict[str, str]:
    """A minimal environment plus ``extra``.

    Starting from nothing keeps the caller's CONTAINER_HOST, CONTAINERD_*, REGISTRY_AUTH_FILE or
    DOCKER_CONFIG from redirecting a client to another daemon, store or set of credentials.
    """
    return {"PATH": os.environ.get("PATH", os.defpath), **extra}


def _run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run a client command; never raises on failure, the caller checks the outcome."""
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
        stdin=subprocess.DEVNULL,
        env=env,
    )


def _require_root(client: str) -> None:
    """Skip (fail under REQUIRE_E2E=1) unless running as root, which these set-ups assume."""
    if os.geteuid() != 0:
        missing(f"the {client} tests run {client} as root with a private store; run them as root")


def _short_tempdir(prefix: str) -> Path:
    """A new directory directly under /tmp.

    pytest's tmp_path can be long, and both clients put unix sockets under their state
    directories, whose paths must stay below the kernel's 108-byte limit.
    """
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def _blobs(manifest: PushedManifest) -> set[str]:
    """Digests of ``manifest`` itself, its config and its layers."""
    config = set() if manifest.config_digest is None else {manifest.config_digest}
    return {manifest.digest, *config, *manifest.layer_digests}


def _fetched_by_digest(proxy: RunningProxy, name: str, digest: str) -> int:
    """How many times the proxy has served ``GET`` of ``name``'s manifest ``digest`` with 200."""
    line = re.compile(
        rf'"GET /v2/{re.escape(name)}/manifests/{re.escape(digest)}(?: -> [^"]*)?" 200 '
    )
    return len(line.findall(proxy.log()))


def _tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file, for failure messages."""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# --------------------------------------------------------------------------------- podman


@dataclass(frozen=True)
class Podman:
    """podman 4 with its own store and configuration, pulling from the proxy over plain HTTP."""

    binary: str
    host: str
    workdir: Path

    @classmethod
    def in_new_store(cls, binary: str, host: str, workdir: Path) -> Podman:
        """Write the configuration files podman reads into ``workdir`` and return the client."""
        (workdir / "containers.conf").write_text(
            # A pull never creates a network, but podman still initialises a network backend;
            # CNI with a private directory keeps it from taking a lock under /etc/cni.
            "[network]\n"
            'network_backend = "cni"\n'
            f"network_config_dir = {_toml_string(workdir / 'cni')}\n"
            "[engine]\n"
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "none"\n'
            f"image_copy_tmp_dir = {_toml_string(workdir / 'tmp')}\n"
        )
        (workdir / "storage.conf").write_text(
            "[storage]\n"
            'driver = "vfs"\n'
            f"runroot = {_toml_string(workdir / 'r')}\n"
            f"graphroot = {_toml_string(workdir / 'g')}\n"
        )
        # Only fully qualified names are pulled, so no search registry may be consulted.
        (workdir / "registries.conf").write_text("unqualified-search-registries = []\n")
        (workdir / "auth.json").write_text("{}")
        # The machine's policy.json could require signatures; these images are unsigned.
        (workdir / "policy.json").write_text('{"default": [{"type": "insecureAcceptAnything"}]}')
        for directory in ("cni", "tmp", "home", "xdg"):
            (workdir / directory).mkdir()
        return cls(binary, host, workdir)

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run a podman command against the private store."""
        home = str(self.workdir / "home")
        env = _client_env(
            # CONTAINERS_CONF set means no system or user containers.conf is read at all.
            CONTAINERS_CONF=str(self.workdir / "containers.conf"),
            CONTAINERS_STORAGE_CONF=str(self.workdir / "storage.conf"),
            CONTAINERS_REGISTRIES_CONF=str(self.workdir / "registries.conf"),
            REGISTRY_AUTH_FILE=str(self.workdir / "auth.json"),
            HOME=home,
            XDG_CONFIG_HOME=home,
            XDG_RUNTIME_DIR=str(self.workdir / "xdg"),
            TMPDIR=str(self.workdir / "tmp"),
        )
        global_options = [
            "--storage-driver=vfs",
            f"--root={self.workdir / 'g'}",
            f"--runroot={self.workdir / 'r'}",
            "--cgroup-manager=cgroupfs",
            "--events-backend=none",
            f"--tmpdir={self.workdir / 'tmp'}",
        ]
        return _run([self.binary, *global_options, *args], env)

    def ref(self, name: str) -> str:
        """``name`` on the proxy, as podman writes image references."""
        return f"{self.host}/{name}"

    def pull(self, name: str, *options: str) -> subprocess.CompletedProcess[str]:
        """``podman pull`` of ``name`` from the proxy."""
        return self.run(
            "pull",
            "--tls-verify=false",
            f"--signature-policy={self.workdir / 'policy.json'}",
            *options,
            self.ref(name),
        )

    def inspect(self, name: str) -> dict[str, Any]:
        """``podman image inspect`` of the pulled ``name``; fails the test if it is missing."""
        result = self.run("image", "inspect", self.ref(name))
        assert result.returncode == 0, result.stderr
        images: list[dict[str, Any]] = json.loads(result.stdout)
        assert len(images) == 1, images
        return images[0]


def _toml_string(path: Path) -> str:
    """``path`` as a TOML basic string (a JSON string is one, escapes included)."""
    return json.dumps(str(path))


@pytest.fixture
def podman(proxy: RunningProxy) -> Iterator[Podman]:
    """podman with a store of its own for this test only, so no pull is served from cache."""
    binary = require_binary("podman", "podman")
    _require_root("podman")
    workdir = _short_tempdir("pd")
    try:
        yield Podman.in_new_store(binary, proxy.host, workdir)
    finally:
        shutil.rmtree(workdir)


def _assert_podman_image(image: dict[str, Any], manifest: PushedManifest) -> None:
    """The stored image is exactly the seeded ``manifest``: same manifest and config digest."""
    assert image["Digest"] == manifest.digest
    # podman's image ID is the config digest: the configuration came through unaltered too.
    assert f"sha256:{image['Id']}" == manifest.config_digest


def test_podman_pulls_public_release(podman: Podman, sandbox: Sandbox) -> None:
    result = podman.pull(WEB)
    assert result.returncode == 0, result.stderr
    image = podman.inspect(WEB)
    _assert_podman_image(image, sandbox.seed[REV2].manifest)
    assert image["Config"]["Labels"]["io.balena.sandbox.commit"] == REV2


def test_podman_private_release_needs_credentials(podman: Podman, sandbox: Sandbox) -> None:
    anonymous = podman.pull(SECRET)
    assert anonymous.returncode != 0
    assert NOT_ALLOWED in anonymous.stderr
    # `podman image exists` answers 1 for "no such image"; anything else is an error.
    assert podman.run("image", "exists", podman.ref(SECRET)).returncode == 1

    result = podman.pull(SECRET, f"--creds={ALICE}")
    assert result.returncode == 0, result.stderr
    image = podman.inspect(SECRET)
    _assert_podman_image(image, sandbox.seed[SECRET_PINNED].manifest)
    assert image["Config"]["Labels"]["io.balena.sandbox.commit"] == SECRET_PINNED


def test_podman_pulls_arm64_child_of_index(
    podman: Podman, sandbox: Sandbox, proxy: RunningProxy
) -> None:
    seeded = sandbox.seed[MULTI]
    child = seeded.platform_manifests[ARM64]
    fetched_before = _fetched_by_digest(proxy, MULTI_NAME, child.digest)

    result = podman.pull(MULTI_NAME, "--os=linux", "--arch=arm64")
    assert result.returncode == 0, result.stderr
    image = podman.inspect(MULTI_NAME)
    # podman records the index it resolved the tag to as the image's digest, the child it
    # stored as a second one, and takes the image ID from the child's config.
    assert image["Digest"] == seeded.digest
    assert f"{podman.ref(MULTI_NAME)}@{child.digest}" in image["RepoDigests"]
    assert f"sha256:{image['Id']}" == child.config_digest
    assert image["Architecture"] == "arm64"
    # The child came from the proxy, addressed by the digest the index names.
    assert _fetched_by_digest(proxy, MULTI_NAME, child.digest) > fetched_before


# ------------------------------------------------------------------------------ containerd


@dataclass(frozen=True)
class Ctr:
    """containerd's ``ctr`` in one namespace of a daemon this module started."""

    binary: str
    address: str
    namespace: str
    host: str

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run a ctr command in this namespace."""
        return _run(
            [self.binary, "--address", self.address, "--namespace", self.namespace, *args],
            _client_env(),
        )

    def ref(self, name: str) -> str:
        """``name`` on the proxy; ctr, unlike other clients, wants the tag spelled out."""
        return f"{self.host}/{name}:latest"

    def pull(self, name: str, *options: str) -> subprocess.CompletedProcess[str]:
        """``ctr images pull`` of ``name`` from the proxy, unpacked with the native snapshotter."""
        return self.run(
            "images", "pull", "--plain-http", "--snapshotter=native", *options, self.ref(name)
        )

    def image_digest(self, name: str) -> str:
        """The digest containerd recorded for the pulled ``name``; fails the test if missing."""
        for fields in self._table("images", "ls"):
            # Columns: REF TYPE DIGEST SIZE PLATFORMS LABELS; the first three hold no spaces.
            if fields[0] == self.ref(name):
                return fields[2]
        pytest.fail(f"{self.ref(name)} is not among the images in namespace {self.namespace}")

    def unpacked(self, name: str) -> bool:
        """Whether all of ``name``'s content is present and unpacked into native snapshots."""
        for fields in self._table("images", "check", "--snapshotter=native"):
            # Columns: REF TYPE DIGEST STATUS SIZE UNPACKED, STATUS like "complete (2/2)".
            if fields[0] == self.ref(name):
                return fields[3] == "complete" and fields[-1] == "true"
        return False

    def content(self) -> set[str]:
        """Digests of every blob in this namespace's content store."""
        result = self.run("content", "ls", "--quiet")
        assert result.returncode == 0, result.stderr
        return set(result.stdout.split())

    def _table(self, *args: str) -> list[list[str]]:
        """The rows of a ctr listing, header dropped, split on whitespace."""
        result = self.run(*args)
        assert result.returncode == 0, result.stderr
        return [line.split() for line in result.stdout.splitlines()[1:] if line.strip()]


@dataclass(frozen=True)
class Containerd:
    """A containerd daemon on a private socket, with all of its state under ``workdir``."""

    ctr: str
    address: str
    host: str
    workdir: Path

    def client(self, namespace: str) -> Ctr:
        """ctr in ``namespace``."""
        return Ctr(self.ctr, self.address, namespace, self.host)


def _containerd_config(workdir: Path) -> str:
    """A containerd 1.6 configuration that keeps every path and socket inside ``workdir``."""
    disabled = [
        # Kubernetes' CRI would want /etc/cni, /opt/cni and more; ctr does not need it.
        "io.containerd.grpc.v1.cri",
        # Snapshotters that need particular filesystems or devices; pulls use "native".
        "io.containerd.snapshotter.v1.btrfs",
        "io.containerd.snapshotter.v1.zfs",
        "io.containerd.snapshotter.v1.devmapper",
        "io.containerd.snapshotter.v1.aufs",
    ]
    return (
        "version = 2\n"
        f"root = {_toml_string(workdir / 'root')}\n"
        f"state = {_toml_string(workdir / 'state')}\n"
        f"disabled_plugins = {json.dumps(disabled)}\n"
        "[grpc]\n"
        f"address = {_toml_string(workdir / 's')}\n"
        "[ttrpc]\n"
        f"address = {_toml_string(workdir / 't')}\n"
        "[debug]\n"
        f"address = {_toml_string(workdir / 'd')}\n"
        # Its default directory is /opt/containerd, created at start-up.
        '[plugins."io.containerd.internal.v1.opt"]\n'
        f"path = {_toml_string(workdir / 'opt')}\n"
        # The default "shared" policy lets a namespace adopt blobs another namespace already
        # fetched, without a request to the proxy; isolated makes every test fetch for itself.
        '[plugins."io.containerd.metadata.v1.bolt"]\n'
        'content_sharing_policy = "isolated"\n'
    )


def _wait_for_containerd(
    ctr: str, address: str, process: subprocess.Popen[bytes], log_path: Path
) -> None:
    """Return once containerd answers on ``address``."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            # Typically a kernel feature or permission this machine lacks, not a proxy fault.
            missing(
                f"containerd exited with {process.returncode} during start-up:\n" + _tail(log_path)
            )
        version = _run([ctr, "--address", address, "version"], _client_env())
        if version.returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"containerd did not answer within 30 s:\n{_tail(log_path)}")


@pytest.fixture(scope="module")
def containerd(proxy: RunningProxy) -> Iterator[Containerd]:
    """A containerd daemon for this module's tests, stopped (by its PID) afterwards."""
    daemon = require_binary("containerd", "containerd")
    ctr = require_binary("ctr", "containerd")
    _require_root("containerd")
    workdir = _short_tempdir("ct")
    try:
        config = workdir / "config.toml"
        config.write_text(_containerd_config(workdir))
        log_path = workdir / "containerd.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [daemon, "--config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_client_env(),
            )
        try:
            address = str(workdir / "s")
            _wait_for_containerd(ctr, address, process, log_path)
            yield Containerd(ctr, address, proxy.host, workdir)
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    finally:
        shutil.rmtree(workdir)


@pytest.fixture
def ctr(containerd: Containerd, request: pytest.FixtureRequest) -> Ctr:
    """ctr in a namespace of its own, named after the test, so no pull finds earlier content."""
    namespace = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name).strip("-")
    return containerd.client(namespace)


def test_ctr_pulls_public_release(ctr: Ctr, sandbox: Sandbox) -> None:
    seeded = sandbox.seed[REV2]
    result = ctr.pull(WEB)
    assert result.returncode == 0, result.stderr
    assert ctr.image_digest(WEB) == seeded.digest
    # containerd verifies every blob against its digest as it writes it to the content store.
    assert _blobs(seeded.manifest) <= ctr.content()
    assert ctr.unpacked(WEB)


def test_ctr_pulls_private_release_with_credentials(ctr: Ctr, sandbox: Sandbox) -> None:
    seeded = sandbox.seed[SECRET_PINNED]
    result = ctr.pull(SECRET, f"--user={ALICE}")
    assert result.returncode == 0, result.stderr
    assert ctr.image_digest(SECRET) == seeded.digest
    assert _blobs(seeded.manifest) <= ctr.content()
    assert ctr.unpacked(SECRET)


def test_ctr_private_release_refuses_anonymous(ctr: Ctr) -> None:
    result = ctr.pull(SECRET)
    assert result.returncode != 0
    # containerd resolves with HEAD. Relaying the registry's 401 and its challenge with
    # error="insufficient_scope" makes ctr say this; a crash or a 5xx in the proxy would not.
    assert "pull access denied" in result.stderr, result.stderr
    assert ctr.content() == set()


def test_ctr_pulls_arm64_child_by_digest(ctr: Ctr, sandbox: Sandbox, proxy: RunningProxy) -> None:
    seeded = sandbox.seed[MULTI]
    child = seeded.platform_manifests[ARM64]
    fetched_before = _fetched_by_digest(proxy, MULTI_NAME, child.digest)

    result = ctr.pull(MULTI_NAME, f"--platform={ARM64}")
    assert result.returncode == 0, result.stderr
    # The image record points at the index; the platform choice shows in the content store.
    assert ctr.image_digest(MULTI_NAME) == seeded.digest
    content = ctr.content()
    # containerd fetched the child by the digest the index names and checked what came back
    # against it, with an Accept list that leaves out the index type: a proxy that rewrote
    # either document would have made the pull fail.
    assert {seeded.digest} | _blobs(child) <= content
    assert seeded.platform_manifests[AMD64].digest not in content
    assert _fetched_by_digest(proxy, MULTI_NAME, child.digest) > fetched_before
