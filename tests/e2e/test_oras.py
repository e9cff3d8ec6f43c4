"""oras (OCI Registry As Storage) through the proxy: its own commands.

What crane and oras both do, pulling into an OCI layout, is in ``test_layout_clients``. Unless
a case says otherwise it runs against the proxy in front of registry 2.8 and of distribution 3.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from balena_registry_proxy.sandbox import Sandbox

from .clients import MULTI_NAME, NOT_ALLOWED, SECRET, WEB, sha256_of
from .conftest import RunningProxy, Upstream
from .go_clients import Oras
from .go_tools import go_tool
from .test_pull import ALICE, BIG, MULTI, REV2, SECRET_PINNED

pytestmark = pytest.mark.e2e


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
