"""The cache and redirect following, against an in-process upstream and storage."""

from __future__ import annotations

import asyncio
import errno
import gc
import hashlib
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from balena_registry_proxy import confirmations, disk_store, download
from balena_registry_proxy.config import Settings
from balena_registry_proxy.disk_store import DiskStore
from balena_registry_proxy.sandbox import generate_signing_key

from .conftest import serve_proxy
from .test_observability import sample

Client = TestClient[web.Request, web.Application]
DATA = hashlib.sha256(b"layer").digest() * 40_000  # 1.28 MB
OTHER = hashlib.sha256(b"other").digest() * 40_000
THIRD = hashlib.sha256(b"third").digest() * 40_000
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()
OTHER_DIGEST = "sha256:" + hashlib.sha256(OTHER).hexdigest()
THIRD_DIGEST = "sha256:" + hashlib.sha256(THIRD).hexdigest()
CORRUPT = "sha256:" + "c" * 64
GOOD = "Bearer good-token"
OCI = "application/vnd.oci.image.manifest.v1+json"
MANIFEST = b'{"schemaVersion":2,"mediaType":"%s","layers":[]}' % OCI.encode()
MANIFEST_DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()


@dataclass
class Registry:
    """An upstream that links blobs to repositories, and a storage host it redirects to."""

    storage_url: str = ""
    gets: list[str] = field(default_factory=list)
    heads: list[str] = field(default_factory=list)
    storage_auth: list[str | None] = field(default_factory=list)
    manifest_requests: list[str] = field(default_factory=list)
    cut: list[str] = field(default_factory=list)
    """Blob GETs whose reader went away before the end."""
    slow: bool = False
    slow_heads: bool = False
    content_type: str = OCI
    etag: str | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/v2/{repo:.+}/blobs/{digest}", self.blob)
        app.router.add_route("*", "/v2/{repo:.+}/manifests/{reference}", self.manifest)
        return app

    async def manifest(self, request: web.Request) -> web.Response:
        """Like the registry: private needs the token, OCI needs an Accept naming it."""
        repo, reference = request.match_info["repo"], request.match_info["reference"]
        self.manifest_requests.append(f"{request.method} {repo}@{reference}")
        if repo == "private/app" and request.headers.get("Authorization") != GOOD:
            return web.json_response({"errors": [{"code": "UNAUTHORIZED"}]}, status=401)
        bodies = {MANIFEST_DIGEST: MANIFEST, "latest": MANIFEST, CORRUPT: MANIFEST + b" "}
        body = bodies.get(reference)
        accepted = OCI in request.headers.getall("Accept", [])
        if repo not in ("public/app", "private/app") or body is None or not accepted:
            return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, status=404)
        if self.etag is not None and request.headers.get("If-None-Match") == self.etag:
            return web.Response(status=304, headers={"Etag": self.etag})
        headers = {"Docker-Content-Digest": MANIFEST_DIGEST, "Content-Type": self.content_type}
        return web.Response(body=body, headers=headers)

    async def blob(self, request: web.Request) -> web.StreamResponse:
        repo, digest = request.match_info["repo"], request.match_info["digest"]
        (self.gets if request.method == "GET" else self.heads).append(f"{repo}@{digest}")
        if self.slow_heads and request.method == "HEAD":
            await asyncio.sleep(0.5)
        if repo == "private/app" and request.headers.get("Authorization") != GOOD:
            return web.json_response({"errors": [{"code": "UNAUTHORIZED"}]}, status=401)
        if repo == "stored/app" and request.method == "GET":
            raise web.HTTPTemporaryRedirect(f"{self.storage_url}/bucket/blob?X-Amz-Signature=s")
        if repo not in ("public/app", "private/app", "stored/app"):
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN"}]}, status=404)
        body = {
            DIGEST: DATA,
            OTHER_DIGEST: OTHER,
            THIRD_DIGEST: THIRD,
            CORRUPT: b"x" * len(DATA),
        }.get(digest)
        if body is None:
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN"}]}, status=404)
        headers = {"Docker-Content-Digest": digest, "Content-Length": str(len(body))}
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        step = len(body) // 8
        try:
            for start in range(0, len(body), step):
                await response.write(body[start : start + step])
                if self.slow:
                    await asyncio.sleep(0.05)
        except (ConnectionError, asyncio.CancelledError):
            self.cut.append(f"{repo}@{digest}")
            raise
        return response

    def storage(self) -> web.Application:
        async def serve(request: web.Request) -> web.Response:
            self.storage_auth.append(request.headers.get("Authorization"))
            if "Authorization" in request.headers:
                return web.Response(status=400, text="Only one auth mechanism allowed")
            return web.Response(body=DATA)

        app = web.Application()
        app.router.add_get("/bucket/blob", serve)
        return app


@dataclass
class Setup:
    registry: Registry
    client: Client
    cache_dir: Path
    upstream: TestServer


ProxyFor = Callable[..., Awaitable[Setup]]


@pytest.fixture
def proxy_for(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    aiohttp_client: Callable[..., Awaitable[Client]],
    tmp_path: Path,
) -> ProxyFor:
    async def make(**settings: Any) -> Setup:
        registry = Registry()
        storage = await aiohttp_server(registry.storage())
        registry.storage_url = str(storage.make_url("")).rstrip("/")
        upstream = await aiohttp_server(registry.app())
        options: dict[str, Any] = {"cache_dir": str(tmp_path / "cache")} | settings
        config = Settings(registry_url=str(upstream.make_url("")).rstrip("/"), **options)
        client = await serve_proxy(config, aiohttp_client)
        return Setup(registry, client, tmp_path / "cache", upstream)

    return make


async def settled(cache_dir: Path) -> None:
    """Wait until no download is being written: kept files are renamed once on disk."""
    for _ in range(100):
        if not any(path.suffix == ".part" for path in (cache_dir / "tmp").iterdir()):
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.05)  # the rename's bookkeeping (eviction) follows on the loop


def cached_files(cache_dir: Path) -> list[str]:
    return sorted(path.name for path in (cache_dir / "blobs" / "sha256").iterdir())


async def get(client: Client, repo: str, digest: str, **headers: str) -> aiohttp.ClientResponse:
    return await client.get(f"/v2/{repo}/blobs/{digest}", headers=headers)


async def test_cold_then_warm_downloads_once(proxy_for: ProxyFor) -> None:
    setup = await proxy_for()
    first = await get(setup.client, "public/app", DIGEST)
    assert first.status == 200
    assert first.headers["Docker-Content-Digest"] == DIGEST
    assert await first.read() == DATA
    await settled(setup.cache_dir)
    assert cached_files(setup.cache_dir) == [DIGEST.removeprefix("sha256:")]
    second = await get(setup.client, "public/app", DIGEST)
    assert await second.read() == DATA
    assert setup.registry.gets == [f"public/app@{DIGEST}"]
    page = await (await setup.client.get("/metrics")).text()
    assert 'registry_proxy_cache_requests_total{kind="blob",outcome="hit"} 1.0' in page
    assert 'registry_proxy_cache_requests_total{kind="blob",outcome="miss"} 1.0' in page
    assert sample(page, "registry_proxy_cache_served_bytes_total") == len(DATA)
    assert sample(page, "registry_proxy_cache_size_bytes") == len(DATA)
    assert sample(page, 'registry_proxy_response_body_bytes_total{route="blob"}') == 2 * len(DATA)


async def test_range_and_head_from_the_cache(proxy_for: ProxyFor) -> None:
    setup = await proxy_for()
    await (await get(setup.client, "public/app", DIGEST)).read()
    await settled(setup.cache_dir)
    ranged = await get(setup.client, "public/app", DIGEST, Range="bytes=100-199")
    assert ranged.status == 206
    assert ranged.headers["Content-Range"] == f"bytes 100-199/{len(DATA)}"
    assert await ranged.read() == DATA[100:200]
    beyond = await get(setup.client, "public/app", DIGEST, Range=f"bytes={len(DATA) + 5}-")
    assert beyond.status == 416
    head = await setup.client.head(f"/v2/public/app/blobs/{DIGEST}")
    assert head.status == 200
    assert head.headers["Content-Length"] == str(len(DATA))
    assert head.headers["Docker-Content-Digest"] == DIGEST
    assert setup.registry.gets == [f"public/app@{DIGEST}"]
    page = await (await setup.client.get("/metrics")).text()
    assert sample(page, "registry_proxy_cache_served_bytes_total") == 100


async def test_a_wrong_upstream_blob_fails_the_client_and_is_not_kept(
    proxy_for: ProxyFor,
) -> None:
    setup = await proxy_for()
    response = await get(setup.client, "public/app", CORRUPT)
    assert response.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()
    await settled(setup.cache_dir)
    assert cached_files(setup.cache_dir) == []
    assert list((setup.cache_dir / "tmp").iterdir()) == []


async def test_concurrent_clients_share_one_download(proxy_for: ProxyFor) -> None:
    setup = await proxy_for()
    setup.registry.slow = True
    responses = await asyncio.gather(*(get(setup.client, "public/app", DIGEST) for _ in range(10)))
    bodies = await asyncio.gather(*(response.read() for response in responses))
    assert all(body == DATA for body in bodies)
    assert setup.registry.gets == [f"public/app@{DIGEST}"]
    page = await (await setup.client.get("/metrics")).text()
    # The first client's bytes came from upstream; the nine others' from the cache.
    assert sample(page, "registry_proxy_cache_served_bytes_total") == 9 * len(DATA)


async def test_cached_private_layer_never_reaches_other_clients(proxy_for: ProxyFor) -> None:
    setup = await proxy_for()
    owner = await get(setup.client, "private/app", DIGEST, Authorization=GOOD)
    assert await owner.read() == DATA
    await settled(setup.cache_dir)
    assert cached_files(setup.cache_dir) == [DIGEST.removeprefix("sha256:")]
    anonymous = await get(setup.client, "private/app", DIGEST)
    assert anonymous.status == 401
    wrong = await get(setup.client, "private/app", DIGEST, Authorization="Bearer other")
    assert wrong.status == 401
    # A repository that does not link the blob does not get it, whatever is cached.
    elsewhere = await get(setup.client, "unlinked/app", DIGEST, Authorization=GOOD)
    assert elsewhere.status == 404
    again = await get(setup.client, "private/app", DIGEST, Authorization=GOOD)
    assert await again.read() == DATA


async def test_redirects_are_followed_without_the_clients_credentials(
    proxy_for: ProxyFor,
) -> None:
    setup = await proxy_for()
    response = await get(setup.client, "stored/app", DIGEST, Authorization=GOOD)
    assert response.status == 200
    assert await response.read() == DATA
    assert setup.registry.storage_auth == [None]


async def test_follow_redirects_without_a_cache(proxy_for: ProxyFor) -> None:
    setup = await proxy_for(cache_dir=None, follow_redirects=True)
    response = await get(setup.client, "stored/app", DIGEST, Authorization=GOOD)
    assert response.status == 200
    assert await response.read() == DATA
    assert setup.registry.storage_auth == [None]


async def test_least_recently_used_blobs_are_evicted(proxy_for: ProxyFor) -> None:
    setup = await proxy_for(cache_max_size=int(len(DATA) * 2.5))
    for digest in (DIGEST, OTHER_DIGEST, THIRD_DIGEST):
        await (await get(setup.client, "public/app", digest)).read()
        await settled(setup.cache_dir)
    assert cached_files(setup.cache_dir) == sorted(
        d.removeprefix("sha256:") for d in (OTHER_DIGEST, THIRD_DIGEST)
    )
    page = await (await setup.client.get("/metrics")).text()
    assert sample(page, "registry_proxy_cache_evictions") == 1


async def test_a_blob_bigger_than_half_the_cache_is_relayed_and_evicts_nothing(
    proxy_for: ProxyFor,
) -> None:
    setup = await proxy_for(cache_max_size=int(len(DATA) * 1.5))
    assert await (await manifest(setup.client, "public/app", MANIFEST_DIGEST)).read()
    for _ in range(2):
        response = await get(setup.client, "public/app", DIGEST)
        assert await response.read() == DATA
    await settled(setup.cache_dir)
    assert cached_files(setup.cache_dir) == []
    assert kept_manifests(setup.cache_dir) == [MANIFEST_DIGEST.removeprefix("sha256:")]
    assert setup.registry.gets.count(f"public/app@{DIGEST}") >= 2
    page = await (await setup.client.get("/metrics")).text()
    assert sample(page, "registry_proxy_cache_evictions") == 0


async def test_stale_temporaries_are_removed_at_start(proxy_for: ProxyFor, tmp_path: Path) -> None:
    (tmp_path / "cache" / "tmp").mkdir(parents=True)
    (tmp_path / "cache" / "tmp" / "half-written.part").write_bytes(b"x" * 100)
    setup = await proxy_for()
    assert list((setup.cache_dir / "tmp").iterdir()) == []


async def test_offline_serves_cached_blobs_only_to_clients_seen_before(
    proxy_for: ProxyFor,
) -> None:
    setup = await proxy_for()
    await (await get(setup.client, "private/app", DIGEST, Authorization=GOOD)).read()
    await settled(setup.cache_dir)
    await setup.upstream.close()
    offline = await get(setup.client, "private/app", DIGEST, Authorization=GOOD)
    assert await offline.read() == DATA
    stranger = await get(setup.client, "private/app", DIGEST, Authorization="Bearer x")
    assert stranger.status == 503
    assert (await stranger.json())["errors"][0]["code"] == "UNAVAILABLE"


async def test_offline_a_fresh_verified_token_is_served_what_its_repository_links(
    proxy_for: ProxyFor, tmp_path: Path
) -> None:
    key = generate_signing_key()
    (tmp_path / "issuer.pem").write_bytes(key.certificate_pem)
    setup = await proxy_for(token_public_key=str(tmp_path / "issuer.pem"), token_audience="reg")

    def token(repository: str) -> str:
        now = int(time.time())
        entry = {"type": "repository", "name": repository, "actions": ["pull"]}
        claims = {"aud": "reg", "exp": now + 600, "nbf": now - 10, "jti": uuid.uuid4().hex}
        return key.sign({**claims, "access": [entry]})

    first = await get(
        setup.client, "public/app", DIGEST, Authorization=f"Bearer {token('public/app')}"
    )
    assert await first.read() == DATA
    await settled(setup.cache_dir)
    await setup.upstream.close()
    fresh = await get(
        setup.client, "public/app", DIGEST, Authorization=f"Bearer {token('public/app')}"
    )
    assert await fresh.read() == DATA
    elsewhere = await get(
        setup.client, "public/app", DIGEST, Authorization=f"Bearer {token('other/app')}"
    )
    assert elsewhere.status == 503
    unsigned = await get(setup.client, "public/app", DIGEST, Authorization="Bearer a.b.c")
    assert unsigned.status == 503


async def manifest(
    client: Client, repo: str, reference: str, method: str = "GET", **headers: str
) -> aiohttp.ClientResponse:
    headers.setdefault("Accept", OCI)
    return await client.request(method, f"/v2/{repo}/manifests/{reference}", headers=headers)


def kept_manifests(cache_dir: Path) -> list[str]:
    return sorted(path.name for path in (cache_dir / "manifests" / "sha256").iterdir())


async def test_manifests_by_digest_are_kept_and_served_with_their_media_type(
    proxy_for: ProxyFor,
) -> None:
    setup = await proxy_for()
    cold = await manifest(setup.client, "private/app", MANIFEST_DIGEST, Authorization=GOOD)
    assert cold.status == 200
    assert await cold.read() == MANIFEST
    assert kept_manifests(setup.cache_dir) == [MANIFEST_DIGEST.removeprefix("sha256:")]
    warm = await manifest(setup.client, "private/app", MANIFEST_DIGEST, Authorization=GOOD)
    assert warm.status == 200
    assert await warm.read() == MANIFEST
    assert warm.headers["Content-Type"] == OCI
    assert warm.headers["Docker-Content-Digest"] == MANIFEST_DIGEST
    head = await manifest(setup.client, "private/app", MANIFEST_DIGEST, "HEAD", Authorization=GOOD)
    assert head.status == 200
    assert head.headers["Content-Length"] == str(len(MANIFEST))
    assert head.headers["Content-Type"] == OCI
    # The first answer confirmed this client: warm GET and HEAD never went upstream.
    assert setup.registry.manifest_requests == [f"GET private/app@{MANIFEST_DIGEST}"]
    page = await (await setup.client.get("/metrics")).text()
    assert 'registry_proxy_cache_requests_total{kind="manifest",outcome="hit"} 2.0' in page
    assert 'registry_proxy_cache_requests_total{kind="manifest",outcome="miss"} 1.0' in page


async def test_a_cached_manifest_reaches_only_clients_the_upstream_allows(
    proxy_for: ProxyFor,
) -> None:
    setup = await proxy_for()
    owner = await manifest(setup.client, "private/app", MANIFEST_DIGEST, Authorization=GOOD)
    assert await owner.read() == MANIFEST
    anonymous = await manifest(setup.client, "private/app", MANIFEST_DIGEST)
    assert anonymous.status == 401
    wrong = await manifest(setup.client, "private/app", MANIFEST_DIGEST, Authorization="Bearer x")
    assert wrong.status == 401
    elsewhere = await manifest(setup.client, "unlinked/app", MANIFEST_DIGEST, Authorization=GOOD)
    assert elsewhere.status == 404
    # A client that does not take the kept media type gets the upstream's answer to it.
    other_type = await manifest(
        setup.client,
        "private/app",
        MANIFEST_DIGEST,
        Authorization=GOOD,
        Accept="application/vnd.docker.distribution.manifest.v2+json",
    )
    assert other_type.status == 404
    assert (await other_type.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"


async def test_manifests_by_tag_or_with_the_wrong_bytes_are_not_kept(proxy_for: ProxyFor) -> None:
    setup = await proxy_for()
    by_tag = await manifest(setup.client, "public/app", "latest")
    assert await by_tag.read() == MANIFEST
    wrong = await manifest(setup.client, "public/app", CORRUPT)
    assert wrong.status == 200  # relayed as the upstream said: the client checks the digest
    assert await wrong.read() == MANIFEST + b" "
    assert kept_manifests(setup.cache_dir) == []
    assert list((setup.cache_dir / "tmp").iterdir()) == []


async def test_offline_a_cached_manifest_is_served_to_clients_seen_before(
    proxy_for: ProxyFor,
) -> None:
    setup = await proxy_for()
    await (await manifest(setup.client, "private/app", MANIFEST_DIGEST, Authorization=GOOD)).read()
    await setup.upstream.close()
    offline = await manifest(setup.client, "private/app", MANIFEST_DIGEST, Authorization=GOOD)
    assert offline.status == 200
    assert await offline.read() == MANIFEST
    stranger = await manifest(
        setup.client, "private/app", MANIFEST_DIGEST, Authorization="Bearer x"
    )
    assert stranger.status == 503
    assert (await stranger.json())["errors"][0]["code"] == "UNAVAILABLE"


async def test_a_full_cache_disk_relays_the_manifest_and_keeps_nothing(
    proxy_for: ProxyFor, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = await proxy_for()

    def full(self: DiskStore, final: Path, content: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(DiskStore, "_write_whole", full)
    response = await manifest(setup.client, "public/app", MANIFEST_DIGEST)
    assert response.status == 200
    assert await response.read() == MANIFEST
    assert kept_manifests(setup.cache_dir) == []


async def test_a_read_only_cache_disk_still_serves_and_relays(
    proxy_for: ProxyFor, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = await proxy_for()
    assert await (await manifest(setup.client, "public/app", MANIFEST_DIGEST)).read() == MANIFEST
    assert await (await get(setup.client, "public/app", DIGEST)).read() == DATA
    await settled(setup.cache_dir)

    def read_only(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "utime", read_only)
    monkeypatch.setattr(DiskStore, "begin", read_only)
    assert await (await manifest(setup.client, "public/app", MANIFEST_DIGEST)).read() == MANIFEST
    assert await (await get(setup.client, "public/app", DIGEST)).read() == DATA
    uncached = await get(setup.client, "public/app", OTHER_DIGEST)
    assert uncached.status == 200
    assert await uncached.read() == OTHER


async def test_a_blob_evicted_while_its_client_is_confirmed_is_relayed(
    proxy_for: ProxyFor,
) -> None:
    setup = await proxy_for(cache_max_size=int(len(DATA) * 2.5))
    await (await get(setup.client, "public/app", DIGEST)).read()
    await settled(setup.cache_dir)
    setup.registry.slow_heads = True
    newcomer = asyncio.create_task(
        get(setup.client, "public/app", DIGEST, Authorization="Bearer n")
    )
    await settled(setup.cache_dir)
    # Meanwhile other blobs fill the cache and evict the first.
    for digest in (OTHER_DIGEST, THIRD_DIGEST):
        await (await get(setup.client, "public/app", digest)).read()
        await settled(setup.cache_dir)
    response = await newcomer
    assert response.status == 200
    assert await response.read() == DATA


async def test_a_media_type_with_parameters_is_kept_bare(
    proxy_for: ProxyFor,
) -> None:
    setup = await proxy_for()
    setup.registry.content_type = f"{OCI}; charset=utf-8"
    for _ in range(3):
        assert await (await manifest(setup.client, "public/app", MANIFEST_DIGEST)).read()
    page = await (await setup.client.get("/metrics")).text()
    assert 'registry_proxy_cache_requests_total{kind="manifest",outcome="miss"} 1.0' in page
    assert 'registry_proxy_cache_requests_total{kind="manifest",outcome="hit"} 2.0' in page
    warm = await manifest(setup.client, "public/app", MANIFEST_DIGEST)
    assert warm.headers["Content-Type"] == OCI


async def test_a_manifest_already_kept_is_not_counted_again(proxy_for: ProxyFor) -> None:
    setup = await proxy_for()
    docker = "application/vnd.docker.distribution.manifest.v2+json"
    setup.registry.content_type = docker
    # Clients whose Accept lacks the kept type go upstream each time.
    for _ in range(3):
        await (await manifest(setup.client, "public/app", MANIFEST_DIGEST)).read()
    page = await (await setup.client.get("/metrics")).text()
    assert 'registry_proxy_cache_requests_total{kind="manifest",outcome="miss"} 1.0' in page


async def test_conditional_requests_go_upstream(proxy_for: ProxyFor) -> None:
    setup = await proxy_for()
    setup.registry.etag = f'"{MANIFEST_DIGEST}"'
    await (await manifest(setup.client, "public/app", MANIFEST_DIGEST)).read()
    conditional = await manifest(
        setup.client, "public/app", MANIFEST_DIGEST, **{"If-None-Match": setup.registry.etag}
    )
    assert conditional.status == 304


async def test_offline_a_token_the_proxy_refuses_gets_nothing_from_the_cache(
    proxy_for: ProxyFor, tmp_path: Path
) -> None:
    key = generate_signing_key()
    (tmp_path / "issuer.pem").write_bytes(key.certificate_pem)
    setup = await proxy_for(token_public_key=str(tmp_path / "issuer.pem"), token_audience="reg")
    now = int(time.time())
    entry = {"type": "repository", "name": "public/app", "actions": ["pull"]}
    # Inside the verifier's leeway now, outside it two seconds later.
    claims = {"aud": "reg", "exp": now - 29, "nbf": now - 100, "jti": uuid.uuid4().hex}
    token = f"Bearer {key.sign({**claims, 'access': [entry]})}"
    first = await manifest(setup.client, "public/app", MANIFEST_DIGEST, Authorization=token)
    assert await first.read() == MANIFEST
    await asyncio.sleep(2.5)
    await setup.upstream.close()
    offline = await manifest(setup.client, "public/app", MANIFEST_DIGEST, Authorization=token)
    assert offline.status == 503


async def test_a_disk_that_fills_up_mid_download_cuts_it_once_then_relays(
    proxy_for: ProxyFor, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = await proxy_for()
    monkeypatch.setattr(disk_store, "FILL_PAUSE_SECONDS", 0.5)
    written = download._store

    def full(descriptor: int, chunk: bytes, offset: int) -> bytes:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(download, "_store", full)
    first = await get(setup.client, "public/app", DIGEST)
    with pytest.raises(aiohttp.ClientPayloadError):
        await first.read()
    # Meanwhile, nothing is written: the blob is relayed whole.
    again = await get(setup.client, "public/app", DIGEST)
    assert await again.read() == DATA
    await settled(setup.cache_dir)
    assert cached_files(setup.cache_dir) == []
    # Once the pause is over, the cache fills again.
    monkeypatch.setattr(download, "_store", written)
    await asyncio.sleep(0.6)
    assert await (await get(setup.client, "public/app", DIGEST)).read() == DATA
    await settled(setup.cache_dir)
    assert cached_files(setup.cache_dir) == [DIGEST.removeprefix("sha256:")]


async def test_a_download_whose_only_client_left_early_stops(proxy_for: ProxyFor) -> None:
    setup = await proxy_for()
    setup.registry.slow = True
    response = await get(setup.client, "public/app", DIGEST)
    assert response.status == 200
    response.close()  # gone with the headers: nothing of it arrived yet
    for _ in range(40):
        if setup.registry.cut:
            break
        await asyncio.sleep(0.05)
    assert setup.registry.cut == [f"public/app@{DIGEST}"]
    await settled(setup.cache_dir)
    assert cached_files(setup.cache_dir) == []
    assert list((setup.cache_dir / "tmp").iterdir()) == []


async def test_a_download_mostly_there_when_its_client_left_is_kept(proxy_for: ProxyFor) -> None:
    setup = await proxy_for()
    setup.registry.slow = True
    response = await get(setup.client, "public/app", DIGEST)
    received = 0
    while received < len(DATA) * 0.6:
        received += len(await response.content.readany())
    response.close()
    for _ in range(40):
        if cached_files(setup.cache_dir):
            break
        await asyncio.sleep(0.05)
    assert cached_files(setup.cache_dir) == [DIGEST.removeprefix("sha256:")]
    assert setup.registry.cut == []


@pytest.mark.parametrize(
    ("wanted", "status", "content_range", "part"),
    [
        ("bytes=100-1123", 206, f"bytes 100-1123/{len(DATA)}", DATA[100:1124]),
        (
            f"bytes={len(DATA) - 10}-",
            206,
            f"bytes {len(DATA) - 10}-{len(DATA) - 1}/{len(DATA)}",
            DATA[-10:],
        ),
        ("bytes=-5", 206, f"bytes {len(DATA) - 5}-{len(DATA) - 1}/{len(DATA)}", DATA[-5:]),
        (f"bytes={len(DATA)}-", 416, f"bytes */{len(DATA)}", b""),
        ("bytes=500-0", 416, f"bytes */{len(DATA)}", b""),
    ],
)
async def test_a_range_joining_a_download_gets_exactly_that_range(
    proxy_for: ProxyFor, wanted: str, status: int, content_range: str, part: bytes
) -> None:
    setup = await proxy_for()
    setup.registry.slow = True
    first = await get(setup.client, "public/app", DIGEST)
    ranged = await get(setup.client, "public/app", DIGEST, Range=wanted)
    assert ranged.status == status
    assert ranged.headers["Content-Range"] == content_range
    if status == 416:
        assert (await ranged.json())["errors"][0]["code"] == "RANGE_INVALID"
    else:
        assert await ranged.read() == part
    assert await first.read() == DATA
    assert setup.registry.gets == [f"public/app@{DIGEST}"]


async def test_with_the_upstream_down_an_uncached_blob_is_503(proxy_for: ProxyFor) -> None:
    setup = await proxy_for()
    await setup.upstream.close()
    response = await get(setup.client, "public/app", DIGEST)
    assert response.status == 503
    error = (await response.json())["errors"][0]
    assert error["code"] == "UNAVAILABLE"
    assert "the cache does not hold this" in error["message"]


async def test_concurrent_gets_of_a_blob_not_kept_are_all_relayed(proxy_for: ProxyFor) -> None:
    # Smaller than twice the blob: relayed, not kept.
    setup = await proxy_for(cache_max_size=len(DATA))
    setup.registry.slow_heads = True
    answers = await asyncio.gather(*(get(setup.client, "public/app", DIGEST) for _ in range(3)))
    assert [answer.status for answer in answers] == [200, 200, 200]
    assert [await answer.read() for answer in answers] == [DATA] * 3


async def test_concurrent_refused_gets_are_each_refused_and_leak_nothing(
    proxy_for: ProxyFor,
) -> None:
    setup = await proxy_for()

    async def round_of_three() -> list[int]:
        answers = await asyncio.gather(
            *(get(setup.client, "private/app", DIGEST) for _ in range(3))
        )
        for answer in answers:
            await answer.read()
        return [answer.status for answer in answers]

    assert await round_of_three() == [401, 401, 401]
    gc.collect()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(30):
        assert await round_of_three() == [401, 401, 401]
    await asyncio.sleep(0.3)
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) - before < 10


async def test_kept_blobs_evicted_while_served_are_served_whole(proxy_for: ProxyFor) -> None:
    # Room for two of the three blobs: every fill evicts the least recently used.
    setup = await proxy_for(cache_max_size=int(len(DATA) * 2.5))
    blobs = {DIGEST: DATA, OTHER_DIGEST: OTHER, THIRD_DIGEST: THIRD}
    for _ in range(15):
        digests = list(blobs) * 3
        answers = await asyncio.gather(*(get(setup.client, "public/app", d) for d in digests))
        for digest, answer in zip(digests, answers, strict=True):
            assert answer.status == 200
            assert await answer.read() == blobs[digest]


async def test_a_kept_file_that_no_longer_matches_its_digest_is_not_served(
    proxy_for: ProxyFor, tmp_path: Path
) -> None:
    kept = tmp_path / "cache" / "blobs" / "sha256"
    kept.mkdir(parents=True)
    (kept / DIGEST.removeprefix("sha256:")).write_bytes(b"\0" * len(DATA))
    setup = await proxy_for()
    response = await get(setup.client, "public/app", DIGEST)
    assert await response.read() == DATA
    assert setup.registry.gets == [f"public/app@{DIGEST}"]  # fetched again
    await settled(setup.cache_dir)
    assert (kept / DIGEST.removeprefix("sha256:")).read_bytes() == DATA


async def test_a_client_leaving_a_growing_download_is_no_error(
    proxy_for: ProxyFor, caplog: pytest.LogCaptureFixture
) -> None:
    setup = await proxy_for()
    setup.registry.slow = True
    response = await get(setup.client, "public/app", DIGEST)
    assert response.status == 200
    await response.content.readany()
    assert response.connection is not None
    assert response.connection.transport is not None
    response.connection.transport.abort()  # the client goes away (reset), mid-body
    response.close()
    await asyncio.sleep(1)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    ("headers", "status", "body"),
    [
        ({"Range": "bytes=0-9"}, 206, DATA[:10]),
        ({"Range": "bytes=0-1,5-6"}, 200, DATA),
        ({"Range": "Bytes=0-1"}, 416, None),
        ({"Range": "bytes=-0"}, 416, None),
        ({"If-None-Match": f'"{DIGEST}"'}, 304, b""),
        ({"If-Range": f'"{DIGEST}"', "Range": "bytes=5-9"}, 206, DATA[5:10]),
        ({"If-Range": '"other"', "Range": "bytes=5-9"}, 200, DATA),
    ],
)
async def test_a_kept_blob_answers_ranges_and_conditions_as_a_growing_one_does(
    proxy_for: ProxyFor, headers: dict[str, str], status: int, body: bytes | None
) -> None:
    setup = await proxy_for()
    setup.registry.slow = True
    first = await get(setup.client, "public/app", DIGEST)
    growing = await get(setup.client, "public/app", DIGEST, **headers)
    assert await first.read() == DATA
    await settled(setup.cache_dir)
    kept = await get(setup.client, "public/app", DIGEST, **headers)
    for answer in (growing, kept):
        assert answer.status == status
        assert answer.headers["Etag"] == f'"{DIGEST}"'
        if body is None:
            assert (await answer.json())["errors"][0]["code"] == "RANGE_INVALID"
        else:
            assert await answer.read() == body
    assert setup.registry.gets == [f"public/app@{DIGEST}"]


async def test_a_range_on_a_kept_blob_after_the_confirmation_expired_is_answered_from_it(
    proxy_for: ProxyFor, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = await proxy_for()
    assert await (await get(setup.client, "public/app", DIGEST)).read() == DATA
    await settled(setup.cache_dir)
    monkeypatch.setattr(confirmations, "CONFIRMATION_SECONDS", 0.0)
    await asyncio.sleep(0.01)
    ranged = await get(setup.client, "public/app", DIGEST, Range="bytes=0-9")
    assert ranged.status == 206
    assert await ranged.read() == DATA[:10]
    assert setup.registry.gets == [f"public/app@{DIGEST}"]
    assert len(setup.registry.heads) == 1  # the confirmation, asked without the Range
