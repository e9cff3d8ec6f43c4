"""Content the proxy fetches itself: following storage redirects, and the local cache.

Without a cache, and without ``--follow-redirects``, blobs are relayed like everything else
(``proxy.py``) and a redirect to storage goes to the client. With either, the proxy follows the
redirect itself, without the client's credentials, so clients need no route to storage. With
the cache, a blob is downloaded once (however many clients ask at the same time) and then
served from disk, and so is a manifest fetched by digest, but only to a client the upstream
confirms may read it: a HEAD of that digest, in that repository, with that client's own
Authorization. A confirmation is remembered briefly per credentials, repository AND digest;
never per credentials and repository alone, because the registry serves content only under a
repository that links it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from contextlib import AsyncExitStack
from pathlib import Path
from urllib.parse import urljoin

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from .cache import BlobCache, Download, DownloadFailed
from .errors import RegistryError
from .headers import REDIRECT_STATUSES, accepts, redirect_request_headers
from .metrics import Metrics
from .upstream import Response, Upstream
from .upstream_errors import UpstreamError

log = logging.getLogger("balena_registry_proxy")

CONFIRMATION_SECONDS = 60.0
_CONDITIONAL = ("If-None-Match", "If-Match", "If-Modified-Since", "If-Unmodified-Since")
_CONFIRMATIONS = 10_000
Key = tuple[str, str, str]


async def open_following(
    upstream: Upstream,
    stack: AsyncExitStack,
    method: str,
    target: str,
    headers: list[tuple[str, str]],
) -> Response:
    """Send a request upstream; if it answers with a redirect, follow it once, credentials off."""
    response = await stack.enter_async_context(upstream.request(method, target, headers))
    location = response.headers.get("Location")
    if response.status in REDIRECT_STATUSES and location:
        absolute = urljoin(upstream.base_url + target, location)
        follow = upstream.fetch(absolute, redirect_request_headers(headers))
        response = await stack.enter_async_context(follow)
    return response


class Confirmations:
    """Which (credentials, repository, digest) the upstream said may read a blob, and when."""

    def __init__(self) -> None:
        """An empty memory."""
        self._seen: OrderedDict[Key, float] = OrderedDict()
        self._linked: OrderedDict[tuple[str, str], None] = OrderedDict()

    def fresh(self, key: Key, now: float) -> bool:
        """Whether ``key`` was confirmed within the last ``CONFIRMATION_SECONDS``."""
        when = self._seen.get(key)
        return when is not None and now - when <= CONFIRMATION_SECONDS

    def ever(self, key: Key) -> bool:
        """Whether ``key`` was ever confirmed (what offline serving relies on)."""
        return key in self._seen

    def linked(self, repository: str, digest: str) -> bool:
        """Whether the upstream ever confirmed ``digest`` under ``repository``, for anyone."""
        return (repository, digest) in self._linked

    def remember(self, key: Key, now: float) -> None:
        """Note a confirmation of ``key`` at ``now``."""
        self._seen[key] = now
        self._seen.move_to_end(key)
        self._linked[key[1:]] = None
        self._linked.move_to_end(key[1:])
        if len(self._seen) > _CONFIRMATIONS:
            self._seen.popitem(last=False)
        if len(self._linked) > _CONFIRMATIONS:
            self._linked.popitem(last=False)


class CachedBlobs:
    """Serves blob and manifest-by-digest GETs and HEADs from the cache, filling it."""

    def __init__(self, upstream: Upstream, cache: BlobCache, metrics: Metrics) -> None:
        """Serve from ``cache``, filled and confirmed through ``upstream``."""
        self.upstream = upstream
        self.cache = cache
        self.metrics = metrics
        self.confirmations = Confirmations()
        self._fills: set[asyncio.Task[None]] = set()
        # Digests whose upstream GET is under way but not answered yet: the first client asks,
        # the others wait for its answer instead of asking too.
        self._asking: dict[str, asyncio.Future[Download | None]] = {}

    async def close(self) -> None:
        """Stop downloads in progress (their temporaries are removed)."""
        for task in list(self._fills):
            task.cancel()
        await asyncio.gather(*self._fills, return_exceptions=True)

    async def serve(
        self,
        request: web.Request,
        repository: str,
        digest: str,
        headers: list[tuple[str, str]],
        verified_pull: bool = False,
    ) -> web.StreamResponse | None:
        """Answer from the cache, or None to let the request be relayed as usual.

        ``verified_pull``: the client's token passed ``TOKEN_PUBLIC_KEY`` verification and grants
        pull on ``repository``; while upstream is down, that suffices for a digest the upstream
        confirmed under that repository before (clients fetch a new token on every pull).
        """
        path = self.cache.lookup(digest)
        download = self.cache.downloads.get(digest)
        asking = self._asking.get(digest)
        if path is None and download is None and asking is not None:
            download = await asyncio.shield(asking)
        if path is not None or download is not None:
            confirmed = await self._confirmed(
                request, "blobs", repository, digest, headers, verified_pull
            )
            if not confirmed:
                return None
            if path is not None and self.cache.lookup(digest) is None:
                return None  # evicted while the upstream was asked: relayed instead
            self.metrics.cache_requests.labels("blob", "hit" if path else "joined").inc()
            if path is not None:
                return _CachedFile(path, self.metrics, headers=_blob_headers(digest))
            assert download is not None
            return await self._follow(request, download, joined=True)
        if request.method != "GET" or "Range" in request.headers or not self.cache.filling:
            return None
        return await self._fill_and_follow(request, repository, digest, headers)

    async def serve_manifest(
        self,
        request: web.Request,
        repository: str,
        digest: str,
        headers: list[tuple[str, str]],
        verified_pull: bool = False,
    ) -> web.Response | None:
        """Answer a manifest request by digest from the cache, or None to relay it.

        Only a client whose ``Accept`` names the kept media type is answered here; anything
        else goes upstream, which decides what such a client gets.
        """
        if any(name in request.headers for name in _CONDITIONAL):
            return None  # the upstream knows what a conditional request gets
        kept = self.cache.manifest(digest)
        if kept is None or not accepts(request.headers.getall("Accept", []), kept[0]):
            return None
        confirmed = await self._confirmed(
            request, "manifests", repository, digest, headers, verified_pull
        )
        if not confirmed:
            return None
        self.metrics.cache_requests.labels("manifest", "hit").inc()
        return self._manifest_response(request, digest, *kept)

    def keep_manifest(
        self,
        headers: list[tuple[str, str]],
        repository: str,
        digest: str,
        content_type: str,
        body: bytes,
    ) -> None:
        """Keep a manifest the upstream just gave the client that sent ``headers`` upstream.

        Kept only if it hashes to ``digest``, under its media type without parameters.
        """
        media_type = content_type.split(";", 1)[0].strip().lower()
        if self.cache.holds_manifest(digest):
            kept = True
        elif self.cache.keep_manifest(digest, media_type, body):
            self.metrics.cache_requests.labels("manifest", "miss").inc()
            kept = True
        else:
            kept = False
        if kept:
            self.confirmations.remember(
                (_credentials(headers), repository, digest), time.monotonic()
            )

    def _manifest_response(
        self, request: web.Request, digest: str, media_type: str, body: bytes
    ) -> web.Response:
        if request.method == "GET":
            self.metrics.cache_served_bytes.inc(len(body))
        headers = {
            "Content-Type": media_type,
            "Docker-Content-Digest": digest,
            "Docker-Distribution-API-Version": "registry/2.0",
            "Etag": f'"{digest}"',
        }
        # For a HEAD, aiohttp sends the length of this body and leaves the body out.
        return web.Response(body=body, headers=headers)

    async def _confirmed(
        self,
        request: web.Request,
        kind: str,
        repository: str,
        digest: str,
        headers: list[tuple[str, str]],
        verified_pull: bool,
    ) -> bool:
        """Whether the upstream lets this client read that digest (remembered briefly).

        ``kind`` is the path segment, ``blobs`` or ``manifests``.
        """
        key = (_credentials(headers), repository, digest)
        now = time.monotonic()
        if self.confirmations.fresh(key, now):
            return True
        try:
            target = f"/v2/{repository}/{kind}/{digest}"
            async with self.upstream.request("HEAD", target, headers) as response:
                allowed = response.status == 200 or response.status in REDIRECT_STATUSES
        except UpstreamError:
            if self.confirmations.ever(key):
                return True  # upstream is down; this client was allowed this blob before
            if verified_pull and self.confirmations.linked(repository, digest):
                return True  # a verified fresh token for a repository that links the blob
            raise RegistryError(
                503, "UNAVAILABLE", "the upstream registry cannot confirm access right now"
            ) from None
        if allowed:
            self.confirmations.remember(key, now)
        return allowed

    async def _fill_and_follow(
        self, request: web.Request, repository: str, digest: str, headers: list[tuple[str, str]]
    ) -> web.StreamResponse | None:
        asking: asyncio.Future[Download | None] = asyncio.get_running_loop().create_future()
        self._asking[digest] = asking
        download = None
        try:
            download = await self._start_fill(repository, digest, headers)
        finally:
            del self._asking[digest]
            asking.set_result(download)
        if download is None:
            return None
        self.metrics.cache_requests.labels("blob", "miss").inc()
        key = (_credentials(headers), repository, digest)
        self.confirmations.remember(key, time.monotonic())
        return await self._follow(request, download, joined=False)

    async def _start_fill(
        self, repository: str, digest: str, headers: list[tuple[str, str]]
    ) -> Download | None:
        """Ask upstream for the blob; if it answers with it, start filling the cache."""
        stack = AsyncExitStack()
        try:
            response = await open_following(
                self.upstream, stack, "GET", f"/v2/{repository}/blobs/{digest}", headers
            )
        except BaseException:
            await stack.aclose()
            raise
        size = response.content_length
        if response.status != 200 or size is None:
            await stack.aclose()
            return None
        try:
            download = self.cache.start(digest, size)
        except OSError as error:
            # A full or read-only cache disk: the blob is relayed as without a cache.
            self.cache.refused(error)
            await stack.aclose()
            return None
        task = asyncio.create_task(self._fill(download, stack, response))
        self._fills.add(task)
        task.add_done_callback(self._fills.discard)
        return download

    async def _fill(self, download: Download, stack: AsyncExitStack, response: Response) -> None:
        ok = False
        try:
            async for chunk in response.content.iter_any():
                await download.write(chunk)
                self.metrics.cache_bytes.inc(len(chunk))
            ok = True
        except OSError as error:
            # The disk, not the upstream: this download's readers are cut once, and the next
            # requests are relayed uncached until the disk has had time to recover.
            self.cache.refused(error)
        except UpstreamError as error:
            log.warning("download of %s failed: %s", download.digest, error.cause)
        except DownloadFailed as error:
            log.warning("download of %s failed: %s", download.digest, error)
        finally:
            await stack.aclose()
            await self.cache.end(download, ok)

    async def _follow(
        self, request: web.Request, download: Download, joined: bool
    ) -> web.StreamResponse | None:
        """Stream ``download`` as it arrives; a ``joined`` client's bytes count as cached."""
        try:
            reader = download.reader()
        except DownloadFailed:
            return None  # ended badly, or kept and evicted already: ask upstream as usual
        response = web.StreamResponse(headers=_blob_headers(download.digest))
        response.content_length = download.size
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        try:
            async for chunk in reader:
                await response.write(chunk)
                if joined:
                    self.metrics.cache_served_bytes.inc(len(chunk))
        except DownloadFailed:
            # Headers are out: cut the connection, so the client never takes wrong bytes.
            if request.transport is not None:
                request.transport.close()
        return response


class _CachedFile(web.FileResponse):
    """A kept blob sent with sendfile, its bytes counted as served from the cache.

    They are counted here because the file goes out only after the handler has returned, when
    the request metrics have already been counted without them.
    """

    def __init__(self, path: Path, metrics: Metrics, headers: dict[str, str]) -> None:
        super().__init__(path, headers=headers)
        self._metrics = metrics

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        # The file goes out inside prepare; its length is then known, Range applied.
        writer = await super().prepare(request)
        if request.method == "GET" and self.status in (200, 206) and self.content_length:
            self._metrics.cache_served_bytes.inc(self.content_length)
            self._metrics.body_bytes.labels("blob").inc(self.content_length)
        return writer


def _credentials(headers: list[tuple[str, str]]) -> str:
    """The Authorization sent upstream: what the upstream's answer was about.

    Not the client's own header: a token the proxy refused is not sent, so the answer it
    got was an anonymous client's.
    """
    for name, value in headers:
        if name.lower() == "authorization":
            return value
    return ""


def _blob_headers(digest: str) -> dict[str, str]:
    return {
        "Docker-Content-Digest": digest,
        "Content-Type": "application/octet-stream",
        "Docker-Distribution-API-Version": "registry/2.0",
    }
