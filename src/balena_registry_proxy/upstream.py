"""The upstream registry: one pooled HTTP client session for the proxy's lifetime.

This is the only module that talks to the upstream. It never decompresses (the bytes a client
receives must hash to the digest it asked for), never follows redirects (a blob redirect to
storage is the client's to follow, without the proxy's involvement) and has no total timeout (a
multi-GiB layer may take as long as it takes while bytes keep arriving).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from . import __version__

USER_AGENT = f"balena-registry-proxy/{__version__}"
READ_BUFFER = 64 * 1024


class Upstream:
    """A keep-alive connection pool to one upstream registry."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float,
        first_byte_timeout: float,
        read_timeout: float,
    ) -> None:
        """Prepare a client for ``base_url`` (``scheme://host[:port]``); call ``start`` next.

        ``first_byte_timeout`` bounds the wait for response headers; ``read_timeout`` any
        silence after that, so a multi-GiB layer takes as long as it takes while bytes flow.
        """
        self.base_url = base_url.rstrip("/")
        self._first_byte_timeout = first_byte_timeout
        self._connect_timeout = connect_timeout
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self._session: aiohttp.ClientSession | None = None
        self.last_answer: float | None = None
        """``time.monotonic()`` of the last answer from upstream that was not a 5xx."""

    async def start(self) -> None:
        """Open the connection pool."""
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=False,
            # The client's own headers are relayed; aiohttp must not add or replace any.
            skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent"),
            cookie_jar=aiohttp.DummyCookieJar(),
            # Per connection aiohttp buffers up to twice this before it stops reading: small
            # enough for many slow clients on a small device, large enough for few wake-ups.
            read_bufsize=READ_BUFFER,
        )

    async def close(self) -> None:
        """Close every pooled connection."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def request(
        self, method: str, target: str, headers: Iterable[tuple[str, str]]
    ) -> AbstractAsyncContextManager[aiohttp.ClientResponse]:
        """Send ``method target`` upstream and yield the response, body unread.

        Leaving the context releases the connection: back to the pool when the body was read to
        the end, closed when it was not (a client that went away mid-blob).
        """
        return self._send(method, URL(self.base_url + target, encoded=True), headers)

    def fetch(
        self, url: str, headers: Iterable[tuple[str, str]]
    ) -> AbstractAsyncContextManager[aiohttp.ClientResponse]:
        """GET an absolute ``url`` (a blob redirect's target), like ``request`` otherwise."""
        return self._send("GET", URL(url, encoded=True), headers)

    @asynccontextmanager
    async def _send(
        self, method: str, url: URL, headers: Iterable[tuple[str, str]]
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        if self._session is None:
            raise RuntimeError("Upstream.start() was not called")
        header_map = CIMultiDict(headers)
        header_map.setdefault("User-Agent", USER_AGENT)
        # The first-byte clock starts once connected: aiohttp bounds connecting by itself.
        async with asyncio.timeout(self._connect_timeout + self._first_byte_timeout):
            response = await self._session.request(
                method, url, headers=header_map, allow_redirects=False
            )
        if response.status < 500:
            self.last_answer = time.monotonic()
        try:
            yield response
        finally:
            # Back to the pool when the body was read to the end, else the connection closes.
            response.release()
