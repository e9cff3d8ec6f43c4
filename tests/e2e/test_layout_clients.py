"""What crane and oras both do through the proxy: fetch an image into an OCI layout.

crane pulls (``crane pull --format=oci``), oras copies (``oras copy --to-oci-layout``). Each case
runs with both, against the proxy in front of registry 2.8 and of distribution 3, and checks the
digest the client wrote down and every blob (hashed against its name) against the seed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .clients import MULTI_NAME, SECRET, WEB, blobs_of, fetched_by_digest
from .conftest import Upstream
from .go_clients import LayoutClient
from .test_pull import ALICE, MULTI, REV2, SECRET_PINNED, SELECTORS

pytestmark = pytest.mark.e2e


@pytest.mark.matrix("pull by every selector form")
def test_every_selector(layout_client: LayoutClient, go_upstream: Upstream, tmp_path: Path) -> None:
    wrong = {}
    for number, (name, commit) in enumerate(SELECTORS):
        seeded = go_upstream.sandbox.seed[commit]
        digest, blobs = layout_client.pulled(name, tmp_path / str(number))
        if digest != seeded.digest or not blobs_of(seeded.manifest) <= blobs:
            wrong[name] = digest
    assert not wrong, f"fetched the wrong image for {wrong}"


@pytest.mark.matrix("pull by digest")
def test_by_digest(layout_client: LayoutClient, go_upstream: Upstream, tmp_path: Path) -> None:
    seeded = go_upstream.sandbox.seed[REV2]
    digest, blobs = layout_client.pulled(f"{WEB}@{seeded.digest}", tmp_path)
    assert digest == seeded.digest
    assert blobs_of(seeded.manifest) <= blobs


@pytest.mark.matrix("multi-platform index, every platform")
def test_multi_platform_index(
    layout_client: LayoutClient, go_upstream: Upstream, tmp_path: Path
) -> None:
    seeded = go_upstream.sandbox.seed[MULTI]
    digest, blobs = layout_client.pulled(MULTI_NAME, tmp_path)
    assert digest == seeded.digest
    children = [blobs_of(child) for child in seeded.platform_manifests.values()]
    assert {seeded.digest}.union(*children) <= blobs


@pytest.mark.matrix("index child by digest")
def test_index_child_by_digest(
    layout_client: LayoutClient, go_upstream: Upstream, tmp_path: Path
) -> None:
    child = go_upstream.sandbox.seed[MULTI].platform_manifests["linux/arm64"]
    before = fetched_by_digest(go_upstream.proxy, MULTI_NAME, child.digest)
    digest, blobs = layout_client.pulled(f"{MULTI_NAME}@{child.digest}", tmp_path)
    assert digest == child.digest
    assert blobs_of(child) <= blobs
    assert fetched_by_digest(go_upstream.proxy, MULTI_NAME, child.digest) > before


@pytest.mark.matrix("private app, with credentials")
def test_private_app_with_credentials(
    layout_client: LayoutClient, go_upstream: Upstream, tmp_path: Path
) -> None:
    seeded = go_upstream.sandbox.seed[SECRET_PINNED]
    digest, blobs = layout_client.pulled(SECRET, tmp_path, credentials=ALICE)
    assert digest == seeded.digest
    assert blobs_of(seeded.manifest) <= blobs
