"""Pulls through the proxy with two more real clients: podman and containerd's ``ctr``.

Each client pulls a public release, a private release (which must be refused without
credentials) and the linux/arm64 child of a multi-platform index. Every pull is checked by
digest against what the sandbox seeded, so a proxy that served the wrong release, or altered a
manifest on the way, fails the test even when the client exits 0.

Both keep their state in a fresh directory under /tmp (see ``clients``).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from balena_registry_proxy.sandbox import Sandbox
from balena_registry_proxy.sandbox.seed import PushedManifest

from .. import matrix
from ..conftest import require_binary
from .clients import (
    CTR16,
    MULTI_NAME,
    NOT_ALLOWED,
    SECRET,
    WEB,
    Containerd,
    Ctr,
    blobs_of,
    client_env,
    debian_containerd,
    fetched_by_digest,
    namespace_for,
    require_root,
    run_client,
    short_tempdir,
    toml_string,
)
from .conftest import RunningProxy
from .test_pull import ALICE, MULTI, REV2, SECRET_PINNED

pytestmark = pytest.mark.e2e

ARM64, AMD64 = "linux/arm64", "linux/amd64"
CTR = CTR16


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
            f"network_config_dir = {toml_string(workdir / 'cni')}\n"
            "[engine]\n"
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "none"\n'
            f"image_copy_tmp_dir = {toml_string(workdir / 'tmp')}\n"
        )
        (workdir / "storage.conf").write_text(
            "[storage]\n"
            'driver = "vfs"\n'
            f"runroot = {toml_string(workdir / 'r')}\n"
            f"graphroot = {toml_string(workdir / 'g')}\n"
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
        env = client_env(
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
        return run_client([self.binary, *global_options, *args], env)

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


@contextlib.contextmanager
def new_podman(host: str) -> Iterator[Podman]:
    """podman with a store of its own, pulling from the proxy at ``host``, removed after."""
    binary = require_binary("podman", "podman")
    require_root("podman")
    matrix.note_version("podman", [binary, "--version"])
    workdir = short_tempdir("pd")
    try:
        yield Podman.in_new_store(binary, host, workdir)
    finally:
        shutil.rmtree(workdir)


@pytest.fixture
def podman(proxy: RunningProxy) -> Iterator[Podman]:
    """podman with a store of its own for this test only, so no pull is served from cache."""
    with new_podman(proxy.host) as client:
        yield client


def _assert_podman_image(image: dict[str, Any], manifest: PushedManifest) -> None:
    """The stored image is exactly the seeded ``manifest``: same manifest and config digest."""
    assert image["Digest"] == manifest.digest
    # podman's image ID is the config digest: the configuration came through unaltered too.
    assert f"sha256:{image['Id']}" == manifest.config_digest


@pytest.mark.matrix("podman", "pull a public release")
def test_podman_pulls_public_release(podman: Podman, sandbox: Sandbox) -> None:
    result = podman.pull(WEB)
    assert result.returncode == 0, result.stderr
    image = podman.inspect(WEB)
    _assert_podman_image(image, sandbox.seed[REV2].manifest)
    assert image["Config"]["Labels"]["io.balena.sandbox.commit"] == REV2


@pytest.mark.matrix("podman", "private app, with and without credentials")
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


@pytest.mark.matrix("podman", "index child by digest")
def test_podman_pulls_arm64_child_of_index(
    podman: Podman, sandbox: Sandbox, proxy: RunningProxy
) -> None:
    seeded = sandbox.seed[MULTI]
    child = seeded.platform_manifests[ARM64]
    fetched_before = fetched_by_digest(proxy, MULTI_NAME, child.digest)

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
    assert fetched_by_digest(proxy, MULTI_NAME, child.digest) > fetched_before


# ------------------------------------------------------------------------------ containerd


@pytest.fixture(scope="module")
def containerd() -> Iterator[Containerd]:
    """A containerd 1.6 daemon for this module's tests."""
    with debian_containerd() as running:
        yield running


@pytest.fixture
def ctr(containerd: Containerd, proxy: RunningProxy, request: pytest.FixtureRequest) -> Ctr:
    """ctr in a namespace of its own, named after the test."""
    return containerd.client(namespace_for(request), proxy.host)


@pytest.mark.matrix(CTR, "pull a public release")
def test_ctr_pulls_public_release(ctr: Ctr, sandbox: Sandbox) -> None:
    seeded = sandbox.seed[REV2]
    result = ctr.pull(WEB)
    assert result.returncode == 0, result.stderr
    assert ctr.image_digest(WEB) == seeded.digest
    # containerd verifies every blob against its digest as it writes it to the content store.
    assert blobs_of(seeded.manifest) <= ctr.content()
    assert ctr.unpacked(WEB)


@pytest.mark.matrix(CTR, "private app, with credentials")
def test_ctr_pulls_private_release_with_credentials(ctr: Ctr, sandbox: Sandbox) -> None:
    seeded = sandbox.seed[SECRET_PINNED]
    result = ctr.pull(SECRET, f"--user={ALICE}")
    assert result.returncode == 0, result.stderr
    assert ctr.image_digest(SECRET) == seeded.digest
    assert blobs_of(seeded.manifest) <= ctr.content()
    assert ctr.unpacked(SECRET)


@pytest.mark.matrix(CTR, "private app, without credentials: refused")
def test_ctr_private_release_refuses_anonymous(ctr: Ctr) -> None:
    result = ctr.pull(SECRET)
    assert result.returncode != 0
    # containerd resolves with HEAD. Relaying the registry's 401 and its challenge with
    # error="insufficient_scope" makes ctr say this; a crash or a 5xx in the proxy would not.
    assert "pull access denied" in result.stderr, result.stderr
    assert ctr.content() == set()


@pytest.mark.matrix(CTR, "index child by digest")
def test_ctr_pulls_arm64_child_by_digest(ctr: Ctr, sandbox: Sandbox, proxy: RunningProxy) -> None:
    seeded = sandbox.seed[MULTI]
    child = seeded.platform_manifests[ARM64]
    fetched_before = fetched_by_digest(proxy, MULTI_NAME, child.digest)

    result = ctr.pull(MULTI_NAME, f"--platform={ARM64}")
    assert result.returncode == 0, result.stderr
    # The image record points at the index; the platform choice shows in the content store.
    assert ctr.image_digest(MULTI_NAME) == seeded.digest
    content = ctr.content()
    # containerd fetched the child by the digest the index names and checked what came back
    # against it, with an Accept list that leaves out the index type: a proxy that rewrote
    # either document would have made the pull fail.
    assert {seeded.digest} | blobs_of(child) <= content
    assert seeded.platform_manifests[AMD64].digest not in content
    assert fetched_by_digest(proxy, MULTI_NAME, child.digest) > fetched_before
