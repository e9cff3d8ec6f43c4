"""One blob on its way from upstream into the disk store, readable while it arrives.

The event loop only hands chunks over: a thread of the download's own writes them to its
temporary file, reads each back and hashes it, so what is verified is the file itself, and a
slow disk (a device's SD card) never stalls the loop. Readers are told how far the file has
grown and read it from disk themselves (with sendfile, where they can); the last byte stays
unreadable until the file verified, so no reader completes a download of wrong bytes.

Whoever reads a download says so (``attach``/``detach``); when the last reader leaves while
less than ``KEEP_FILLING_FRACTION`` of the blob arrived, the download is abandoned, so a client
that asks and hangs up cannot make the proxy fetch a whole layer.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("balena_registry_proxy")

# A download whose last reader left keeps going once this much of it arrived: it is nearly
# there, and a client that resumes (Docker does, with a Range) finds it kept.
KEEP_FILLING_FRACTION = 0.5
# Chunks the loop may hand over before the writer thread has taken them: above it, the fill
# waits (and with it the upstream read).
QUEUED_BYTES = 1 << 20
# The writer takes what was offered in batches this big, or what arrived in this long after
# the first chunk: each batch is one write, one hash and one wake-up of the readers.
BATCH_BYTES = 1 << 20
BATCH_WAIT_SECONDS = 0.005


class DownloadFailed(Exception):
    """The upstream stream broke, its bytes did not hash to the digest, or it was abandoned."""


class Download:
    """A blob being written to ``temporary``; readers follow it as it grows."""

    def __init__(
        self,
        digest: str,
        size: int,
        temporary: Path,
        descriptor: int,
        final: Path,
        on_abandoned: Callable[[Download], None],
        on_progress: Callable[[], None] = lambda: None,
    ) -> None:
        """Receive ``size`` bytes of ``digest`` into ``temporary``, open for writing as
        ``descriptor``, to be kept at ``final``; ``on_abandoned`` is called when the last
        reader left early, ``on_progress`` when more bytes are on disk."""
        self.digest = digest
        self.size = size
        self.temporary = temporary
        self.final = final
        """Where the blob lies once kept: readers that arrive later open it there."""
        self.written = 0
        """Bytes on disk and hashed: what readers may read (but the last byte)."""
        self.outcome: bool | None = None
        self.readers = 0
        self._on_abandoned = on_abandoned
        self._on_progress = on_progress
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._received = 0
        self._queue: deque[bytes] = deque()
        self._queued = 0
        self._closing = False
        self._complete = False
        self._full = False
        self._waiting = False
        self._lock = threading.Condition()
        self._error: OSError | None = None
        self._done: asyncio.Future[bool] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._write_and_hash, args=(descriptor,), name=f"fill {digest[7:19]}"
        )
        self._thread.start()

    # The fill's side, on the event loop.

    def offer(self, chunk: bytes) -> bool:
        """Hand ``chunk`` to the writer; False once too much waits for the disk (then wait
        for ``room``). What went wrong before (the disk refused, too many bytes) is raised at
        ``room``."""
        self._received += len(chunk)
        with self._lock:
            self._queue.append(chunk)
            self._queued += len(chunk)
            if self._queued > QUEUED_BYTES and not self._full:
                self._full = True
                self._room.clear()
            if self._waiting and (self._queued >= BATCH_BYTES or len(self._queue) == 1):
                # A batch is ready, or the first chunk starts the writer's short wait: wake it
                # only then, not for every chunk.
                self._lock.notify()
        return not self._full and self._error is None and self._received <= self.size

    async def room(self) -> None:
        """Wait until the writer has taken what was offered; raise what went wrong."""
        if self._error is not None:
            raise self._error
        if self._received > self.size:
            raise DownloadFailed("upstream sent more bytes than it announced")
        await self._room.wait()
        if self._error is not None:
            raise self._error

    async def write(self, chunk: bytes) -> None:
        """Hand ``chunk`` to the writer, waiting while too much waits for the disk."""
        if not self.offer(chunk):
            await self.room()

    async def close(self, complete: bool) -> bool:
        """Wait for the writer; True if every byte arrived and the file hashes to the digest.

        The file is flushed to disk before a True: kept blobs are not hashed again when read,
        and after a power cut a file renamed before its bytes were on disk could be empty
        under a digest it does not match. Disk errors are raised as ``OSError``.
        """
        with self._lock:
            self._closing = True
            self._complete = complete and self._received == self.size
            self._lock.notify()
        verified = await self._done
        if self._error is not None:
            raise self._error
        return verified

    def ended(self, kept: bool) -> None:
        """Tell the readers how it ended: they get the last byte, or ``DownloadFailed``."""
        self.outcome = kept
        self._changed.set()

    # The writer thread.

    def _write_and_hash(self, descriptor: int) -> None:
        digest = hashlib.sha256()
        offset = 0
        verified = False
        try:
            while True:
                with self._lock:
                    self._gather()
                    chunks = list(self._queue)
                    self._queue.clear()
                    self._queued = 0
                    full, self._full = self._full, False
                    closing = self._closing and not chunks
                if full:
                    self._loop.call_soon_threadsafe(self._room.set)
                if chunks:
                    # One write and one hash for all that waited: few hand-overs of the GIL
                    # between this thread and the event loop's.
                    batch = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                    # Hash what the file holds, not what passed by: the file is what is kept.
                    digest.update(_store(descriptor, batch, offset))
                    offset += len(batch)
                    self._loop.call_soon_threadsafe(self._progress, offset)
                if closing:
                    break
            verified = (
                self._complete
                and os.fstat(descriptor).st_size == self.size == offset
                and f"sha256:{digest.hexdigest()}" == self.digest
            )
            if verified:
                os.fsync(descriptor)
        except OSError as error:
            self._error = error
        finally:
            os.close(descriptor)
            self._loop.call_soon_threadsafe(self._finish, verified, offset)

    def _gather(self) -> None:
        """Wait (the lock held) for a batch: ``BATCH_BYTES`` offered, or the end, or whatever
        arrived within ``BATCH_WAIT_SECONDS`` of the first chunk, on a slow network."""
        deadline: float | None = None
        while not self._closing and self._queued < BATCH_BYTES:
            if not self._queue:
                self._wait(None)
                continue
            now = time.monotonic()
            if deadline is None:
                deadline = now + BATCH_WAIT_SECONDS
            if now >= deadline:
                return
            self._wait(deadline - now)

    def _wait(self, timeout: float | None) -> None:
        self._waiting = True
        self._lock.wait(timeout)
        self._waiting = False

    def _progress(self, written: int) -> None:
        self.written = written
        self._on_progress()
        self._changed.set()

    def _finish(self, verified: bool, written: int) -> None:
        self.written = written
        self._room.set()
        if not self._done.done():
            self._done.set_result(verified)

    # The readers' side.

    def attach(self) -> None:
        """A reader starts following the download."""
        self.readers += 1

    def detach(self) -> None:
        """A reader stopped (done or gone); the last one leaving early abandons it."""
        self.readers -= 1
        if (
            self.readers == 0
            and self.outcome is None
            and self._received < self.size * KEEP_FILLING_FRACTION
        ):
            self._on_abandoned(self)

    def readable(self) -> int:
        """How many bytes from the start may be read now."""
        if self.outcome:
            return self.size
        return max(0, min(self.written, self.size - 1))

    async def readable_beyond(self, offset: int) -> int:
        """Wait until more than ``offset`` bytes may be read; how many may.

        Raises ``DownloadFailed`` if the download ended without the blob.
        """
        while True:
            readable = self.readable()
            if readable > offset:
                return readable
            if self.outcome is False:
                raise DownloadFailed(f"download of {self.digest} failed")
            if self.outcome and offset >= self.size:
                return self.size
            self._changed.clear()
            await self._changed.wait()

    def open(self) -> int:
        """A descriptor to read the blob from: the file as it grows, or once kept.

        Opened at once: the download may end and its file be renamed into the store before
        the first byte is asked for. Raises ``DownloadFailed`` if it is gone.
        """
        for path in (self.temporary, self.final):
            try:
                return os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
        raise DownloadFailed(f"download of {self.digest} is gone")


def _store(descriptor: int, chunk: bytes, offset: int) -> bytes:
    """Append ``chunk`` (at ``offset``) to the file; what the file now holds there."""
    view = memoryview(chunk)
    while view:
        view = view[os.write(descriptor, view) :]
    return os.pread(descriptor, len(chunk), offset)
