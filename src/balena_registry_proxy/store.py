"""What the edge cache needs of the store beneath it: content by digest, verified, bounded.

``disk_store.DiskStore`` keeps it in a local folder; ``s3_store.S3Store`` in object storage
shared by replicas, whose blobs are read as streams (``StoredObject``) instead of files. The
edge cache (``edge_cache.py``) decides who may read what; a store only keeps bytes that hash
to their digest, under a size limit.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Protocol

from .download import Download

# A blob bigger than this share of a cache's limit is not kept: it would empty the cache.
MAX_BLOB_FRACTION = 0.5


def fits(size: int, reserved: int, max_bytes: int) -> bool:
    """Whether a blob of ``size`` bytes may be kept under ``max_bytes``, beside the ``reserved``
    bytes of the downloads in progress (and not bigger than ``MAX_BLOB_FRACTION`` of it)."""
    return size <= max_bytes * MAX_BLOB_FRACTION and reserved + size <= max_bytes


class StorageError(Exception):
    """Object storage failed while a blob was read from it; ``cause`` says how."""

    def __init__(self, cause: BaseException) -> None:
        """Wrap the storage client's own error."""
        super().__init__(str(cause))
        self.cause = cause


class StoredObject(Protocol):
    """A blob kept where no file of this process holds it (object storage): read as a
    stream, or fetched by clients themselves from a presigned URL."""

    @property
    def size(self) -> int:
        """Its length in bytes."""

    def read(self, first: int, last: int) -> AsyncGenerator[bytes, None]:
        """Its bytes ``first`` to ``last``; ``StorageError`` when storage fails."""

    async def presigned(self) -> str | None:
        """A short-lived URL to GET it from, or None."""


class Store(Protocol):
    """Blobs and manifests by digest."""

    @property
    def size(self) -> int:
        """Bytes kept."""

    @property
    def evictions(self) -> int:
        """Entries dropped to stay under the size limit, since start."""

    downloads: dict[str, Download]
    """Blobs being written, by digest: readers may follow them."""

    @property
    def filling(self) -> bool:
        """Whether new downloads may be written now."""

    def refused(self, error: OSError) -> None:
        """The storage refused a write: stop filling for a while."""

    async def kept(self, digest: str) -> Path | StoredObject | None:
        """Kept blob ``digest``, verified (marked as just used): the file it can be read
        from, or the object in storage; None if it is not kept."""

    def begin(
        self, digest: str, size: int, on_abandoned: Callable[[Download], None]
    ) -> Download | None:
        """Begin keeping blob ``digest`` of ``size`` bytes; None if it is not to be kept."""

    async def end(self, download: Download, complete: bool) -> bool:
        """Keep ``download`` if ``complete`` and it verifies, else drop it; True if kept."""

    async def manifest(self, digest: str) -> tuple[str, bytes] | None:
        """Media type and bytes of kept manifest ``digest``, verified again, or None."""

    def holds_manifest(self, digest: str) -> bool:
        """Whether manifest ``digest`` is kept, without reading it."""

    async def keep_manifest(self, digest: str, media_type: str, body: bytes) -> bool:
        """Keep ``body`` as manifest ``digest`` if it hashes to it; True if kept."""

    async def start(self) -> None:
        """Connect to the storage, once the event loop runs (what can be checked before,
        such as a folder's lock, is checked when the store is made)."""

    async def aclose(self) -> None:
        """Let go of the storage."""
