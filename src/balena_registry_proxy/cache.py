"""A content-addressed blob cache on local disk, with coalesced downloads.

Blobs are stored by digest. A download is written to a temporary file and hashed on the way;
only a verified file is renamed into place, so a wrong or broken upstream stream never leaves
anything a client could be served. Every client of an uncached blob, the first included, reads
the temporary file as it grows: N clients cost one upstream download, each served as the bytes
arrive. The last byte is held back until the digest is verified, so no client ever completes a
download of wrong bytes. Least recently used blobs are evicted to stay under the size limit.

Who may read a cached blob is not decided here: the proxy confirms every client's access with
the upstream first (see ``proxy.py``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger("balena_registry_proxy")

_DIGEST_RE = re.compile(r"sha256:([0-9a-f]{64})")
_CHUNK = 256 * 1024


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
    """Blobs on disk by digest, under a size limit."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        """A cache in ``root`` holding at most ``max_bytes``; call ``open`` before use."""
        self.root = root
        self.max_bytes = max_bytes
        self._blobs = root / "blobs" / "sha256"
        self._temporary = root / "tmp"
        # digest -> size, least recently used first.
        self._entries: OrderedDict[str, int] = OrderedDict()
        self.size = 0
        self.evictions = 0
        self.downloads: dict[str, Download] = {}

    def open(self) -> None:
        """Create the folders, drop temporaries a crash left behind, and index what is kept."""
        self._blobs.mkdir(parents=True, exist_ok=True)
        self._temporary.mkdir(parents=True, exist_ok=True)
        for stale in self._temporary.iterdir():
            stale.unlink(missing_ok=True)
        found = []
        for path in self._blobs.iterdir():
            if _DIGEST_RE.fullmatch(f"sha256:{path.name}"):
                status = path.stat()
                found.append((status.st_mtime, f"sha256:{path.name}", status.st_size))
        for _, digest, size in sorted(found):
            self._entries[digest] = size
            self.size += size
        self._evict()

    def path(self, digest: str) -> Path:
        """Where the blob with ``digest`` lives once cached."""
        return self._blobs / digest.removeprefix("sha256:")

    def lookup(self, digest: str) -> Path | None:
        """The cached file of ``digest`` (marked as just used), or None."""
        if digest not in self._entries:
            return None
        path = self.path(digest)
        if not path.exists():
            self.size -= self._entries.pop(digest)
            return None
        self._entries.move_to_end(digest)
        os.utime(path)
        return path

    def start(self, digest: str, size: int) -> Download:
        """Begin receiving ``digest``; readers find it in ``downloads`` until it ends."""
        temporary = self._temporary / f"{digest.removeprefix('sha256:')}.part"
        download = Download(digest, temporary, self.path(digest), size)
        self.downloads[digest] = download
        return download

    async def end(self, download: Download, ok: bool) -> bool:
        """Keep the download if ``ok`` and it verifies, else delete it; True if kept."""
        kept = ok and download.verified()
        try:
            if kept:
                os.replace(download.temporary, self.path(download.digest))
                self._entries[download.digest] = download.size
                self.size += download.size
                self._evict()
            else:
                log.warning("not caching %s: the download did not verify", download.digest)
        finally:
            if not kept:
                download.temporary.unlink(missing_ok=True)
            self.downloads.pop(download.digest, None)
            await download.finish(kept)
        return kept

    def _evict(self) -> None:
        while self.size > self.max_bytes and self._entries:
            digest, size = self._entries.popitem(last=False)
            self.path(digest).unlink(missing_ok=True)
            self.size -= size
            self.evictions += 1
