"""The aiohttp application: routes, OCI error answers, security headers, access log."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Handler

from .accesslog import format_line, redact_target
from .config import Settings
from .errors import CONTENT_TYPE, RegistryError, internal_error
from .forwarded import TrustProxy, client_address
from .headers import SECURITY_HEADERS
from .proxy import BODY_BYTES, UPSTREAM_TARGET, Proxy
from .upstream import Upstream

log = logging.getLogger("balena_registry_proxy")
ACCESS_LOGGER = logging.getLogger("balena_registry_proxy.access")
SERVER_NAME = "balena-registry-proxy"


def error_response(error: RegistryError) -> web.Response:
    """The JSON response for an error the proxy answers itself."""
    return web.Response(
        status=error.status,
        body=error.body(),
        content_type=CONTENT_TYPE,
        headers=error.headers,
    )


@web.middleware
async def oci_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer every refusal, ours or the router's, in the registry's JSON error format."""
    try:
        return await handler(request)
    except RegistryError as error:
        return error_response(error)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        headers = {"Allow": error.headers["Allow"]} if "Allow" in error.headers else {}
        message = error.reason.lower()
        return error_response(RegistryError(error.status, "UNSUPPORTED", message, headers=headers))
    except Exception:
        # A fault of the proxy's own: the details go to the log, the client gets the format.
        log.exception("unexpected error handling %s", redact_target(request.raw_path))
        return error_response(internal_error())


async def ping(request: web.Request) -> web.Response:
    """Health check: answers without asking upstream."""
    return web.Response(text="pong")


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS:
        response.headers.setdefault(name, value)
    # aiohttp would announce its own and Python's versions; say only what answered.
    response.headers.setdefault("Server", SERVER_NAME)


class AccessLogger(AbstractAccessLogger):
    """One line per finished request, written after the last byte (or the disconnect).

    Also called for requests that never reached the application (a TLS hello on the plain
    port, say), so it must not depend on anything but the request itself.
    """

    trust_proxy = TrustProxy()

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        """Write the access-log line for ``request``."""
        client = client_address(request.remote, _forwarded_for(request), self.trust_proxy)
        self.logger.info(
            format_line(
                client=client,
                method=request.method,
                target=request.raw_path,
                upstream_target=request.get(UPSTREAM_TARGET),
                status=response.status,
                size=_body_size(request, response),
                elapsed_ms=time * 1000,
            )
        )

    @property
    def enabled(self) -> bool:
        """Whether lines would be written at all (skips the work when they would not)."""
        return self.logger.isEnabledFor(logging.INFO)


def _forwarded_for(request: web.BaseRequest) -> list[str]:
    # Requests refused by the HTTP parser carry a plain dict, not a multidict.
    return [v for k, v in request.headers.items() if k.lower() == "x-forwarded-for"]


def _body_size(request: web.BaseRequest, response: web.StreamResponse) -> int:
    """Body bytes sent: counted while streaming, else the length of a buffered body."""
    if BODY_BYTES in request:
        return int(request[BODY_BYTES])
    if request.method == "HEAD":
        return 0
    return response.content_length or 0


def runner_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for the ``AppRunner`` that serves ``create_app(settings)``."""

    class ConfiguredAccessLogger(AccessLogger):
        trust_proxy = settings.trust_proxy

    return {
        "access_log_class": ConfiguredAccessLogger,
        "access_log": ACCESS_LOGGER,
        "shutdown_timeout": settings.shutdown_timeout,
    }


def create_app(settings: Settings) -> web.Application:
    """Build the proxy application for ``settings``; the upstream pool opens on startup."""
    app = web.Application(middlewares=[oci_errors], client_max_size=1 << 20)
    upstream = Upstream(
        settings.registry_url,
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
    )
    proxy = Proxy(upstream)
    app.router.add_get("/ping", ping)
    app.router.add_route("*", "/v2{tail:.*}", proxy.handle)
    app.on_response_prepare.append(_security_headers)

    async def upstream_pool(app: web.Application) -> AsyncIterator[None]:
        await upstream.start()
        yield
        await upstream.close()

    app.cleanup_ctx.append(upstream_pool)
    return app
