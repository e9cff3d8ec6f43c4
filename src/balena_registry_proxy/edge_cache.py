"""The edge cache: confirms each client's access, fills the store once, serves from it.

A blob is downloaded once however many clients ask at the same time, and served from disk
after that, and so is a manifest fetched by digest; but only to a client the upstream confirms
may read it: a HEAD of that digest, in that repository, with that client's own Authorization
(remembered briefly, see ``confirmations.py``). Clients of a blob being downloaded read the
growing file, from the start or from the offset of their Range, with the kernel's sendfile,
so a client that reads nothing costs no memory here. The bytes live in a store (``store.py``;
``disk_store.py`` on local disk).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from .confirmations import Confirmations, key
from .download import Download, DownloadFailed
from .file_answer import answer_from_file
from .headers import REDIRECT_STATUSES, accepts, unconditional
from .metrics import Metrics
from .request_state import BODY_BYTES
from .store import Store
from .upstream import Response, Upstream
from .upstream_errors import UpstreamError

log = logging.getLogger("balena_registry_proxy")

_CONDITIONAL = ("If-None-Match", "If-Match", "If-Modified-Since", "If-Unmodified-Since")


@dataclass(frozen=True, slots=True)
class Uncached:
    """An upstream answer the cache asked for but does not keep (too big for it, or not a
    blob): the caller relays it, then closes ``stack``."""

    response: Response
    stack: AsyncExitStack


class EdgeCache:
    """Serves blob and manifest-by-digest GETs and HEADs from the store, filling it."""

    def __init__(
        self, upstream: Upstream, store: Store, metrics: Metrics, *, send_timeout: float
    ) -> None:
        """Serve from ``store``, filled and confirmed through ``upstream``; a client taking
        nothing of an answer for ``send_timeout`` seconds is disconnected."""
        self.upstream = upstream
        self.send_timeout = send_timeout
        self.store = store
        self.metrics = metrics
        self.confirmations = Confirmations()
        self._fills: dict[Download, asyncio.Task[None]] = {}
        # Digests whose upstream GET is under way but not answered yet: the first client asks,
        # the others wait for its answer instead of asking too.
        self._asking: dict[str, asyncio.Future[Download | None]] = {}

    async def close(self) -> None:
        """Stop downloads in progress (their temporaries are removed), let go of the store."""
        tasks = list(self._fills.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.store.close()

    async def serve(
        self,
        request: web.Request,
        repository: str,
        digest: str,
        headers: list[tuple[str, str]],
        verified_pull: bool = False,
    ) -> web.StreamResponse | Uncached | None:
        """Answer from the cache, or None to let the request be relayed as usual, or the
        upstream's answer to relay (``Uncached``).

        ``verified_pull``: the client's token passed ``TOKEN_PUBLIC_KEY`` verification and grants
        pull on ``repository``; while upstream is down, that suffices for a digest the upstream
        confirmed under that repository before (clients fetch a new token on every pull).
        """
        while True:
            path = await self.store.kept(digest)
            download = self.store.downloads.get(digest)
            asking = self._asking.get(digest)
            if path is not None or download is not None or asking is None:
                break
            # Another client is asking upstream for it: wait for that answer, then look again.
            await asyncio.shield(asking)
        if path is not None or download is not None:
            confirmed = await self._confirmed(
                request, "blobs", repository, digest, headers, verified_pull
            )
            if not confirmed:
                return None
            if path is not None:
                return await self._from_kept(request, digest, path)
            assert download is not None
            return await self._follow(request, download, joined=True)
        if request.method != "GET" or "Range" in request.headers or not self.store.filling:
            return None
        return await self._fill_and_follow(request, repository, digest, headers)

    async def _from_kept(
        self, request: web.Request, digest: str, path: Path
    ) -> web.StreamResponse | None:
        """Answer from a kept file, opened at once: an eviction from now on cannot take it."""
        try:
            descriptor = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None  # evicted while the upstream was asked: relayed instead
        try:
            self.metrics.cache_requests.labels("blob", "hit").inc()
            return await self._answer(request, digest, descriptor, os.fstat(descriptor).st_size)
        finally:
            os.close(descriptor)

    async def _answer(
        self,
        request: web.Request,
        digest: str,
        descriptor: int,
        size: int,
        growing: Download | None = None,
    ) -> web.StreamResponse:
        response, sent = await answer_from_file(
            request,
            digest,
            descriptor,
            size,
            growing=growing,
            send_timeout=self.send_timeout,
        )
        request[BODY_BYTES] = sent
        self.metrics.cache_served_bytes.inc(sent)
        return response

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
        kept = await self.store.manifest(digest)
        if kept is None or not accepts(request.headers.getall("Accept", []), kept[0]):
            return None
        confirmed = await self._confirmed(
            request, "manifests", repository, digest, headers, verified_pull
        )
        if not confirmed:
            return None
        self.metrics.cache_requests.labels("manifest", "hit").inc()
        return self._manifest_response(request, digest, *kept)

    async def keep_manifest(
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
        if self.store.holds_manifest(digest):
            kept = True
        elif await self.store.keep_manifest(digest, media_type, body):
            self.metrics.cache_requests.labels("manifest", "miss").inc()
            kept = True
        else:
            kept = False
        if kept:
            self.confirmations.remember(
                key(_credentials(headers), repository, digest), time.monotonic()
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
        confirmation = key(_credentials(headers), repository, digest)
        now = time.monotonic()
        if self.confirmations.fresh(confirmation, now):
            return True
        try:
            target = f"/v2/{repository}/{kind}/{digest}"
            async with self.upstream.request("HEAD", target, unconditional(headers)) as response:
                allowed = response.status == 200 or response.status in REDIRECT_STATUSES
        except UpstreamError:
            if self.confirmations.ever(confirmation):
                return True  # upstream is down; this client was allowed this blob before
            if verified_pull and self.confirmations.linked(repository, digest):
                return True  # a verified fresh token for a repository that links the blob
            raise
        if allowed:
            self.confirmations.remember(confirmation, now)
        return allowed

    async def _fill_and_follow(
        self, request: web.Request, repository: str, digest: str, headers: list[tuple[str, str]]
    ) -> web.StreamResponse | Uncached | None:
        asking: asyncio.Future[Download | None] = asyncio.get_running_loop().create_future()
        self._asking[digest] = asking
        download: Download | None = None
        try:
            started = await self._start_fill(repository, digest, headers)
            if isinstance(started, Download):
                download = started
        finally:
            if self._asking.get(digest) is asking:
                del self._asking[digest]
            asking.set_result(download)
        if download is None:
            assert isinstance(started, Uncached)
            return started
        self.metrics.cache_requests.labels("blob", "miss").inc()
        self.confirmations.remember(
            key(_credentials(headers), repository, digest), time.monotonic()
        )
        return await self._follow(request, download, joined=False)

    async def _start_fill(
        self, repository: str, digest: str, headers: list[tuple[str, str]]
    ) -> Download | Uncached:
        """Ask upstream for the blob; if it answers with one to keep, start filling the store,
        else hand its answer back for relaying."""
        stack = AsyncExitStack()
        try:
            response = await self.upstream.get_following(
                stack, f"/v2/{repository}/blobs/{digest}", headers
            )
        except BaseException:
            await stack.aclose()
            raise
        size = response.content_length
        download = None
        if response.status == 200 and size is not None:
            try:
                download = self.store.begin(digest, size, self._abandoned)
            except OSError as error:
                # A full or read-only cache disk: the blob is relayed as without a cache.
                self.store.refused(error)
        if download is None:
            # Not a blob, not one to keep (too big for the cache), or nowhere to keep it.
            return Uncached(response, stack)
        self._fills[download] = asyncio.create_task(self._fill(download, stack, response))
        return download

    async def _fill(self, download: Download, stack: AsyncExitStack, response: Response) -> None:
        complete = False
        filled = self.metrics.cache_bytes

        def offer(chunk: bytes) -> bool:
            filled.inc(len(chunk))
            return download.offer(chunk)

        try:
            # From the connection's callback straight to the writer thread, no task woken per
            # chunk; reading pauses while the disk is behind.
            await response.content.pipe(offer, download.room)
            await download.room()
            complete = True
        except OSError as error:
            # The disk, not the upstream: this download's readers are cut once, and the next
            # requests are relayed uncached until the disk has had time to recover.
            self.store.refused(error)
        except UpstreamError as error:
            log.warning("download of %s failed: %s", download.digest, error.cause)
        except DownloadFailed as error:
            log.warning("download of %s failed: %s", download.digest, error)
        except asyncio.CancelledError:
            log.info("download of %s stopped: every client of it left", download.digest)
        finally:
            await stack.aclose()
            await self.store.end(download, complete)
            self._fills.pop(download, None)

    def _abandoned(self, download: Download) -> None:
        """The last reader left a download that had far to go: stop fetching it."""
        task = self._fills.get(download)
        if task is not None:
            task.cancel()

    async def _follow(
        self, request: web.Request, download: Download, joined: bool
    ) -> web.StreamResponse | None:
        """Answer from ``download`` as it arrives; a ``joined`` client's bytes count as
        cached, the first client's came from upstream."""
        try:
            descriptor = download.open()
        except DownloadFailed:
            return None  # ended badly, or kept and evicted already: ask upstream as usual
        download.attach()
        try:
            if joined:
                self.metrics.cache_requests.labels("blob", "joined").inc()
                return await self._answer(
                    request, download.digest, descriptor, download.size, download
                )
            response, sent = await answer_from_file(
                request,
                download.digest,
                descriptor,
                download.size,
                growing=download,
                send_timeout=self.send_timeout,
            )
            request[BODY_BYTES] = sent
            return response
        finally:
            os.close(descriptor)
            download.detach()


def _credentials(headers: list[tuple[str, str]]) -> str:
    """The Authorization sent upstream: what the upstream's answer was about.

    Not the client's own header: a token the proxy refused is not sent, so the answer it
    got was an anonymous client's.
    """
    for name, value in headers:
        if name.lower() == "authorization":
            return value
    return ""
