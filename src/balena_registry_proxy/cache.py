"""A content-addressed cache on local disk: blobs with coalesced downloads, and manifests.

Blobs are stored by digest. A download is written to a temporary file and hashed on the way;
only a verified file is renamed into place, so a wrong or broken upstream stream never leaves
anything a client could be served. Every client of an uncached blob, the first included, reads
the temporary file as it grows: N clients cost one upstream download, each served as the bytes
arrive. The last byte is held back until the digest is verified, so no client ever completes a
download of wrong bytes.

Manifests fetched by digest are small documents whose media type matters as much as their
bytes, so each is kept in one file, the media type on its first line, written whole and renamed
into place. Blobs and manifests share the size limit; the least recently used go first.

Who may read a cached entry is not decided here: the proxy confirms every client's access with
the upstream first (see ``blobs.py``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger("balena_registry_proxy")

_DIGEST_RE = re.compile(r"sha256:([0-9a-f]{64})")
_CHUNK = 256 * 1024
# The registry's own limit on a manifest's size; anything bigger is relayed, not kept.
MAX_MANIFEST_BYTES = 4 << 20
# After the disk refuses a write (full, read-only), blobs are relayed uncached for this long:
# retrying every download into a full disk would cut every one of them.
FILL_PAUSE_SECONDS = 60.0


class DownloadFailed(Exception):
    """The upstream stream broke, or its bytes did not hash to the digest."""


def cacheable(digest: str) -> bool:
    """Whether blobs with this digest can be cached (sha256, the only algorithm verified)."""
    return _DIGEST_RE.fullmatch(digest) is not None


class Download:
    """One blob on its way from upstream into the cache, readable while it arrives."""

    def __init__(self, digest: str, temporary: Path, final: Path, size: int) -> None:
        """Prepare to receive ``size`` bytes of ``digest`` into ``temporary``, kept at ``final``."""
        self.digest = digest
        self.size = size
        self.temporary = temporary
        self.final = final
        self._file = temporary.open("wb")
        self._hash = hashlib.sha256()
        self._written = 0
        self._changed = asyncio.Condition()
        self._outcome: bool | None = None

    async def write(self, chunk: bytes) -> None:
        """Append ``chunk`` and wake the readers."""
        if self._written + len(chunk) > self.size:
            raise DownloadFailed("upstream sent more bytes than it announced")
        self._file.write(chunk)
        self._file.flush()
        self._hash.update(chunk)
        self._written += len(chunk)
        async with self._changed:
            self._changed.notify_all()

    def verified(self) -> bool:
        """Whether every announced byte arrived and they hash to the digest."""
        return self._written == self.size and f"sha256:{self._hash.hexdigest()}" == self.digest

    async def finish(self, ok: bool) -> None:
        """Close the file and tell the readers how it ended."""
        self._file.close()
        self._outcome = ok
        async with self._changed:
            self._changed.notify_all()

    async def _more_than(self, sent: int) -> None:
        """Wait until more than ``sent`` bytes may be read, or the download ended."""
        async with self._changed:
            await self._changed.wait_for(
                lambda: self._outcome is not None or self._written - 1 > sent
            )

    def reader(self) -> AsyncIterator[bytes]:
        """The blob's bytes as they arrive; raises DownloadFailed if it does not verify.

        The file is opened here, at once: the download may end, and its file be renamed into
        the cache, before the first byte is asked for. If it already has, the kept file is read.
        """
        try:
            return self._read(self.temporary.open("rb"))
        except FileNotFoundError:
            pass
        if self._outcome:
            try:
                return self._read(self.final.open("rb"))
            except FileNotFoundError:
                pass  # kept, then evicted at once
        raise DownloadFailed(f"download of {self.digest} is gone")

    async def _read(self, source: BinaryIO) -> AsyncIterator[bytes]:
        sent = 0
        with source:
            while True:
                # The last byte waits for the verdict: no reader completes on wrong bytes.
                limit = self.size if self._outcome else max(0, self._written - 1)
                if sent < limit:
                    chunk = source.read(min(_CHUNK, limit - sent))
                    sent += len(chunk)
                    yield chunk
                    continue
                if self._outcome is False:
                    raise DownloadFailed(f"download of {self.digest} failed")
                if self._outcome and sent == self.size:
                    return
                await self._more_than(sent)


class BlobCache:
    """Blobs and manifests on disk by digest, under a size limit."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        """A cache in ``root`` holding at most ``max_bytes``; call ``open`` before use."""
        self.root = root
        self.max_bytes = max_bytes
        self._blobs = root / "blobs" / "sha256"
        self._manifests = root / "manifests" / "sha256"
        self._temporary = root / "tmp"
        # file -> size, least recently used first.
        self._entries: OrderedDict[Path, int] = OrderedDict()
        self.size = 0
        self.evictions = 0
        self.downloads: dict[str, Download] = {}
        self._refused_until = 0.0

    @property
    def filling(self) -> bool:
        """Whether new downloads may be written (not just after the disk refused one)."""
        return time.monotonic() >= self._refused_until

    def refused(self, error: OSError) -> None:
        """The disk refused a write: relay blobs without keeping them for a while."""
        self._refused_until = time.monotonic() + FILL_PAUSE_SECONDS
        log.warning(
            "the cache disk refused a write (%s): relaying blobs uncached for %g s",
            error.strerror or error,
            FILL_PAUSE_SECONDS,
        )

    def open(self) -> None:
        """Create the folders, drop temporaries a crash left behind, and index what is kept."""
        for folder in (self._blobs, self._manifests, self._temporary):
            folder.mkdir(parents=True, exist_ok=True)
        for stale in self._temporary.iterdir():
            stale.unlink(missing_ok=True)
        found = []
        for folder in (self._blobs, self._manifests):
            for path in folder.iterdir():
                if _DIGEST_RE.fullmatch(f"sha256:{path.name}"):
                    status = path.stat()
                    found.append((status.st_mtime, path, status.st_size))
        for _, path, size in sorted(found):
            self._entries[path] = size
            self.size += size
        self._evict()

    def path(self, digest: str) -> Path:
        """Where the blob with ``digest`` lives once cached."""
        return self._blobs / digest.removeprefix("sha256:")

    def lookup(self, digest: str) -> Path | None:
        """The cached file of blob ``digest`` (marked as just used), or None."""
        path = self.path(digest)
        return path if self._use(path) else None

    def manifest(self, digest: str) -> tuple[str, bytes] | None:
        """The media type and bytes of the cached manifest ``digest``, or None.

        The bytes are hashed again on every read: a manifest is small, and a disk that changed
        one would otherwise hand out a document that does not match its digest.
        """
        path = self._manifests / digest.removeprefix("sha256:")
        if not self._use(path):
            return None
        try:
            media_type, _, body = path.read_bytes().partition(b"\n")
        except FileNotFoundError:
            return None
        if f"sha256:{hashlib.sha256(body).hexdigest()}" != digest or not media_type.isascii():
            log.warning("dropping cached manifest %s: its file changed on disk", digest)
            self._forget(path)
            return None
        return media_type.decode("ascii"), body

    def holds_manifest(self, digest: str) -> bool:
        """Whether manifest ``digest`` is kept (without reading it).

        Its media type needs no comparing: the registry derives it from the bytes, and the
        digest names the bytes.
        """
        return self._manifests / digest.removeprefix("sha256:") in self._entries

    def keep_manifest(self, digest: str, media_type: str, body: bytes) -> bool:
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
        final = self._manifests / digest.removeprefix("sha256:")
        temporary = self._temporary / f"{final.name}.manifest"
        content = media_type.encode("ascii") + b"\n" + body
        try:
            temporary.write_bytes(content)
            os.replace(temporary, final)
        except OSError as error:
            log.warning("not caching manifest %s: %s", digest, error.strerror or error)
            return False
        finally:
            temporary.unlink(missing_ok=True)
        self.size += len(content) - self._entries.get(final, 0)
        self._entries[final] = len(content)
        self._entries.move_to_end(final)
        self._evict()
        return True

    def _use(self, path: Path) -> bool:
        """Mark ``path`` as just used; False if it is not (or no longer) in the cache."""
        if path not in self._entries:
            return False
        try:
            os.utime(path)  # the order survives a restart
        except FileNotFoundError:
            self._forget(path)
            return False
        except OSError:
            pass  # a read-only disk: still readable, only the order is not kept on disk
        self._entries.move_to_end(path)
        return True

    def _forget(self, path: Path) -> None:
        self.size -= self._entries.pop(path, 0)
        _remove(path)

    def start(self, digest: str, size: int) -> Download:
        """Begin receiving ``digest``; readers find it in ``downloads`` until it ends."""
        temporary = self._temporary / f"{digest.removeprefix('sha256:')}.part"
        download = Download(digest, temporary, self.path(digest), size)
        self.downloads[digest] = download
        return download

    async def end(self, download: Download, ok: bool) -> bool:
        """Keep the download if ``ok`` and it verifies, else delete it; True if kept.

        Readers learn the outcome first; making the file durable before it is renamed into
        place can take a while on a slow disk, and they have their bytes already.
        """
        kept = ok and download.verified()
        await download.finish(kept)
        try:
            if kept:
                final = self.path(download.digest)
                await asyncio.to_thread(_durable_rename, download.temporary, final)
                self.size += download.size - self._entries.get(final, 0)
                self._entries[final] = download.size
                self._evict()
            else:
                log.warning("not caching %s: the download did not verify", download.digest)
        except OSError as error:
            self.refused(error)
            kept = False
        finally:
            if not kept:
                _remove(download.temporary)
            self.downloads.pop(download.digest, None)
        return kept

    def _evict(self) -> None:
        while self.size > self.max_bytes and self._entries:
            path, size = self._entries.popitem(last=False)
            self.size -= size
            self.evictions += 1
            _remove(path)


def _durable_rename(temporary: Path, final: Path) -> None:
    """Rename ``temporary`` to ``final`` once its bytes are on disk, and the rename too.

    Kept blobs are not hashed again when read: after a power cut, a file renamed before its
    bytes reached the disk could be empty under a digest it does not match.
    """
    _fsync(temporary, os.O_RDONLY)
    os.replace(temporary, final)
    _fsync(final.parent, os.O_RDONLY | os.O_DIRECTORY)


def _fsync(path: Path, flags: int) -> None:
    descriptor = os.open(path, flags)
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
