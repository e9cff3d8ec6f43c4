"""The HTTP server around the application: connections, their limits, and parser refusals.

aiohttp answers malformed HTTP (smuggling shapes such as Content-Length with
Transfer-Encoding, oversized request lines and headers, bytes that are not HTTP) before any
application code runs, in plain text and with an ERROR log line and a traceback. This module
gives those answers the registry's JSON error format, the right status (414 for a request line
over the limit, 431 for headers), the security headers, and a quiet log line.

It also bounds what clients can make the proxy hold: at most ``max_connections`` connections
(more are answered 503 and closed), a request head must arrive within ``head_timeout`` once it
started, and nothing a client does not read waits in the proxy's send buffers (see
``Proxy._stream``).

aiohttp builds its ``Server`` itself; ``ProxyRunner`` swaps in a subclass. That is aiohttp's
private API, so the runner checks at start-up that the hook is still where it was.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from . import __version__
from .errors import CONTENT_TYPE, error_body
from .headers import SECURITY_HEADERS
from .requestid import HEADER as REQUEST_ID_HEADER
from .requestid import request_id
from .resources import MemoryTrim

SERVER_NAME = f"balena-registry-proxy/{__version__}"
QUIET = web.ResponseKey("quiet", bool)
"""Set on a response whose access line is written at debug level (noise: TLS on HTTP)."""
# At most one "connection limit reached" warning this often.
_LIMIT_WARNING_SECONDS = 10.0
# A refused connection's request is read (so the client sees the 503, not a reset) for at
# most this long and this much; beyond this many refusals at once, connections are dropped.
_REFUSAL_READ_SECONDS = 5.0
_REFUSAL_READ_BYTES = 16 * 1024
_MAX_REFUSALS = 64
# Bytes a client may send while its request is being answered (a pipelined request): more is
# no client's habit, and aiohttp would parse and queue them all.
_MAX_AHEAD = 64 * 1024

log = logging.getLogger("balena_registry_proxy")


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """What one client connection may take of the server."""

    max_connections: int = 1024
    head_timeout: float = 10.0
    max_request_line: int = 8190
    max_header_size: int = 8190
    max_head: int = 3 * 8190


def parser_refusal(
    exc: BaseException | None, status: int, line_limit: int, header_limit: int
) -> tuple[int, str, str]:
    """Status, OCI code and message for a request the HTTP parser refused.

    aiohttp's LineTooLong names the limit it hit; with distinct limits that tells a request
    line from a header. With equal limits, what it was reading decides: the C parser hands
    over the request target, which starts with '/' or a scheme.
    """
    text = str(exc) if exc is not None else ""
    if isinstance(exc, LineTooLong):
        limit = str(exc.args[1]) if len(exc.args) > 1 else ""
        read = exc.args[0] if exc.args else b""
        if line_limit != header_limit:
            too_long_line = limit == str(line_limit)
        else:
            too_long_line = isinstance(read, bytes | bytearray) and read.startswith((b"/", b"http"))
        if too_long_line:
            return 414, "UNSUPPORTED", "request line too long"
        return 431, "UNSUPPORTED", "request header too large"
    if "too many headers" in text.lower():
        return 431, "UNSUPPORTED", "too many request headers"
    if is_tls_hello(exc):
        return status, "UNSUPPORTED", "this port speaks plain HTTP, not HTTPS"
    return status, "UNSUPPORTED", "malformed HTTP request"


def is_tls_hello(exc: BaseException | None) -> bool:
    """Whether a parser refusal was of a TLS handshake: a client trying HTTPS on this port.

    Clients such as skopeo try HTTPS first. The handshake record starts with 0x16 and a
    protocol version 3.x; aiohttp's C parser says it recognised it, its Python parser shows
    the bytes.
    """
    text = str(exc)
    return isinstance(exc, BadHttpMethod) and ("HTTPS traffic" in text or "\\x16\\x03" in text)


def refusal_response(status: int, code: str, message: str) -> web.Response:
    """An answer to a request that never reached the application; the connection closes."""
    response = web.Response(
        status=status,
        body=error_body(code, message),
        content_type=CONTENT_TYPE,
        headers={
            **dict(SECURITY_HEADERS),
            "Server": SERVER_NAME,
            REQUEST_ID_HEADER: request_id(None),
        },
    )
    response.force_close()
    return response


class LoopErrors:
    """The event loop's exception handler: accepting without descriptors is a warning.

    asyncio reports a failed ``accept()`` (no descriptors left) as an error with a traceback,
    every second while it lasts; an operator needs one line saying what to change. (uvloop
    drops such connections without a word; the connection limit keeps them from happening.)
    """

    def __init__(self) -> None:
        """No warning given yet."""
        self._last_warning = -_LIMIT_WARNING_SECONDS

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """Handle one error ``context`` of ``loop``."""
        error = context.get("exception")
        if isinstance(error, OSError) and "accept" in str(context.get("message", "")):
            now = time.monotonic()
            if now - self._last_warning >= _LIMIT_WARNING_SECONDS:
                self._last_warning = now
                log.warning(
                    "cannot accept connections: %s; raise the open-file limit or lower "
                    "MAX_CONNECTIONS",
                    error.strerror or error,
                )
            return
        loop.default_exception_handler(context)


class _OCIRequestHandler(RequestHandler):
    server: _OCIServer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Pause writers as soon as anything waits in the send buffer.

        A relay waits for the client before it reads on (see ``Proxy._stream``); with the
        default high-water mark of 64 KiB a client that reads nothing would hold that much
        more of this process's memory.
        """
        self._refused = not self.server.admit(self)
        if self._refused:
            # Over the limit once its TLS handshake was done: accepted below the limit while
            # others were handshaking too.
            _answer_busy(transport)
            return
        super().connection_made(transport)
        cast(asyncio.WriteTransport, transport).set_write_buffer_limits(high=0)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._ahead = 0

    def data_received(self, data: bytes) -> None:
        """Parse, within bounds: a request head must arrive within ``head_timeout`` once it
        started and take at most ``max_head`` bytes; little may come ahead of an answer."""
        limits = self.server.limits
        if self._request_in_progress:
            self._ahead += len(data)
            if self._ahead > _MAX_AHEAD:
                log.debug("closing a connection from %s: too much sent ahead", self._peer())
                self.force_close()
                return
        else:
            self._ahead = 0
            self._head_bytes += len(data)
        count = self._request_count
        super().data_received(data)
        if self._request_count != count:
            self._head_bytes = 0
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
        elif self._head_bytes > limits.max_head:
            log.debug("refused a request head of more than %d bytes", limits.max_head)
            _answer_raw(
                self.transport, 431, "Request Header Fields Too Large", "request head too large"
            )
            self.force_close()
        elif self._head_timer is None and data and not self._request_in_progress:
            self._head_timer = self._loop.call_later(
                limits.head_timeout, self._head_too_slow, count
            )

    def _head_too_slow(self, count: int) -> None:
        self._head_timer = None
        if self._request_count == count and not self._request_in_progress:
            log.debug("closing a connection from %s: request head too slow", self._peer())
            self.force_close()

    def _peer(self) -> str:
        transport = self.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        return str(peer[0]) if isinstance(peer, tuple) else "-"

    def connection_lost(self, exc: BaseException | None) -> None:
        """Stop the head timer with the connection, and free its place."""
        if self._refused:
            return
        self.server.open.discard(self)
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Answer a request the parser refused in the OCI format, and quietly."""
        if status >= 500 or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        limits = self.server.limits
        status, code, text = parser_refusal(
            exc, status, limits.max_request_line, limits.max_header_size
        )
        log.debug("refused malformed request from %s: %s", request.remote, type(exc).__name__)
        response = refusal_response(status, code, text)
        if is_tls_hello(exc):
            response[QUIET] = True
        return response


def _answer_busy(transport: asyncio.BaseTransport | None) -> None:
    """The answer of a connection beyond the limit: 503, try again in a second."""
    _answer_raw(
        transport,
        503,
        "Service Unavailable",
        "too many connections: try again shortly",
        code="UNAVAILABLE",
        extra="Retry-After: 1\r\n",
    )


def _answer_raw(
    transport: asyncio.BaseTransport | None,
    status: int,
    reason: str,
    message: str,
    code: str = "UNSUPPORTED",
    extra: str = "",
) -> None:
    """Write an OCI error answer straight to ``transport`` and close it: for connections that
    never get as far as the application."""
    if transport is None or transport.is_closing():
        return
    body = error_body(code, message)
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        f"Content-Type: {CONTENT_TYPE}\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"{extra}"
        f"Server: {SERVER_NAME}\r\n"
        "Connection: close\r\n\r\n"
    )
    cast(asyncio.WriteTransport, transport).write(head.encode("ascii") + body)
    transport.close()


class _Refusal(asyncio.Protocol):
    """A connection over the limit: its request head is read, then answered 503 and closed."""

    def __init__(self, refusals: weakref.WeakSet[_Refusal]) -> None:
        self._refusals = refusals
        refusals.add(self)
        self._transport: asyncio.Transport | None = None
        self._received = bytearray()
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(_REFUSAL_READ_SECONDS, self._answer)

    def data_received(self, data: bytes) -> None:
        self._received += data
        if b"\r\n\r\n" in self._received or len(self._received) > _REFUSAL_READ_BYTES:
            self._answer()

    def _answer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        transport, self._transport = self._transport, None
        _answer_busy(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._transport = None
        self._refusals.discard(self)


class _Dropped(asyncio.Protocol):
    """A connection beyond the limit and beyond the refusals answered: closed at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class _OCIServer(web.Server):
    limits = ConnectionLimits()
    trim: MemoryTrim
    open: set[_OCIRequestHandler]
    """Connections made (TLS handshakes done) and not yet lost."""
    refusals: weakref.WeakSet[_Refusal]
    last_limit_warning = 0.0

    def admit(self, handler: _OCIRequestHandler) -> bool:
        """Count ``handler``'s connection in, if there is room for it."""
        if len(self.open) >= self.limits.max_connections:
            return False
        self.open.add(handler)
        return True

    def __call__(self) -> RequestHandler:
        # aiohttp's factory type says RequestHandler; the loop needs only a protocol.
        in_use = len(self.open)
        if in_use >= self.limits.max_connections:
            now = time.monotonic()
            if now - self.last_limit_warning >= _LIMIT_WARNING_SECONDS:
                self.last_limit_warning = now
                log.warning(
                    "%d connections open, the limit (MAX_CONNECTIONS): answering new ones 503",
                    in_use,
                )
            if len(self.refusals) >= _MAX_REFUSALS:
                return cast(RequestHandler, _Dropped())
            return cast(RequestHandler, _Refusal(self.refusals))
        handler = _OCIRequestHandler(self, loop=self._loop, **self._kwargs)
        handler.server = self
        return handler

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        """Forget the connection; after many have closed, give their memory back."""
        super().connection_lost(handler, exc)
        self.trim.closed()


class ProxyRunner(web.AppRunner):
    """An ``AppRunner`` whose connections are limited, and refused in the OCI format."""

    def __init__(self, app: web.Application, *, limits: ConnectionLimits, **kwargs: Any) -> None:
        """Serve ``app`` within ``limits``; ``kwargs`` go to ``web.AppRunner``."""
        super().__init__(
            app,
            max_line_size=limits.max_request_line,
            max_field_size=limits.max_header_size,
            **kwargs,
        )
        self._limits = limits

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        if type(server) is not web.Server or not hasattr(server, "_connections"):
            raise RuntimeError(
                f"aiohttp {web.__name__} changed its Server: this proxy's connection handling "
                "needs the aiohttp versions pyproject.toml allows"
            )
        server.__class__ = _OCIServer
        assert isinstance(server, _OCIServer)
        server.limits = self._limits
        server.trim = MemoryTrim(asyncio.get_running_loop().call_later)
        server.open = set()
        server.refusals = weakref.WeakSet()
        return server
