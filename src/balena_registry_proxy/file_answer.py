"""A blob request answered from a file the proxy holds: kept in the store, or still arriving.

The file is opened before this is called, so an eviction meanwhile cannot take it away. Bytes
go from the page cache to the socket with the kernel's sendfile, a piece at a time, each piece
allowed ``send_timeout`` to be taken: a client that takes nothing is disconnected, and holds no
buffer of this process while it lasts. Where the connection cannot take sendfile (TLS), pieces
of one read buffer are written instead, the client draining each.
"""

from __future__ import annotations

import asyncio
import os

from aiohttp import web

from .download import Download, DownloadFailed
from .errors import error_body
from .ranges import ByteRange, blob_answer, unsatisfiable_content_range
from .upstream import READ_BUFFER

# The most one sendfile call sends: a piece the client must take within the send timeout.
SENDFILE_PIECE = 1 << 20


def blob_headers(digest: str) -> dict[str, str]:
    """The headers of a blob answer, as the registry gives them."""
    return {
        "Docker-Content-Digest": digest,
        "Content-Type": "application/octet-stream",
        "Docker-Distribution-API-Version": "registry/2.0",
        "Etag": f'"{digest}"',
        "Accept-Ranges": "bytes",
    }


async def answer_from_file(
    request: web.Request,
    digest: str,
    descriptor: int,
    size: int,
    *,
    growing: Download | None,
    send_timeout: float,
) -> tuple[web.StreamResponse, int]:
    """Answer ``request`` for blob ``digest`` (``size`` bytes) from the open ``descriptor``;
    the answer and the body bytes sent.

    ``growing``: the download the file belongs to, still arriving (its readers wait for the
    bytes they need, and never get the last one before the download verified).
    """
    etag = f'"{digest}"'
    decided = blob_answer(
        size,
        etag,
        request.headers.get("Range"),
        request.headers.get("If-Range"),
        request.headers.get("If-None-Match"),
    )
    headers = blob_headers(digest)
    if decided.status == 304:
        return web.Response(status=304, headers={"Etag": etag}), 0
    if decided.status == 416:
        body = error_body("RANGE_INVALID", "the requested range is not within the blob")
        headers = {**headers, "Content-Range": unsatisfiable_content_range(size)}
        headers["Content-Type"] = "application/json"
        return web.Response(status=416, body=body, headers=headers), 0
    response = web.StreamResponse(status=decided.status, headers=headers)
    part = decided.part
    if decided.status == 206:
        assert part is not None
        response.headers["Content-Range"] = part.content_range
    response.content_length = part.length if part is not None else 0
    await response.prepare(request)
    if request.method == "HEAD" or part is None:
        return response, 0
    sent = 0
    try:
        sent = await _send(request, descriptor, part, growing, send_timeout)
    except (DownloadFailed, ConnectionError, TimeoutError):
        # Headers are out: cut the connection, so the client never takes wrong bytes (or
        # keeps a stalled connection).
        if request.transport is not None:
            request.transport.close()
    return response, sent


async def _send(
    request: web.Request,
    descriptor: int,
    part: ByteRange,
    growing: Download | None,
    send_timeout: float,
) -> int:
    """Send ``part`` from the file as its bytes are there; the bytes sent."""
    transport = request.transport
    loop = asyncio.get_running_loop()
    position, end = part.first, part.last + 1
    # A file object around the descriptor (no I/O): what loop.sendfile takes.
    with open(descriptor, "rb", buffering=0, closefd=False) as file:  # noqa: ASYNC230
        while position < end:
            readable = end if growing is None else min(await growing.readable_beyond(position), end)
            while position < readable:
                if transport is None or transport.is_closing():
                    raise ConnectionResetError("the client left")
                count = min(readable - position, SENDFILE_PIECE)
                try:
                    async with asyncio.timeout(send_timeout):
                        sent = await loop.sendfile(transport, file, position, count, fallback=False)
                except (asyncio.SendfileNotAvailableError, NotImplementedError):
                    if transport.is_closing():
                        raise ConnectionResetError("the client left") from None
                    sent = await _write_pieces(request, descriptor, position, count, send_timeout)
                if sent < count:
                    # The file ends before the bytes it should hold.
                    raise DownloadFailed("the file is shorter than it should be")
                position += count
    return position - part.first


async def _write_pieces(
    request: web.Request, descriptor: int, start: int, count: int, send_timeout: float
) -> int:
    """``count`` bytes of a file from ``start``, one read buffer at a time; the bytes read."""
    transport = request.transport
    done = 0
    while done < count:
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client left")
        piece = os.pread(descriptor, min(READ_BUFFER, count - done), start + done)
        if not piece:
            break
        transport.write(piece)
        done += len(piece)
        async with asyncio.timeout(send_timeout):
            await request.writer.drain()
    return done
