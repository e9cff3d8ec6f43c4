"""The edge cache's store on local disk: blobs and manifests by digest, verified, bounded.

Blobs are stored by digest. A download is written to a temporary file of its own (an
exclusive, unpredictable name) and hashed as it is written (see ``download.py``); only a file
whose bytes hash to its digest is renamed into place. Manifests fetched by digest are small
documents whose media type matters as much as their bytes: each is kept in one file, the media
type on its first line. Blobs and manifests share the size limit; the least recently used go
first. A blob larger than ``MAX_BLOB_FRACTION`` of the limit is not kept at all (it would empty
the cache), and downloads in progress count toward the limit from their start.

One process owns the folder: it holds an exclusive lock on it for as long as it runs, and a
second refuses to start. File work that can wait on a slow disk runs in threads.

Who may read a kept entry is not decided here: the edge cache confirms every client's access
with the upstream first (see ``edge_cache.py``).
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import logging
import os
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from .digests import MAX_MANIFEST_BYTES, SHA256_RE
from .download import Download
from .store import fits

log = logging.getLogger("balena_registry_proxy")

# A blob bigger than this share of the size limit is relayed, not kept: keeping it would evict
# most of what the cache holds, for one blob.
# After the disk refuses a write (full, read-only), blobs are relayed uncached for this long:
# retrying every download into a full disk would cut every one of them.
FILL_PAUSE_SECONDS = 60.0
LOCK_FILE = "lock"


class StoreInUse(Exception):
    """Another process holds the cache folder."""


class DiskStore:
    """Blobs and manifests on disk by digest, under a size limit, for one process."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        """A store in ``root`` holding at most ``max_bytes``; call ``open`` before use."""
        self.root = root
        self.max_bytes = max_bytes
        self._blobs = root / "blobs" / "sha256"
        self._manifests = root / "manifests" / "sha256"
        self._temporary = root / "tmp"
        # file -> size, least recently used first.
        self._entries: OrderedDict[Path, int] = OrderedDict()
        self.size = 0
        """Bytes kept."""
        self.reserved = 0
        """Bytes of downloads in progress, counted toward the limit."""
        self.evictions = 0
        self.downloads: dict[str, Download] = {}
        self._refused_until = 0.0
        self._lock: int | None = None
        # Blobs found at start-up: kept by an earlier run, whose files are hashed once before
        # this one serves them (a disk or an older version may have damaged them).
        self._unverified: set[Path] = set()

    @property
    def filling(self) -> bool:
        """Whether new downloads may be written (not just after the disk refused one)."""
        return time.monotonic() >= self._refused_until

    def refused(self, error: OSError) -> None:
        """The disk refused a write: relay blobs without keeping them for a while."""
        paused = not self.filling
        self._refused_until = time.monotonic() + FILL_PAUSE_SECONDS
        if paused:
            return  # said already, for this very failure or one just before
        log.warning(
            "the cache disk refused a write (%s): relaying blobs uncached for %g s",
            error.strerror or error,
            FILL_PAUSE_SECONDS,
        )

    def open(self) -> None:
        """Lock the folder, create what is missing, drop temporaries, index what is kept.

        Raises ``StoreInUse`` if another process holds the folder, ``OSError`` if it is
        unusable.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise StoreInUse("another process uses this cache folder") from None
        self._lock = descriptor
        for folder in (self._blobs, self._manifests, self._temporary):
            folder.mkdir(parents=True, exist_ok=True)
        # Only now: with the lock held, every temporary is a crashed run's.
        for stale in self._temporary.iterdir():
            stale.unlink(missing_ok=True)
        found = []
        for folder in (self._blobs, self._manifests):
            for path in folder.iterdir():
                if SHA256_RE.fullmatch(f"sha256:{path.name}"):
                    status = path.stat()
                    found.append((status.st_mtime, path, status.st_size))
        for _, path, size in sorted(found):
            self._entries[path] = size
            self.size += size
            if path.parent == self._blobs:
                self._unverified.add(path)
        self._evict(0)

    def close(self) -> None:
        """Let go of the folder."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    async def start(self) -> None:
        """Nothing to connect to: ``open`` did the work, before the event loop ran."""

    async def aclose(self) -> None:
        """Let go of the folder (the store's interface)."""
        self.close()

    def path(self, digest: str) -> Path:
        """Where the blob with ``digest`` lives once kept."""
        return self._blobs / digest.removeprefix("sha256:")

    def lookup(self, digest: str) -> Path | None:
        """The kept file of blob ``digest`` (marked as just used), or None."""
        path = self.path(digest)
        return path if self._use(path) else None

    async def kept(self, digest: str) -> Path | None:
        """The kept file of blob ``digest``, verified (marked as just used), or None.

        A blob kept by an earlier run is hashed before its first use in this one; one that no
        longer matches its digest is dropped.
        """
        path = self.lookup(digest)
        if path is None or path not in self._unverified:
            return path
        matches = await asyncio.to_thread(_hashes_to, path, digest)
        self._unverified.discard(path)
        if not matches:
            log.warning("dropping cached blob %s: its file changed on disk", digest)
            self._forget(path)
            return None
        return path

    def _manifest_path(self, digest: str) -> Path:
        return self._manifests / digest.removeprefix("sha256:")

    def holds_manifest(self, digest: str) -> bool:
        """Whether manifest ``digest`` is kept (without reading it).

        Its media type needs no comparing: the registry derives it from the bytes, and the
        digest names the bytes.
        """
        return self._manifest_path(digest) in self._entries

    async def manifest(self, digest: str) -> tuple[str, bytes] | None:
        """The media type and bytes of the kept manifest ``digest``, or None.

        The bytes are hashed again on every read: a manifest is small, and a disk that changed
        one would otherwise hand out a document that does not match its digest.
        """
        path = self._manifest_path(digest)
        if not self._use(path):
            return None
        try:
            content = await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            return None
        media_type, _, body = content.partition(b"\n")
        if f"sha256:{hashlib.sha256(body).hexdigest()}" != digest or not media_type.isascii():
            log.warning("dropping cached manifest %s: its file changed on disk", digest)
            self._forget(path)
            return None
        return media_type.decode("ascii"), body

    async def keep_manifest(self, digest: str, media_type: str, body: bytes) -> bool:
        """Keep ``body`` as manifest ``digest`` if it hashes to it; True if kept.

        ``media_type`` is the upstream's Content-Type without parameters. A disk that refuses
        the write (full, read-only) only means the manifest is not kept.
        """
        if (
            not media_type
            or len(body) > MAX_MANIFEST_BYTES
            or not media_type.isascii()
            or "\n" in media_type
            or f"sha256:{hashlib.sha256(body).hexdigest()}" != digest
        ):
            return False
        final = self._manifest_path(digest)
        content = media_type.encode("ascii") + b"\n" + body
        try:
            await asyncio.to_thread(self._write_whole, final, content)
        except OSError as error:
            log.warning("not caching manifest %s: %s", digest, error.strerror or error)
            return False
        self.size += len(content) - self._entries.get(final, 0)
        self._entries[final] = len(content)
        self._entries.move_to_end(final)
        self._evict(0)
        return True

    def _write_whole(self, final: Path, content: bytes) -> None:
        descriptor, name = tempfile.mkstemp(prefix=f"{final.name}.", dir=self._temporary)
        try:
            with os.fdopen(descriptor, "wb") as file:
                file.write(content)
            os.replace(name, final)
        finally:
            Path(name).unlink(missing_ok=True)

    def _use(self, path: Path) -> bool:
        """Mark ``path`` as just used; False if it is not (or no longer) kept."""
        if path not in self._entries:
            return False
        try:
            # The order survives a restart through the files' times. A metadata update, in
            # memory until written back: no wait on the disk here.
            os.utime(path)
        except FileNotFoundError:
            self._forget(path)  # removed behind the proxy's back
            return False
        except OSError:
            pass  # a read-only disk: still readable, only the order after a restart suffers
        self._entries.move_to_end(path)
        return True

    def _forget(self, path: Path) -> None:
        self.size -= self._entries.pop(path, 0)
        self._unverified.discard(path)
        _remove(path)

    def begin(
        self, digest: str, size: int, on_abandoned: Callable[[Download], None]
    ) -> Download | None:
        """Begin receiving blob ``digest`` of ``size`` bytes; None if it is not to be kept.

        Not kept: a blob bigger than ``MAX_BLOB_FRACTION`` of the limit, or one that does not
        fit beside the downloads in progress (their sizes are reserved). Room is made, least
        recently used first, as its bytes arrive. Readers find it in ``downloads`` until it
        ends. ``OSError`` if the disk refuses the file.
        """
        if not fits(size, self.reserved, self.max_bytes):
            return None
        descriptor, name = tempfile.mkstemp(
            prefix=f"{digest.removeprefix('sha256:')}.", suffix=".part", dir=self._temporary
        )
        self.reserved += size
        download = Download(
            digest,
            size,
            Path(name),
            descriptor,
            self.path(digest),
            on_abandoned,
            on_progress=lambda: self._evict(0),
        )
        self.downloads[digest] = download
        return download

    async def end(self, download: Download, complete: bool) -> bool:
        """Keep the download if ``complete`` and verified, else delete it; True if kept.

        Readers learn the outcome as soon as the file verified; the rename follows.
        """
        kept = False
        try:
            verified = await download.close(complete)
            download.ended(verified)
            if verified:
                final = self.path(download.digest)
                await asyncio.to_thread(_durable_rename, download.temporary, final)
                self.size += download.size - self._entries.get(final, 0)
                self._entries[final] = download.size
                kept = True
            elif complete:
                log.warning("not caching %s: the download did not verify", download.digest)
        except OSError as error:
            download.ended(False)
            self.refused(error)
        finally:
            self.reserved -= download.size
            if not kept:
                _remove(download.temporary)
            if self.downloads.get(download.digest) is download:
                del self.downloads[download.digest]
            self._evict(0)
        return kept

    def _evict(self, room: int) -> None:
        """Drop the least recently used entries until ``room`` more bytes fit beside what is
        kept and what downloads in progress have written: room is made as bytes arrive, so a
        download stopped early evicts little."""
        arriving = sum(download.written for download in self.downloads.values())
        while self.size + arriving + room > self.max_bytes and self._entries:
            path, size = self._entries.popitem(last=False)
            self.size -= size
            self.evictions += 1
            _remove(path)


def _hashes_to(path: Path, digest: str) -> bool:
    """Whether the file at ``path`` hashes to ``digest``."""
    hasher = hashlib.sha256()
    try:
        with path.open("rb") as file:
            while chunk := file.read(1 << 20):
                hasher.update(chunk)
    except FileNotFoundError:
        return False
    return f"sha256:{hasher.hexdigest()}" == digest


def _durable_rename(temporary: Path, final: Path) -> None:
    """Rename ``temporary`` (already flushed) to ``final``, and make the rename durable."""
    os.replace(temporary, final)
    descriptor = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _remove(path: Path) -> None:
    """Delete ``path`` if it is there; a disk that refuses is logged, not raised."""
    try:
        path.unlink(missing_ok=True)
    except OSError as error:
        log.warning("cannot remove %s from the cache: %s", path.name, error.strerror or error)
