"""Edge mode's token realm: the proxy names itself and passes token requests on."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from balena_registry_proxy.config import Settings
from balena_registry_proxy.forwarded import parse_trust_proxy

from .conftest import serve_proxy

Client = TestClient[web.Request, web.Application]


async def setup(
    aiohttp_server: Callable[..., Awaitable[Any]],
    aiohttp_client: Callable[..., Awaitable[Client]],
    seen: list[tuple[str, str | None]],
    **settings: Any,
) -> Client:
    async def token(request: web.Request) -> web.Response:
        seen.append((request.rel_url.raw_query_string, request.headers.get("Authorization")))
        return web.json_response({"token": "issued-token"})

    auth_app = web.Application()
    auth_app.router.add_get("/auth/v1/token", token)
    auth = await aiohttp_server(auth_app)
    realm = str(auth.make_url("/auth/v1/token"))

    async def challenge(request: web.Request) -> web.Response:
        header = f'Bearer realm="{realm}",service="registry.test"'
        return web.json_response({"errors": []}, status=401, headers={"WWW-Authenticate": header})

    registry_app = web.Application()
    registry_app.router.add_get("/{tail:.*}", challenge)
    registry = await aiohttp_server(registry_app)
    config = Settings(
        registry_url=str(registry.make_url("")).rstrip("/"), proxy_auth=True, **settings
    )
    return await serve_proxy(config, aiohttp_client)


async def test_challenge_names_the_proxy_and_tokens_pass_through(
    aiohttp_server: Callable[..., Awaitable[Any]],
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> None:
    seen: list[tuple[str, str | None]] = []
    client = await setup(aiohttp_server, aiohttp_client, seen)
    response = await client.get("/v2/")
    assert response.status == 401
    own = f"http://{client.host}:{client.port}/auth/v1/token"
    assert response.headers["WWW-Authenticate"] == f'Bearer realm="{own}",service="registry.test"'
    query = "account=alice&scope=repository:org/app:pull&service=registry.test"
    token = await client.get(
        f"/auth/v1/token?{query}", headers={"Authorization": "Basic YWxpY2U6a2V5"}
    )
    assert token.status == 200
    assert await token.json() == {"token": "issued-token"}
    assert seen == [(query, "Basic YWxpY2U6a2V5")]


async def test_token_requests_before_any_challenge_learn_the_realm(
    aiohttp_server: Callable[..., Awaitable[Any]],
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> None:
    seen: list[tuple[str, str | None]] = []
    client = await setup(aiohttp_server, aiohttp_client, seen)
    token = await client.get("/auth/v1/token?service=registry.test")
    assert await token.json() == {"token": "issued-token"}
    assert seen == [("service=registry.test", None)]


async def test_behind_a_tls_terminator_the_realm_uses_the_forwarded_origin(
    aiohttp_server: Callable[..., Awaitable[Any]],
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> None:
    seen: list[tuple[str, str | None]] = []
    client = await setup(
        aiohttp_server, aiohttp_client, seen, trust_proxy=parse_trust_proxy("loopback")
    )
    response = await client.get(
        "/v2/",
        headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "uuid.balena-devices.com"},
    )
    assert (
        'realm="https://uuid.balena-devices.com/auth/v1/token"'
        in response.headers["WWW-Authenticate"]
    )


async def test_a_storage_host_cannot_become_the_realm(
    aiohttp_server: Callable[..., Awaitable[Any]],
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> None:
    """A blob redirect leads to a host that answers with its own challenge: the proxy must not
    send the next client's credentials there."""
    stolen: list[str | None] = []

    async def hostile(request: web.Request) -> web.Response:
        if request.path == "/steal":
            stolen.append(request.headers.get("Authorization"))
            return web.json_response({"token": "x"})
        evil = f"http://{request.host}/steal"
        header = f'Bearer realm="{evil}",service="registry.test"'
        return web.json_response({"errors": []}, status=401, headers={"WWW-Authenticate": header})

    storage_app = web.Application()
    storage_app.router.add_get("/{tail:.*}", hostile)
    storage = await aiohttp_server(storage_app)
    real_realm: list[str] = []

    async def registry(request: web.Request) -> web.Response:
        if request.path.startswith("/v2/org/app/blobs/"):
            return web.Response(status=307, headers={"Location": str(storage.make_url("/blob"))})
        header = f'Bearer realm="{real_realm[0]}",service="registry.test"'
        return web.json_response({"errors": []}, status=401, headers={"WWW-Authenticate": header})

    async def token(request: web.Request) -> web.Response:
        return web.json_response({"token": "issued-token"})

    auth_app = web.Application()
    auth_app.router.add_get("/auth/v1/token", token)
    auth = await aiohttp_server(auth_app)
    real_realm.append(str(auth.make_url("/auth/v1/token")))
    registry_app = web.Application()
    registry_app.router.add_get("/{tail:.*}", registry)
    upstream = await aiohttp_server(registry_app)
    config = Settings(registry_url=str(upstream.make_url("")).rstrip("/"), proxy_auth=True)
    client = await serve_proxy(config, aiohttp_client)
    blob = await client.get("/v2/org/app/blobs/sha256:" + "a" * 64)
    assert blob.status == 401
    assert "WWW-Authenticate" not in blob.headers  # a storage host names no realm to clients
    answer = await client.get(
        "/auth/v1/token?service=registry.test", headers={"Authorization": "Basic YWxpY2U6a2V5"}
    )
    assert await answer.json() == {"token": "issued-token"}
    assert stolen == []
