"""What clients can make the proxy hold: memory, connections, open files, time.

Each test runs the proxy as its own process (its memory and files are counted) in front of an
in-process upstream, and plays the client that wants to exhaust something.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from balena_registry_proxy.resources import TRIM_DELAY_SECONDS, TRIM_INTERVAL_SECONDS

from .processes import ProxyProcess, start_proxy

MIB = 1024 * 1024
BLOB = "sha256:" + "b" * 64
BLOB_SIZE = 64 * MIB
STALLED_READERS = 1000


async def big_blob(request: web.Request) -> web.StreamResponse:
    """64 MiB, as fast as the reader takes it."""
    response = web.StreamResponse(headers={"Content-Length": str(BLOB_SIZE)})
    await response.prepare(request)
    chunk = b"z" * (256 * 1024)
    try:
        for _ in range(BLOB_SIZE // len(chunk)):
            await response.write(chunk)
    except (ConnectionError, asyncio.CancelledError):
        pass
    return response


@pytest.fixture
async def upstream() -> AsyncIterator[TestServer]:
    app = web.Application()
    app.router.add_get(f"/v2/big/blobs/{BLOB}", big_blob)
    server = TestServer(app)
    await server.start_server()
    yield server
    await server.close()


@pytest.fixture
def launch(upstream: TestServer, tmp_path: Path) -> Iterator[Callable[..., ProxyProcess]]:
    """Start proxies in front of ``upstream`` with extra settings; all stop at the end."""
    started: list[ProxyProcess] = []

    def start(
        env: dict[str, str] | None = None, preexec_fn: Callable[[], None] | None = None
    ) -> ProxyProcess:
        log = tmp_path / f"proxy-{len(started)}.log"
        proxy = start_proxy(str(upstream.make_url("")).rstrip("/"), log, env, preexec_fn)
        started.append(proxy)
        proxy.wait_listening()
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


def raise_own_file_limit(wanted: int) -> int:
    """This process's soft limit on open files, raised towards ``wanted``; what it is now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return max(soft, target)


async def settled_rss(proxy: ProxyProcess, within: float) -> float:
    """The proxy's RSS once it stopped changing by more than 1 MiB in a second."""
    previous = proxy.rss_mib()
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        await asyncio.sleep(1)
        now = proxy.rss_mib()
        if abs(now - previous) < 1:
            return now
        previous = now
    return previous


async def open_request(port: int, request: bytes) -> socket.socket:
    """A client that sends ``request`` and then reads nothing."""
    client = socket.socket()
    client.setblocking(False)
    await asyncio.get_running_loop().sock_connect(client, ("127.0.0.1", port))
    client.send(request)
    return client


async def closed_by_peer(client: socket.socket, within: float) -> bool:
    """Whether the proxy closed ``client`` within ``within`` seconds (what it sent is skipped)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        try:
            data = await asyncio.wait_for(loop.sock_recv(client, 65536), deadline - loop.time())
        except TimeoutError:
            return False
        except ConnectionError:
            return True
        if not data:
            return True
    return False


async def test_stalled_readers_hold_little_memory_and_give_it_back(
    launch: Callable[..., ProxyProcess],
) -> None:
    # Each stalled reader costs this test two descriptors (its socket, the upstream's).
    readers = min(STALLED_READERS, (raise_own_file_limit(4 * STALLED_READERS) - 200) // 2)
    assert readers >= 500, "the open-file limit is too low for this test"
    proxy = launch({"LOG_LEVEL": "debug"})
    await asyncio.sleep(1)
    baseline = proxy.rss_mib()
    request = f"GET /v2/big/blobs/{BLOB} HTTP/1.1\r\nHost: proxy\r\n\r\n".encode()
    clients = [await open_request(proxy.port, request) for _ in range(readers)]
    try:
        stalled = await settled_rss(proxy, within=30)
        # About 22 KiB of request state and at most one 32 KiB read per reader.
        assert stalled - baseline < 64 * readers / STALLED_READERS, (baseline, stalled)
    finally:
        for client in clients:
            client.close()
    # Memory is handed back a moment after the last of a burst of clients left.
    await asyncio.sleep(TRIM_DELAY_SECONDS + 2)
    left = await settled_rss(proxy, within=30)
    # Heap memory goes back to the system; Python's own small-object arenas stay part-used.
    # About 20 MiB stays: Python's small-object arenas, part-used by what lives on. It is a
    # high-water mark, not a leak: a second burst of readers leaves no more.
    assert left - baseline < 32, (baseline, stalled, left)
    clients = [await open_request(proxy.port, request) for _ in range(readers)]
    await settled_rss(proxy, within=30)
    for client in clients:
        client.close()
    # Trims are at least TRIM_INTERVAL_SECONDS apart: on a fast machine the second burst is
    # over before that, and its trim waits for the interval.
    await asyncio.sleep(TRIM_INTERVAL_SECONDS + 2)
    again = await settled_rss(proxy, within=30)
    assert again - left < 8, (baseline, left, again)
    assert proxy.process.poll() is None


async def test_beyond_the_connection_limit_new_clients_get_503(
    launch: Callable[..., ProxyProcess],
) -> None:
    proxy = launch({"MAX_CONNECTIONS": "5", "LOG_LEVEL": "info"})
    loop = asyncio.get_running_loop()
    idle = []
    for _ in range(5):
        client = socket.socket()
        client.setblocking(False)
        await loop.sock_connect(client, ("127.0.0.1", proxy.port))
        idle.append(client)
    await asyncio.sleep(0.2)
    refused = await open_request(proxy.port, b"GET /ping HTTP/1.1\r\nHost: proxy\r\n\r\n")
    answer = b""
    while chunk := await asyncio.wait_for(loop.sock_recv(refused, 65536), 5):
        answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ")
    assert b"Retry-After: 1" in head
    assert b'"code":"UNAVAILABLE"' in body
    refused.close()
    for client in idle:
        client.close()
    await asyncio.sleep(0.3)
    again = await open_request(proxy.port, b"GET /ping HTTP/1.1\r\nHost: proxy\r\n\r\n")
    reply = await asyncio.wait_for(loop.sock_recv(again, 65536), 5)
    assert reply.startswith(b"HTTP/1.1 200 ")
    again.close()
    assert "5 connections open, the limit (MAX_CONNECTIONS)" in proxy.log.read_text()


async def test_a_trickled_request_head_is_cut_after_the_head_timeout(
    launch: Callable[..., ProxyProcess],
) -> None:
    proxy = launch({"REQUEST_HEAD_TIMEOUT": "1"})
    trickler = await open_request(proxy.port, b"G")
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    for byte in b"ET /ping HTTP/1.1\r\nHost: p":
        await asyncio.sleep(0.25)
        try:
            await loop.sock_sendall(trickler, bytes([byte]))
        except ConnectionError:
            break
        if time.monotonic() - started > 3:
            break
    assert await closed_by_peer(trickler, within=2)
    assert time.monotonic() - started < 4
    trickler.close()
    # A whole head in time is served as ever, on a connection that then idles a while.
    fine = await open_request(proxy.port, b"GET /ping HTTP/1.1\r\nHost: proxy\r\n\r\n")
    assert (await asyncio.wait_for(loop.sock_recv(fine, 65536), 5)).startswith(b"HTTP/1.1 200")
    assert not await closed_by_peer(fine, within=1.5)
    fine.close()


async def test_idle_keep_alive_connections_close_after_the_keepalive_timeout(
    launch: Callable[..., ProxyProcess],
) -> None:
    proxy = launch({"KEEPALIVE_TIMEOUT": "1"})
    loop = asyncio.get_running_loop()
    client = await open_request(proxy.port, b"GET /ping HTTP/1.1\r\nHost: proxy\r\n\r\n")
    assert (await asyncio.wait_for(loop.sock_recv(client, 65536), 5)).startswith(b"HTTP/1.1 200")
    assert await closed_by_peer(client, within=3)
    client.close()
    silent = socket.create_connection(("127.0.0.1", proxy.port))
    silent.setblocking(False)
    assert await closed_by_peer(silent, within=3)
    silent.close()


def low_file_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 1024))


def test_the_soft_file_limit_is_raised_and_connections_fit_the_files(
    launch: Callable[..., ProxyProcess],
) -> None:
    proxy = launch({"LOG_LEVEL": "info"}, preexec_fn=low_file_limit)
    limits = Path(f"/proc/{proxy.process.pid}/limits").read_text()
    line = next(row for row in limits.splitlines() if row.startswith("Max open files"))
    assert line.split()[3:5] == ["1024", "1024"]
    assert "MAX_CONNECTIONS lowered from 1024 to 256: the open-file limit is 1024" in (
        proxy.log.read_text()
    )


@pytest.mark.parametrize("cache", [False, True])
async def test_a_client_that_takes_nothing_is_disconnected_after_the_send_timeout(
    launch: Callable[..., ProxyProcess], tmp_path: Path, cache: bool
) -> None:
    env = {"SEND_TIMEOUT": "1", "MAX_CONNECTIONS": "2"}
    if cache:
        env["CACHE_DIR"] = str(tmp_path / "cache")
    proxy = launch(env)
    request = f"GET /v2/big/blobs/{BLOB} HTTP/1.1\r\nHost: proxy\r\n\r\n".encode()
    stalled = [await open_request(proxy.port, request) for _ in range(2)]
    await asyncio.sleep(4)
    loop = asyncio.get_running_loop()
    for client in stalled:
        received = 0
        while True:  # what the kernel holds, then the end (or a reset): not 64 MiB
            try:
                data = await asyncio.wait_for(loop.sock_recv(client, 1 << 20), 5)
            except ConnectionResetError:
                break
            if not data:
                break
            received += len(data)
        assert received < 32 * MIB
        client.close()
    # Their slots are free again.
    ping = await open_request(proxy.port, b"GET /ping HTTP/1.1\r\nHost: proxy\r\n\r\n")
    assert (await asyncio.wait_for(loop.sock_recv(ping, 65536), 5)).startswith(b"HTTP/1.1 200")
    ping.close()


async def read_answer(client: socket.socket) -> bytes:
    """Everything the proxy sends until it closes the connection (5 s at most)."""
    loop = asyncio.get_running_loop()
    answer = b""
    while data := await asyncio.wait_for(loop.sock_recv(client, 65536), 5):
        answer += data
    return answer


async def test_a_request_head_beyond_its_bound_is_431_and_a_close(
    launch: Callable[..., ProxyProcess],
) -> None:
    proxy = launch()
    headers = b"".join(b"X-Big-%d: %s\r\n" % (n, b"h" * 8000) for n in range(4))
    client = await open_request(
        proxy.port, b"GET /ping HTTP/1.1\r\nHost: p\r\n" + headers + b"\r\n"
    )
    answer = await read_answer(client)
    client.close()
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert b'"message":"request head too large"' in answer
    # Two headers of the largest size (a token, say) are fine.
    fits = b"".join(b"X-Big-%d: %s\r\n" % (n, b"h" * 8000) for n in range(2))
    client = await open_request(
        proxy.port, b"GET /ping HTTP/1.1\r\nHost: p\r\nConnection: close\r\n" + fits + b"\r\n"
    )
    assert (await read_answer(client)).startswith(b"HTTP/1.1 200 ")
    client.close()


async def test_requests_piled_up_behind_an_answer_close_the_connection(
    launch: Callable[..., ProxyProcess],
) -> None:
    proxy = launch()
    before = proxy.rss_mib()
    blob = f"GET /v2/big/blobs/{BLOB} HTTP/1.1\r\nHost: p\r\n\r\n".encode()
    client = await open_request(proxy.port, blob)
    await asyncio.sleep(0.5)
    piled = b"GET /ping HTTP/1.1\r\nHost: p\r\n" + b"X-Pad: " + b"p" * 8000 + b"\r\n\r\n"
    loop = asyncio.get_running_loop()
    sent = 0
    with contextlib.suppress(ConnectionError, TimeoutError):
        for _ in range(200):  # 1.6 MB of requests, none of them answered yet
            await asyncio.wait_for(loop.sock_sendall(client, piled), 2)
            sent += len(piled)
    await asyncio.sleep(0.5)
    # What was sent waits in the kernel's buffers or was refused: not in the proxy's memory.
    assert proxy.rss_mib() - before < 16, sent
    client.close()


def tls_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    from ..pki import write_test_pki

    (tmp_path / "pki").mkdir()
    return write_test_pki(tmp_path / "pki")


async def test_connections_over_the_limit_once_their_tls_handshake_is_done_get_503(
    launch: Callable[..., ProxyProcess], tmp_path: Path
) -> None:
    trust, cert, key = tls_files(tmp_path)
    proxy = launch({"TLS_CERT": str(cert), "TLS_KEY": str(key), "MAX_CONNECTIONS": "3"})
    loop = asyncio.get_running_loop()
    # Five connections, accepted before any handshake is done: three have places.
    raw = []
    for _ in range(5):
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", proxy.port))
        raw.append(sock)
    await asyncio.sleep(0.3)
    context = ssl.create_default_context(cafile=str(trust / "ca.crt"))
    streams = [
        await asyncio.open_connection(sock=sock, ssl=context, server_hostname="127.0.0.1")
        for sock in raw
    ]
    for _, writer in streams:  # all five kept open
        writer.write(b"GET /ping HTTP/1.1\r\nHost: p\r\n\r\n")
    statuses = [(await asyncio.wait_for(reader.readline(), 5)).split()[1] for reader, _ in streams]
    for _, writer in streams:
        writer.close()
    assert statuses.count(b"503") == 2
    assert statuses.count(b"200") == 3


async def test_refusals_are_bounded_too(launch: Callable[..., ProxyProcess]) -> None:
    proxy = launch({"MAX_CONNECTIONS": "1"})
    before = proxy.fds()
    loop = asyncio.get_running_loop()
    silent = []
    for _ in range(200):  # each beyond the limit; they send nothing to be answered
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", proxy.port))
        silent.append(sock)
    await asyncio.sleep(0.5)
    # The first holds its place; 64 wait for a request to refuse; the rest were closed.
    assert proxy.fds() - before < 80
    for sock in silent:
        sock.close()
