"""Resolver mode in process, in front of the sandbox: its real registry, token service and /v7 API.

What a client sees: the proxy's token endpoint, listings, tags that pull their release, services
of multi-container releases, digests under tag-chosen names, and what it costs the API.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from balena_registry_proxy.balena_api import BalenaApi
from balena_registry_proxy.config import Settings
from balena_registry_proxy.envelope import Envelope, Sealer, derive_key
from balena_registry_proxy.release_names import KEYWORDS
from balena_registry_proxy.sandbox import Sandbox
from balena_registry_proxy.sandbox.catalog import App, ReleaseStatus
from balena_registry_proxy.sandbox.ports import free_port
from balena_registry_proxy.sandbox.token_service import DEFAULT_EXPIRY_SECONDS

from .conftest import serve_proxy

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]
ALICE = ("alice", "alice-sandbox-api-key-0001")
MALLORY = ("mallory", "mallory-sandbox-api-key-0003")
SEAL_KEY = "resolver-tests-seal-secret"
ACCEPT = ", ".join(
    (
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    )
)


def settings(sandbox: Sandbox, **more: Any) -> Settings:
    options = {
        "registry_url": sandbox.registry_url,
        "resolve": True,
        "api_url": sandbox.api_url,
        "token_seal_key": SEAL_KEY,
        **more,
    }
    return Settings(**options)


Route = tuple[str, Callable[[web.Request], Awaitable[web.StreamResponse]]]


async def stub_url(aiohttp_server: Callable[..., Awaitable[Any]], *routes: Route) -> str:
    """The URL of a stand-in server (for the API, the registry or its realm) that answers
    GETs of each path pattern with its handler."""
    stub = web.Application()
    for path, handler in routes:
        stub.router.add_get(path, handler)
    server = await aiohttp_server(stub)
    return str(server.make_url("")).rstrip("/")


@pytest.fixture
async def proxy(sandbox: Sandbox, aiohttp_client: MakeClient) -> Client:
    return await serve_proxy(settings(sandbox), aiohttp_client)


def basic(credentials: tuple[str, str]) -> str:
    return "Basic " + base64.b64encode(":".join(credentials).encode()).decode()


async def login(client: Client, credentials: tuple[str, str] | None = None) -> str:
    headers = {"Authorization": basic(credentials)} if credentials else {}
    answer = await client.get("/auth/v1/token?service=registry.sandbox.test", headers=headers)
    assert answer.status == 200, await answer.text()
    token: str = (await answer.json())["token"]
    return token


async def get(client: Client, token: str, path: str, method: str = "GET") -> Any:
    headers = {"Authorization": f"Bearer {token}", "Accept": ACCEPT}
    return await client.request(method, path, headers=headers)


async def api_requests(client: Client) -> float:
    """The balena API requests the proxy counted so far."""
    text = await (await client.get("/metrics")).text()
    found = re.search(r'^registry_proxy_api_requests_total\{outcome="ok"\} (\S+)$', text, re.M)
    return float(found[1]) if found else 0.0


def listed(app: App) -> list[str]:
    """The tags a listing of ``app`` shows, from the catalog itself."""
    good = [r for r in app.releases if r.status is ReleaseStatus.SUCCESS]
    tags = {r.semver for r in good if r.is_final and not r.invalidated}
    pinned = app.pinned_release
    if pinned is not None and pinned.status is ReleaseStatus.SUCCESS:
        tags |= KEYWORDS
    return sorted(tags)


async def test_the_root_shows_the_forms_of_resolver_mode(proxy: Client) -> None:
    response = await proxy.get("/", headers={"Host": "proxy.example"})
    text = await response.text()
    assert "docker pull proxy.example/<org>/<app>:<version>" in text
    assert "docker pull proxy.example/<org>/<app>[/<version>]/<service>" in text
    assert "skopeo list-tags docker://proxy.example/<org>/<app>" in text


async def test_the_token_answer(proxy: Client) -> None:
    answer = await proxy.get("/auth/v1/token", headers={"Authorization": basic(ALICE)})
    assert answer.status == 200
    assert answer.headers["Cache-Control"] == "no-store"
    document = await answer.json()
    assert document["token"] == document["access_token"]
    assert document["token"].startswith("brp1.")
    assert ALICE[1] not in document["token"]
    # Clients are told a minute less than the realm's token lasts.
    assert document["expires_in"] == DEFAULT_EXPIRY_SECONDS - 60
    issued = time.mktime(time.strptime(document["issued_at"], "%Y-%m-%dT%H:%M:%SZ"))
    assert abs(issued - time.mktime(time.gmtime())) < 60


async def test_a_wrong_key_gets_the_realms_refusal(proxy: Client) -> None:
    answer = await proxy.get("/auth/v1/token", headers={"Authorization": basic(("a", "wrong"))})
    assert answer.status == 401


async def test_the_base_endpoint_accepts_the_proxy_token(proxy: Client) -> None:
    token = await login(proxy, ALICE)
    answer = await get(proxy, token, "/v2/")
    assert answer.status == 200


async def test_an_unknown_or_expired_proxy_token_is_challenged(proxy: Client) -> None:
    answer = await get(
        proxy, "brp1.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "/v2/gh_acme/web/tags/list"
    )
    assert answer.status == 401
    challenge = answer.headers["WWW-Authenticate"]
    assert f'realm="http://{proxy.host}:{proxy.port}/auth/v1/token"' in challenge
    assert 'scope="repository:gh_acme/web:pull"' in challenge
    assert 'error="invalid_token"' in challenge


async def test_a_token_sealed_with_another_key_does_not_open(
    sandbox: Sandbox, proxy: Client, aiohttp_client: MakeClient
) -> None:
    other = await serve_proxy(
        settings(sandbox, token_seal_key="another-seal-secret-xx"), aiohttp_client
    )
    token = await login(other)
    assert (await get(proxy, token, "/v2/gh_acme/web/tags/list")).status == 401


@pytest.mark.parametrize("slug", ["gh_acme/web", "gh_acme/multi", "gh_acme/browser-aarch64"])
async def test_listing_then_pulling_every_listed_tag(
    sandbox: Sandbox, proxy: Client, slug: str
) -> None:
    token = await login(proxy)
    answer = await get(proxy, token, f"/v2/{slug}/tags/list")
    assert answer.status == 200
    document = await answer.json()
    app = sandbox.catalog.app(slug)
    assert app is not None
    assert document == {"name": slug, "tags": listed(app)}
    for tag in document["tags"]:
        manifest = await get(proxy, token, f"/v2/{slug}/manifests/{tag}")
        assert manifest.status == 200, (tag, await manifest.text())
        expected = sandbox.expected_images(f"{slug}/{tag}")
        (image,) = expected.values()
        body = await manifest.read()
        assert "sha256:" + hashlib.sha256(body).hexdigest() == image.digest
        assert manifest.headers["Docker-Content-Digest"] == image.digest


async def test_drafts_commits_and_invalidated_releases_pull_though_unlisted(
    sandbox: Sandbox, proxy: Client
) -> None:
    token = await login(proxy)
    web_app = sandbox.catalog.app("gh_acme/web")
    stack = sandbox.catalog.app("gh_acme/stack")
    assert web_app is not None
    assert stack is not None
    draft = next(r for r in web_app.releases if not r.is_final)
    invalidated = next(r for r in stack.releases if r.invalidated)
    pulls = [
        ("gh_acme/web", draft.raw_version),
        ("gh_acme/web", web_app.releases[0].commit),
        ("gh_acme/stack/api", invalidated.semver),
    ]
    for name, tag in pulls:
        answer = await get(proxy, token, f"/v2/{name}/manifests/{tag}")
        assert answer.status == 200, (name, tag)
        app_slug, _, service = name.partition("/")[2].partition("/")
        images = sandbox.expected_images(f"gh_acme/{app_slug}/{tag}")
        expected = images[service] if service else next(iter(images.values()))
        assert answer.headers["Docker-Content-Digest"] == expected.digest


async def test_each_service_of_a_multi_container_release(sandbox: Sandbox, proxy: Client) -> None:
    token = await login(proxy)
    images = sandbox.expected_images("gh_acme/stack")
    assert set(images) == {"frontend", "api", "db"}
    for service, image in images.items():
        for name, tag in (
            (f"gh_acme/stack/{service}", "latest"),
            (f"gh_acme/stack/latest/{service}", "anything"),
        ):
            manifest = await get(proxy, token, f"/v2/{name}/manifests/{tag}")
            assert manifest.status == 200
            assert manifest.headers["Docker-Content-Digest"] == image.digest
            config = json.loads(await manifest.read())["config"]["digest"]
            blob = await get(proxy, token, f"/v2/{name}/blobs/{config}")
            assert blob.status == 200
            assert "sha256:" + hashlib.sha256(await blob.read()).hexdigest() == config


async def test_an_unknown_service_names_the_services(proxy: Client) -> None:
    token = await login(proxy)
    answer = await get(proxy, token, "/v2/gh_acme/stack/nope/manifests/latest")
    assert answer.status == 404
    (error,) = (await answer.json())["errors"]
    assert error["code"] == "NAME_UNKNOWN"
    assert "api, db, frontend" in error["message"]
    assert error["detail"]["services"] == ["api", "db", "frontend"]


async def test_digests_under_a_tag_chosen_name_come_from_that_release(
    sandbox: Sandbox, proxy: Client, aiohttp_client: MakeClient
) -> None:
    """A pull of ``gh_acme/web:1.3.0`` asks for its blobs under ``gh_acme/web``; on a replica
    that never saw the tag, the release is found by reading manifests."""
    token = await login(proxy)
    wanted = next(iter(sandbox.expected_images("gh_acme/web/1.3.0").values()))
    pinned = next(iter(sandbox.expected_images("gh_acme/web").values()))
    assert wanted.digest != pinned.digest
    manifest = await get(proxy, token, "/v2/gh_acme/web/manifests/1.3.0")
    layers = [entry["digest"] for entry in json.loads(await manifest.read())["layers"]]
    assert layers == list(wanted.manifest.layer_digests)
    own = set(layers) - set(pinned.manifest.layer_digests)
    assert own, "the catalog's releases should differ in a layer"
    other_replica = await serve_proxy(settings(sandbox), aiohttp_client)
    for replica in (proxy, other_replica):
        for digest in sorted(own):
            blob = await get(replica, token, f"/v2/gh_acme/web/blobs/{digest}")
            assert blob.status == 200
            assert "sha256:" + hashlib.sha256(await blob.read()).hexdigest() == digest
    unknown = await get(proxy, token, "/v2/gh_acme/web/blobs/sha256:" + "0" * 64)
    assert unknown.status == 404
    assert (await unknown.json())["errors"][0]["code"] == "BLOB_UNKNOWN"


async def test_a_manifest_by_digest_where_the_api_gives_no_content_hash(
    sandbox: Sandbox, proxy: Client, aiohttp_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Images built before balena recorded ``content_hash`` have none: their tag goes to the
    repository's ``latest``, and the digest that answered must be found again."""
    asked = BalenaApi.app

    async def without_hashes(api: BalenaApi, slug: str, envelope: Envelope, rid: str) -> Any:
        app = await asked(api, slug, envelope, rid)
        if app is None:
            return None
        releases = tuple(
            replace(r, images=tuple(replace(i, content_hash=None) for i in r.images))
            for r in app.releases
        )
        return replace(app, releases=releases)

    monkeypatch.setattr(BalenaApi, "app", without_hashes)
    replica = await serve_proxy(settings(sandbox), aiohttp_client)
    token = await login(replica)
    wanted = next(iter(sandbox.expected_images("gh_acme/web/1.3.0").values()))
    head = await get(replica, token, "/v2/gh_acme/web/manifests/1.3.0", method="HEAD")
    assert head.headers["Docker-Content-Digest"] == wanted.digest
    for name in ("gh_acme/web", "gh_acme/web/1.3.0"):
        again = await get(replica, token, f"/v2/{name}/manifests/{wanted.digest}")
        assert again.status == 200, name
        assert "sha256:" + hashlib.sha256(await again.read()).hexdigest() == wanted.digest


async def test_a_multi_platform_index_by_tag_and_its_children_by_digest(
    sandbox: Sandbox, proxy: Client, aiohttp_client: MakeClient
) -> None:
    token = await login(proxy)
    (image,) = sandbox.expected_images("gh_acme/multi").values()
    assert image.platform_manifests
    index = await get(proxy, token, "/v2/gh_acme/multi/manifests/latest")
    assert index.headers["Docker-Content-Digest"] == image.digest
    other_replica = await serve_proxy(settings(sandbox), aiohttp_client)
    for child in image.platform_manifests.values():
        answer = await get(other_replica, token, f"/v2/gh_acme/multi/manifests/{child.digest}")
        assert answer.status == 200
        assert answer.headers["Docker-Content-Digest"] == child.digest


async def test_private_apps(proxy: Client) -> None:
    anonymous = await login(proxy)
    refused = await get(proxy, anonymous, "/v2/gh_acme/secret/tags/list")
    assert refused.status == 401
    assert 'scope="repository:gh_acme/secret:pull"' in refused.headers["WWW-Authenticate"]
    assert "docker login" in (await refused.json())["errors"][0]["message"]
    alice = await login(proxy, ALICE)
    allowed = await get(proxy, alice, "/v2/gh_acme/secret/tags/list")
    assert allowed.status == 200
    assert "latest" in (await allowed.json())["tags"]
    assert (await get(proxy, alice, "/v2/gh_acme/secret/manifests/latest")).status == 200
    # Another org's member reads it as unknown.
    mallory = await login(proxy, MALLORY)
    hidden = await get(proxy, mallory, "/v2/gh_acme/secret/manifests/latest")
    assert hidden.status == 404
    assert (await hidden.json())["errors"][0]["code"] == "NAME_UNKNOWN"


async def test_a_pull_costs_one_api_query_per_name_and_caller(proxy: Client) -> None:
    before = await api_requests(proxy)
    anonymous, alice = await login(proxy), await login(proxy, ALICE)
    for token in (anonymous, alice, anonymous, alice):
        manifest = await get(proxy, token, "/v2/gh_acme/web/manifests/1.3.0")
        config = json.loads(await manifest.read())["config"]["digest"]
        assert (await get(proxy, token, f"/v2/gh_acme/web/blobs/{config}")).status == 200
        assert (await get(proxy, token, "/v2/gh_acme/web/tags/list")).status == 200
    assert await api_requests(proxy) - before == 2


async def test_an_app_the_api_does_not_show_costs_one_query_too(proxy: Client) -> None:
    before = await api_requests(proxy)
    anonymous = await login(proxy)
    for _ in range(5):
        answer = await get(proxy, anonymous, "/v2/gh_acme/secret/tags/list")
        assert answer.status == 401
    assert await api_requests(proxy) - before == 1


async def test_pagination(sandbox: Sandbox, proxy: Client) -> None:
    token = await login(proxy)
    app = sandbox.catalog.app("gh_acme/web")
    assert app is not None
    seen: list[str] = []
    path = "/v2/gh_acme/web/tags/list?n=2"
    while path:
        answer = await get(proxy, token, path)
        seen += (await answer.json())["tags"]
        link = answer.headers.get("Link")
        path = link[1 : link.index(">")] if link else ""
    assert seen == listed(app)


async def test_alias_mode_tokens_still_work_in_resolver_mode(
    sandbox: Sandbox, proxy: Client
) -> None:
    """A client holding a token straight from the balena API keeps getting alias mode."""
    async with aiohttp.ClientSession() as session:
        query = f"service={sandbox.service}&scope=repository:gh_acme/web:pull"
        async with session.get(f"{sandbox.token_url}?{query}") as answer:
            token = (await answer.json())["token"]
    manifest = await get(proxy, token, "/v2/gh_acme/web/manifests/latest")
    assert manifest.status == 200
    (image,) = sandbox.expected_images("gh_acme/web").values()
    assert manifest.headers["Docker-Content-Digest"] == image.digest


async def test_an_expired_proxy_token_is_challenged(proxy: Client) -> None:
    now = int(time.time())
    expired = Sealer(derive_key(SEAL_KEY)).seal(Envelope(None, None, "x", now - 1))
    answer = await get(proxy, expired, "/v2/gh_acme/web/manifests/latest")
    assert answer.status == 401
    assert 'error="invalid_token"' in answer.headers["WWW-Authenticate"]


async def test_a_revoked_key_is_asked_to_log_in_again(proxy: Client) -> None:
    # A proxy token outlives the key inside it: the realm refuses the key (the API reads an
    # unknown bearer as a guest's), and the client is sent to log in, not told of a fault.
    now = int(time.time())
    revoked = Envelope("alice", "revoked-api-key-0000", "x", now + 600)
    token = Sealer(derive_key(SEAL_KEY)).seal(revoked)
    answer = await get(proxy, token, "/v2/gh_acme/web/manifests/latest")
    assert answer.status == 401
    assert "no longer accepts" in (await answer.json())["errors"][0]["message"]
    challenge = answer.headers["WWW-Authenticate"]
    assert 'error="invalid_token"' in challenge
    assert 'scope="repository:gh_acme/web:pull"' in challenge


async def test_an_api_refusing_the_key_is_asked_to_log_in_again(
    sandbox: Sandbox, aiohttp_client: MakeClient, aiohttp_server: Callable[..., Awaitable[Any]]
) -> None:
    async def refuse(request: web.Request) -> web.Response:
        return web.Response(status=401)

    api_url = await stub_url(aiohttp_server, ("/{tail:.*}", refuse))
    client = await serve_proxy(settings(sandbox, api_url=api_url), aiohttp_client)
    token = await login(client, ALICE)
    answer = await get(client, token, "/v2/gh_acme/web/tags/list")
    assert answer.status == 401
    assert 'error="invalid_token"' in answer.headers["WWW-Authenticate"]


@pytest.mark.parametrize("path", ["/v2/", "/v2/_catalog"])
async def test_a_token_that_does_not_open_is_challenged_outside_repositories_too(
    proxy: Client, path: str
) -> None:
    answer = await get(proxy, "brp1.AAAA", path)
    assert answer.status == 401
    challenge = answer.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="http://')
    assert "/auth/v1/token" in challenge
    assert "scope=" not in challenge


async def test_basic_credentials_never_reach_the_registry(
    sandbox: Sandbox, aiohttp_client: MakeClient, aiohttp_server: Callable[..., Awaitable[Any]]
) -> None:
    seen: list[str | None] = []

    async def registry(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.Response(status=401, headers={"WWW-Authenticate": 'Bearer realm="x"'})

    registry_url = await stub_url(aiohttp_server, ("/{tail:.*}", registry))
    client = await serve_proxy(settings(sandbox, registry_url=registry_url), aiohttp_client)
    answer = await client.get(
        "/v2/gh_acme/web/manifests/latest", headers={"Authorization": basic(ALICE)}
    )
    assert answer.status == 401
    assert seen == [None]


async def test_a_rate_limited_realm_is_relayed_with_its_retry_after(
    sandbox: Sandbox, aiohttp_client: MakeClient, aiohttp_server: Callable[..., Awaitable[Any]]
) -> None:
    async def registry(request: web.Request) -> web.Response:
        realm = f"http://{request.host}/auth/v1/token"
        challenge = f'Bearer realm="{realm}",service="registry.example"'
        return web.Response(status=401, headers={"WWW-Authenticate": challenge})

    async def realm(request: web.Request) -> web.Response:
        if "scope" in request.query:
            return web.Response(status=429, headers={"Retry-After": "42"})
        return web.json_response({"token": "eyJhbGciOiJub25lIn0.e30."})

    registry_url = await stub_url(
        aiohttp_server, ("/auth/v1/token", realm), ("/{tail:.*}", registry)
    )
    client = await serve_proxy(settings(sandbox, registry_url=registry_url), aiohttp_client)
    token = await login(client)
    answer = await get(client, token, "/v2/gh_acme/web/manifests/latest")
    assert answer.status == 429
    assert answer.headers["Retry-After"] == "42"
    assert (await answer.json())["errors"][0]["code"] == "TOOMANYREQUESTS"


async def test_head_of_a_listing(proxy: Client) -> None:
    token = await login(proxy)
    answer = await get(proxy, token, "/v2/gh_acme/web/tags/list", method="HEAD")
    assert answer.status == 200
    assert await answer.read() == b""


async def test_the_api_unreachable_is_a_503_naming_it(
    sandbox: Sandbox, aiohttp_client: MakeClient
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    client = await serve_proxy(settings(sandbox, api_url=closed), aiohttp_client)
    token = await login(client)
    answer = await get(client, token, "/v2/gh_acme/web/manifests/latest")
    assert answer.status == 503
    (error,) = (await answer.json())["errors"]
    assert error["code"] == "UNAVAILABLE"
    assert "balena API (127.0.0.1)" in error["message"]


@pytest.mark.parametrize(
    ("status", "headers", "expected", "words"),
    [
        (429, {"Retry-After": "17"}, 429, "fewer requests"),
        (500, {}, 503, "answered 500"),
        (200, {}, 503, "not JSON"),
    ],
)
async def test_api_refusals(
    sandbox: Sandbox,
    aiohttp_client: MakeClient,
    aiohttp_server: Callable[..., Awaitable[Any]],
    status: int,
    headers: dict[str, str],
    expected: int,
    words: str,
) -> None:
    async def refuse(request: web.Request) -> web.Response:
        return web.Response(status=status, headers=headers, text="<html>")

    api_url = await stub_url(aiohttp_server, ("/{tail:.*}", refuse))
    client = await serve_proxy(settings(sandbox, api_url=api_url), aiohttp_client)
    token = await login(client)
    answer = await get(client, token, "/v2/gh_acme/web/manifests/latest")
    assert answer.status == expected
    assert words in (await answer.json())["errors"][0]["message"]
    if "Retry-After" in headers:
        assert answer.headers["Retry-After"] == headers["Retry-After"]


async def test_a_slow_api_is_a_503_after_the_timeout(
    sandbox: Sandbox,
    aiohttp_client: MakeClient,
    aiohttp_server: Callable[..., Awaitable[Any]],
) -> None:
    async def silent(request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.Response()

    api_url = await stub_url(aiohttp_server, ("/{tail:.*}", silent))
    client = await serve_proxy(settings(sandbox, api_url=api_url, api_timeout=0.3), aiohttp_client)
    token = await login(client)
    started = time.monotonic()
    answer = await get(client, token, "/v2/gh_acme/web/manifests/latest")
    assert answer.status == 503
    assert "did not answer in time" in (await answer.json())["errors"][0]["message"]
    assert time.monotonic() - started < 5
