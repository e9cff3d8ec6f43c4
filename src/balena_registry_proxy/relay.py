"""Writing an upstream answer to the client: small ones in one piece, the rest streamed.

Streams stay streams: a body of known length goes from the upstream connection straight into
the client's (``Body.pipe``), the next read waiting until the client took the last one, so a
multi-GiB layer never sits in memory and a client that reads nothing holds one read.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from multidict import CIMultiDict

from .accesslog import redact_target
from .answers import has_body
from .metrics import Metrics
from .request_state import BODY_BYTES, REQUEST_ID, UPSTREAM_TARGET
from .upstream import Response
from .upstream_errors import UpstreamError

log = logging.getLogger("balena_registry_proxy")

# Bodies up to this size are read whole and sent with their headers in one write.
SMALL_BODY = 64 * 1024


def buffered(
    status: int, headers: list[tuple[str, str]], body: bytes, reason: str | None = None
) -> web.Response:
    """An answer whose whole body is in hand."""
    return web.Response(status=status, reason=reason, body=body, headers=CIMultiDict(headers))


async def stream(
    request: web.Request,
    upstream: Response,
    headers: list[tuple[str, str]],
    metrics: Metrics,
    send_timeout: float,
    prefix: bytes = b"",
) -> web.StreamResponse:
    """Relay the rest of the upstream body (after ``prefix``, already read) to the client.

    A client that takes nothing for ``send_timeout`` seconds is disconnected: its connection
    and the upstream's are not held for ever.
    """
    length = upstream.content_length
    with_body = has_body(request.method, upstream.status)
    if not prefix and with_body and length is not None and length <= SMALL_BODY:
        # Mostly there already: one write of headers and body instead of two, and an
        # upstream failure can still be answered with an error instead of a cut.
        body = await upstream.content.readexactly(length)
        request[BODY_BYTES] = length
        return buffered(upstream.status, headers, body, upstream.reason)
    response = web.StreamResponse(
        status=upstream.status, reason=upstream.reason, headers=CIMultiDict(headers)
    )
    # Without a length aiohttp frames the body itself: chunked for HTTP/1.1, close for 1.0.
    if length is not None:
        response.content_length = length
    await response.prepare(request)
    if not with_body:
        return response
    sent = 0
    try:
        if prefix:
            await response.write(prefix)
            sent += len(prefix)
        transport = request.transport
        if transport is None:
            return response

        def send(chunk: bytes) -> bool:
            # Headers are out, and the body needs no framing of its own (a length, or
            # HTTP/1.0's end at close): straight into the client's connection.
            nonlocal sent
            if transport.is_closing():
                return False
            transport.write(chunk)
            sent += len(chunk)
            return not transport.get_write_buffer_size()

        async def drained() -> None:
            if transport.is_closing():
                raise ConnectionResetError("the client left")
            async with asyncio.timeout(send_timeout):
                await request.writer.drain()

        if length is not None or request.version < (1, 1):
            await upstream.content.pipe(send, drained)
        else:
            async for chunk in upstream.content.iter_any():
                async with asyncio.timeout(send_timeout):
                    await response.write(chunk)
                sent += len(chunk)
    except (ConnectionResetError, TimeoutError):
        # The client went away, or took nothing for too long: leaving the upstream context
        # closes that connection too.
        if request.transport is not None:
            request.transport.close()
        return response
    except UpstreamError as error:
        # Headers are out, so no error response is possible: cut the connection so the
        # client sees a short body (and retries with Range) instead of waiting or trusting.
        metrics.upstream_errors.labels("cut").inc()
        log.warning(
            "upstream failed mid-response for %s: %s rid=%s",
            redact_target(request.get(UPSTREAM_TARGET, request.raw_path)),
            error.cause,
            request[REQUEST_ID],
        )
        if request.transport is not None:
            request.transport.close()
    finally:
        request[BODY_BYTES] = sent
    return response
