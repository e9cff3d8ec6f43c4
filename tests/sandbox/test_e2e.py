"""The real registry accepts the sandbox's tokens and serves the seeded images."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import subprocess
import tarfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import encode_basic_auth

from balena_registry_proxy.sandbox import (
    RegistryNotInstalledError,
    Sandbox,
    generate_signing_key,
)
from balena_registry_proxy.sandbox.catalog import AccessEntry
from balena_registry_proxy.sandbox.seed import OCI_INDEX, OCI_MANIFEST

pytestmark = pytest.mark.e2e

WEB_123_REV2 = "e8b6a13ac1443a731f1ad8fe7b6573f6"
WEB_FAILED = "6148afa5e5a269b8262f0be330c81663"
SECRET = "63ba1da10a1cd217cd1d0db8b51db6b8"
MULTI = "df536a8c7e7306f41113f698a6a97911"
BIG = "99b6b1d3944b1ea6cea6317bd9bdb9c3"
ALICE = ("alice", "alice-sandbox-api-key-0001")
OCI_ACCEPT = f"{OCI_MANIFEST}, {OCI_INDEX}"


async def get_token(
    sandbox: Sandbox, scope: str | None, credentials: tuple[str, str] | None = None
) -> str:
    params = {"service": sandbox.service}
    if scope is not None:
        params["scope"] = scope
    headers = {} if credentials is None else {"Authorization": encode_basic_auth(*credentials)}
    async with (
        aiohttp.ClientSession() as session,
        session.get(sandbox.token_url, params=params, headers=headers) as response,
    ):
        assert response.status == 200
        body: dict[str, Any] = await response.json()
        token: str = body["token"]
        return token


async def registry_get(
    sandbox: Sandbox, path: str, token: str | None, accept: str = OCI_ACCEPT
) -> tuple[int, Mapping[str, str], bytes]:
    headers = {"Accept": accept}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{sandbox.registry_url}{path}", headers=headers) as response,
    ):
        return response.status, dict(response.headers), await response.read()


async def test_token_for_app_name_pulls_the_release(sandbox: Sandbox) -> None:
    token = await get_token(sandbox, "repository:gh_acme/web/1.2.3:pull")
    seeded = sandbox.seed[WEB_123_REV2]
    status, headers, body = await registry_get(
        sandbox, f"/v2/{seeded.repository}/manifests/latest", token
    )
    assert status == 200
    assert headers["Docker-Content-Digest"] == seeded.digest
    assert headers["Content-Type"] == OCI_MANIFEST
    layer_digest = json.loads(body)["layers"][0]["digest"]
    status, _, blob = await registry_get(
        sandbox, f"/v2/{seeded.repository}/blobs/{layer_digest}", token
    )
    assert status == 200
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as archive:
        member = archive.extractfile("release.txt")
        assert member is not None
        assert (
            member.read()
            .decode()
            .startswith(f"gh_acme/web commit={WEB_123_REV2} version=1.2.3+rev2")
        )


async def test_no_token_is_challenged_towards_the_token_service(sandbox: Sandbox) -> None:
    seeded = sandbox.seed[WEB_123_REV2]
    status, headers, _ = await registry_get(
        sandbox, f"/v2/{seeded.repository}/manifests/latest", None
    )
    assert status == 401
    challenge = headers["WWW-Authenticate"]
    assert challenge.startswith(f'Bearer realm="{sandbox.token_url}"')
    assert f'service="{sandbox.service}"' in challenge
    assert f'scope="repository:{seeded.repository}:pull"' in challenge


async def test_token_without_actions_is_refused(sandbox: Sandbox) -> None:
    seeded = sandbox.seed[SECRET]
    token = await get_token(sandbox, f"repository:{seeded.repository}:pull")
    status, headers, body = await registry_get(
        sandbox, f"/v2/{seeded.repository}/manifests/latest", token
    )
    assert status == 401
    assert 'error="insufficient_scope"' in headers["WWW-Authenticate"]
    assert b"UNAUTHORIZED" in body


async def test_member_token_pulls_private_release(sandbox: Sandbox) -> None:
    token = await get_token(sandbox, "repository:gh_acme/secret:pull", ALICE)
    seeded = sandbox.seed[SECRET]
    status, headers, _ = await registry_get(
        sandbox, f"/v2/{seeded.repository}/manifests/latest", token
    )
    assert (status, headers["Docker-Content-Digest"]) == (200, seeded.digest)


async def test_token_signed_by_another_key_is_invalid(sandbox: Sandbox) -> None:
    forged = generate_signing_key().sign(
        sandbox.token_issuer.claims(
            subject="mallory",
            audience=sandbox.service,
            access=[AccessEntry(sandbox.seed[SECRET].repository, ("pull",))],
            now=int(time.time()),
        )
    )
    status, headers, _ = await registry_get(
        sandbox, f"/v2/{sandbox.seed[SECRET].repository}/manifests/latest", forged
    )
    assert status == 401
    assert 'error="invalid_token"' in headers["WWW-Authenticate"]


async def test_failed_release_is_stored_but_not_resolvable(sandbox: Sandbox) -> None:
    seeded = sandbox.seed[WEB_FAILED]
    token = await get_token(sandbox, "repository:gh_acme/web/1.5.0:pull")
    status, _, _ = await registry_get(sandbox, f"/v2/{seeded.repository}/manifests/latest", token)
    assert status == 401
    push_token = sandbox.token_issuer.push_token([seeded.repository])
    status, headers, _ = await registry_get(
        sandbox, f"/v2/{seeded.repository}/manifests/latest", push_token
    )
    assert (status, headers["Docker-Content-Digest"]) == (200, seeded.digest)


async def test_multi_platform_release_is_an_index(sandbox: Sandbox) -> None:
    seeded = sandbox.seed[MULTI]
    token = await get_token(sandbox, "repository:gh_acme/multi:pull")
    status, headers, body = await registry_get(
        sandbox, f"/v2/{seeded.repository}/manifests/latest", token
    )
    assert (status, headers["Content-Type"]) == (200, OCI_INDEX)
    assert headers["Docker-Content-Digest"] == seeded.digest
    children = {
        f"{m['platform']['os']}/{m['platform']['architecture']}": m["digest"]
        for m in json.loads(body)["manifests"]
    }
    assert children == {p: m.digest for p, m in seeded.platform_manifests.items()}
    status, headers, _ = await registry_get(
        sandbox, f"/v2/{seeded.repository}/manifests/{children['linux/arm64']}", token
    )
    assert (status, headers["Content-Type"]) == (200, OCI_MANIFEST)


async def test_registry_access_log_counts_requests(sandbox: Sandbox) -> None:
    seeded = sandbox.seed[WEB_123_REV2]
    path = f"/v2/{seeded.repository}/manifests/{seeded.digest}"
    before = sum(1 for e in sandbox.registry_requests() if e.path == path)
    await registry_get(sandbox, path, None)
    for _ in range(100):  # the registry logs just after responding
        entries = [e for e in sandbox.registry_requests() if e.path == path]
        if len(entries) > before:
            break
        await asyncio.sleep(0.01)
    assert (len(entries), entries[-1].method, entries[-1].status) == (before + 1, "GET", 401)
    assert sandbox.registry_log_path.exists()


async def test_every_image_is_seeded_at_its_content_hash(sandbox: Sandbox) -> None:
    """Every image of every release is in the registry, at the digest /v7 gives as content_hash."""
    images = sandbox.catalog.all_images()
    assert len(sandbox.seed.images) == len(images)
    push_token = sandbox.token_issuer.push_token(image.repository for _, _, image in images)
    content_hashes: dict[str, str] = {}
    # Between them, alice's and mallory's orgs own every private app.
    for key in (ALICE[1], "mallory-sandbox-api-key-0003"):
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                f"{sandbox.api_url}/v7/image?$select=is_stored_at__image_location,content_hash",
                headers={"Authorization": f"Bearer {key}"},
            ) as response,
        ):
            assert response.status == 200
            for row in (await response.json())["d"]:
                location = row["is_stored_at__image_location"]
                content_hashes[location.removeprefix(f"{sandbox.service}/")] = row["content_hash"]
    assert set(content_hashes) == {image.repository for _, _, image in images}
    for _, _, image in images:
        seeded = sandbox.seed.images[image.repository]
        status, headers, _ = await registry_get(
            sandbox, f"/v2/{image.repository}/manifests/latest", push_token
        )
        assert status == 200
        assert headers["Docker-Content-Digest"] == seeded.digest == content_hashes[image.repository]


async def test_each_service_of_a_release_pulls_by_repository(sandbox: Sandbox) -> None:
    services = sandbox.expected_images("gh_acme/stack/1.0.0")
    assert set(services) == {"frontend", "api", "db"}
    for name, seeded in services.items():
        token = await get_token(sandbox, f"repository:{seeded.repository}:pull")
        status, _, body = await registry_get(
            sandbox, f"/v2/{seeded.repository}/manifests/{seeded.digest}", token
        )
        assert status == 200
        layer = json.loads(body)["layers"][0]["digest"]
        _, _, blob = await registry_get(sandbox, f"/v2/{seeded.repository}/blobs/{layer}", token)
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as archive:
            member = archive.extractfile("release.txt")
            assert member is not None
            assert member.read().decode().endswith(f" service={name}\n")


async def test_private_service_images_need_a_member(sandbox: Sandbox) -> None:
    web = sandbox.expected_images("gh_acme/backoffice", "alice")["web"]
    assert sandbox.expected_images("gh_acme/backoffice") == {}
    path = f"/v2/{web.repository}/manifests/latest"
    anonymous = await get_token(sandbox, f"repository:{web.repository}:pull")
    assert (await registry_get(sandbox, path, anonymous))[0] == 401
    member = await get_token(sandbox, f"repository:{web.repository}:pull", ALICE)
    assert (await registry_get(sandbox, path, member))[0] == 200


async def test_images_are_for_their_apps_platform(sandbox: Sandbox) -> None:
    seeded = sandbox.expected_release("gh_acme/browser-armv7hf")
    assert seeded is not None
    token = await get_token(sandbox, f"repository:{seeded.repository}:pull")
    _, _, body = await registry_get(sandbox, f"/v2/{seeded.repository}/manifests/latest", token)
    config_digest = json.loads(body)["config"]["digest"]
    _, _, config = await registry_get(
        sandbox, f"/v2/{seeded.repository}/blobs/{config_digest}", token
    )
    platform = json.loads(config)
    assert (platform["architecture"], platform["variant"]) == ("arm", "v7")


def test_expected_release_follows_resolution_rules(sandbox: Sandbox) -> None:
    pinned = sandbox.expected_release("gh_acme/web")
    assert pinned is not None
    assert pinned.commit == "173fde6195e3907bc9fa80315fd862a4"
    assert sandbox.expected_release("gh_acme/web/1.2.3") == sandbox.seed[WEB_123_REV2]
    assert sandbox.expected_release("gh_acme/web/1.5.0") is None
    assert sandbox.expected_release("gh_acme/secret") is None
    assert sandbox.expected_release("gh_acme/secret", "alice") == sandbox.seed[SECRET]
    assert sandbox.expected_release("gh_acme/secret", "mallory") is None
    with pytest.raises(KeyError):
        sandbox.expected_release("gh_acme/web", "nobody")
    # Several services: the API resolves none by name, a resolving client each of them.
    assert sandbox.expected_release("gh_acme/stack") is None
    assert set(sandbox.expected_images("gh_acme/stack")) == {"frontend", "api", "db"}
    assert sandbox.expected_images("gh_acme/web/1.2.3") == {"main": sandbox.seed[WEB_123_REV2]}
    assert sandbox.expected_images("gh_acme/stack/1.2.0") == {}  # failed
    assert sandbox.expected_images("nobody/nothing") == {}


# --------------------------------------------------------------------------- skopeo


def run_skopeo(skopeo: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([skopeo, *args], capture_output=True, text=True, timeout=120, check=False)


def inspect(skopeo: str, sandbox: Sandbox, commit: str, *options: str) -> dict[str, Any]:
    reference = f"docker://{sandbox.registry_host}/{sandbox.seed[commit].repository}:latest"
    result = run_skopeo(skopeo, "inspect", "--tls-verify=false", *options, reference)
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def test_skopeo_inspect_does_the_token_dance(sandbox: Sandbox, skopeo: str) -> None:
    before = len(sandbox.token_requests)
    document = inspect(skopeo, sandbox, WEB_123_REV2, "--no-creds")
    assert document["Digest"] == sandbox.seed[WEB_123_REV2].digest
    assert document["Labels"]["io.balena.sandbox.version"] == "1.2.3+rev2"
    repository = sandbox.seed[WEB_123_REV2].repository
    assert any(
        f"repository:{repository}:pull" in record.scopes
        for record in sandbox.token_requests[before:]
    )


def test_skopeo_inspect_override_arch_on_index(sandbox: Sandbox, skopeo: str) -> None:
    seeded = sandbox.seed[MULTI]
    document = inspect(skopeo, sandbox, MULTI, "--no-creds", "--override-arch", "arm64")
    assert document["Architecture"] == "arm64"
    assert document["Layers"] == list(seeded.platform_manifests["linux/arm64"].layer_digests)


def test_skopeo_private_needs_member_credentials(sandbox: Sandbox, skopeo: str) -> None:
    document = inspect(skopeo, sandbox, SECRET, "--creds", ":".join(ALICE))
    assert document["Digest"] == sandbox.seed[SECRET].digest
    reference = f"docker://{sandbox.registry_host}/{sandbox.seed[SECRET].repository}:latest"
    result = run_skopeo(skopeo, "inspect", "--tls-verify=false", "--no-creds", reference)
    assert result.returncode != 0
    assert "unauthorized" in result.stderr or "denied" in result.stderr


def test_skopeo_copies_the_big_layer(sandbox: Sandbox, skopeo: str, tmp_path: Path) -> None:
    seeded = sandbox.seed[BIG]
    source = f"docker://{sandbox.registry_host}/{seeded.repository}:latest"
    result = run_skopeo(
        skopeo,
        "--insecure-policy",
        "copy",
        "--src-tls-verify=false",
        "--src-no-creds",
        source,
        f"oci:{tmp_path / 'big'}:latest",
    )
    assert result.returncode == 0, result.stderr
    blobs = tmp_path / "big" / "blobs" / "sha256"
    sizes = {f"sha256:{p.name}": p.stat().st_size for p in blobs.iterdir()}
    assert set(seeded.layer_digests) <= set(sizes)
    assert max(sizes[d] for d in seeded.layer_digests) > 64 * 1024 * 1024


# --------------------------------------------------------------------------- lifecycle


SMALL_CATALOG = """
orgs: [o]
apps:
  - slug: o/app
    public: true
    pinned_release: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa
    releases:
      - {commit: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa, semver: 1.0.0}
"""


@pytest.mark.usefixtures("registry_binary")
async def test_sandbox_start_and_cleanup(tmp_path: Path) -> None:
    catalog_path = tmp_path / "small.yaml"
    catalog_path.write_text(SMALL_CATALOG)
    async with Sandbox.start(catalog_path) as sandbox:
        workdir = sandbox.workdir
        assert workdir.exists()
        assert list(sandbox.seed.releases) == ["a" * 32]
        registry = sandbox.registry
        token = await get_token(sandbox, "repository:o/app:pull")
        status, _, _ = await registry_get(
            sandbox, f"/v2/{sandbox.seed['a' * 32].repository}/manifests/latest", token
        )
        assert status == 200
    assert registry.returncode is not None
    assert not workdir.exists()
    with pytest.raises(aiohttp.ClientConnectionError):
        await registry_get(sandbox, "/v2/", None)


@pytest.mark.usefixtures("registry_binary")
async def test_given_workdir_is_kept(tmp_path: Path) -> None:
    catalog_path = tmp_path / "small.yaml"
    catalog_path.write_text(SMALL_CATALOG)
    async with Sandbox.start(catalog_path, tmp_path / "work") as sandbox:
        assert sandbox.workdir == tmp_path / "work"
    assert (tmp_path / "work" / "registry" / "storage").is_dir()
    assert (tmp_path / "work" / "keys" / "token.crt").is_file()


async def test_missing_registry_binary(tmp_path: Path) -> None:
    with pytest.raises(RegistryNotInstalledError, match="apt-get install docker-registry"):
        async with Sandbox.start(registry_binary=tmp_path / "nope"):
            pass
