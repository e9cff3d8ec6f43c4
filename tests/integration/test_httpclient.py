"""The upstream HTTP/1.1 client against scripted servers that send exactly the bytes given."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ssl
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from balena_registry_proxy import httpclient
from balena_registry_proxy.httpclient import ConnectionPool, Response
from balena_registry_proxy.sandbox.ports import free_port
from balena_registry_proxy.upstream import Upstream
from balena_registry_proxy.upstream_errors import (
    BrokenAnswer,
    Unreachable,
    UpstreamError,
    UpstreamTimeout,
)

from ..pki import write_test_pki

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Server:
    """A loopback server running ``handler`` for each connection."""

    port: int
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)


@contextlib.asynccontextmanager
async def scripted(
    handler: Handler, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[Server]:
    """Serve ``handler`` on 127.0.0.1, counting connections; closed on exit."""
    server = Server(port=0)

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server.connections += 1
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    listener = await asyncio.start_server(accept, "127.0.0.1", 0, ssl=ssl_context)
    server.port = listener.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listener.close()


async def read_request(reader: asyncio.StreamReader, server: Server) -> bytes:
    """The next request head on the connection (the client never sends a body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    server.requests.append(head)
    return head


def pool_for(server: Server, scheme: str = "http", **options: object) -> ConnectionPool:
    settings: dict[str, object] = {
        "connect_timeout": 5.0,
        "answer_timeout": 5.0,
        "read_buffer": 64 * 1024,
        "read_timeout": 5.0,
    } | options
    return ConnectionPool(scheme, "127.0.0.1", server.port, **settings)  # type: ignore[arg-type]


async def body_of(response: Response) -> bytes:
    parts = [chunk async for chunk in response.content.iter_any()]
    response.release()
    return b"".join(parts)


def answering(*answers: bytes, close_after: bool = False) -> Callable[[Server], Handler]:
    """A handler that answers successive requests on a connection with ``answers``."""

    def make(server: Server) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            for answer in answers:
                await read_request(reader, server)
                writer.write(answer)
                await writer.drain()
            if not close_after:
                await reader.read()  # keep the connection open until the client closes it

        return handle

    return make


@contextlib.asynccontextmanager
async def serving(make: Callable[[Server], Handler]) -> AsyncIterator[Server]:
    holder: list[Server] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await make(holder[0])(reader, writer)

    async with scripted(handle) as server:
        holder.append(server)
        yield server


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello"


async def test_keep_alive_reuses_one_connection_and_sends_a_clean_request() -> None:
    async with serving(answering(OK, OK)) as server:
        pool = pool_for(server)
        for _ in range(2):
            response = await pool.request("GET", "/v2/a/manifests/x?n=1", [("Accept", "a/b")])
            assert (response.status, response.reason) == (200, "OK")
            assert response.headers["content-type"] == "text/plain"
            assert response.content_length == 5
            assert await body_of(response) == b"hello"
        pool.close()
    assert server.connections == 1
    assert (
        server.requests[0]
        == (
            f"GET /v2/a/manifests/x?n=1 HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            "Accept: a/b\r\n\r\n"
        ).encode()
    )


async def test_chunked_bodies_are_decoded() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    async with serving(answering(chunked, OK)) as server:
        pool = pool_for(server)
        response = await pool.request("GET", "/", [])
        assert response.content_length is None
        assert await body_of(response) == b"hello world"
        assert await body_of(await pool.request("GET", "/", [])) == b"hello"
    assert server.connections == 1


async def test_a_head_answer_announces_a_length_but_carries_no_body() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nDocker-Content-Digest: sha256:x\r\n\r\n"
    async with serving(answering(head, OK)) as server:
        pool = pool_for(server)
        response = await pool.request("HEAD", "/", [])
        assert response.content_length == 1000
        assert await body_of(response) == b""
        assert await body_of(await pool.request("GET", "/", [])) == b"hello"
    assert server.connections == 1


@pytest.mark.parametrize("status", [b"204 No Content", b"304 Not Modified"])
async def test_answers_without_a_body(status: bytes) -> None:
    async with serving(answering(b"HTTP/1.1 " + status + b"\r\n\r\n", OK)) as server:
        pool = pool_for(server)
        response = await pool.request("GET", "/", [])
        assert await body_of(response) == b""
        assert await body_of(await pool.request("GET", "/", [])) == b"hello"
    assert server.connections == 1


async def test_interim_answers_are_skipped() -> None:
    early = b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n" + OK
    async with serving(answering(early)) as server:
        response = await pool_for(server).request("GET", "/", [])
        assert response.status == 200
        assert "Link" not in response.headers
        assert await body_of(response) == b"hello"


async def test_a_body_without_length_ends_with_the_connection() -> None:
    until_close = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it"
    async with serving(answering(until_close, close_after=True)) as server:
        pool = pool_for(server)
        assert await body_of(await pool.request("GET", "/", [])) == b"all of it"


async def test_connection_close_is_not_reused() -> None:
    closing = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
    async with serving(answering(closing, close_after=True)) as server:
        pool = pool_for(server)
        for _ in range(2):
            assert await body_of(await pool.request("GET", "/", [])) == b"hello"
    assert server.connections == 2


async def test_a_connection_the_upstream_closed_while_idle_is_replaced() -> None:
    # The server answers once per connection and hangs up without saying so.
    async with serving(answering(OK, close_after=True)) as server:
        pool = pool_for(server)
        assert await body_of(await pool.request("GET", "/", [])) == b"hello"
        await asyncio.sleep(0.05)
        assert await body_of(await pool.request("GET", "/", [])) == b"hello"
        # Even when the client has not noticed yet: the request is sent once more.
        response = await pool.request("GET", "/", [])
        assert await body_of(response) == b"hello"
    assert server.connections == 3


async def test_a_stale_connection_found_on_sending_is_retried_once() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader, holder[0])
        writer.write(OK)
        await writer.drain()
        # The next request arrives, and the connection closes without an answer.
        await read_request(reader, holder[0])
        writer.transport.abort()

    holder: list[Server] = []
    async with scripted(handle) as server:
        holder.append(server)
        pool = pool_for(server)
        assert await body_of(await pool.request("GET", "/", [])) == b"hello"
        assert await body_of(await pool.request("GET", "/", [])) == b"hello"
    assert server.connections == 2
    assert len(server.requests) == 3


async def test_a_body_cut_short_fails_the_reader() -> None:
    cut = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this"
    async with serving(answering(cut, close_after=True)) as server:
        response = await pool_for(server).request("GET", "/", [])
        assert await response.content.readany() == b"only this"
        with pytest.raises(BrokenAnswer):
            await response.content.readany()
        response.release()


async def test_readexactly_of_a_short_body_fails_cleanly() -> None:
    cut = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this"
    async with serving(answering(cut, close_after=True)) as server:
        response = await pool_for(server).request("GET", "/", [])
        with pytest.raises(BrokenAnswer):
            await response.content.readexactly(100)


@pytest.mark.parametrize(
    "garbage",
    [b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"],
)
async def test_a_malformed_answer_fails_the_request(garbage: bytes) -> None:
    async with serving(answering(garbage)) as server:
        with pytest.raises(UpstreamError):
            await pool_for(server).request("GET", "/", [])


async def test_no_answer_in_time_is_a_timeout() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async with scripted(silent) as server:
        with pytest.raises(UpstreamTimeout):
            await pool_for(server, answer_timeout=0.2).request("GET", "/", [])


async def test_the_answer_timeout_ends_with_the_headers() -> None:
    async def slow_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nso")
        await writer.drain()
        await asyncio.sleep(0.4)
        writer.write(b"me")
        await writer.drain()
        await reader.read()

    async with scripted(slow_body) as server:
        response = await pool_for(server, answer_timeout=0.2).request("GET", "/", [])
        assert await response.content.readexactly(4) == b"some"
        response.release()


async def test_silence_mid_body_is_a_timeout() -> None:
    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nsome")
        await writer.drain()
        await reader.read()

    async with scripted(stall) as server:
        response = await pool_for(server, read_timeout=0.3).request("GET", "/", [])
        assert await response.content.readany() == b"some"
        with pytest.raises(UpstreamTimeout):
            await response.content.readany()
        response.release()


async def test_a_refused_connection_is_a_connection_error() -> None:
    nobody = Server(port=free_port("127.0.0.1"))
    with pytest.raises(Unreachable, match="connection refused"):
        await pool_for(nobody).request("GET", "/", [])


async def test_an_unread_body_closes_its_connection() -> None:
    partial = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789"
    async with serving(answering(partial, OK)) as server:
        pool = pool_for(server)
        response = await pool.request("GET", "/", [])
        assert await response.content.readany() == b"0123456789"
        response.release()  # the client went away mid-body
        again = await pool.request("GET", "/", [])
        assert await again.content.readany() == b"0123456789"  # a new connection's first
        again.release()
    assert server.connections == 2


async def test_a_slow_reader_pauses_the_connection() -> None:
    size = 64 << 20  # more than loopback's socket buffers can take
    sent = asyncio.Event()

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        writer.write(b"x" * size)
        await writer.drain()
        sent.set()
        await reader.read()

    async with scripted(flood) as server:
        response = await pool_for(server, read_buffer=16 * 1024).request("GET", "/", [])
        await asyncio.sleep(0.3)
        # The client stopped reading, so the server cannot get it all out.
        assert not sent.is_set()
        received = 0
        async for chunk in response.content.iter_any():
            received += len(chunk)
        assert received == size
        response.release()
        await asyncio.wait_for(sent.wait(), 5)


@pytest.mark.parametrize(
    ("method", "target", "headers"),
    [
        ("GET", "/a b", []),
        ("GET", "/a\r\nX: y", []),
        ("GET", "/", [("X-Evil", "a\r\nInjected: 1")]),
        ("GET", "/", [("X-Evil\r\nInjected", "1")]),
        ("GE T", "/", []),
    ],
)
async def test_line_breaks_cannot_split_the_request(
    method: str, target: str, headers: list[tuple[str, str]]
) -> None:
    async with serving(answering(OK)) as server:
        with pytest.raises(ValueError, match="line break"):
            await pool_for(server).request(method, target, headers)
    assert server.requests == []


async def test_https_with_the_given_trust(tmp_path: Path) -> None:
    trust, cert, key = write_test_pki(tmp_path)
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(cert, key)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await answering(OK)(holder[0])(reader, writer)

    holder: list[Server] = []
    async with scripted(handle, ssl_context=served) as server:
        holder.append(server)
        trusted = ssl.create_default_context(cafile=trust / "ca.crt")
        pool = pool_for(server, "https", ssl_context=trusted)
        assert await body_of(await pool.request("GET", "/", [])) == b"hello"
        untrusting = pool_for(server, "https")
        with pytest.raises(Unreachable, match="TLS verification failed"):
            await untrusting.request("GET", "/", [])
    assert f"Host: 127.0.0.1:{server.port}\r\n".encode() in server.requests[0]


async def test_upstream_keeps_few_other_hosts_and_always_the_registry() -> None:
    async with serving(answering(OK, OK)) as registry, serving(answering(OK)) as storage:
        upstream = Upstream(
            f"http://127.0.0.1:{registry.port}",
            connect_timeout=5,
            first_byte_timeout=5,
            read_timeout=5,
        )
        await upstream.start()
        async with upstream.request("GET", "/v2/", []) as answer:
            assert await answer.content.readexactly(5) == b"hello"
        async with upstream.fetch(f"http://127.0.0.1:{storage.port}/b?X-Amz=1", []) as answer:
            assert await answer.content.readexactly(5) == b"hello"
        assert storage.requests[0].startswith(b"GET /b?X-Amz=1 HTTP/1.1\r\n")
        assert b"User-Agent: balena-registry-proxy/" in storage.requests[0]
        for port in range(1, 40):
            upstream.fetch(f"http://storage-{port}.test/", [])  # never entered: nothing sent
        assert len(upstream._pools) == 17
        async with upstream.request("GET", "/v2/", []) as answer:
            assert await answer.content.readexactly(5) == b"hello"
        await upstream.close()
    assert registry.connections == 1


@pytest.mark.parametrize("apart", [False, True])
async def test_bytes_beyond_the_answer_close_the_connection(apart: bool) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader, holder[0])
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
        await writer.drain()
        if apart:
            await asyncio.sleep(0.1)  # the rest of the body comes in a read of its own
        writer.write(b"56789HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil")
        await writer.drain()
        await reader.read()

    holder: list[Server] = []
    async with scripted(handle) as server:
        holder.append(server)
        pool = pool_for(server)
        assert await body_of(await pool.request("GET", "/", [])) == b"0123456789"
        await asyncio.sleep(0.1)
        assert await body_of(await pool.request("GET", "/", [])) == b"0123456789"
    assert server.connections == 2


async def test_headers_beyond_the_limit_fail_the_request() -> None:
    huge = b"HTTP/1.1 200 OK\r\n" + b"X-Filler: " + b"x" * (70 * 1024) + b"\r\n\r\n"
    async with serving(answering(huge)) as server:
        with pytest.raises(UpstreamError):
            await pool_for(server).request("GET", "/", [])


async def test_idle_connections_are_closed_after_a_while_and_few_are_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(httpclient, "_IDLE_SECONDS", 0.3)
    monkeypatch.setattr(httpclient, "_MAX_IDLE", 2)
    closed: list[float] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader, holder[0])
        await asyncio.sleep(0.1)  # long enough for all four requests to need a connection
        writer.write(OK)
        await writer.drain()
        await reader.read()  # until the client closes its side
        closed.append(asyncio.get_running_loop().time())

    holder: list[Server] = []
    async with scripted(handle) as server:
        holder.append(server)
        pool = pool_for(server)
        started = asyncio.get_running_loop().time()
        responses = await asyncio.gather(*(pool.request("GET", "/", []) for _ in range(4)))
        for response in responses:
            assert await body_of(response) == b"hello"
        await asyncio.sleep(0.05)
        assert len(closed) == 2  # two over the limit went at once
        await asyncio.sleep(0.6)
        assert len(closed) == 4  # the two kept ones once idle long enough
        assert closed[-1] - started >= 0.3
    assert server.connections == 4


async def test_one_endless_header_line_fails_at_once() -> None:
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nX-Filler: ")
        while True:
            writer.write(b"a" * 65536)
            await writer.drain()

    async with scripted(endless) as server:
        started = time.monotonic()
        with pytest.raises(UpstreamError):
            await pool_for(server, answer_timeout=3.0).request("GET", "/", [])
        assert time.monotonic() - started < 1.0


async def test_an_unasked_upgrade_fails_and_is_not_sent_again() -> None:
    switching = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: Upgrade\r\n\r\n"
    async with serving(answering(OK, switching, OK)) as server:
        pool = pool_for(server)
        assert await body_of(await pool.request("GET", "/", [])) == b"hello"
        with pytest.raises(BrokenAnswer):
            await pool.request("GET", "/", [])
    assert len(server.requests) == 2


async def test_a_request_answered_in_part_is_not_sent_again() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader, holder[0])
        writer.write(OK)
        await read_request(reader, holder[0])
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Half")
        await writer.drain()

    holder: list[Server] = []
    async with scripted(handle) as server:
        holder.append(server)
        pool = pool_for(server)
        assert await body_of(await pool.request("GET", "/", [])) == b"hello"
        with pytest.raises(UpstreamError):
            await pool.request("GET", "/", [])
    assert len(server.requests) == 2


@pytest.mark.parametrize("coding", [b"identity", b"gzip"])
async def test_a_transfer_coding_other_than_chunked_ends_with_the_connection(
    coding: bytes,
) -> None:
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + coding + b"\r\n\r\nall of it"
    async with serving(answering(answer, close_after=True)) as server:
        assert await body_of(await pool_for(server).request("GET", "/", [])) == b"all of it"


async def test_a_head_answer_without_a_length_keeps_the_connection() -> None:
    # What a registry on S3 answers to a blob HEAD: a redirect, and no Content-Length.
    redirect = b"HTTP/1.1 307 Temporary Redirect\r\nLocation: https://s3.test/x\r\n\r\n"
    async with serving(answering(redirect, OK)) as server:
        pool = pool_for(server)
        assert await body_of(await pool.request("HEAD", "/v2/r/blobs/sha256:x", [])) == b""
        assert await body_of(await pool.request("GET", "/", [])) == b"hello"
    assert server.connections == 1


async def test_a_body_received_whole_but_unread_keeps_the_connection() -> None:
    redirect = b"HTTP/1.1 307 Temporary Redirect\r\nLocation: /x\r\nContent-Length: 5\r\n\r\nmoved"
    async with serving(answering(redirect, OK)) as server:
        pool = pool_for(server)
        response = await pool.request("GET", "/r", [])
        await asyncio.sleep(0.05)  # every byte is in
        response.release()  # as a followed redirect is left unread
        assert await body_of(await pool.request("GET", "/", [])) == b"hello"
    assert server.connections == 1


async def test_a_failed_read_leaves_no_cycle_holding_its_buffers() -> None:
    size = 4 << 20
    cut = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"m" * (3 << 20)
    async with serving(answering(cut, close_after=True)) as server:
        pool = pool_for(server)
        gc.collect()
        gc.disable()
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            response = await pool.request("GET", "/", [])
            with pytest.raises(BrokenAnswer):
                await response.content.readexactly(size)
            response.release()
            del response
            await asyncio.sleep(0.05)
            held = tracemalloc.get_traced_memory()[0] - base
            assert held < 1 << 20, f"{held >> 20} MiB held until the next full collection"
        finally:
            tracemalloc.stop()
            gc.enable()


FORGED_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nEVIL!"


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 307 Temporary Redirect\r\nLocation: /x\r\n\r\n",
    ],
)
@pytest.mark.parametrize("later", [False, True])
async def test_bytes_after_a_head_answer_close_the_connection(head: bytes, later: bool) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if server.connections == 1:
            await read_request(reader, server)
            writer.write(head if later else head + FORGED_ANSWER)
            if later:
                await writer.drain()
                await asyncio.sleep(0.05)
                writer.write(FORGED_ANSWER)
            await writer.drain()
        while True:
            await read_request(reader, server)
            writer.write(OK)
            await writer.drain()

    async with scripted(handle) as server:
        pool = pool_for(server)
        assert await body_of(await pool.request("HEAD", "/", [])) == b""
        await asyncio.sleep(0.1)
        assert await body_of(await pool.request("GET", "/", [])) == b"hello"
    assert server.connections == 2
