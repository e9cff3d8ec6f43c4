"""What the edge cache needs of the store beneath it: content by digest, verified, bounded.

``disk_store.DiskStore`` keeps it in a local folder; another backend (object storage, shared
by replicas) implements the same interface. The edge cache (``edge_cache.py``) decides who
may read what; a store only keeps bytes that hash to their digest, under a size limit.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from .download import Download


class Store(Protocol):
    """Blobs and manifests by digest."""

    size: int
    """Bytes kept."""
    evictions: int
    """Entries dropped to stay under the size limit, since start."""
    downloads: dict[str, Download]
    """Blobs being written, by digest: readers may follow them."""

    @property
    def filling(self) -> bool:
        """Whether new downloads may be written now."""

    def refused(self, error: OSError) -> None:
        """The storage refused a write: stop filling for a while."""

    async def kept(self, digest: str) -> Path | None:
        """Where kept blob ``digest`` can be read, verified (marked as just used), or None."""

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

    def close(self) -> None:
        """Let go of the storage."""
