"""The aiohttp application: routes, OCI error answers, headers on every answer, request ids,
metrics, health and readiness, and the access log."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from time import perf_counter
from typing import Any, cast

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Handler

from . import __version__
from .accesslog import ACCESS, AccessRecord, redact_target
from .admission import refusal
from .balena_api import BalenaApi
from .config import ConfigError, Settings
from .disk_store import DiskStore, StoreInUse
from .edge_cache import EdgeCache
from .envelope import Sealer, derive_key
from .errors import CONTENT_TYPE, RegistryError, internal_error
from .forwarded import TrustProxy, client_address
from .headers import SECURITY_HEADERS
from .login import Login
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics, status_class
from .proxy import Proxy, Resolving
from .realm import TOKEN_PATH
from .request_state import BODY_BYTES, REQUEST_ID, ROUTE, STARTED, UPSTREAM_TARGET
from .requestid import HEADER as REQUEST_ID_HEADER
from .requestid import request_id
from .resolver import Resolver
from .resources import connections_for
from .server import QUIET, SERVER_NAME, ConnectionLimits
from .sharing import PEER_PATH
from .token_relay import TokenRelay
from .upstream import Upstream
from .upstream_errors import UpstreamError
from .upstream_tokens import UpstreamTokens
from .verification import TokenVerifier, load_public_key

log = logging.getLogger("balena_registry_proxy")
ACCESS_LOGGER = logging.getLogger("balena_registry_proxy.access")
METRICS = web.AppKey("metrics", Metrics)
UPSTREAM = web.AppKey("upstream", Upstream)
TRUST = web.AppKey("trust_proxy", TrustProxy)
MAX_HEAD = web.AppKey("max_head", int)
RESOLVING = web.AppKey("resolving", bool)
# nginx's convention for "the client closed the connection before the answer was complete".
CLIENT_GONE = 499
_OWN_ROUTES = {"/": "home", "/ping": "ping", "/ready": "ready", "/metrics": "metrics"}
# Readiness trusts an upstream answer this recent without asking again.
READY_FRESH_SECONDS = 30.0
READY_PROBE_TIMEOUT = 5.0


def error_response(error: RegistryError) -> web.Response:
    """The JSON response for an error the proxy answers itself."""
    return web.Response(
        status=error.status,
        body=error.body(),
        content_type=CONTENT_TYPE,
        headers=error.headers,
    )


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Give the request its id, and count it in the metrics once it is answered."""
    request[STARTED] = started = time.perf_counter()
    request[REQUEST_ID] = request_id(request.headers.get(REQUEST_ID_HEADER))
    request[ROUTE] = _OWN_ROUTES.get(request.path, "other")
    metrics = request.app[METRICS]
    metrics.in_flight.inc()
    try:
        refused = refusal(request.version, request.raw_headers, request.app[MAX_HEAD])
        if refused is not None:
            response: web.StreamResponse = error_response(refused)
            response.force_close()
        else:
            response = await handler(request)
    except asyncio.CancelledError:
        # The client left and aiohttp cancelled the handler: aiohttp writes no access line.
        elapsed = time.perf_counter() - started
        finished(ACCESS_LOGGER, request, request.app[TRUST], CLIENT_GONE, elapsed)
        raise
    finally:
        metrics.in_flight.dec()
    return response


def finished(
    logger: logging.Logger,
    request: web.BaseRequest,
    trust: TrustProxy,
    status: int,
    elapsed: float,
    response: web.StreamResponse | None = None,
) -> None:
    """Count a finished request and write its access line: the one place that does both.

    ``response`` is None for a request whose client left before it was answered.
    """
    size = _body_size(request, response)
    if ROUTE in request:
        # Requests the HTTP parser refused never reached the application or its metrics.
        metrics = cast(web.Request, request).app[METRICS]
        route = request[ROUTE]
        method = request.method if request.method in ("GET", "HEAD") else "other"
        metrics.requests.labels(method, route, status_class(status)).inc()
        metrics.body_bytes.labels(route).inc(size)
    level = logging.DEBUG if response is not None and response.get(QUIET) else logging.INFO
    if logger.isEnabledFor(level):
        entry = _access_record(request, trust, status, elapsed, size)
        # makeRecord and handle rather than log: log walks the stack for the caller's file
        # and line, which no format prints, on every request. The record rides along for
        # the JSON format, which alone turns it into fields.
        logger.handle(
            logger.makeRecord(
                logger.name, level, __file__, 0, entry.line(), (), None, extra={ACCESS: entry}
            )
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


async def home(request: web.Request) -> web.Response:
    """What this is and how to pull through it, for a person who opened it in a browser."""
    host = request.headers.get("Host", "<proxy>")
    text = (
        f"balena-registry-proxy {__version__}: a read-only Docker registry that serves "
        "balenaCloud release images by name.\n\n"
        f"  docker pull {host}/<org>/<app>[/<version|commit>]\n\n"
        "<org>/<app> is the app (fleet) slug; without a version you get the pinned release.\n"
        f"Private apps: docker login {host} with your balena username and an API key.\n"
    )
    if request.app[RESOLVING]:
        text += (
            "\nTags and services:\n\n"
            f"  docker pull {host}/<org>/<app>:<version>\n"
            f"  docker pull {host}/<org>/<app>[/<version>]/<service>\n"
            f"  skopeo list-tags docker://{host}/<org>/<app>\n"
        )
    return web.Response(text=text)


async def ping(request: web.Request) -> web.Response:
    """Liveness: answers without asking upstream."""
    return web.Response(text="pong")


async def ready(request: web.Request) -> web.Response:
    """Readiness: 200 while the upstream answers (recently, or to a probe now), else 503."""
    upstream = request.app[UPSTREAM]
    last = upstream.last_answer
    if last is None or time.monotonic() - last > READY_FRESH_SECONDS:
        answered = False
        try:
            async with asyncio.timeout(READY_PROBE_TIMEOUT):
                async with upstream.request(
                    "GET", "/v2/", [(REQUEST_ID_HEADER, request[REQUEST_ID])]
                ) as probe:
                    # 401 is the usual answer of a registry with token auth: it is up.
                    answered = probe.status < 500
        except (UpstreamError, TimeoutError):
            pass
        if not answered:
            error = RegistryError(503, "UNAVAILABLE", "the upstream registry does not answer")
            return error_response(error)
    return web.json_response({"upstream": upstream.base_url, "ready": True})


async def metrics_page(request: web.Request) -> web.Response:
    """The Prometheus exposition of this process's metrics."""
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS:
        response.headers.setdefault(name, value)
    # aiohttp announces its own and Python's versions, storage hosts theirs: one name for all.
    response.headers["Server"] = SERVER_NAME
    if REQUEST_ID in request:
        response.headers[REQUEST_ID_HEADER] = request[REQUEST_ID]


class AccessLogger(AbstractAccessLogger):
    """One line per finished request, written after the last byte.

    Also called for requests that never reached the application (a TLS hello on the plain
    port, say), so it must not depend on anything but the request itself.
    """

    trust_proxy = TrustProxy()

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        """Count the request and write its access-log line, once its last byte is out.

        ``time`` is aiohttp's measure, from the event loop's clock (whole milliseconds on
        uvloop); a request that reached the application is timed by its own clock instead.
        """
        started = request.get(STARTED)
        elapsed = time if started is None else perf_counter() - started
        finished(self.logger, request, self.trust_proxy, response.status, elapsed, response)

    @property
    def enabled(self) -> bool:
        """Always: the metrics are counted here, whatever the log level."""
        return True


def _access_record(
    request: web.BaseRequest,
    trust: TrustProxy,
    status: int,
    elapsed: float,
    size: int,
) -> AccessRecord:
    """The facts of one request's access-log entry."""
    return AccessRecord.of(
        client=client_address(request.remote, _forwarded_for(request), trust),
        method=request.method,
        target=request.raw_path,
        upstream_target=request.get(UPSTREAM_TARGET),
        status=status,
        size=size,
        elapsed_ms=elapsed * 1000,
        request_id=request.get(REQUEST_ID),
    )


def _forwarded_for(request: web.BaseRequest) -> list[str]:
    # Requests refused by the HTTP parser carry a plain dict, not a multidict.
    return [v for k, v in request.headers.items() if k.lower() == "x-forwarded-for"]


def _body_size(request: web.BaseRequest, response: web.StreamResponse | None) -> int:
    """Body bytes sent: noted while streaming, else the length of a buffered body."""
    if BODY_BYTES in request:
        return int(request[BODY_BYTES])
    if request.method == "HEAD" or response is None:
        return 0
    return response.content_length or 0


def runner_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for the ``ProxyRunner`` that serves ``create_app(settings)``."""

    class ConfiguredAccessLogger(AccessLogger):
        trust_proxy = settings.trust_proxy

    return {
        # A client that leaves cancels its handler, which closes the upstream connection at
        # once, even while upstream is silent.
        "handler_cancellation": True,
        "access_log_class": ConfiguredAccessLogger,
        "access_log": ACCESS_LOGGER,
        "shutdown_timeout": settings.shutdown_timeout,
        "keepalive_timeout": settings.keepalive_timeout,
    }


def connection_limits(settings: Settings, open_files: int | None = None) -> ConnectionLimits:
    """What each client connection may take, from ``settings``.

    With ``open_files`` (the descriptors the process may open) the connection limit is
    lowered to what they can serve, so that accepting never fails for lack of them.
    """
    max_connections = settings.max_connections
    if open_files is not None and connections_for(open_files) < max_connections:
        max_connections = connections_for(open_files)
        log.warning(
            "MAX_CONNECTIONS lowered from %d to %d: the open-file limit is %d",
            settings.max_connections,
            max_connections,
            open_files,
        )
    return ConnectionLimits(
        max_connections=max_connections,
        head_timeout=settings.request_head_timeout,
        max_request_line=settings.max_request_line,
        max_header_size=settings.max_header_size,
        max_head=settings.max_head,
    )


def token_verifier(settings: Settings) -> TokenVerifier | None:
    """The token verifier for ``TOKEN_PUBLIC_KEY``, if set; ConfigError if it is unusable."""
    if settings.token_public_key is None:
        return None
    try:
        key = load_public_key(Path(settings.token_public_key).read_bytes())
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"TOKEN_PUBLIC_KEY (--token-public-key) {settings.token_public_key!r}: "
            f"{getattr(error, 'strerror', None) or error}"
        ) from None
    # Unset, the audience is learned from the registry's challenge (see Proxy._audience).
    return TokenVerifier(key, settings.token_audience or settings.registry2_host)


def _edge_cache(settings: Settings, upstream: Upstream, metrics: Metrics) -> EdgeCache | None:
    """The edge cache for ``CACHE_S3_URL`` or ``CACHE_DIR``, if set; ConfigError if the
    folder is unusable."""
    if settings.cache_s3_url is not None:
        # Imported here: botocore and redis-py cost every other process ~17 MiB for nothing.
        from .shared_cache import shared_edge_cache

        return shared_edge_cache(settings, upstream, metrics)
    if settings.cache_dir is None:
        return None
    store = DiskStore(Path(settings.cache_dir), settings.cache_max_size)
    try:
        store.open()
    except StoreInUse as error:
        raise ConfigError(f"CACHE_DIR (--cache-dir) {settings.cache_dir!r}: {error}") from None
    except OSError as error:
        raise ConfigError(
            f"CACHE_DIR (--cache-dir) {settings.cache_dir!r}: {error.strerror or error}"
        ) from None
    metrics.watch_cache(lambda: store.size, lambda: store.evictions)
    return EdgeCache(upstream, store, metrics, send_timeout=settings.send_timeout)


def _resolving(
    settings: Settings, upstream: Upstream, relay: TokenRelay, metrics: Metrics
) -> Resolving:
    """Resolver mode's parts for ``settings``."""
    # Unset, a key of this process's own: the workers of one proxy share it (supervise
    # makes it before they fork), separate replicas do not.
    secret = settings.token_seal_key or secrets.token_urlsafe(32)
    sealer = Sealer(derive_key(secret))
    api = BalenaApi(
        upstream,
        settings.api_url,
        metrics,
        timeout=settings.api_timeout,
        ttl=settings.api_cache_ttl,
    )
    resolver = Resolver(api, UpstreamTokens(relay, metrics), upstream)
    return Resolving(Login(relay, sealer, metrics), sealer, resolver)


def create_app(settings: Settings) -> web.Application:
    """Build the proxy application for ``settings``; the upstream pool opens on startup."""
    app = web.Application(middlewares=[observe, oci_errors], client_max_size=1 << 20)
    upstream = Upstream(
        settings.registry_url,
        connect_timeout=settings.connect_timeout,
        first_byte_timeout=settings.first_byte_timeout,
        read_timeout=settings.read_timeout,
    )
    metrics = Metrics()
    app[METRICS] = metrics
    app[UPSTREAM] = upstream
    app[TRUST] = settings.trust_proxy
    app[MAX_HEAD] = settings.max_head
    app[RESOLVING] = settings.resolve
    cache = _edge_cache(settings, upstream, metrics)
    relay = TokenRelay(upstream) if settings.proxy_auth or settings.resolve else None
    proxy = Proxy(
        upstream,
        metrics,
        verifier=token_verifier(settings),
        cache=cache,
        follow_redirects=settings.follows_redirects,
        token_relay=relay,
        trust=settings.trust_proxy,
        send_timeout=settings.send_timeout,
        resolving=(
            _resolving(settings, upstream, relay, metrics) if relay and settings.resolve else None
        ),
    )
    app.router.add_get("/", home)
    app.router.add_get("/ping", ping)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics_page)
    app.router.add_route("*", "/v2{tail:.*}", proxy.handle)
    if relay is not None:
        app.router.add_get(TOKEN_PATH, proxy.token)
    if cache is not None and cache.sharing is not None:
        app.router.add_get(PEER_PATH + "{digest}", cache.serve_peer)
    app.on_response_prepare.append(_security_headers)

    async def upstream_pool(app: web.Application) -> AsyncIterator[None]:
        await upstream.start()
        if cache is not None:
            await cache.start()
        yield
        if cache is not None:
            await cache.close()
        await upstream.close()

    app.cleanup_ctx.append(upstream_pool)
    return app
