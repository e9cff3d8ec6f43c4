"""Registry protocol details through the proxy, with a token from the sandbox's token service."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp
import pytest

from balena_registry_proxy.sandbox import Sandbox

from .conftest import RunningProxy, Skopeo
from .test_pull import ALICE, BIG, REV2

pytestmark = pytest.mark.e2e

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


async def token_for(sandbox: Sandbox, name: str) -> str:
    """A pull token for ``name``, fetched the way clients fetch it."""
    params = [("service", sandbox.service), ("scope", f"repository:{name}:pull")]
    async with (
        aiohttp.ClientSession() as session,
        session.get(sandbox.token_url, params=params) as response,
    ):
        assert response.status == 200
        token: str = (await response.json())["token"]
        return token


async def test_head_by_tag_and_blob_keep_digest_and_length(
    sandbox: Sandbox, proxy: RunningProxy
) -> None:
    name = "gh_acme/web/1.2.3"
    headers = {"Authorization": f"Bearer {await token_for(sandbox, name)}", "Accept": OCI_MANIFEST}
    base = f"http://{proxy.host}/v2/{name}"
    seeded = sandbox.seed[REV2]
    async with aiohttp.ClientSession() as session:
        async with session.head(f"{base}/manifests/anything", headers=headers) as response:
            assert response.status == 200
            assert response.headers["Docker-Content-Digest"] == seeded.digest
            assert int(response.headers["Content-Length"]) == seeded.manifest.size
        layer = seeded.layer_digests[0]
        async with session.head(f"{base}/blobs/{layer}", headers=headers) as response:
            assert response.status == 200
            assert response.headers["Docker-Content-Digest"] == layer
            assert int(response.headers["Content-Length"]) > 0
            assert await response.read() == b""


async def test_range_request_on_a_blob_gets_206(sandbox: Sandbox, proxy: RunningProxy) -> None:
    name = "gh_acme/big"
    auth = {"Authorization": f"Bearer {await token_for(sandbox, name)}"}
    base = f"http://{proxy.host}/v2/{name}/blobs"
    async with aiohttp.ClientSession() as session:
        sizes = {}
        for layer in sandbox.seed[BIG].layer_digests:
            async with session.head(f"{base}/{layer}", headers=auth) as response:
                sizes[layer] = int(response.headers["Content-Length"])
        layer = max(sizes, key=lambda digest: sizes[digest])
        ranged = {**auth, "Range": "bytes=100-1123"}
        async with session.get(f"{base}/{layer}", headers=ranged) as response:
            assert response.status == 206
            assert response.headers["Content-Range"] == f"bytes 100-1123/{sizes[layer]}"
            assert len(await response.read()) == 1024


async def test_tags_list_answers_under_the_alias(sandbox: Sandbox, proxy: RunningProxy) -> None:
    name = "gh_acme/web/1.2.3"
    headers = {"Authorization": f"Bearer {await token_for(sandbox, name)}"}
    url = f"http://{proxy.host}/v2/{name}/tags/list"
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
        assert response.status == 200
        assert await response.json() == {"name": name, "tags": ["latest"]}


async def test_referrers_fallback_tag_is_not_the_release(
    sandbox: Sandbox, proxy: RunningProxy
) -> None:
    # oras discover, cosign and notation ask for /referrers/<digest>, and on 404 (registry 2.8
    # and 3.1 have no referrers API) for the tag sha256-<hex> of that digest (OCI 1.1).
    name = "gh_acme/web/1.2.3"
    fallback = sandbox.seed[REV2].digest.replace(":", "-")
    headers = {
        "Authorization": f"Bearer {await token_for(sandbox, name)}",
        # What oras sends: a fallback tag is fetched like any manifest.
        "Accept": f"application/vnd.oci.image.index.v1+json, {OCI_MANIFEST}",
    }
    url = f"http://{proxy.host}/v2/{name}/manifests/{fallback}"
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
        assert response.status == 404
        assert (await response.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"


def test_push_fails_and_upstream_storage_is_unchanged(
    client: Skopeo, sandbox: Sandbox, tmp_path: Path
) -> None:
    pulled = tmp_path / "image"
    result = client.pull("gh_acme/web/1.2.3", pulled)
    assert result.returncode == 0, result.stderr
    before = _snapshot(sandbox.registry.storage_dir)
    pushed = client.run(
        "copy",
        "--dest-tls-verify=false",
        f"--dest-creds={ALICE}",
        f"dir:{pulled}",
        client.ref("gh_acme/web/9.0.0"),
    )
    assert pushed.returncode != 0
    assert _snapshot(sandbox.registry.storage_dir) == before


def _snapshot(root: Path) -> dict[str, int]:
    return {
        os.path.relpath(os.path.join(folder, name), root): os.stat(
            os.path.join(folder, name)
        ).st_size
        for folder, _, names in os.walk(root)
        for name in names
    }


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("gh_acme/web/9.9.9", "release '9.9.9' of app 'gh_acme/web' was not found"),
        ("gh_acme/nope/1.0.0", "release '1.0.0' of app 'gh_acme/nope' was not found"),
        ("gh_acme/nope", "app 'gh_acme/nope' was not found"),
        ("gh_acme", "'gh_acme' names no app: write the org and the app (gh_acme/<app>)"),
        ("gh_acme/web/v1.2.3", "did you mean gh_acme/web/1.2.3?"),
    ],
)
async def test_unknown_app_or_version_is_a_4xx_with_the_helpful_message(
    sandbox: Sandbox, proxy: RunningProxy, name: str, shown: str
) -> None:
    headers = {"Authorization": f"Bearer {await token_for(sandbox, name)}"}
    url = f"http://{proxy.host}/v2/{name}/manifests/latest"
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
        assert 400 <= response.status < 500
        error = (await response.json())["errors"][0]
        assert shown in error["message"]
        assert error["detail"]["name"] == name


@pytest.mark.parametrize("wanted", ["bytes=5000000-10000000", "bytes=500-0"])
async def test_a_range_outside_the_blob_gets_a_well_framed_416(
    sandbox: Sandbox, proxy: RunningProxy, wanted: str
) -> None:
    name = "gh_acme/web/1.2.3"
    auth = {"Authorization": f"Bearer {await token_for(sandbox, name)}"}
    layer = sandbox.seed[REV2].layer_digests[0]
    url = f"http://{proxy.host}/v2/{name}/blobs/{layer}"
    async with aiohttp.ClientSession() as session:
        async with session.head(url, headers=auth) as response:
            size = int(response.headers["Content-Length"])
        for _ in range(2):  # the second on whatever connection the proxy kept
            async with session.get(url, headers={**auth, "Range": wanted}) as response:
                assert response.status == 416
                assert response.headers["Content-Range"] == f"bytes */{size}"
                body = await asyncio.wait_for(response.read(), 10)
                assert len(body) == int(response.headers["Content-Length"])
                assert (await response.json())["errors"][0]["code"] == "RANGE_INVALID"
        async with session.get(url, headers={**auth, "Range": "bytes=0-9"}) as response:
            assert response.status == 206
            assert len(await response.read()) == 10
