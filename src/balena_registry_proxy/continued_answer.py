"""A client's answer for a whole blob written from one source after another: storage, a
download of this replica's, the replica holding the blob's lease. When a source fails the
answer goes on from the byte it reached, so a client of a replica whose source died sees one
unbroken answer. Which source comes next is the edge cache's to decide."""

from __future__ import annotations

import asyncio
import os
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

from aiohttp import web

from .download import Download, DownloadFailed
from .file_answer import blob_headers, send_part
from .sharing import LEASE_SECONDS, Holder
from .store import StorageError, StoredObject
from .upstream import Response
from .upstream_errors import UpstreamError

if TYPE_CHECKING:
    from .peers import Peers


class SourceBroke(Exception):
    """The source a client's answer was being read from failed: try the next."""


class ClientGone(Exception):
    """The client left, or took nothing for the send timeout."""


class ContinuedAnswer:
    """A client's answer for a whole blob, written from one source after another."""

    def __init__(self, request: web.Request, digest: str, send_timeout: float) -> None:
        """The answer to ``request`` for blob ``digest``; a client that takes nothing of it
        for ``send_timeout`` seconds is gone."""
        self.request = request
        self.digest = digest
        self.send_timeout = send_timeout
        self.response: web.StreamResponse | None = None
        self.size: int | None = None
        self.position = 0
        """Bytes the client has been sent."""

    @property
    def started(self) -> bool:
        """Whether the headers are out."""
        return self.response is not None

    @property
    def done(self) -> bool:
        """Whether every byte was sent."""
        return self.size is not None and self.position >= self.size

    def cut(self) -> web.StreamResponse | None:
        """End an answer that cannot be completed: the client sees a short body."""
        if self.request.transport is not None and self.started:
            self.request.transport.close()
        return self.response

    async def _start(self, size: int) -> None:
        if self.response is None:
            response = web.StreamResponse(status=200, headers=blob_headers(self.digest))
            response.content_length = size
            self.size = size
            try:
                await response.prepare(self.request)
            except ConnectionError as error:
                raise ClientGone from error
            self.response = response
        elif size != self.size:
            raise SourceBroke("a source disagrees on the blob's size")

    async def _write(self, chunk: bytes) -> None:
        assert self.response is not None
        try:
            async with asyncio.timeout(self.send_timeout):
                await self.response.write(chunk)
        except (ConnectionError, TimeoutError) as error:
            raise ClientGone from error
        self.position += len(chunk)

    async def from_stored(self, stored: StoredObject) -> None:
        """The rest of the blob from storage."""
        await self._start(stored.size)
        chunks = stored.read(self.position, stored.size - 1)
        try:
            async for chunk in chunks:
                await self._write(chunk)
        except StorageError as error:
            raise SourceBroke from error
        finally:
            await chunks.aclose()
        if not self.done:
            raise SourceBroke("storage ended the object early")

    async def from_download(self, download: Download) -> None:
        """The rest of the blob from a download of this replica's, as it arrives."""
        try:
            descriptor = download.open()
        except DownloadFailed as error:
            raise SourceBroke from error
        download.attach()

        def sent(count: int) -> None:
            self.position += count

        try:
            await self._start(download.size)
            if self.position < download.size:
                await send_part(
                    self.request,
                    descriptor,
                    self.position,
                    download.size - 1,
                    download,
                    self.send_timeout,
                    sent,
                )
        except DownloadFailed as error:
            raise SourceBroke from error
        except (ConnectionError, TimeoutError) as error:
            raise ClientGone from error
        finally:
            os.close(descriptor)
            download.detach()

    async def from_peer(self, peers: Peers, holder: Holder, request_id: str) -> None:
        """The rest of the blob from the replica holding its lease, as it arrives there.

        A holder silent for as long as its lease would take to lapse is taken for dead (the
        upstream's own timeouts, minutes, are for registries, not for a replica next door)."""
        try:
            async with AsyncExitStack() as stack:
                async with asyncio.timeout(LEASE_SECONDS):
                    answer = await stack.enter_async_context(
                        peers.read(holder, self.digest, self.position, request_id)
                    )
                size = _whole_size(answer, self.position)
                if size is None:
                    raise SourceBroke(f"the holder answered {answer.status}")
                await self._start(size)
                while True:
                    async with asyncio.timeout(LEASE_SECONDS):
                        chunk = await answer.content.readany()
                    if not chunk:
                        break
                    await self._write(chunk)
        except (UpstreamError, TimeoutError) as error:
            raise SourceBroke from error
        if not self.done:
            raise SourceBroke("the holder's answer ended early")


def _whole_size(answer: Response, offset: int) -> int | None:
    """The blob's size by a replica's answer from ``offset``, or None if it is no such
    answer."""
    if answer.status == 200 and offset == 0:
        return answer.content_length
    total = answer.headers.get("Content-Range", "").rpartition("/")[2]
    if answer.status == 206 and total.isdigit():
        return int(total)
    return None
