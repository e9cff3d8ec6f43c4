"""The edge cache: confirms each client's access, fills the store once, serves from it.

A blob is downloaded once however many clients ask at the same time, and served from disk
after that, and so is a manifest fetched by digest; but only to a client the upstream confirms
may read it: a HEAD of that digest, in that repository, with that client's own Authorization
(remembered briefly, see ``confirmations.py``). Clients of a blob being downloaded read the
growing file, from the start or from the offset of their Range, with the kernel's sendfile,
so a client that reads nothing costs no memory here. The bytes live in a store (``store.py``;
``disk_store.py`` on local disk, ``s3_store.py`` in object storage).

Replicas sharing object storage also share Redis (``coordination.py``): a replica about to
download a blob takes the digest's lease first, and when another replica holds it, reads that
replica's download as it grows (``peers.py``) instead of asking upstream; if that replica dies
mid-way, the client's answer goes on from whatever has the bytes next (storage, a download of
this replica's, a new holder), from the byte it had reached.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from .confirmations import Confirmations, key
from .continued_answer import ClientGone, ContinuedAnswer, SourceBroke
from .download import Download, DownloadFailed
from .errors import RegistryError
from .file_answer import answer_from_file, answer_from_stream
from .headers import REDIRECT_STATUSES, accepts, unconditional
from .metrics import Metrics
from .request_state import BODY_BYTES, REQUEST_ID
from .sharing import (
    LEASE_SECONDS,
    PEER_HEADER,
    RENEW_SECONDS,
    Holder,
    Source,
    source,
)
from .store import StorageError, Store, StoredObject
from .upstream import Response, Upstream
from .upstream_errors import UpstreamError

if TYPE_CHECKING:
    # Only the shared cache has these, and it imports them itself: a cache on local disk
    # loads neither Redis's client nor botocore (about 17 MiB of memory).
    from .coordination import Coordination
    from .peers import Peers

log = logging.getLogger("balena_registry_proxy")

_CONDITIONAL = ("If-None-Match", "If-Match", "If-Modified-Since", "If-Unmodified-Since")
# A client's answer read from other replicas goes on while some source makes progress; with
# none for this long (a dead holder's lease lapsing takes LEASE_SECONDS), it is cut.
SOURCE_PATIENCE_SECONDS = 3 * LEASE_SECONDS
SOURCE_RETRY_SECONDS = 0.25
# Retries without progress back off up to this: a source that fails at once (an upstream
# answering 503 to every new download) is asked a few times a minute, not in a tight loop.
SOURCE_RETRY_MAX_SECONDS = 4.0


@dataclass(frozen=True, slots=True)
class Sharing:
    """What a replica sharing its cache needs besides the store: Redis, the other replicas,
    and whether hits are redirected to storage."""

    coordination: Coordination | None
    peers: Peers | None
    redirect: bool = False


@dataclass(frozen=True, slots=True)
class Uncached:
    """An upstream answer the cache asked for but does not keep (too big for it, or not a
    blob): the caller relays it, then closes ``stack``."""

    response: Response
    stack: AsyncExitStack


class EdgeCache:
    """Serves blob and manifest-by-digest GETs and HEADs from the store, filling it."""

    def __init__(
        self,
        upstream: Upstream,
        store: Store,
        metrics: Metrics,
        *,
        send_timeout: float,
        sharing: Sharing | None = None,
    ) -> None:
        """Serve from ``store``, filled and confirmed through ``upstream``; a client taking
        nothing of an answer for ``send_timeout`` seconds is disconnected. With ``sharing``,
        the store is shared with other replicas."""
        self.upstream = upstream
        self.send_timeout = send_timeout
        self.store = store
        self.metrics = metrics
        self.sharing = sharing
        self.coordination = sharing.coordination if sharing is not None else None
        self.confirmations = Confirmations()
        self._fills: dict[Download, asyncio.Task[None]] = {}
        # Digests whose upstream GET is under way but not answered yet: the first client asks,
        # the others wait for its answer instead of asking too.
        self._asking: dict[str, asyncio.Future[Download | None]] = {}

    async def start(self) -> None:
        """Connect to the store (once the event loop runs)."""
        await self.store.start()

    async def close(self) -> None:
        """Stop downloads in progress (their temporaries are removed), let go of the store."""
        tasks = list(self._fills.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.store.aclose()
        if self.coordination is not None:
            await self.coordination.close()

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
            kept = await self.store.kept(digest)
            download = self.store.downloads.get(digest)
            asking = self._asking.get(digest)
            if kept is not None or download is not None or asking is None:
                break
            # Another client is asking upstream for it: wait for that answer, then look again.
            await asyncio.shield(asking)
        if kept is not None or download is not None:
            confirmed = await self._confirmed(
                request, "blobs", repository, digest, headers, verified_pull
            )
            if not confirmed:
                return None
            if isinstance(kept, Path):
                return await self._from_kept(request, digest, kept)
            if kept is not None:
                return await self._from_stored(request, digest, kept)
            assert download is not None
            return await self._follow(request, download, joined=True)
        if request.method != "GET" or "Range" in request.headers or not self.store.filling:
            return None
        claimed = await self._claim(repository, digest, headers)
        if isinstance(claimed, Uncached):
            return claimed
        if isinstance(claimed, Download):
            self.metrics.cache_requests.labels("blob", "miss").inc()
            await self._remember(headers, repository, digest)
            return await self._follow(request, claimed, joined=False)
        # Another replica is downloading it: this client may read it once upstream says so.
        if not await self._confirmed(request, "blobs", repository, digest, headers, verified_pull):
            return None
        self.metrics.cache_requests.labels("blob", "peer").inc()
        return await self._from_elsewhere(request, repository, digest, headers, claimed)

    async def _from_stored(
        self, request: web.Request, digest: str, stored: StoredObject
    ) -> web.StreamResponse | None:
        """Answer from an object in storage: a redirect to it, or its bytes streamed; None
        (relayed) if storage fails before the answer starts."""
        self.metrics.cache_requests.labels("blob", "hit").inc()
        if self.sharing is not None and self.sharing.redirect and request.method == "GET":
            url = await stored.presigned()
            if url is not None:
                headers = {"Location": url, "Docker-Content-Digest": digest}
                return web.Response(status=307, headers=headers)
        try:
            response, sent = await answer_from_stream(
                request, digest, stored.size, stored.read, send_timeout=self.send_timeout
            )
        except StorageError as error:
            self._storage_failed(error.cause)
            return None
        request[BODY_BYTES] = sent
        self.metrics.cache_served_bytes.inc(sent)
        return response

    def _storage_failed(self, error: BaseException) -> None:
        failed = getattr(self.store, "failed", None)
        if failed is not None:
            failed(error)

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
            await self._remember(headers, repository, digest)

    async def _remember(self, headers: list[tuple[str, str]], repository: str, digest: str) -> None:
        """Note that the upstream let the client that sent ``headers`` read ``digest`` under
        ``repository``: here, and for the other replicas."""
        credentials = _credentials(headers)
        self.confirmations.remember(key(credentials, repository, digest), time.monotonic())
        if self.coordination is not None:
            await self.coordination.confirm(credentials, repository, digest)

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
        if self.coordination is not None and await self.coordination.confirmed(
            _credentials(headers), repository, digest
        ):
            self.confirmations.remember(confirmation, now)
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
            await self._remember(headers, repository, digest)
        return allowed

    async def _claim(
        self, repository: str, digest: str, headers: list[tuple[str, str]]
    ) -> Download | Uncached | Holder:
        """Start downloading ``digest`` here (its lease taken, where replicas share one),
        unless another replica holds the lease: then that replica. The upstream's answer if
        it gave no blob to keep. Clients of this replica asking meanwhile wait for this."""
        asking: asyncio.Future[Download | None] = asyncio.get_running_loop().create_future()
        self._asking[digest] = asking
        download: Download | None = None
        try:
            holder = None
            if self.coordination is not None:
                holder = await self.coordination.acquire(digest)
                if holder is not None and holder != self.coordination.me:
                    return holder
                if holder is not None and await self.store.kept(digest) is not None:
                    # Its holder kept it and let go just before this replica looked: the
                    # lease is free, the bytes are in storage, and they are read from there.
                    await self._release(digest, leased=True)
                    return holder
            started = await self._start_fill(repository, digest, headers, leased=holder is not None)
            if isinstance(started, Download):
                download = started
            return started
        finally:
            if self._asking.get(digest) is asking:
                del self._asking[digest]
            asking.set_result(download)

    async def _start_fill(
        self, repository: str, digest: str, headers: list[tuple[str, str]], *, leased: bool
    ) -> Download | Uncached:
        """Ask upstream for the blob; if it answers with one to keep, start filling the store,
        else hand its answer back for relaying. ``leased``: this replica holds the digest's
        lease, to be renewed while the download goes on and released when it ends."""
        stack = AsyncExitStack()
        # The upstream may take up to its first-byte timeout to answer, longer than a lease
        # lasts: the lease is renewed meanwhile, or another replica would download too.
        waiting = asyncio.create_task(self._hold_lease(digest)) if leased else None
        try:
            response = await self.upstream.get_following(
                stack, f"/v2/{repository}/blobs/{digest}", headers
            )
        except BaseException:
            await stack.aclose()
            await self._release(digest, leased)
            raise
        finally:
            if waiting is not None:
                waiting.cancel()
        size = response.content_length
        download = None
        if response.status == 200 and size is not None:
            try:
                download = self.store.begin(digest, size, self._abandoned)
            except OSError as error:
                # A full or read-only cache disk: the blob is relayed as without a cache.
                self.store.refused(error)
        if download is None:
            # Not a blob, not one to keep (too big for the cache), or nowhere to keep it: the
            # other replicas will ask upstream themselves.
            await self._release(digest, leased)
            return Uncached(response, stack)
        self._fills[download] = asyncio.create_task(
            self._fill(download, stack, response, leased=leased)
        )
        return download

    async def _release(self, digest: str, leased: bool) -> None:
        if leased:
            assert self.coordination is not None
            await self.coordination.release(digest)

    async def _hold_lease(self, digest: str) -> None:
        """Renew this replica's lease on ``digest`` until cancelled."""
        assert self.coordination is not None
        while True:
            await asyncio.sleep(RENEW_SECONDS)
            await self.coordination.renew(digest)

    async def _renew(self, download: Download) -> None:
        """Renew this replica's lease on ``download`` while its bytes keep arriving (and
        while it is being kept, once they all did)."""
        assert self.coordination is not None
        written = -1
        while True:
            await asyncio.sleep(RENEW_SECONDS)
            if download.written != written or download.outcome is not None:
                written = download.written
                await self.coordination.renew(download.digest)

    async def _fill(
        self, download: Download, stack: AsyncExitStack, response: Response, *, leased: bool
    ) -> None:
        complete = False
        filled = self.metrics.cache_bytes
        renewal = asyncio.create_task(self._renew(download)) if leased else None

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
            try:
                await self.store.end(download, complete)
            finally:
                # Only now: until the blob is kept, the other replicas read it here.
                if renewal is not None:
                    renewal.cancel()
                await self._release(download.digest, leased)
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

    async def serve_peer(self, request: web.Request) -> web.StreamResponse:
        """The replicas' endpoint: this replica's download of a digest, as it grows, to a
        request signed with the shared secret (``peers.py``); Range as for any client."""
        digest = request.match_info["digest"]
        peers = self.sharing.peers if self.sharing is not None else None
        if peers is None or not peers.admits(digest, request.headers.get(PEER_HEADER)):
            raise RegistryError(403, "DENIED", "this endpoint is for the proxy's replicas")
        download = self.store.downloads.get(digest)
        answer = None if download is None else await self._follow(request, download, False)
        if answer is None:
            raise RegistryError(404, "BLOB_UNKNOWN", "not being downloaded here")
        return answer

    async def _from_elsewhere(
        self,
        request: web.Request,
        repository: str,
        digest: str,
        headers: list[tuple[str, str]],
        holder: Holder,
    ) -> web.StreamResponse | Uncached | None:
        """Answer a client from wherever the blob's bytes are, the lease ``holder`` first:
        when a source fails, the answer goes on from the next (storage, a download of this
        replica's, another holder, or a download this replica starts), from the byte it
        reached. None (relayed) or the upstream's answer if no byte was sent yet."""
        assert self.coordination is not None
        assert self.sharing is not None
        answer = ContinuedAnswer(request, digest, self.send_timeout)
        current: Holder | None = holder
        progress = time.monotonic()
        delay = SOURCE_RETRY_SECONDS
        try:
            while time.monotonic() - progress < SOURCE_PATIENCE_SECONDS:
                before = answer.position
                try:
                    switched = await self._next_source(answer, repository, digest, headers, current)
                except SourceBroke:
                    switched = False
                if answer.done:
                    return answer.response
                if isinstance(switched, Uncached):
                    if not answer.started:
                        return switched
                    # The upstream gave nothing to keep: no new source was found.
                    await switched.stack.aclose()
                    switched = False
                current = None
                if answer.position > before:
                    progress = time.monotonic()
                    delay = SOURCE_RETRY_SECONDS
                elif not switched:
                    await asyncio.sleep(delay)
                    delay = min(2 * delay, SOURCE_RETRY_MAX_SECONDS)
        except ClientGone:
            return answer.cut()
        finally:
            request[BODY_BYTES] = answer.position
            self.metrics.cache_served_bytes.inc(answer.position)
        log.warning("no source of %s made progress: the client's answer is cut", digest)
        return answer.cut()

    async def _next_source(
        self,
        answer: ContinuedAnswer,
        repository: str,
        digest: str,
        headers: list[tuple[str, str]],
        holder: Holder | None,
    ) -> bool | Uncached:
        """Send ``answer`` what the blob's best source has, from where it stands; True if
        it only found a new source (a download started here, a new holder) to read next, the
        upstream's answer if it gave no blob to keep. ``SourceBroke`` if the source failed."""
        assert self.coordination is not None
        assert self.sharing is not None
        stored = await self.store.kept(digest)
        local = self.store.downloads.get(digest)
        if holder is None and stored is None and local is None:
            holder = await self.coordination.holder(digest)
        where = source(
            stored=stored is not None,
            local=local is not None,
            holder=holder,
            replica=self.coordination.me.replica,
        )
        if where is Source.STORAGE and isinstance(stored, Path | None):
            raise SourceBroke("a store of files is not shared")
        if where is Source.STORAGE:
            assert stored is not None
            assert not isinstance(stored, Path)
            await answer.from_stored(stored)
        elif where is Source.LOCAL:
            assert local is not None
            await answer.from_download(local)
        elif where is Source.PEER:
            assert holder is not None
            assert self.sharing.peers is not None
            await answer.from_peer(self.sharing.peers, holder, answer.request[REQUEST_ID])
        else:
            asking = self._asking.get(digest)
            if asking is not None:
                await asyncio.shield(asking)
                return True
            claimed = await self._claim(repository, digest, headers)
            if isinstance(claimed, Uncached):
                return claimed
            if isinstance(claimed, Download):
                self.metrics.cache_requests.labels("blob", "miss").inc()
            return True
        return False


def _credentials(headers: list[tuple[str, str]]) -> str:
    """The Authorization sent upstream: what the upstream's answer was about.

    Not the client's own header: a token the proxy refused is not sent, so the answer it
    got was an anonymous client's.
    """
    for name, value in headers:
        if name.lower() == "authorization":
            return value
    return ""
