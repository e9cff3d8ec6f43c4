"""Hostile input on the wire: smuggling shapes, oversized lines and headers, garbage, fuzzing.

The proxy runs with the production runner (``ProxyRunner``) so the HTTP parser's refusals are
answered as they are in production: a 4xx in the OCI format, no traceback, nothing upstream.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balena_registry_proxy import __version__
from balena_registry_proxy.app import connection_limits, create_app, runner_options
from balena_registry_proxy.config import Settings
from balena_registry_proxy.routes import NAME_RE
from balena_registry_proxy.sandbox.ports import free_port
from balena_registry_proxy.server import ProxyRunner

from ..tokens import alias_entry, make_token

REAL = "v2/0123456789abcdef0123456789abcdef"


@dataclass
class Wire:
    """A proxy served by ``ProxyRunner`` on loopback, and the paths its upstream saw."""

    port: int
    seen: list[str]

    async def send(self, raw: bytes) -> tuple[int, dict[str, str], bytes]:
        """Send raw bytes, return status, headers and body of the answer."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(raw)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
        return int(lines[0].split()[1]), headers, body


@pytest.fixture
async def wire() -> AsyncIterator[Wire]:
    seen: list[str] = []

    async def upstream_handler(request: web.Request) -> web.Response:
        seen.append(request.raw_path)
        return web.json_response({"errors": []}, status=404)

    upstream_app = web.Application()
    upstream_app.router.add_route("*", "/{tail:.*}", upstream_handler)
    upstream = TestServer(upstream_app)
    await upstream.start_server()
    settings = Settings(
        registry_url=str(upstream.make_url("")).rstrip("/"),
        max_request_line=2048,
        max_header_size=1024,
    )
    runner = ProxyRunner(
        create_app(settings), limits=connection_limits(settings), **runner_options(settings)
    )
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield Wire(port, seen)
    await runner.cleanup()
    await upstream.close()


def assert_oci(status: int, headers: dict[str, str], body: bytes, expected: int) -> None:
    assert status == expected
    assert headers["Content-Type"].startswith("application/json")
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Server"] == f"balena-registry-proxy/{__version__}"
    assert len(headers["X-Request-Id"]) == 32
    error = json.loads(body)["errors"][0]
    assert set(error) == {"code", "message", "detail"}


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n"
        b"\r\n0\r\n\r\n",
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\n folded: y\r\n\r\n",
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"GET /v2/\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,
    ],
)
async def test_smuggling_shapes_and_garbage_get_a_quiet_oci_400(
    wire: Wire, raw: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    assert_oci(*await wire.send(raw), 400)
    assert wire.seen == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_overlong_request_line_gets_414(wire: Wire) -> None:
    raw = b"GET /v2/" + b"a" * 3000 + b"/manifests/latest HTTP/1.1\r\nHost: x\r\n\r\n"
    assert_oci(*await wire.send(raw), 414)
    assert wire.seen == []


async def test_oversized_header_gets_431(wire: Wire) -> None:
    raw = b"GET /v2/ HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + b"e" * 2000 + b"\r\n\r\n"
    assert_oci(*await wire.send(raw), 431)
    assert wire.seen == []


async def test_non_utf8_and_control_bytes_in_headers_never_reach_upstream_as_such(
    wire: Wire,
) -> None:
    raw = b"GET /v2/a/b/manifests/latest HTTP/1.1\r\nHost: x\r\nX-Junk: \xff\xfe\x01\r\n\r\n"
    status, _, _ = await wire.send(raw)
    assert 400 <= status < 500
    assert wire.seen == []


_PIECES = st.sampled_from(
    [
        "/",
        "a",
        "b",
        "..",
        ".",
        "%2F",
        "%2e",
        "//",
        "manifests",
        "blobs",
        "tags",
        "list",
        "latest",
        "sha256:" + "a" * 64,
        "A",
        "\\",
        "?",
        "#",
        "%00",
        "~",
        " ",
        "é",
        "\t",
        "v2",
    ]
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    path=st.lists(_PIECES, max_size=12).map("".join),
    alias_target=st.sampled_from([REAL, "../x", "a/b\r\nX: y", "UPPER/case", "ok/name"]),
)
async def test_fuzzed_requests_are_4xx_or_forwarded_in_grammar(
    wire: Wire, path: str, alias_target: str
) -> None:
    wire.seen.clear()
    token = make_token(alias_entry(path.strip("/"), alias_target))
    target = ("/v2/" + path).encode("utf-8", "surrogateescape")
    raw = b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token.encode()
    status, _, _ = await wire.send(raw + b"\r\nConnection: close\r\n\r\n")
    assert status < 500
    for forwarded in wire.seen:
        name_path = forwarded.partition("?")[0].removeprefix("/v2/")
        if name_path and name_path != "_catalog":
            repository = (
                name_path.rsplit("/", 2)[0]
                if "/tags/list" not in name_path
                else name_path.removesuffix("/tags/list")
            )
            assert NAME_RE.fullmatch(repository), forwarded


@pytest.mark.parametrize(
    "raw",
    [
        # HTTP/0.9: no version, and an answer without a status line would follow.
        b"GET /ping\r\n\r\n",
        # HTTP/1.0 framing by Transfer-Encoding is faulty (RFC 9112, 6.1), keep-alive or not.
        b"GET /ping HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n",
        b"GET /ping HTTP/1.1\r\n\r\n",
    ],
)
async def test_http_without_a_version_or_with_bad_framing_gets_400_and_a_close(
    wire: Wire, raw: bytes
) -> None:
    # Wire.send reads until the proxy closes the connection.
    status, headers, body = await wire.send(raw)
    assert_oci(status, headers, body, 400)


async def test_every_answer_names_the_proxy_alone_as_server(wire: Wire) -> None:
    close = b"Host: x\r\nConnection: close\r\n\r\n"
    for raw in (b"GET /ping HTTP/1.1\r\n" + close, b"GET /v2/a/b/tags/list HTTP/1.1\r\n" + close):
        _, headers, _ = await wire.send(raw)
        assert headers["Server"] == f"balena-registry-proxy/{__version__}"
    assert wire.seen == ["/v2/a/b/tags/list"]  # its upstream named itself aiohttp


async def test_tls_on_the_plain_port_is_told_so_and_logged_at_debug(
    wire: Wire, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64
    status, headers, body = await wire.send(hello)
    assert_oci(status, headers, body, 400)
    assert "plain HTTP, not HTTPS" in json.loads(body)["errors"][0]["message"]
    access = [r for r in caplog.records if r.name == "balena_registry_proxy.access"]
    assert [r.levelno for r in access] == [logging.DEBUG]
