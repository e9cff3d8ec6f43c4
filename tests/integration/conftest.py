"""A fake upstream registry in-process, and the proxy in front of it."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDictProxy

from balena_registry_proxy.app import create_app, runner_options
from balena_registry_proxy.config import Settings

REAL = "v2/0123456789abcdef0123456789abcdef"
ALIAS = "gh_acme/web/1.2.3"
MANIFEST = json.dumps(
    {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json"}
).encode()
MANIFEST_DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
BLOB_SIZE = 8 * 1024 * 1024 + 17
CHALLENGE = 'Bearer realm="http://api.test/auth/v1/token",service="registry.test"'


@dataclass
class Seen:
    """What the fake upstream received, in order."""

    method: str
    path_qs: str
    headers: CIMultiDictProxy[str]


@dataclass
class FakeRegistry:
    """Routes of a registry just real enough to check what the proxy relays."""

    blob_path: Path
    blob_digest: str
    seen: list[Seen] = field(default_factory=list)

    def app(self) -> web.Application:
        """The upstream application."""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Record the request, then answer it by path."""
        self.seen.append(Seen(request.method, request.raw_path, request.headers))
        path = request.path
        api = {"Docker-Distribution-API-Version": "registry/2.0"}
        if path == "/v2/":
            return _denied(401, "UNAUTHORIZED", "authentication required", scope=None)
        if request.headers.get("If-None-Match") == f'"{MANIFEST_DIGEST}"':
            return web.Response(status=304, headers={"ETag": f'"{MANIFEST_DIGEST}"'})
        if path == f"/v2/{REAL}/manifests/latest" or path.endswith(f"manifests/{MANIFEST_DIGEST}"):
            return web.Response(
                body=MANIFEST,
                headers={
                    **api,
                    "Content-Type": MANIFEST_TYPE,
                    "Docker-Content-Digest": MANIFEST_DIGEST,
                    "ETag": f'"{MANIFEST_DIGEST}"',
                    "Connection": "X-Upstream-Hop",
                    "X-Upstream-Hop": "secret-hop",
                },
            )
        if path == f"/v2/{REAL}/blobs/{self.blob_digest}":
            response = web.FileResponse(self.blob_path, chunk_size=1 << 16)
            response.headers["Docker-Content-Digest"] = self.blob_digest
            return response
        if path == f"/v2/{REAL}/tags/list" and request.query.get("framing") == "chunked":
            size = int(request.query.get("tags", "1"))
            document = {"name": REAL, "tags": [f"t{i:07d}" for i in range(size)]}
            return await _chunked(request, json.dumps(document).encode(), "application/json")
        if path == f"/v2/{REAL}/tags/list":
            link = f'</v2/{REAL}/tags/list?last=latest&n=1>; rel="next"'
            return web.json_response({"name": REAL, "tags": ["latest"]}, headers={"Link": link})
        if path.startswith("/v2/gh_acme/web/9.9.8/"):
            challenge = CHALLENGE + ',scope="repository:gh_acme/web/9.9.8:pull"'
            headers = {"WWW-Authenticate": challenge, "Content-Encoding": "gzip"}
            body = gzip.compress(b"<html>denied</html>")
            return web.Response(status=401, body=body, content_type="text/html", headers=headers)
        if path.startswith("/v2/gh_acme/web/9.9.9/"):
            return _denied(401, "UNAUTHORIZED", "authentication required", "gh_acme/web/9.9.9")
        if path == f"/v2/{REAL}/blobs/sha256:{'e' * 64}":
            location = "https://storage.test/blob?X-Amz-Signature=abc&X-Amz-Credential=k"
            return web.Response(status=307, headers={"Location": location})
        if path == f"/v2/{REAL}/blobs/sha256:{'f' * 64}":
            location = f"{request.scheme}://{request.host}/v2/{REAL}/blobs/{self.blob_digest}"
            return web.Response(status=307, headers={"Location": location})
        if path == "/v2/slow/manifests/latest":
            await asyncio.sleep(5)
            return web.Response(text="too late")
        if path == "/v2/gzip/blobs/sha256:" + "a" * 64:
            return web.Response(
                body=b"\x1f\x8b\x08\x00not-really-gzip",
                headers={"Content-Encoding": "gzip", "Content-Type": "application/octet-stream"},
            )
        if path == "/v2/chunked/blobs/sha256:" + "c" * 64:
            return await _chunked(request, self.blob_path.read_bytes(), "application/octet-stream")
        if path == "/v2/stall/blobs/sha256:" + "d" * 64:
            stalled = web.StreamResponse(headers={"Content-Length": "1000000"})
            await stalled.prepare(request)
            await stalled.write(b"x" * 1000)
            await asyncio.sleep(5)
            return stalled
        if path == "/v2/cut/blobs/sha256:" + "b" * 64:
            cut = web.StreamResponse(headers={"Content-Length": "1000000"})
            await cut.prepare(request)
            await cut.write(b"x" * 1000)
            assert request.transport is not None
            request.transport.close()
            return cut
        return _denied(404, "NAME_UNKNOWN", "repository name not known to registry", None)


async def _chunked(request: web.Request, body: bytes, content_type: str) -> web.StreamResponse:
    """Send ``body`` without a length, in several chunks, as some upstreams and proxies do."""
    response = web.StreamResponse(headers={"Content-Type": content_type})
    response.enable_chunked_encoding()
    await response.prepare(request)
    step = max(1, len(body) // 3)
    for start in range(0, len(body), step):
        await response.write(body[start : start + step])
    await response.write_eof()
    return response


def _denied(status: int, code: str, message: str, scope: str | None) -> web.Response:
    challenge = CHALLENGE + (f',scope="repository:{scope}:pull"' if scope else "")
    if code == "UNAUTHORIZED" and scope:
        challenge += ',error="insufficient_scope"'
    body = {"errors": [{"code": code, "message": message, "detail": None}]}
    headers = {"Docker-Distribution-API-Version": "registry/2.0"}
    if status == 401:
        headers["WWW-Authenticate"] = challenge
    return web.json_response(body, status=status, headers=headers)


@pytest.fixture
def blob(tmp_path: Path) -> tuple[Path, bytes]:
    """A blob of a few MiB on disk, with a size that is no multiple of any chunk size."""
    data = (hashlib.sha256(b"seed").digest() * (BLOB_SIZE // 32 + 1))[:BLOB_SIZE]
    path = tmp_path / "blob"
    path.write_bytes(data)
    return path, data


@pytest.fixture
def registry(blob: tuple[Path, bytes]) -> FakeRegistry:
    """The fake upstream's state."""
    path, data = blob
    return FakeRegistry(path, "sha256:" + hashlib.sha256(data).hexdigest())


@pytest.fixture
async def proxy(
    registry: FakeRegistry,
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    aiohttp_client: Callable[..., Awaitable[TestClient[web.Request, web.Application]]],
) -> TestClient[web.Request, web.Application]:
    """A test client talking to the proxy, which talks to the fake upstream."""
    upstream = await aiohttp_server(registry.app())
    settings = Settings(registry_url=str(upstream.make_url("")).rstrip("/"), read_timeout=1.0)
    return await serve_proxy(settings, aiohttp_client)


async def serve_proxy(
    settings: Settings,
    aiohttp_client: Callable[..., Awaitable[TestClient[web.Request, web.Application]]],
) -> TestClient[web.Request, web.Application]:
    """The proxy for ``settings``, served with the runner options production uses."""
    server = TestServer(create_app(settings))
    options = runner_options(settings)
    # The test server always cancels handlers of departed clients; so does production.
    assert options.pop("handler_cancellation") is True
    await server.start_server(**options)
    return await aiohttp_client(server, auto_decompress=False)
