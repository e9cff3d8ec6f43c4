"""crane (go-containerregistry: ko, Tekton, many CI systems) through the proxy.

Every case runs against the proxy in front of Debian's registry 2.8 and in front of
distribution 3, and checks what crane wrote by digest against what the sandbox seeded.
"""

from __future__ import annotations

import subprocess
import tarfile
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
from .test_pull import ALICE, MULTI, REV2, SECRET_PINNED, SELECTORS

pytestmark = pytest.mark.e2e

WEB, SECRET, MULTI_NAME = "gh_acme/web/1.2.3", "gh_acme/secret/0.2.0", "gh_acme/multi/2.0.0"


@dataclass(frozen=True)
class Crane:
    """crane with a home of its own, talking plain HTTP to a proxy."""

    binary: Path
    host: str
    home: Path

    def run(self, *args: str, credentials: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a crane command, logged in with ``user:password`` if given."""
        config = self.home / ("login" if credentials else "anonymous")
        config.mkdir(exist_ok=True)
        if credentials:
            write_auth_config(config / "config.json", self.host, credentials)
        env = client_env(HOME=str(self.home), DOCKER_CONFIG=str(config))
        return run_client([str(self.binary), *args, "--insecure"], env)

    def ref(self, name: str) -> str:
        """``name`` on the proxy."""
        return f"{self.host}/{name}"

    def pull(
        self, name: str, destination: Path, *options: str, credentials: str | None = None
    ) -> OciLayout:
        """``crane pull`` of ``name`` into an OCI layout; fails the test if crane fails."""
        source = self.ref(name)
        result = self.run(
            "pull", "--format=oci", *options, source, str(destination), credentials=credentials
        )
        assert result.returncode == 0, f"{name}: {result.stderr}"
        return OciLayout(destination)


@pytest.fixture
def crane(go_upstream: Upstream, tmp_path: Path) -> Crane:
    """crane, talking to the proxy in front of ``go_upstream``."""
    binary = go_tool("crane")
    matrix.note_version("crane", [str(binary), "version"])
    home = tmp_path / "home"
    home.mkdir()
    return Crane(binary, go_upstream.host, home)


@pytest.mark.matrix("crane", "pull by every selector form")
def test_crane_pulls_every_selector(crane: Crane, go_upstream: Upstream, tmp_path: Path) -> None:
    wrong = {}
    for number, (name, commit) in enumerate(SELECTORS):
        seeded = go_upstream.sandbox.seed[commit]
        layout = crane.pull(name, tmp_path / str(number))
        if layout.only() != seeded.digest or not blobs_of(seeded.manifest) <= layout.blobs():
            wrong[name] = layout.only()
    assert not wrong, f"pulled the wrong image for {wrong}"


@pytest.mark.matrix("crane", "pull by digest")
def test_crane_pulls_by_digest(crane: Crane, go_upstream: Upstream, tmp_path: Path) -> None:
    seeded = go_upstream.sandbox.seed[REV2]
    layout = crane.pull(f"{WEB}@{seeded.digest}", tmp_path)
    assert layout.only() == seeded.digest
    assert blobs_of(seeded.manifest) <= layout.blobs()


@pytest.mark.matrix("crane", "multi-platform index, every platform")
def test_crane_pulls_a_multi_platform_index(
    crane: Crane, go_upstream: Upstream, tmp_path: Path
) -> None:
    seeded = go_upstream.sandbox.seed[MULTI]
    layout = crane.pull(MULTI_NAME, tmp_path)
    assert layout.only() == seeded.digest
    children = [blobs_of(child) for child in seeded.platform_manifests.values()]
    assert set().union(*children) <= layout.blobs()


@pytest.mark.matrix("crane", "index child by digest")
def test_crane_pulls_an_index_child_by_digest(
    crane: Crane, go_upstream: Upstream, tmp_path: Path
) -> None:
    child = go_upstream.sandbox.seed[MULTI].platform_manifests["linux/arm64"]
    before = fetched_by_digest(go_upstream.proxy, MULTI_NAME, child.digest)
    layout = crane.pull(f"{MULTI_NAME}@{child.digest}", tmp_path)
    assert layout.only() == child.digest
    assert blobs_of(child) <= layout.blobs()
    assert fetched_by_digest(go_upstream.proxy, MULTI_NAME, child.digest) > before


@pytest.mark.matrix("crane", "private app, with credentials")
def test_crane_pulls_a_private_app_with_credentials(
    crane: Crane, go_upstream: Upstream, tmp_path: Path
) -> None:
    seeded = go_upstream.sandbox.seed[SECRET_PINNED]
    layout = crane.pull(SECRET, tmp_path, credentials=ALICE)
    assert layout.only() == seeded.digest
    assert blobs_of(seeded.manifest) <= layout.blobs()


@pytest.mark.matrix("crane", "private app, without credentials: refused")
def test_crane_private_app_refuses_anonymous(crane: Crane, tmp_path: Path) -> None:
    result = crane.run("pull", "--format=oci", crane.ref(SECRET), str(tmp_path / "out"))
    assert result.returncode != 0
    # The proxy's explanation reached crane's error message, with the registry's status.
    assert NOT_ALLOWED in result.stderr, result.stderr
    assert "UNAUTHORIZED" in result.stderr
    assert not (tmp_path / "out" / "index.json").exists()


@pytest.mark.matrix("crane", "crane manifest")
def test_crane_manifest_is_the_seeded_document(crane: Crane, go_upstream: Upstream) -> None:
    for name, commit in [(WEB, REV2), (MULTI_NAME, MULTI)]:
        result = crane.run("manifest", crane.ref(name))
        assert result.returncode == 0, result.stderr
        # The bytes as the registry stored them: their digest is the seeded one.
        assert sha256_of(result.stdout.encode()) == go_upstream.sandbox.seed[commit].digest


@pytest.mark.matrix("crane", "crane digest")
def test_crane_digest(crane: Crane, go_upstream: Upstream) -> None:
    for name, commit in [(WEB, REV2), (MULTI_NAME, MULTI)]:
        result = crane.run("digest", crane.ref(name))
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == go_upstream.sandbox.seed[commit].digest


@pytest.mark.matrix("crane", "crane ls (tags list)")
def test_crane_lists_the_tags_of_a_release(crane: Crane) -> None:
    # The release's repository has one tag; the proxy lists it under the name crane asked for.
    result = crane.run("ls", crane.ref(WEB))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["latest"]


@pytest.mark.matrix("crane", "crane export (filesystem of one platform)")
def test_crane_exports_the_filesystem(crane: Crane, tmp_path: Path) -> None:
    for name, platform, release in [
        (WEB, "linux/amd64", f"commit={REV2} version=1.2.3+rev2\n"),
        (MULTI_NAME, "linux/arm64", f"commit={MULTI} version=2.0.0 platform=linux/arm64\n"),
    ]:
        tarball = tmp_path / f"{platform.replace('/', '-')}.tar"
        result = crane.run("export", f"--platform={platform}", crane.ref(name), str(tarball))
        assert result.returncode == 0, result.stderr
        with tarfile.open(tarball) as archive:
            member = archive.extractfile("release.txt")
            assert member is not None
            assert member.read().decode().endswith(release)


@pytest.mark.matrix("crane", "token realm on a private address: --proxy-auth needed")
def test_crane_pulls_through_proxy_auth_when_the_realm_is_a_private_ip(
    sandbox: Sandbox, proxy: RunningProxy, edge_proxy: RunningProxy, tmp_path: Path
) -> None:
    # The shared sandbox's realm is http://127.0.0.1:<port>, an IP literal on another port.
    binary = go_tool("crane")
    refused = Crane(binary, proxy.host, tmp_path).run("digest", f"{proxy.host}/{WEB}")
    assert refused.returncode != 0
    assert "private or link-local" in refused.stderr, refused.stderr
    # With --proxy-auth the realm is the proxy itself, the registry crane already talks to.
    edge = Crane(binary, edge_proxy.host, tmp_path)
    result = edge.run("digest", edge.ref(SECRET), credentials=ALICE)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == sandbox.seed[SECRET_PINNED].digest
