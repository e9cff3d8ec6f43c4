"""oras (OCI Registry As Storage) through the proxy.

Every case runs against the proxy in front of Debian's registry 2.8 and in front of
distribution 3, and checks what oras wrote by digest against what the sandbox seeded.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from balena_registry_proxy.sandbox import Sandbox

from .. import matrix
from .clients import (
    NOT_ALLOWED,
    OciLayout,
    blobs_of,
    client_env,
    fetched_by_digest,
    run_client,
    sha256_of,
    write_auth_config,
)
from .conftest import RunningProxy, Upstream
from .go_tools import go_tool
from .test_pull import ALICE, BIG, MULTI, REV2, SECRET_PINNED, SELECTORS

pytestmark = pytest.mark.e2e

WEB, SECRET, MULTI_NAME = "gh_acme/web/1.2.3", "gh_acme/secret/0.2.0", "gh_acme/multi/2.0.0"


@dataclass(frozen=True)
class Oras:
    """oras with a home of its own, talking plain HTTP to a proxy."""

    binary: Path
    host: str
    home: Path

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run an oras command."""
        return run_client([str(self.binary), *args], client_env(HOME=str(self.home)))

    def ref(self, name: str) -> str:
        """``name`` on the proxy; oras wants a tag or a digest spelled out."""
        return f"{self.host}/{name}" if ":" in name or "@" in name else f"{self.host}/{name}:latest"

    def login(self, credentials: str | None) -> list[str]:
        """The authentication file option of a command: ``user:password``, or nobody's."""
        path = self.home / ("login.json" if credentials else "anonymous.json")
        if credentials:
            write_auth_config(path, self.host, credentials)
        else:
            path.write_text("{}")
        return [f"--registry-config={path}"]

    def copy(self, name: str, layout: Path, credentials: str | None = None) -> OciLayout:
        """``oras copy`` of ``name`` into the OCI layout ``layout``, tagged ``copied``."""
        login = [f"--from-{option[2:]}" for option in self.login(credentials)]
        source, destination = self.ref(name), f"{layout}:copied"
        result = self.run(
            "copy", "--from-plain-http", *login, source, "--to-oci-layout", destination
        )
        assert result.returncode == 0, f"{name}: {result.stderr}"
        return OciLayout(layout)

    def manifest(self, name: str, *options: str) -> subprocess.CompletedProcess[str]:
        """``oras manifest fetch`` of ``name``."""
        return self.run("manifest", "fetch", "--plain-http", *options, self.ref(name))


@pytest.fixture
def oras(go_upstream: Upstream, tmp_path: Path) -> Oras:
    """oras, talking to the proxy in front of ``go_upstream``."""
    binary = go_tool("oras")
    matrix.note_version("oras", [str(binary), "version"])
    home = tmp_path / "home"
    home.mkdir()
    return Oras(binary, go_upstream.host, home)


@pytest.mark.matrix("oras", "pull by every selector form")
def test_oras_copies_every_selector(oras: Oras, go_upstream: Upstream, tmp_path: Path) -> None:
    wrong = {}
    for number, (name, commit) in enumerate(SELECTORS):
        seeded = go_upstream.sandbox.seed[commit]
        layout = oras.copy(name, tmp_path / str(number))
        copied = layout.tagged("copied")
        if copied != seeded.digest or not blobs_of(seeded.manifest) <= layout.blobs():
            wrong[name] = copied
    assert not wrong, f"copied the wrong image for {wrong}"


@pytest.mark.matrix("oras", "pull by digest")
def test_oras_copies_by_digest(oras: Oras, go_upstream: Upstream, tmp_path: Path) -> None:
    seeded = go_upstream.sandbox.seed[REV2]
    layout = oras.copy(f"{WEB}@{seeded.digest}", tmp_path)
    assert layout.tagged("copied") == seeded.digest
    assert blobs_of(seeded.manifest) <= layout.blobs()


@pytest.mark.matrix("oras", "oras copy of a multi-platform index to an OCI layout")
def test_oras_copies_a_multi_platform_index(
    oras: Oras, go_upstream: Upstream, tmp_path: Path
) -> None:
    seeded = go_upstream.sandbox.seed[MULTI]
    layout = oras.copy(MULTI_NAME, tmp_path)
    assert layout.tagged("copied") == seeded.digest
    children = [blobs_of(child) for child in seeded.platform_manifests.values()]
    assert {seeded.digest}.union(*children) <= layout.blobs()


@pytest.mark.matrix("oras", "index child by digest")
def test_oras_fetches_an_index_child_by_digest(oras: Oras, go_upstream: Upstream) -> None:
    child = go_upstream.sandbox.seed[MULTI].platform_manifests["linux/arm64"]
    before = fetched_by_digest(go_upstream.proxy, MULTI_NAME, child.digest)
    result = oras.manifest(f"{MULTI_NAME}@{child.digest}")
    assert result.returncode == 0, result.stderr
    assert sha256_of(result.stdout.encode()) == child.digest
    assert fetched_by_digest(go_upstream.proxy, MULTI_NAME, child.digest) > before


@pytest.mark.matrix("oras", "private app, with credentials")
def test_oras_copies_a_private_app_with_credentials(
    oras: Oras, go_upstream: Upstream, tmp_path: Path
) -> None:
    seeded = go_upstream.sandbox.seed[SECRET_PINNED]
    layout = oras.copy(SECRET, tmp_path, credentials=ALICE)
    assert layout.tagged("copied") == seeded.digest
    assert blobs_of(seeded.manifest) <= layout.blobs()


@pytest.mark.matrix("oras", "private app, without credentials: refused")
def test_oras_private_app_refuses_anonymous(oras: Oras) -> None:
    result = oras.manifest(SECRET, *oras.login(None))
    assert result.returncode != 0
    assert NOT_ALLOWED in result.stderr, result.stderr
    assert result.stdout == ""


@pytest.mark.matrix("oras", "oras manifest fetch")
def test_oras_manifest_fetch(oras: Oras, go_upstream: Upstream) -> None:
    for name, commit in [(WEB, REV2), (MULTI_NAME, MULTI)]:
        seeded = go_upstream.sandbox.seed[commit]
        result = oras.manifest(name)
        assert result.returncode == 0, result.stderr
        assert sha256_of(result.stdout.encode()) == seeded.digest
        described = oras.manifest(name, "--descriptor")
        assert described.returncode == 0, described.stderr
        descriptor = json.loads(described.stdout)
        assert (descriptor["digest"], descriptor["mediaType"]) == (seeded.digest, seeded.media_type)


@pytest.mark.matrix("oras", "oras blob fetch (a 64 MiB layer too)")
def test_oras_blob_fetch(oras: Oras, go_upstream: Upstream, tmp_path: Path) -> None:
    seeded = go_upstream.sandbox.seed[BIG]
    assert seeded.manifest.config_digest is not None
    for digest in [seeded.manifest.config_digest, *seeded.layer_digests]:
        output = tmp_path / digest.removeprefix("sha256:")
        ref = oras.ref(f"gh_acme/big@{digest}")
        result = oras.run("blob", "fetch", "--plain-http", f"--output={output}", ref)
        assert result.returncode == 0, result.stderr
        assert sha256_of(output.read_bytes()) == digest
    assert max(path.stat().st_size for path in tmp_path.iterdir()) > 64 * 1024 * 1024


@pytest.mark.matrix("oras", "oras repo tags (tags list)")
def test_oras_lists_the_tags_of_a_release(oras: Oras) -> None:
    result = oras.run("repo", "tags", "--plain-http", f"{oras.host}/{WEB}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["latest"]


@pytest.mark.matrix("oras", "token realm on a private address: --proxy-auth needed")
def test_oras_pulls_through_proxy_auth_when_the_realm_is_elsewhere_on_loopback(
    sandbox: Sandbox, proxy: RunningProxy, edge_proxy: RunningProxy, tmp_path: Path
) -> None:
    # The shared sandbox's realm is at 127.0.0.1; to oras, the proxy is "localhost".
    binary = go_tool("oras")
    plain = Oras(binary, proxy.host.replace("127.0.0.1", "localhost"), tmp_path)
    refused = plain.manifest(WEB)
    assert refused.returncode != 0
    assert "blocked prefix" in refused.stderr, refused.stderr
    # With --proxy-auth the realm is the proxy, on the host name oras already talks to.
    edge = Oras(binary, edge_proxy.host.replace("127.0.0.1", "localhost"), tmp_path)
    result = edge.manifest(SECRET, *edge.login(ALICE))
    assert result.returncode == 0, result.stderr
    assert sha256_of(result.stdout.encode()) == sandbox.seed[SECRET_PINNED].digest
