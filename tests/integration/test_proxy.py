"""The proxy application against an in-process fake upstream registry."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from balena_registry_proxy.config import Settings
from balena_registry_proxy.forwarded import parse_trust_proxy

from ..tokens import alias_entry, bearer, make_token
from .conftest import (
    ALIAS,
    CHALLENGE,
    MANIFEST,
    MANIFEST_DIGEST,
    MANIFEST_TYPE,
    REAL,
    FakeRegistry,
    serve_proxy,
)

Client = TestClient[web.Request, web.Application]
TOKEN = make_token(alias_entry(ALIAS, REAL))
OCI_ACCEPT = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.index.v1+json",
]


async def raw_get(client: Client, target: str, headers: dict[str, str]) -> tuple[int, bytes]:
    """Send a request target byte for byte, as no URL library would let it through."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    lines = [f"GET {target} HTTP/1.1", f"Host: {client.host}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    response = await reader.read()
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def assert_oci_error(body: dict[str, Any], code: str) -> None:
    """``body`` is the registry's JSON error envelope with ``code`` first."""
    assert set(body) == {"errors"}
    assert body["errors"][0]["code"] == code
    assert set(body["errors"][0]) == {"code", "message", "detail"}
    assert body["errors"][0]["message"]


async def test_ping_answers_pong_with_security_headers(proxy: Client) -> None:
    response = await proxy.get("/ping")
    assert response.status == 200
    assert await response.text() == "pong"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["X-Frame-Options"] == "DENY"


async def test_request_without_token_is_forwarded_unchanged(
    proxy: Client, registry: FakeRegistry
) -> None:
    response = await proxy.get(f"/v2/{ALIAS}/manifests/anytag")
    assert response.status == 404
    assert registry.seen[-1].path_qs == f"/v2/{ALIAS}/manifests/anytag"


async def test_base_challenge_reaches_client_unchanged(
    proxy: Client, registry: FakeRegistry
) -> None:
    response = await proxy.get("/v2/")
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == CHALLENGE
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert_oci_error(await response.json(), "UNAUTHORIZED")
    assert response.headers["X-Frame-Options"] == "DENY"


async def test_manifest_by_tag_goes_to_latest_of_real_repository(
    proxy: Client, registry: FakeRegistry
) -> None:
    headers = [("Accept", a) for a in OCI_ACCEPT] + list(bearer(TOKEN).items())
    response = await proxy.get(f"/v2/{ALIAS}/manifests/v9-ignored", headers=headers)
    assert response.status == 200
    assert await response.read() == MANIFEST
    seen = registry.seen[-1]
    assert seen.path_qs == f"/v2/{REAL}/manifests/latest"
    assert seen.headers.getall("Accept") == OCI_ACCEPT
    assert seen.headers["Authorization"] == f"Bearer {TOKEN}"
    assert response.headers["Docker-Content-Digest"] == MANIFEST_DIGEST
    assert response.headers["Content-Type"] == MANIFEST_TYPE
    assert response.headers["Content-Length"] == str(len(MANIFEST))
    assert response.headers["ETag"] == f'"{MANIFEST_DIGEST}"'
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"


async def test_manifest_by_digest_keeps_its_digest(proxy: Client, registry: FakeRegistry) -> None:
    response = await proxy.get(f"/v2/{ALIAS}/manifests/{MANIFEST_DIGEST}", headers=bearer(TOKEN))
    assert response.status == 200
    assert registry.seen[-1].path_qs == f"/v2/{REAL}/manifests/{MANIFEST_DIGEST}"


async def test_query_string_is_forwarded_verbatim(proxy: Client, registry: FakeRegistry) -> None:
    await proxy.get(f"/v2/{ALIAS}/manifests/latest?ns=bh.cr", headers=bearer(TOKEN))
    assert registry.seen[-1].path_qs == f"/v2/{REAL}/manifests/latest?ns=bh.cr"


async def test_blob_streams_byte_for_byte(
    proxy: Client, registry: FakeRegistry, blob: tuple[Any, bytes]
) -> None:
    _, data = blob
    response = await proxy.get(f"/v2/{ALIAS}/blobs/{registry.blob_digest}", headers=bearer(TOKEN))
    assert response.status == 200
    assert response.headers["Content-Length"] == str(len(data))
    assert response.headers["Docker-Content-Digest"] == registry.blob_digest
    body = await response.read()
    assert hashlib.sha256(body).hexdigest() == registry.blob_digest.split(":")[1]


async def test_head_keeps_length_and_digest_without_body(
    proxy: Client, registry: FakeRegistry, blob: tuple[Any, bytes]
) -> None:
    response = await proxy.head(f"/v2/{ALIAS}/blobs/{registry.blob_digest}", headers=bearer(TOKEN))
    assert response.status == 200
    assert response.headers["Content-Length"] == str(len(blob[1]))
    assert response.headers["Docker-Content-Digest"] == registry.blob_digest
    assert await response.read() == b""
    assert registry.seen[-1].method == "HEAD"


async def test_range_is_forwarded_and_206_relayed(
    proxy: Client, registry: FakeRegistry, blob: tuple[Any, bytes]
) -> None:
    _, data = blob
    headers = {**bearer(TOKEN), "Range": "bytes=500-1499"}
    response = await proxy.get(f"/v2/{ALIAS}/blobs/{registry.blob_digest}", headers=headers)
    assert response.status == 206
    assert response.headers["Content-Range"] == f"bytes 500-1499/{len(data)}"
    assert await response.read() == data[500:1500]
    assert registry.seen[-1].headers["Range"] == "bytes=500-1499"


async def test_unsatisfiable_range_gets_416(proxy: Client, registry: FakeRegistry) -> None:
    headers = {**bearer(TOKEN), "Range": "bytes=99999999-"}
    response = await proxy.get(f"/v2/{ALIAS}/blobs/{registry.blob_digest}", headers=headers)
    assert response.status == 416


async def test_conditional_headers_are_forwarded(proxy: Client, registry: FakeRegistry) -> None:
    headers = {**bearer(TOKEN), "If-None-Match": '"x"', "If-Range": '"y"'}
    response = await proxy.get(f"/v2/{ALIAS}/manifests/latest", headers=headers)
    assert response.status == 200
    assert registry.seen[-1].headers["If-None-Match"] == '"x"'
    assert registry.seen[-1].headers["If-Range"] == '"y"'


async def test_tags_list_maps_name_and_link_back_to_alias(
    proxy: Client, registry: FakeRegistry
) -> None:
    response = await proxy.get(f"/v2/{ALIAS}/tags/list", headers=bearer(TOKEN))
    assert response.status == 200
    assert await response.json() == {"name": ALIAS, "tags": ["latest"]}
    assert registry.seen[-1].path_qs == f"/v2/{REAL}/tags/list"
    assert response.headers["Link"] == f'</v2/{ALIAS}/tags/list?last=latest&n=1>; rel="next"'
    assert REAL not in response.headers["Link"]


async def test_redirect_to_storage_passes_through_untouched(proxy: Client) -> None:
    response = await proxy.get(
        f"/v2/{ALIAS}/blobs/sha256:{'e' * 64}", headers=bearer(TOKEN), allow_redirects=False
    )
    assert response.status == 307
    expected = "https://storage.test/blob?X-Amz-Signature=abc&X-Amz-Credential=k"
    assert response.headers["Location"] == expected


async def test_redirect_to_upstream_itself_points_back_at_proxy(
    proxy: Client, registry: FakeRegistry
) -> None:
    response = await proxy.get(
        f"/v2/{ALIAS}/blobs/sha256:{'f' * 64}", headers=bearer(TOKEN), allow_redirects=False
    )
    assert response.status == 307
    assert response.headers["Location"] == f"/v2/{ALIAS}/blobs/{registry.blob_digest}"


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
async def test_write_methods_are_refused_before_upstream(
    proxy: Client, registry: FakeRegistry, method: str
) -> None:
    response = await proxy.request(
        method, f"/v2/{ALIAS}/blobs/uploads/", headers=bearer(TOKEN), data=b"x"
    )
    assert response.status == 405
    assert_oci_error(await response.json(), "UNSUPPORTED")
    assert registry.seen == []


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/v2/gh_acme/../secret/manifests/latest", "NAME_INVALID"),
        ("/v2/gh_acme/./web/manifests/latest", "NAME_INVALID"),
        ("/v2/gh_acme%2Fweb/manifests/latest", "NAME_INVALID"),
        ("/v2/gh_acme/%2e%2e/manifests/latest", "NAME_INVALID"),
        ("/v2/gh_acme//web/manifests/latest", "NAME_INVALID"),
        ("/v2/GH_ACME/web/manifests/latest", "NAME_INVALID"),
        ("/v2/gh_acme/web/manifests/bad%00tag", "NAME_INVALID"),
        ("/v2/gh_acme/web/blobs/not-a-digest", "DIGEST_INVALID"),
        ("/v2/gh_acme/web/manifests/-bad-tag", "MANIFEST_INVALID"),
    ],
)
async def test_non_canonical_paths_get_400_and_never_reach_upstream(
    proxy: Client, registry: FakeRegistry, path: str, code: str
) -> None:
    status, raw = await raw_get(proxy, path, bearer(TOKEN))
    assert status == 400
    assert_oci_error(json.loads(raw), code)
    assert registry.seen == []


async def test_unknown_endpoint_and_non_registry_path_get_oci_404(
    proxy: Client, registry: FakeRegistry
) -> None:
    for path in ("/v2/gh_acme/web/whatever", "/index.html"):
        response = await proxy.get(path)
        assert response.status == 404
        assert_oci_error(await response.json(), "UNSUPPORTED")
    assert registry.seen == []


async def test_token_mapping_to_invalid_name_is_refused(
    proxy: Client, registry: FakeRegistry
) -> None:
    token = make_token(alias_entry(ALIAS, "../../admin"))
    response = await proxy.get(f"/v2/{ALIAS}/manifests/latest", headers=bearer(token))
    assert response.status == 400
    assert_oci_error(await response.json(), "NAME_INVALID")
    assert registry.seen == []


async def test_duplicate_authorization_headers_are_refused(
    proxy: Client, registry: FakeRegistry
) -> None:
    headers = [("Authorization", f"Bearer {TOKEN}"), ("Authorization", "Bearer other")]
    response = await proxy.get(f"/v2/{ALIAS}/manifests/latest", headers=headers)
    assert response.status == 400
    assert registry.seen == []


async def test_garbage_token_is_forwarded_unchanged(proxy: Client, registry: FakeRegistry) -> None:
    response = await proxy.get(f"/v2/{ALIAS}/manifests/latest", headers=bearer("not.a.jwt"))
    assert response.status == 404
    assert_oci_error(await response.json(), "NAME_UNKNOWN")
    assert registry.seen[-1].path_qs == f"/v2/{ALIAS}/manifests/latest"
    assert registry.seen[-1].headers["Authorization"] == "Bearer not.a.jwt"


async def test_unresolved_name_keeps_status_and_challenge_with_helpful_message(
    proxy: Client,
) -> None:
    name = "gh_acme/web/9.9.9"
    token = make_token({"type": "repository", "name": name, "actions": []})
    response = await proxy.get(
        f"/v2/{name}/manifests/latest", headers={**bearer(token), "Host": "proxy.test:8080"}
    )
    assert response.status == 401
    assert 'scope="repository:gh_acme/web/9.9.9:pull"' in response.headers["WWW-Authenticate"]
    body = await response.json()
    assert_oci_error(body, "UNAUTHORIZED")
    message = body["errors"][0]["message"]
    assert "release '9.9.9' of app 'gh_acme/web'" in message
    assert "without a leading 'v'" in message
    assert "'+rev'" in message
    assert "docker login proxy.test:8080" in message
    assert token not in message


async def test_legacy_grant_for_an_unknown_app_explains_the_404(proxy: Client) -> None:
    token = make_token({"type": "repository", "name": "gh_acme/nope", "actions": ["pull"]})
    response = await proxy.get("/v2/gh_acme/nope/manifests/latest", headers=bearer(token))
    assert response.status == 404
    error = (await response.json())["errors"][0]
    assert error["code"] == "NAME_UNKNOWN"
    assert error["message"].startswith("app 'gh_acme/nope' was not found")


async def test_unresolved_head_keeps_401_without_waiting_for_a_body(proxy: Client) -> None:
    name = "gh_acme/web/9.9.9"
    token = make_token({"type": "repository", "name": name, "actions": []})
    response = await asyncio.wait_for(
        proxy.head(f"/v2/{name}/manifests/latest", headers=bearer(token)), 5
    )
    assert response.status == 401
    assert "WWW-Authenticate" in response.headers
    assert await response.read() == b""


async def test_rewritten_challenge_asks_for_the_alias(
    registry: FakeRegistry,
    aiohttp_server: Callable[..., Awaitable[Any]],
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> None:
    async def expired(request: web.Request) -> web.Response:
        challenge = CHALLENGE + f',scope="repository:{REAL}:pull",error="invalid_token"'
        headers = {"WWW-Authenticate": challenge}
        return web.json_response({"errors": []}, status=401, headers=headers)

    app = web.Application()
    app.router.add_get("/{tail:.*}", expired)
    upstream = await aiohttp_server(app)
    settings = Settings(registry_url=str(upstream.make_url("")).rstrip("/"))
    client = await serve_proxy(settings, aiohttp_client)
    response = await client.get(f"/v2/{ALIAS}/manifests/latest", headers=bearer(TOKEN))
    assert response.status == 401
    assert f'scope="repository:{ALIAS}:pull"' in response.headers["WWW-Authenticate"]


async def test_compressed_bodies_are_never_decompressed(proxy: Client) -> None:
    response = await proxy.get(
        f"/v2/gzip/blobs/sha256:{'a' * 64}", headers={"Accept-Encoding": "gzip"}
    )
    assert response.headers["Content-Encoding"] == "gzip"
    assert await response.read() == b"\x1f\x8b\x08\x00not-really-gzip"


async def test_hop_by_hop_headers_are_dropped_both_ways(
    proxy: Client, registry: FakeRegistry
) -> None:
    headers = {
        **bearer(TOKEN),
        "Connection": "keep-alive, X-Client-Hop",
        "X-Client-Hop": "1",
        "Proxy-Authorization": "Basic c2VjcmV0",
        "X-End-To-End": "kept",
    }
    response = await proxy.get(f"/v2/{ALIAS}/manifests/latest", headers=headers)
    seen = registry.seen[-1].headers
    assert "X-Client-Hop" not in seen
    assert "Proxy-Authorization" not in seen
    assert seen["X-End-To-End"] == "kept"
    assert "X-Upstream-Hop" not in response.headers


async def test_upstream_unreachable_gives_502(
    aiohttp_client: Callable[..., Awaitable[Client]], unused_tcp_port: int
) -> None:
    settings = Settings(registry_url=f"http://127.0.0.1:{unused_tcp_port}")
    client = await serve_proxy(settings, aiohttp_client)
    response = await client.get("/v2/")
    assert response.status == 502
    assert_oci_error(await response.json(), "UNAVAILABLE")
    assert (await client.get("/ping")).status == 200


async def test_upstream_timeout_gives_504_and_proxy_keeps_serving(proxy: Client) -> None:
    response = await proxy.get("/v2/slow/manifests/latest")
    assert response.status == 504
    assert_oci_error(await response.json(), "UNAVAILABLE")
    assert (await proxy.get("/v2/")).status == 401


async def test_upstream_cut_mid_blob_cuts_the_client_too(proxy: Client) -> None:
    response = await proxy.get(f"/v2/cut/blobs/sha256:{'b' * 64}")
    assert response.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()
    assert (await proxy.get("/ping")).status == 200


async def test_garbage_on_the_port_logs_no_traceback(
    proxy: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64)
    await writer.drain()
    assert b" 400 " in (await reader.read()).split(b"\r\n")[0]
    writer.close()
    await asyncio.sleep(0.05)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert (await proxy.get("/ping")).status == 200


async def test_trust_proxy_decides_the_logged_client(
    registry: FakeRegistry,
    aiohttp_server: Callable[..., Awaitable[Any]],
    aiohttp_client: Callable[..., Awaitable[Client]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="balena_registry_proxy.access")
    upstream = await aiohttp_server(registry.app())
    url = str(upstream.make_url("")).rstrip("/")
    headers = {"X-Forwarded-For": "203.0.113.9"}
    for trust, expected in (("false", "127.0.0.1 "), ("loopback", "203.0.113.9 ")):
        settings = Settings(registry_url=url, trust_proxy=parse_trust_proxy(trust))
        client = await serve_proxy(settings, aiohttp_client)
        await (await client.get("/ping", headers=headers)).read()
        await asyncio.sleep(0.05)
        assert caplog.records[-1].getMessage().startswith(expected)


async def test_access_log_has_one_line_without_secrets(
    proxy: Client, registry: FakeRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="balena_registry_proxy.access")
    response = await proxy.get(f"/v2/{ALIAS}/manifests/latest?token=hunter2", headers=bearer(TOKEN))
    await response.read()
    await asyncio.sleep(0.05)
    lines = [r.getMessage() for r in caplog.records if r.name == "balena_registry_proxy.access"]
    assert len(lines) == 1
    line = lines[0]
    assert f"GET /v2/{ALIAS}/manifests/latest?token=***" in line
    assert f"-> /v2/{REAL}/manifests/latest?token=***" in line
    assert " 200 " in line
    assert f" {len(MANIFEST)} " in line
    assert "hunter2" not in line
    assert TOKEN not in caplog.text


async def test_chunked_upstream_blob_is_relayed_whole(
    proxy: Client, blob: tuple[Any, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="balena_registry_proxy.access")
    response = await proxy.get(f"/v2/chunked/blobs/sha256:{'c' * 64}")
    assert response.status == 200
    assert "Content-Length" not in response.headers
    assert await response.read() == blob[1]
    await asyncio.sleep(0.05)
    assert f" 200 {len(blob[1])} " in caplog.records[-1].getMessage()


async def test_http_1_0_client_gets_a_chunked_upstream_body_framed_by_close(
    proxy: Client, blob: tuple[Any, bytes]
) -> None:
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(f"GET /v2/chunked/blobs/sha256:{'c' * 64} HTTP/1.0\r\n\r\n".encode())
    await writer.drain()
    response = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == b"HTTP/1.0 200 OK"
    assert b"transfer-encoding" not in head.lower()
    assert body == blob[1]


async def test_chunked_tags_list_is_mapped_back(proxy: Client) -> None:
    response = await proxy.get(
        f"/v2/{ALIAS}/tags/list?framing=chunked&tags=2", headers=bearer(TOKEN)
    )
    assert response.status == 200
    assert await response.json() == {"name": ALIAS, "tags": ["t0000000", "t0000001"]}


async def test_huge_chunked_tags_list_is_relayed_untouched(proxy: Client) -> None:
    response = await proxy.get(
        f"/v2/{ALIAS}/tags/list?framing=chunked&tags=200000", headers=bearer(TOKEN)
    )
    assert response.status == 200
    document = await response.json()
    assert len(document["tags"]) == 200000
    assert document["name"] == REAL


async def test_head_of_tags_list_has_no_body(proxy: Client) -> None:
    response = await proxy.head(f"/v2/{ALIAS}/tags/list", headers=bearer(TOKEN))
    assert response.status == 200
    assert await response.read() == b""


async def test_not_modified_is_relayed_without_body(proxy: Client, registry: FakeRegistry) -> None:
    headers = {**bearer(TOKEN), "If-None-Match": f'"{MANIFEST_DIGEST}"'}
    response = await proxy.get(f"/v2/{ALIAS}/manifests/latest", headers=headers)
    assert response.status == 304
    assert response.headers["ETag"] == f'"{MANIFEST_DIGEST}"'
    assert await response.read() == b""


async def test_denial_of_an_encoded_html_body_becomes_plain_json(proxy: Client) -> None:
    name = "gh_acme/web/9.9.8"
    token = make_token({"type": "repository", "name": name, "actions": []})
    response = await proxy.get(
        f"/v2/{name}/manifests/latest", headers={**bearer(token), "Accept-Encoding": "gzip"}
    )
    assert response.status == 401
    assert "Content-Encoding" not in response.headers
    assert response.headers["Content-Type"] == "application/json"
    body = json.loads(await response.read())
    assert "release '9.9.8' of app 'gh_acme/web'" in body["errors"][0]["message"]


@pytest.mark.parametrize(
    "header",
    [
        ("Host", "evil.example<script>"),
        ("Host", 'evil", error="x'),
        ("Host", "a b"),
        ("X-Forwarded-Host", 'proxy.example, evil", error="x'),
    ],
)
async def test_a_host_that_is_no_host_is_refused_not_echoed(
    proxy: Client, registry: FakeRegistry, header: tuple[str, str]
) -> None:
    name = "gh_acme/web/9.9.9"
    token = make_token({"type": "repository", "name": name, "actions": []})
    response = await proxy.get(
        f"/v2/{name}/manifests/latest", headers={**bearer(token), header[0]: header[1]}
    )
    assert response.status == 400
    error = (await response.json())["errors"][0]
    assert error["code"] == "UNSUPPORTED"
    assert "evil" not in error["message"]
    assert "host" in error["message"].lower()
    assert registry.seen == []


async def test_the_host_named_in_messages_is_the_one_the_client_used(proxy: Client) -> None:
    name = "gh_acme/web/9.9.9"
    token = make_token({"type": "repository", "name": name, "actions": []})
    headers = {**bearer(token), "Host": "proxy.example:8443"}
    response = await proxy.get(f"/v2/{name}/manifests/latest", headers=headers)
    assert "docker login proxy.example:8443" in (await response.json())["errors"][0]["message"]


async def test_no_accept_encoding_is_invented_upstream(
    proxy: Client, registry: FakeRegistry
) -> None:
    response = await proxy.get(
        f"/v2/{ALIAS}/manifests/latest",
        headers=bearer(TOKEN),
        skip_auto_headers=["Accept-Encoding", "Accept", "User-Agent"],
    )
    assert response.status == 200
    seen = registry.seen[-1].headers
    assert "Accept-Encoding" not in seen
    assert "Accept" not in seen
    assert seen["User-Agent"].startswith("balena-registry-proxy/")


async def test_first_byte_timeout_bounds_the_wait_for_headers(
    registry: FakeRegistry,
    aiohttp_server: Callable[..., Awaitable[Any]],
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> None:
    upstream = await aiohttp_server(registry.app())
    url = str(upstream.make_url("")).rstrip("/")
    settings = Settings(
        registry_url=url, connect_timeout=0.5, first_byte_timeout=0.5, read_timeout=30
    )
    client = await serve_proxy(settings, aiohttp_client)
    started = asyncio.get_running_loop().time()
    response = await client.get("/v2/slow/manifests/latest")
    assert response.status == 504
    assert asyncio.get_running_loop().time() - started < 3


async def test_upstream_stalling_mid_blob_cuts_the_client_after_the_read_timeout(
    proxy: Client, caplog: pytest.LogCaptureFixture
) -> None:
    response = await proxy.get(f"/v2/stall/blobs/sha256:{'d' * 64}")
    assert response.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await asyncio.wait_for(response.read(), 4)
    assert "upstream failed mid-response" in caplog.text
    assert (await proxy.get("/ping")).status == 200


async def test_client_leaving_mid_blob_is_not_an_upstream_failure(
    proxy: Client, registry: FakeRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="balena_registry_proxy.access")
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    request = f"GET /v2/{ALIAS}/blobs/{registry.blob_digest} HTTP/1.1\r\nHost: p\r\n"
    writer.write(f"{request}Authorization: Bearer {TOKEN}\r\n\r\n".encode())
    await writer.drain()
    await reader.read(4096)
    writer.transport.abort()
    await asyncio.sleep(0.5)
    assert "upstream failed" not in caplog.text
    assert (await proxy.get("/ping")).status == 200
    gone = [r.getMessage() for r in caplog.records if " 499 " in r.getMessage()]
    assert len(gone) == 1
    assert f"GET /v2/{ALIAS}/blobs/{registry.blob_digest}" in gone[0]
    page = await (await proxy.get("/metrics")).text()
    assert 'registry_proxy_requests_total{method="GET",route="blob",status="4xx"} 1.0' in page


async def test_connect_timeout_gives_502(
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> None:
    # A listener that never accepts, its backlog full: connection attempts get no answer.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        settings = Settings(registry_url=f"http://127.0.0.1:{port}", connect_timeout=0.5)
        client = await serve_proxy(settings, aiohttp_client)
        response = await client.get("/v2/")
        assert response.status == 502
        assert_oci_error(await response.json(), "UNAVAILABLE")
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


FORGED = {
    "X-Forwarded-For": "198.51.100.66",
    "X-Forwarded-Proto": "https",
    "X-Forwarded-Host": "forged.example",
    "Forwarded": "for=198.51.100.66;host=forged.example",
    "X-Real-IP": "198.51.100.66",
}


async def test_an_untrusted_client_cannot_tell_upstream_who_it_is(
    proxy: Client, registry: FakeRegistry
) -> None:
    response = await proxy.get(
        f"/v2/{ALIAS}/manifests/latest", headers={**bearer(TOKEN), **FORGED, "Host": "p.test"}
    )
    assert response.status == 200
    seen = registry.seen[-1].headers
    assert seen.getall("X-Forwarded-For") == ["127.0.0.1"]
    assert seen.getall("X-Forwarded-Proto") == ["http"]
    assert seen.getall("X-Forwarded-Host") == ["p.test"]
    assert "Forwarded" not in seen
    assert "X-Real-IP" not in seen


async def test_a_trusted_front_proxy_is_believed_and_appended_to(
    aiohttp_server: Callable[..., Awaitable[Any]],
    aiohttp_client: Callable[..., Awaitable[Client]],
    registry: FakeRegistry,
) -> None:
    upstream = await aiohttp_server(registry.app())
    settings = Settings(
        registry_url=str(upstream.make_url("")).rstrip("/"), trust_proxy=parse_trust_proxy("1")
    )
    client = await serve_proxy(settings, aiohttp_client)
    await client.get(f"/v2/{ALIAS}/manifests/latest", headers={**bearer(TOKEN), **FORGED})
    seen = registry.seen[-1].headers
    assert seen.getall("X-Forwarded-For") == ["198.51.100.66, 127.0.0.1"]
    assert seen.getall("X-Forwarded-Proto") == ["https"]
    assert seen.getall("X-Forwarded-Host") == ["forged.example"]
    assert "Forwarded" not in seen


async def test_an_upstream_failure_is_logged_with_its_cause(
    aiohttp_client: Callable[..., Awaitable[Client]],
    unused_tcp_port: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = await serve_proxy(
        Settings(registry_url=f"http://127.0.0.1:{unused_tcp_port}"), aiohttp_client
    )
    response = await client.get(f"/v2/{ALIAS}/manifests/latest?token=hunter2")
    assert response.status == 502
    assert "connection refused" in (await response.json())["errors"][0]["message"]
    failures = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(failures) == 1
    line = failures[0].getMessage()
    assert "upstream registry failed" in line
    assert "connection refused" in line
    assert f"GET /v2/{ALIAS}/manifests/latest?token=***" in line
    assert "rid=" in line


async def test_the_root_says_what_this_is_and_how_to_pull(proxy: Client) -> None:
    response = await proxy.get("/", headers={"Host": "proxy.example"})
    assert response.status == 200
    assert response.content_type == "text/plain"
    text = await response.text()
    assert "docker pull proxy.example/<org>/<app>[/<version|commit>]" in text
    assert "docker login proxy.example" in text
    assert "list-tags" not in text
