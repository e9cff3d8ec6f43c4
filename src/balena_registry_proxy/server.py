"""The HTTP server around the application: requests the HTTP parser refuses get OCI answers.

aiohttp answers malformed HTTP (smuggling shapes such as Content-Length with
Transfer-Encoding, oversized request lines and headers, bytes that are not HTTP) before any
application code runs, in plain text and with an ERROR log line and a traceback. This module
gives those answers the registry's JSON error format, the right status (414 for a request line
over the limit, 431 for headers), the security headers, and a quiet log line.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from .errors import CONTENT_TYPE, error_body
from .headers import SECURITY_HEADERS
from .requestid import HEADER as REQUEST_ID_HEADER
from .requestid import request_id

SERVER_NAME = "balena-registry-proxy"

log = logging.getLogger("balena_registry_proxy")


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
    return status, "UNSUPPORTED", "malformed HTTP request"


class _OCIRequestHandler(RequestHandler):
    limits = (8190, 8190)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500 or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        status, code, text = parser_refusal(exc, status, *self.limits)
        rid = request_id(None)
        log.debug(
            "refused malformed request from %s: %s rid=%s", request.remote, type(exc).__name__, rid
        )
        response = web.Response(
            status=status,
            body=error_body(code, text),
            content_type=CONTENT_TYPE,
            headers={**dict(SECURITY_HEADERS), "Server": SERVER_NAME, REQUEST_ID_HEADER: rid},
        )
        response.force_close()
        return response


class _OCIServer(web.Server):
    limits = (8190, 8190)

    def __call__(self) -> RequestHandler:
        handler = _OCIRequestHandler(self, loop=self._loop, **self._kwargs)
        handler.limits = self.limits
        return handler


class ProxyRunner(web.AppRunner):
    """An ``AppRunner`` whose connections answer parser refusals in the OCI format."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # aiohttp builds its Server internally; only its per-connection factory differs here.
        server.__class__ = _OCIServer
        assert isinstance(server, _OCIServer)
        kwargs = server._kwargs
        server.limits = (kwargs.get("max_line_size", 8190), kwargs.get("max_field_size", 8190))
        return server


def parser_limits(max_request_line: int, max_header_size: int) -> dict[str, Any]:
    """aiohttp's parser limits, as runner keyword arguments."""
    return {"max_line_size": max_request_line, "max_field_size": max_header_size}
