"""containerd 2 (today's Kubernetes nodes) through the proxy, with its own ``ctr``.

containerd 2 pulls in the daemon, through its transfer service, unlike 1.6 where ``ctr``
pulled itself; ctr only hands over the reference, the credentials and the hosts directory.
Every case runs against the proxy in front of Debian's registry 2.8 and in front of
distribution 3, in a namespace of its own, and is checked by digest.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from balena_registry_proxy.sandbox.ports import free_port

from .clients import (
    CTR2,
    MULTI_NAME,
    SECRET,
    WEB,
    Containerd,
    Ctr,
    blobs_of,
    containerd2_daemon,
    fetched_by_digest,
    namespace_for,
)
from .conftest import Upstream
from .test_pull import ALICE, MULTI, REV2, SECRET_PINNED, SELECTORS

pytestmark = pytest.mark.e2e

CLIENT = CTR2
# A registry name that exists only in the hosts.toml below (.invalid never resolves).
MIRRORED = "balena.invalid"


@pytest.fixture(scope="module")
def containerd2() -> Iterator[Containerd]:
    """A containerd 2 daemon for this module's tests."""
    with containerd2_daemon() as running:
        yield running


@pytest.fixture
def ctr2(containerd2: Containerd, go_upstream: Upstream, request: pytest.FixtureRequest) -> Ctr:
    """ctr 2 in a namespace of its own, pulling from the proxy in front of ``go_upstream``."""
    return containerd2.client(namespace_for(request), go_upstream.host)


@pytest.mark.matrix(CLIENT, "pull by every selector form")
def test_ctr2_pulls_every_selector(ctr2: Ctr, go_upstream: Upstream) -> None:
    wrong = {}
    for name, commit in SELECTORS:
        result = ctr2.pull(name)
        assert result.returncode == 0, f"{name}: {result.stderr}"
        if ctr2.image_digest(name) != go_upstream.sandbox.seed[commit].digest:
            wrong[name] = ctr2.image_digest(name)
    assert not wrong, f"pulled the wrong image for {wrong}"
    assert ctr2.unpacked(WEB)


@pytest.mark.matrix(CLIENT, "pull by digest")
def test_ctr2_pulls_by_digest(ctr2: Ctr, go_upstream: Upstream) -> None:
    seeded = go_upstream.sandbox.seed[REV2]
    name = f"{WEB}@{seeded.digest}"
    result = ctr2.pull(name)
    assert result.returncode == 0, result.stderr
    assert ctr2.image_digest(name) == seeded.digest
    assert blobs_of(seeded.manifest) <= ctr2.content()


@pytest.mark.matrix(CLIENT, "multi-platform index, one platform")
def test_ctr2_pulls_one_platform_of_an_index(ctr2: Ctr, go_upstream: Upstream) -> None:
    seeded = go_upstream.sandbox.seed[MULTI]
    arm64, amd64 = (
        seeded.platform_manifests["linux/arm64"],
        seeded.platform_manifests["linux/amd64"],
    )
    result = ctr2.pull(MULTI_NAME, "--platform=linux/arm64")
    assert result.returncode == 0, result.stderr
    assert ctr2.image_digest(MULTI_NAME) == seeded.digest
    content = ctr2.content()
    assert {seeded.digest} | blobs_of(arm64) <= content
    # containerd 2 keeps every platform's manifest and config ("metadata"), not their layers.
    assert not set(amd64.layer_digests) & content


@pytest.mark.matrix(CLIENT, "index child by digest")
def test_ctr2_pulls_an_index_child_by_digest(ctr2: Ctr, go_upstream: Upstream) -> None:
    child = go_upstream.sandbox.seed[MULTI].platform_manifests["linux/arm64"]
    before = fetched_by_digest(go_upstream.proxy, MULTI_NAME, child.digest)
    name = f"{MULTI_NAME}@{child.digest}"
    result = ctr2.pull(name, "--platform=linux/arm64")
    assert result.returncode == 0, result.stderr
    assert ctr2.image_digest(name) == child.digest
    assert blobs_of(child) <= ctr2.content()
    assert fetched_by_digest(go_upstream.proxy, MULTI_NAME, child.digest) > before


@pytest.mark.matrix(CLIENT, "private app, with credentials")
def test_ctr2_pulls_a_private_app_with_credentials(ctr2: Ctr, go_upstream: Upstream) -> None:
    seeded = go_upstream.sandbox.seed[SECRET_PINNED]
    result = ctr2.pull(SECRET, f"--user={ALICE}")
    assert result.returncode == 0, result.stderr
    assert ctr2.image_digest(SECRET) == seeded.digest
    assert blobs_of(seeded.manifest) <= ctr2.content()
    assert ctr2.unpacked(SECRET)


@pytest.mark.matrix(CLIENT, "private app, without credentials: refused")
def test_ctr2_private_app_refuses_anonymous(ctr2: Ctr) -> None:
    result = ctr2.pull(SECRET)
    assert result.returncode != 0
    # The registry's 401 and its insufficient_scope challenge, relayed, make ctr say this.
    assert "pull access denied" in result.stderr, result.stderr
    assert ctr2.content() == set()


@pytest.mark.matrix(CLIENT, "hosts.toml mirror pointing at the proxy")
def test_ctr2_pulls_through_a_hosts_toml_mirror(
    ctr2: Ctr, go_upstream: Upstream, tmp_path: Path
) -> None:
    # How containerd users point a registry name at a mirror: certs.d/<name>/hosts.toml. The
    # name's own server is a loopback port nobody listens on, so only the mirror can serve.
    hosts = tmp_path / "certs.d"
    (hosts / MIRRORED).mkdir(parents=True)
    (hosts / MIRRORED / "hosts.toml").write_text(
        f"server = {json.dumps(f'http://127.0.0.1:{free_port()}')}\n"
        f"[host.{json.dumps(f'http://{go_upstream.host}')}]\n"
        'capabilities = ["pull", "resolve"]\n'
    )
    seeded = go_upstream.sandbox.seed[SECRET_PINNED]
    ref = f"{MIRRORED}/{SECRET}:latest"
    result = ctr2.run(
        "images", "pull", "--snapshotter=native", f"--hosts-dir={hosts}", f"--user={ALICE}", ref
    )
    assert result.returncode == 0, result.stderr
    assert ctr2.image_digest_of(ref) == seeded.digest
    assert blobs_of(seeded.manifest) <= ctr2.content()
    # containerd names the registry a mirror stands in for in an ns= parameter; the proxy
    # passed it upstream with the request.
    assert f"/blobs/{seeded.manifest.layer_digests[0]}?ns={MIRRORED}" in go_upstream.proxy.log()
