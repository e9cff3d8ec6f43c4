"""A lean HTTP/1.1 client for the upstream registry: keep-alive connections, streamed bodies.

Most of what a proxy does is small requests (manifests, HEADs, token pings), and for those a
general-purpose client's per-request machinery (request and response objects, tracing hooks,
cookie and redirect handling, timers) cost more CPU than everything else the proxy does, the
HTTP server included. This client does only what the proxy needs: GET and HEAD without a
body, over keep-alive connections pooled per origin. Responses are parsed by httptools
(llhttp, the parser of Node.js and aiohttp), never by hand. Bodies are streamed with flow
control: every read takes at most ``read_buffer`` bytes, and a connection stops reading once it
holds that much unread or its reader says it is busy (``hold``), so a stalled client of a
multi-GiB layer costs at most one read of memory here.

Errors are the project's own ``UpstreamError`` family (``upstream_errors.py``), each naming
its cause, whatever answered.
"""

from __future__ import annotations

import asyncio
import copy
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import cast

from multidict import CIMultiDict

from .framing import Broken, Data, End, Event, Head, ResponseReader, State, request_head
from .upstream_errors import BrokenAnswer, Unreachable, UpstreamTimeout, connect_failure

__all__ = ["Body", "ConnectionPool", "Response"]


class _ClosedBeforeAnswer(BrokenAnswer):
    """The connection closed before any answer: on a pooled one, the request may be retried."""


# An idle connection is closed after this long, and at most this many are kept per host: a
# burst of requests must not leave hundreds of connections open (the registry never closes
# idle ones itself).
_IDLE_SECONDS = 30.0
_MAX_IDLE = 256


class Body:
    """A response body as it arrives: a bounded buffer between a connection and its reader.

    Read it with ``readany`` (chunk by chunk, for bodies the proxy looks at or keeps), or
    ``pipe`` it into a sink (for bodies relayed as they are): piped bytes go from the
    connection's callback straight to the sink, without waking a task for every chunk.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        transport: asyncio.Transport,
        read_buffer: int,
        read_timeout: float,
    ):
        """Buffer what ``transport`` delivers, pausing it at ``read_buffer`` unread bytes.

        A reader waiting longer than ``read_timeout`` for the next bytes gets ``UpstreamTimeout``;
        time during which the connection is paused because the reader is behind is not
        silence.
        """
        self._transport = transport
        self._high = read_buffer
        self._read_timeout = read_timeout
        self._loop = loop
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._paused = False
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._sink: Callable[[bytes], bool] | None = None
        self._sink_full = False
        self._last_data = self._loop.time()
        # One timer per body, re-armed when it fires, instead of one per wait: a GiB arrives in
        # some ten thousand chunks, and arming and cancelling a timer for each showed up.
        self._timer: asyncio.TimerHandle | None = None

    @property
    def received(self) -> bool:
        """Whether the whole body arrived (read or not)."""
        return self._done and self._error is None

    def feed(self, chunk: bytes) -> None:
        """Called by the connection with the next bytes of the body."""
        self._last_data = self._loop.time()
        if self._sink is not None:
            if not self._sink(chunk):
                self._sink_full = True
                self._hold()
                self._wake()
            return
        self._chunks.append(chunk)
        self._size += len(chunk)
        if self._size >= self._high and (self._waiter is None or self._waiter.done()):
            # A full read that nobody is waiting for yet: the next waits in the kernel.
            self._hold()
        self._wake()

    def _hold(self) -> None:
        """Stop reading until the reader comes back for more and finds nothing buffered."""
        if not self._paused and not self._done:
            self._paused = True
            self._transport.pause_reading()

    def _resume(self) -> None:
        if self._paused:
            self._paused = False
            self._last_data = self._loop.time()
            self._transport.resume_reading()

    def finish(self, error: BaseException | None = None) -> None:
        """Called by the connection when the body ended, well or (with ``error``) badly."""
        if not self._done:
            self._done = True
            self._error = error
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if error is None:
                # The answer is complete: the connection reads again, for the next one.
                self._resume()
            self._wake()

    def discard(self) -> None:
        """Drop what is buffered: nobody will read it (the connection is being closed)."""
        self._chunks.clear()
        self._size = 0
        self.finish(BrokenAnswer("the body was abandoned"))

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _check_silence(self) -> None:
        silent = self._loop.time() - self._last_data
        if self._paused or silent < self._read_timeout:
            wait = self._read_timeout if self._paused else self._read_timeout - silent
            self._timer = self._loop.call_later(wait, self._check_silence)
            return
        self._timer = None
        self.finish(UpstreamTimeout(f"silent for {self._read_timeout:g} s mid-body"))

    async def _wait(self) -> None:
        """Wait for the next event: bytes, the end, or a full sink. Reading resumes first."""
        self._resume()
        if self._timer is None:
            wait = self._read_timeout - (self._loop.time() - self._last_data)
            self._timer = self._loop.call_later(max(0.0, wait), self._check_silence)
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            # A copy: raising the stored one would tie its traceback (and the frames' buffers)
            # to this body in a cycle.
            raise copy.copy(self._error)

    async def readany(self) -> bytes:
        """The next bytes available (waiting for some if none are), or ``b""`` at the end.

        At most one read's worth: whoever relays it holds no more than that at a time.
        """
        while not self._chunks:
            if self._done:
                self._raise_if_failed()
                return b""
            await self._wait()
        chunk = self._chunks.popleft()
        self._size -= len(chunk)
        return chunk

    async def pipe(
        self, sink: Callable[[bytes], bool], drained: Callable[[], Awaitable[None]]
    ) -> None:
        """Hand the rest of the body to ``sink`` as it arrives, until it ends.

        ``sink`` takes each chunk and says whether it can take more at once; when it cannot,
        reading stops until ``drained()`` returns, so a sink that takes nothing makes this
        process hold nothing but what the sink itself buffered.
        """
        while self._chunks:
            self._size -= len(self._chunks[0])
            # Not bound to a name: this frame lives as long as the body, the chunk need not.
            if not sink(self._chunks.popleft()):
                await drained()
        self._sink = sink
        try:
            while not self._done:
                await self._wait()
                if self._sink_full:
                    self._sink_full = False
                    await drained()
        finally:
            self._sink = None
        self._raise_if_failed()

    async def readexactly(self, count: int) -> bytes:
        """Exactly ``count`` bytes; ``BrokenAnswer`` if the body ends first."""
        parts = bytearray()
        while len(parts) < count:
            chunk = await self.readany()
            if not chunk:
                raise BrokenAnswer(f"the body ended after {len(parts)} of {count} bytes")
            wanted = count - len(parts)
            if len(chunk) > wanted:
                self._chunks.appendleft(chunk[wanted:])
                self._size += len(chunk) - wanted
                chunk = chunk[:wanted]
            parts += chunk
        return bytes(parts)

    async def iter_any(self) -> AsyncIterator[bytes]:
        """Every chunk of the body, as it arrives."""
        while chunk := await self.readany():
            yield chunk


class Response:
    """Status, headers and the streamed body of one upstream answer."""

    def __init__(
        self,
        connection: _Connection,
        status: int,
        reason: str,
        headers: CIMultiDict[str],
        content: Body,
    ) -> None:
        """Wrap what ``connection`` parsed; ``release`` hands the connection back."""
        self._connection = connection
        self.status = status
        self.reason = reason
        self.headers = headers
        self.content = content
        length = headers.get("Content-Length")
        self.content_length = int(length) if length is not None and length.isdigit() else None
        self.from_registry = False
        """Whether the registry itself answered (not a host one of its redirects named)."""

    async def read_up_to(self, limit: int) -> tuple[bytes, bool]:
        """Up to ``limit`` bytes of the body, and whether that is all of it.

        For the small documents the proxy reads whole (JSON it rewrites, manifests it keeps);
        a body announced bigger than ``limit`` is not read at all.
        """
        length = self.content_length
        if length is not None and length > limit:
            return b"", False
        if length is not None:
            return await self.content.readexactly(length), True
        body = bytearray()
        while len(body) <= limit:
            chunk = await self.content.readany()
            if not chunk:
                return bytes(body), True
            body += chunk
        return bytes(body), False

    def release(self) -> None:
        """Back to the pool if the whole body arrived, else close the connection.

        An unread body that arrived whole (a redirect's, a 401's) does not cost the connection.
        """
        self._connection.release(self.content.received)


class _Connection(asyncio.BufferedProtocol):
    """One keep-alive connection, one request at a time: the I/O around a ``ResponseReader``.

    A buffered protocol, so that each read takes at most the pool's ``read_buffer`` bytes
    (the event loop's own reads take up to 256 KiB at a time): that bounds what one stalled
    client of a blob can make this process hold. The buffer is the pool's, shared by all its
    connections: every read is parsed or copied out before the next one starts.
    """

    def __init__(self, pool: ConnectionPool, loop: asyncio.AbstractEventLoop) -> None:
        self._pool = pool
        # Kept rather than asked for: on Python 3.11 asking costs a getpid system call.
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0
        self._reader: ResponseReader | None = None
        self._answer: asyncio.Future[Response] | None = None
        self._body: Body | None = None
        self._reusable = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport to write requests to."""
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    @property
    def open(self) -> bool:
        """Whether another request may be sent on this connection."""
        return self.transport is not None and not self.transport.is_closing()

    @property
    def answering(self) -> bool:
        """Whether any byte of an answer to the current request arrived."""
        return self._reader is not None and self._reader.started

    def send(self, request: bytes, method: str) -> asyncio.Future[Response]:
        """Write ``request``; the future resolves once the answer's headers arrived."""
        assert self.transport is not None
        self._reader = ResponseReader(method)
        self._body = None
        self._reusable = False
        self._answer = self.loop.create_future()
        self.transport.write(request)
        return self._answer

    def get_buffer(self, sizehint: int) -> memoryview:
        """Where the event loop puts the next bytes read."""
        return self._pool.read_view

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` arrived in the shared buffer: parse or take them before returning."""
        if self._reader is None:
            self._fail(BrokenAnswer("bytes before any request"))
            return
        self._handle(self._reader.feed(self._pool.read_view[:nbytes]))

    def _handle(self, events: list[Event]) -> None:
        for event in events:
            if type(event) is Data:
                assert self._body is not None
                self._body.feed(event.chunk)
            elif type(event) is Head:
                self._answered(event)
            elif type(event) is End:
                self._reusable = event.reusable
                assert self._body is not None
                self._body.finish()
            else:
                assert isinstance(event, Broken)
                self._fail(BrokenAnswer(event.cause))

    def _answered(self, head: Head) -> None:
        """Hand the response to the waiting request."""
        assert self.transport is not None
        body = Body(self.loop, self.transport, self._pool.read_buffer, self._pool.read_timeout)
        self._body = body
        answer, self._answer = self._answer, None
        if answer is not None and not answer.done():
            response = Response(self, head.status, head.reason, CIMultiDict(head.headers), body)
            answer.set_result(response)

    def connection_lost(self, exc: Exception | None) -> None:
        """Fail whatever waits on the connection, unless it had finished."""
        self.transport = None
        self._pool.forget(self)
        answer, reader = self._answer, self._reader
        if answer is not None and not answer.done():
            answer.set_exception(_ClosedBeforeAnswer("closed the connection before answering"))
            if reader is not None:
                reader.closed()
        elif reader is not None:
            self._handle(reader.closed())
        # Nothing must point back here once closed: a reference cycle would keep a closed
        # connection's buffers alive until the next garbage collection. The reader stays: it
        # knows whether the answer had begun.
        self._answer = self._body = None

    def _fail(self, error: Exception) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(error)
        elif self._body is not None and not self._body.received:
            self._body.finish(error)
        self._close()

    def _close(self) -> None:
        if self._body is not None and not self._body.received:
            self._body.discard()
        self._answer = self._body = None
        if self.transport is not None:
            self.transport.close()

    def release(self, read_to_end: bool) -> None:
        """Pool the connection if its answer was read to the end, else close it.

        The reader stays: bytes arriving while the connection idles break it, and close it.
        """
        reader = self._reader
        done = reader is not None and reader.state is State.DONE
        if read_to_end and done and self._reusable and self.open:
            self._body = None
            self._pool.give_back(self)
        else:
            self._close()


class ConnectionPool:
    """Keep-alive connections to one origin, reused most recent first."""

    def __init__(
        self,
        scheme: str,
        host: str,
        port: int,
        *,
        connect_timeout: float,
        answer_timeout: float,
        read_buffer: int,
        read_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """Connections to ``scheme://host:port`` (TLS for https, with ``ssl_context``).

        ``answer_timeout`` bounds the wait for an answer's headers once connected (then
        ``UpstreamTimeout``), ``read_timeout`` any silence while a body is read.
        """
        self._host = host
        self._port = port
        self._connect_timeout = connect_timeout
        self._answer_timeout = answer_timeout
        self._ssl: ssl.SSLContext | None = None
        if scheme == "https":
            self._ssl = ssl_context or ssl.create_default_context()
        default_port = 443 if scheme == "https" else 80
        authority = host if port == default_port else f"{host}:{port}"
        if ":" in host:
            authority = f"[{host}]" if port == default_port else f"[{host}]:{port}"
        self._host_line = f"Host: {authority}\r\n".encode()
        self.read_buffer = read_buffer
        self.read_view = memoryview(bytearray(read_buffer))
        self.read_timeout = read_timeout
        # Insertion-ordered: the most recently used is reused first, the oldest swept first.
        self._idle: dict[_Connection, None] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    async def request(
        self, method: str, target: str, headers: Iterable[tuple[str, str]]
    ) -> Response:
        """Send ``method target`` with ``headers``; return once the answer's headers arrived.

        A pooled connection the upstream closed while it sat idle is detected when the request
        fails before any answer; the request (GET or HEAD: safe to repeat) is then sent once
        more on a new connection.
        """
        request = request_head(method, target, headers, self._host_line)
        connection = self._pooled()
        if connection is not None:
            try:
                return await self._send(connection, request, method)
            except _ClosedBeforeAnswer:
                if connection.answering:
                    raise  # it was answering: the request may have been acted on
        return await self._send(await self._connect(), request, method)

    async def _send(self, connection: _Connection, request: bytes, method: str) -> Response:
        timer: asyncio.TimerHandle | None = None
        try:
            answer = connection.send(request, method)
            # A timer on the answer rather than asyncio.timeout, which looks up the task and,
            # on Python 3.11, makes a getpid system call for every request.
            timer = connection.loop.call_later(self._answer_timeout, self._time_out, answer)
            return await answer
        except BaseException:
            # Cancelled or failed before the answer: the connection's state is unknown.
            connection.release(read_to_end=False)
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def _time_out(self, answer: asyncio.Future[Response]) -> None:
        if not answer.done():
            answer.set_exception(UpstreamTimeout(f"no answer within {self._answer_timeout:g} s"))

    def _pooled(self) -> _Connection | None:
        while self._idle:
            connection, _ = self._idle.popitem()
            if connection.open:
                return connection
            connection.release(read_to_end=False)
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                transport, connection = await loop.create_connection(
                    lambda: _Connection(self, loop),
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl else None,
                )
        except TimeoutError:
            raise Unreachable(f"no connection within {self._connect_timeout:g} s") from None
        except OSError as error:
            raise connect_failure(error) from None
        # uvloop may call connection_made only after create_connection has returned.
        connection.transport = transport
        return connection

    def forget(self, connection: _Connection) -> None:
        """Drop ``connection`` from the idle ones (the upstream closed it)."""
        self._idle.pop(connection, None)

    def give_back(self, connection: _Connection) -> None:
        """Keep ``connection`` for the next request (called by ``Response.release``)."""
        if self._closed or len(self._idle) >= _MAX_IDLE:
            connection.release(read_to_end=False)
            return
        connection.idle_since = time.monotonic()
        self._idle[connection] = None
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(_IDLE_SECONDS, self._sweep)

    def _sweep(self) -> None:
        """Close the connections idle for too long; come back when the next one will be."""
        self._sweeper = None
        now = time.monotonic()
        while self._idle:
            oldest = next(iter(self._idle))
            if now - oldest.idle_since < _IDLE_SECONDS:
                wait = oldest.idle_since + _IDLE_SECONDS - now
                self._sweeper = asyncio.get_running_loop().call_later(wait, self._sweep)
                return
            del self._idle[oldest]
            oldest.release(read_to_end=False)

    def close(self) -> None:
        """Close every idle connection; connections in use close when released."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        while self._idle:
            self._idle.popitem()[0].release(read_to_end=False)
