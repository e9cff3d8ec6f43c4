"""crane (go-containerregistry: ko, Tekton, many CI systems) through the proxy: its own commands.

What crane and oras both do, pulling into an OCI layout, is in ``test_layout_clients``. Unless
a case says otherwise it runs against the proxy in front of registry 2.8 and of distribution 3.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from balena_registry_proxy.sandbox import Sandbox

from .clients import MULTI_NAME, NOT_ALLOWED, SECRET, WEB, sha256_of
from .conftest import RunningProxy, Upstream
from .go_clients import Crane
from .go_tools import go_tool
from .test_pull import ALICE, MULTI, REV2, SECRET_PINNED

pytestmark = pytest.mark.e2e


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
