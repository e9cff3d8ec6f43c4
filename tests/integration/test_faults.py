"""Upstream faults, departing and slow clients: the proxy answers cleanly and leaks nothing.

The proxy runs as its own process (so its file descriptors and memory can be counted) in front
of an in-process upstream that misbehaves on purpose.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from ..conftest import until_serving
from .processes import ProxyProcess, start_proxy

MIB = 1024 * 1024
BLOB = "sha256:" + "b" * 64


@dataclass
class Faults:
    """The misbehaving upstream, and what it noticed."""

    closed_at: list[float] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v2/ok/manifests/latest", self.ok)
        app.router.add_get("/v2/error/manifests/latest", self.error)
        app.router.add_get("/v2/slow/manifests/latest", self.slow)
        app.router.add_get("/v2/reset/manifests/latest", self.reset_manifest)
        app.router.add_get(f"/v2/reset/blobs/{BLOB}", self.reset_blob)
        app.router.add_get(f"/v2/stall/blobs/{BLOB}", self.stall)
        app.router.add_get(f"/v2/endless/blobs/{BLOB}", self.endless)
        return app

    async def ok(self, request: web.Request) -> web.Response:
        return web.json_response({"schemaVersion": 2})

    async def error(self, request: web.Request) -> web.Response:
        body = {"errors": [{"code": "UNAVAILABLE", "message": "down", "detail": None}]}
        return web.json_response(body, status=503)

    async def slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(10)
        return web.Response(text="late")

    async def reset_manifest(self, request: web.Request) -> web.StreamResponse:
        return await self._cut(request, 1000, 10)

    async def reset_blob(self, request: web.Request) -> web.StreamResponse:
        return await self._cut(request, 10 * MIB, MIB)

    async def _cut(self, request: web.Request, length: int, sent: int) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": str(length)})
        await response.prepare(request)
        await response.write(b"x" * sent)
        assert request.transport is not None
        request.transport.abort()
        return response

    async def stall(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": str(MIB)})
        await response.prepare(request)
        await response.write(b"x" * 1000)
        await asyncio.sleep(10)
        return response

    async def endless(self, request: web.Request) -> web.StreamResponse:
        """256 MiB, as fast as the reader takes it; notes when the reader went away."""
        response = web.StreamResponse(headers={"Content-Length": str(256 * MIB)})
        await response.prepare(request)
        chunk = b"y" * (256 * 1024)
        try:
            for _ in range(1024):
                await response.write(chunk)
        except (ConnectionError, asyncio.CancelledError):
            self.closed_at.append(time.monotonic())
            raise
        return response


@pytest.fixture
def faults() -> Faults:
    return Faults()


@pytest.fixture
async def upstream(aiohttp_server: object, faults: Faults) -> AsyncIterator[TestServer]:
    server = TestServer(faults.app())
    await server.start_server()
    yield server
    await server.close()


@pytest.fixture
def proxy_process(upstream: TestServer, tmp_path: Path) -> Iterator[ProxyProcess]:
    proxy = start_proxy(str(upstream.make_url("")).rstrip("/"), tmp_path / "proxy.log")
    try:
        proxy.wait_listening()
        yield proxy
    finally:
        proxy.stop()


async def outcome(session: aiohttp.ClientSession, url: str) -> str:
    """What a client makes of one request: an error status, a cut body, or a whole body."""
    try:
        async with session.get(url) as response:
            if response.status >= 500:
                body = await response.json()
                assert set(body["errors"][0]) == {"code", "message", "detail"}
                return str(response.status)
            data = await response.read()
            assert response.content_length in (None, len(data))
            return f"whole {response.status}"
    except aiohttp.ClientPayloadError:
        return "cut"


async def test_faults_give_clean_errors_or_cut_bodies_and_leak_nothing(
    proxy_process: ProxyProcess,
) -> None:
    expected = {
        "/v2/ok/manifests/latest": {"whole 200"},
        "/v2/error/manifests/latest": {"503"},
        "/v2/slow/manifests/latest": {"504"},
        # A small body is read whole before anything is sent: its loss is still a clean 502.
        "/v2/reset/manifests/latest": {"502"},
        f"/v2/reset/blobs/{BLOB}": {"cut"},
        f"/v2/stall/blobs/{BLOB}": {"cut"},
    }
    async with aiohttp.ClientSession() as session:
        await outcome(session, proxy_process.url + "/v2/ok/manifests/latest")
        await asyncio.sleep(0.2)
        baseline = proxy_process.fds()
        paths = list(expected) * 34  # 204 requests, 20 at a time
        for start in range(0, len(paths), 20):
            batch = paths[start : start + 20]
            results = await asyncio.gather(
                *(outcome(session, proxy_process.url + p) for p in batch)
            )
            for path, result in zip(batch, results, strict=True):
                assert result in expected[path], (path, result)
        await asyncio.sleep(1)
        assert await outcome(session, proxy_process.url + "/v2/ok/manifests/latest") == "whole 200"
    await asyncio.sleep(0.5)
    # Keep-alive connections to upstream may stay pooled (up to one per concurrent ok or 503
    # answer of a batch); nothing else may remain.
    assert proxy_process.fds() <= baseline + 15
    assert proxy_process.process.poll() is None
    assert b"Traceback" not in proxy_process.log.read_bytes()


async def test_malformed_upstream_headers_give_502(tmp_path: Path) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nThis is no header\r\n\x00\x01\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proxy = start_proxy(f"http://127.0.0.1:{port}", tmp_path / "proxy.log")
    try:
        async with aiohttp.ClientSession() as session:
            await until_serving(proxy.url)
            assert await outcome(session, proxy.url + "/v2/ok/manifests/latest") == "502"
    finally:
        proxy.process.terminate()
        proxy.process.wait(30)
        server.close()


async def test_departing_client_releases_upstream_within_a_second(
    proxy_process: ProxyProcess, faults: Faults
) -> None:
    host, port = proxy_process.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET /v2/endless/blobs/{BLOB} HTTP/1.1\r\nHost: p\r\n\r\n".encode())
    await writer.drain()
    await reader.readexactly(MIB)
    left = time.monotonic()
    writer.transport.abort()
    for _ in range(20):
        if faults.closed_at:
            break
        await asyncio.sleep(0.1)
    assert faults.closed_at, "upstream was never released"
    assert faults.closed_at[0] - left < 1.0


async def test_abandoned_downloads_leave_fds_and_memory_where_they_were(
    proxy_process: ProxyProcess, faults: Faults
) -> None:
    host, port = proxy_process.url.removeprefix("http://").split(":")

    async def abandon() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"GET /v2/endless/blobs/{BLOB} HTTP/1.1\r\nHost: p\r\n\r\n".encode())
        await writer.drain()
        await reader.readexactly(256 * 1024)
        writer.transport.abort()

    await asyncio.gather(*(abandon() for _ in range(10)))
    await asyncio.sleep(0.5)
    fds, rss = proxy_process.fds(), proxy_process.rss_mib()
    for _ in range(19):
        await asyncio.gather(*(abandon() for _ in range(10)))
    for _ in range(50):
        if len(faults.closed_at) == 200:
            break
        await asyncio.sleep(0.1)
    assert len(faults.closed_at) == 200
    assert proxy_process.fds() <= fds + 5
    assert proxy_process.rss_mib() < rss + 16


async def test_slow_clients_keep_memory_bounded(proxy_process: ProxyProcess) -> None:
    host, port = proxy_process.url.removeprefix("http://").split(":")
    before = proxy_process.rss_mib()

    async def slow_reader() -> int:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        reader, writer = await asyncio.open_connection(sock=sock, limit=64 * 1024)
        writer.write(f"GET /v2/endless/blobs/{BLOB} HTTP/1.1\r\nHost: p\r\n\r\n".encode())
        await writer.drain()
        received = 0
        for _ in range(16):  # 1 MiB/s for 4 s, in quarter-second steps
            received += len(await reader.readexactly(256 * 1024))
            await asyncio.sleep(0.25)
        writer.transport.abort()
        return received

    readers = [asyncio.ensure_future(slow_reader()) for _ in range(50)]
    peak = before
    while not all(task.done() for task in readers):
        peak = max(peak, proxy_process.rss_mib())
        await asyncio.sleep(0.2)
    assert all(task.result() == 4 * MIB for task in readers)
    assert peak - before < 64, f"RSS grew by {peak - before:.0f} MiB"
