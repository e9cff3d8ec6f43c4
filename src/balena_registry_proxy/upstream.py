"""The upstream registry, and the hosts it redirects to: pooled HTTP connections.

This is the only module that talks to the upstream. It never decompresses (the bytes a client
receives must hash to the digest it asked for), never follows redirects by itself (whether a
blob redirect to storage is followed is the caller's decision: ``get_following``) and has no
total timeout (a multi-GiB layer may take as long as it takes while bytes keep arriving).
The HTTP work is done by ``httpclient.py``.
"""

from __future__ import annotations

import ssl
import time
from collections import OrderedDict
from collections.abc import Iterable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from urllib.parse import urljoin, urlsplit

from . import __version__
from .headers import REDIRECT_STATUSES, redirect_request_headers
from .httpclient import ConnectionPool, Response
from .upstream_errors import BrokenAnswer

__all__ = ["READ_BUFFER", "USER_AGENT", "Response", "Upstream"]

USER_AGENT = f"balena-registry-proxy/{__version__}"
# The most one read of an upstream answer takes, and so what one client that reads nothing
# makes the proxy hold (see httpclient.Body): 32 KiB keeps 1,000 stalled clients within
# 64 MiB, and relayed more cheaply than 16 or 64 KiB in the measurements of docs/benchmark.
READ_BUFFER = 32 * 1024
# Hosts besides the upstream (storage and token hosts that redirects name) kept connected.
_OTHER_ORIGINS = 16

Origin = tuple[str, str, int]


class Upstream:
    """Keep-alive connection pools to one upstream registry and the hosts it names."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float,
        first_byte_timeout: float,
        read_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """Prepare a client for ``base_url`` (``scheme://host[:port]``); call ``start`` next.

        ``first_byte_timeout`` bounds the wait for response headers; ``read_timeout`` any
        silence after that, so a multi-GiB layer takes as long as it takes while bytes flow.
        ``ssl_context`` replaces the system's trust for HTTPS (tests use it for their own CA).
        """
        self.base_url = base_url.rstrip("/")
        self._origin = _origin(self.base_url)
        self._connect_timeout = connect_timeout
        self._first_byte_timeout = first_byte_timeout
        self._read_timeout = read_timeout
        self._ssl_context = ssl_context
        self._pools: OrderedDict[Origin, ConnectionPool] = OrderedDict()
        self._started = False
        self.last_answer: float | None = None
        """``time.monotonic()`` of the last answer from upstream that was not a 5xx."""

    async def start(self) -> None:
        """Be ready to send requests (connections open on first use)."""
        self._started = True

    async def close(self) -> None:
        """Close every pooled connection."""
        self._started = False
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    def request(
        self, method: str, target: str, headers: Iterable[tuple[str, str]]
    ) -> AbstractAsyncContextManager[Response]:
        """Send ``method target`` upstream and yield the response, body unread.

        Leaving the context releases the connection: back to the pool when the body was read to
        the end, closed when it was not (a client that went away mid-blob).
        """
        return self._send(self._origin, method, target, headers, registry=True)

    async def challenge(self, request_id: str) -> str:
        """The ``WWW-Authenticate`` the registry answers an anonymous ``GET /v2/`` with.

        Its realm names the token server, its service what tokens are issued for.
        """
        async with self.request("GET", "/v2/", [("X-Request-Id", request_id)]) as probe:
            return probe.headers.get("WWW-Authenticate", "")

    async def get_following(
        self, stack: AsyncExitStack, target: str, headers: list[tuple[str, str]]
    ) -> Response:
        """GET ``target``; if the registry redirects (to blob storage), follow once without
        the client's credentials. The answer stays open until ``stack`` closes."""
        response = await stack.enter_async_context(self.request("GET", target, headers))
        location = response.headers.get("Location")
        if response.status in REDIRECT_STATUSES and location:
            absolute = urljoin(self.base_url + target, location)
            follow = self.fetch(absolute, redirect_request_headers(headers))
            response = await stack.enter_async_context(follow)
        return response

    def fetch(
        self, url: str, headers: Iterable[tuple[str, str]]
    ) -> AbstractAsyncContextManager[Response]:
        """GET an absolute ``url`` (a blob redirect's target), like ``request`` otherwise."""
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return self._send(_origin(url), "GET", target, headers, registry=False)

    def _send(
        self,
        origin: Origin,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        *,
        registry: bool,
    ) -> _Exchange:
        if not self._started:
            raise RuntimeError("Upstream.start() was not called")
        sent = list(headers)
        if not any(name.lower() == "user-agent" for name, _ in sent):
            sent.append(("User-Agent", USER_AGENT))
        return _Exchange(self, self._pool(origin), method, target, sent, registry)

    def _pool(self, origin: Origin) -> ConnectionPool:
        pool = self._pools.get(origin)
        if pool is None:
            scheme, host, port = origin
            pool = ConnectionPool(
                scheme,
                host,
                port,
                connect_timeout=self._connect_timeout,
                # Silence before the answer counts against the read timeout too.
                answer_timeout=min(self._first_byte_timeout, self._read_timeout),
                read_buffer=READ_BUFFER,
                read_timeout=self._read_timeout,
                ssl_context=self._ssl_context,
            )
            self._pools[origin] = pool
            if len(self._pools) > _OTHER_ORIGINS + 1:
                # The least recently used other host goes; the registry's own pool stays.
                for old in self._pools:
                    if old != self._origin:
                        self._pools.pop(old).close()
                        break
        self._pools.move_to_end(origin)
        return pool


class _Exchange(AbstractAsyncContextManager[Response]):
    """One request and its answer; leaving releases the connection.

    A class rather than a generator-based context manager: this runs for every request, and
    generator machinery costs more than the rest of the exchange's bookkeeping.
    """

    __slots__ = ("_headers", "_method", "_pool", "_registry", "_response", "_target", "_upstream")

    def __init__(
        self,
        upstream: Upstream,
        pool: ConnectionPool,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        registry: bool,
    ) -> None:
        self._upstream = upstream
        self._pool = pool
        self._method = method
        self._target = target
        self._headers = headers
        self._registry = registry
        self._response: Response | None = None

    async def __aenter__(self) -> Response:
        try:
            response = await self._pool.request(self._method, self._target, self._headers)
        except ValueError:
            raise BrokenAnswer("a target the proxy cannot send (a line break)") from None
        response.from_registry = self._registry
        if self._registry and response.status < 500:
            self._upstream.last_answer = time.monotonic()
        self._response = response
        return response

    async def __aexit__(self, *exc_info: object) -> None:
        # Back to the pool when the body was read to the end, else the connection closes.
        if self._response is not None:
            self._response.release()


def _origin(url: str) -> Origin:
    """``(scheme, host, port)`` of an http(s) URL; ``BrokenAnswer`` for anything else (a
    redirect the upstream answered with)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise BrokenAnswer("a redirect to a URL with an invalid port") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BrokenAnswer("a redirect to a URL that is not http(s)")
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80)
