"""The edge cache's store in S3-compatible object storage, shared by replicas.

Blobs and manifests are objects named by digest (``sharing.object_key``), a manifest's media
type kept as object metadata. Nothing becomes an object before its bytes verified: a blob is
received into a spool file of this replica's (``download.py`` writes and hashes it, and
clients read it as it grows) while its parts are uploaded as they arrive; the multipart
upload is completed only once the file verified, and aborted otherwise, so a failed fill
leaves no object and no parts. A blob of one part or less is put whole after verification.

Storage is never a client's failure: when the bucket cannot be reached, lookups miss and
fills stop for ``STORAGE_PAUSE_SECONDS`` (blobs are relayed uncached meanwhile), the failure
logged (at most every ``WARN_EVERY_SECONDS``) and counted. The size limit, the index of what
was used when and the eviction are the replicas' together, through Redis
(``coordination.py``); without Redis nothing is evicted.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import tempfile
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from .coordination import Coordination
from .digests import MAX_MANIFEST_BYTES
from .download import Download, DownloadFailed
from .metrics import Metrics
from .sharing import LEASE_SECONDS, PART_BYTES, PIN_SECONDS, Kind, object_key, parts
from .store import StorageError, fits

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

log = logging.getLogger("balena_registry_proxy")

STORAGE_PAUSE_SECONDS = 15.0
WARN_EVERY_SECONDS = 30.0
PRESIGN_SECONDS = 300
# A lookup or a manifest's transfer takes this long at most: a storage that accepts
# connections but does not answer (stopped) delays a client by no more. Not less: a busy
# storage that answers late would trip the pause, and every replica would then relay blobs
# uncached, each client fetching from upstream (seen with 2 s on a loaded machine).
QUICK_SECONDS = 5.0
# A write of a part (8 MiB) or an upload's completion takes this long at most: botocore's
# read timeout does not bound a request whose body is still being sent, and a fill stuck on a
# storage that stopped answering would hold its lease, spool file and reserved room.
WRITE_SECONDS = 60.0
# How often each replica looks for uploads left behind by a replica that died mid-fill.
SWEEP_SECONDS = 60.0
# Without Redis, an upload is taken for an orphan only this old.
ORPHAN_SECONDS = 24 * 3600.0
READ_BYTES = 64 * 1024
# Short timeouts and no retries: a storage that does not answer makes the proxy relay instead,
# rather than hold clients while botocore retries.
_CLIENT_CONFIG = AioConfig(
    s3={"addressing_style": "path"},
    signature_version="s3v4",
    connect_timeout=2,
    read_timeout=15,
    retries={"max_attempts": 1, "mode": "standard"},
    max_pool_connections=64,
)
STORAGE_ERRORS = (BotoCoreError, ClientError, aiohttp.ClientError, OSError, TimeoutError)
_MISSING = {"404", "NoSuchKey", "NotFound"}
_MANIFEST_TYPE = "media-type"
_REMEMBERED_MANIFESTS = 10_000


@dataclass(frozen=True, slots=True)
class StoredBlob:
    """A blob kept in the bucket: its size, and how to read it."""

    digest: str
    size: int
    store: S3Store

    def read(self, first: int, last: int) -> AsyncGenerator[bytes, None]:
        """Its bytes ``first`` to ``last``, as they come from storage."""
        return self.store.read(self.digest, first, last, self.size)

    async def presigned(self) -> str | None:
        """A short-lived URL clients can GET it from, or None if storage cannot say."""
        return await self.store.presigned(self.digest, self.size)


class S3Store:
    """Blobs and manifests in a bucket, by digest, shared with other replicas."""

    def __init__(
        self,
        *,
        endpoint: str,
        bucket: str,
        prefix: str,
        region: str,
        spool: Path | None,
        max_bytes: int,
        metrics: Metrics,
        coordination: Coordination | None = None,
        public_endpoint: str | None = None,
    ) -> None:
        """A store in ``bucket`` at ``endpoint`` under ``prefix``, holding at most
        ``max_bytes`` (with ``coordination``), receiving downloads in ``spool`` (None: a
        temporary folder of its own, removed when it closes); call
        ``start`` before use. ``public_endpoint`` is where clients reach the storage, for
        presigned URLs."""
        self._endpoint = endpoint
        self._public_endpoint = public_endpoint or endpoint
        self._bucket = bucket
        self._prefix = prefix
        self._region = region
        self._spool = spool or Path()
        self._own_spool = spool is None
        self.max_bytes = max_bytes
        self._metrics = metrics
        self.coordination = coordination
        self.downloads: dict[str, Download] = {}
        self.reserved = 0
        self._uploads: dict[Download, asyncio.Task[tuple[str, list[dict[str, Any]]]]] = {}
        self._manifests: OrderedDict[str, None] = OrderedDict()
        self._paused_until = 0.0
        self._spool_refused_until = 0.0
        self._warned = 0.0
        self._exit = AsyncExitStack()
        self._client: S3Client | None = None
        self._signer: S3Client | None = None
        self._kept_here = 0
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def size(self) -> int:
        """Bytes in the shared cache (as Redis last said; without it, kept by this replica)."""
        return self.coordination.size if self.coordination is not None else self._kept_here

    @property
    def evictions(self) -> int:
        """Objects this replica evicted since start."""
        return self.coordination.evictions if self.coordination is not None else 0

    @property
    def available(self) -> bool:
        """Whether storage is used now (not paused after a failure)."""
        return time.monotonic() >= self._paused_until

    @property
    def filling(self) -> bool:
        """Whether new downloads may be kept: storage and the spool folder both usable."""
        return self.available and time.monotonic() >= self._spool_refused_until

    @property
    def spool(self) -> Path:
        """The folder downloads in progress are received in."""
        return self._spool

    async def start(self) -> None:
        """Create the clients and the spool folder, emptied of an earlier run's downloads (a
        storage that does not answer yet is no reason not to start: it is tried at every
        lookup)."""
        if self._own_spool:
            folder = tempfile.TemporaryDirectory(prefix="registry-proxy-spool-")
            self._spool = Path(self._exit.enter_context(folder))
        self._spool.mkdir(parents=True, exist_ok=True)
        for stale in self._spool.glob("*.part"):
            stale.unlink(missing_ok=True)
        session = get_session()
        self._client = await self._exit.enter_async_context(
            session.create_client(
                "s3", endpoint_url=self._endpoint, region_name=self._region, config=_CLIENT_CONFIG
            )
        )
        self._signer = self._client
        if self._public_endpoint != self._endpoint:
            # Presigning is local arithmetic: this client never connects.
            self._signer = await self._exit.enter_async_context(
                session.create_client(
                    "s3",
                    endpoint_url=self._public_endpoint,
                    region_name=self._region,
                    config=_CLIENT_CONFIG,
                )
            )
        self._sweeper = asyncio.create_task(self._sweep_now_and_then())

    async def aclose(self) -> None:
        """Abort uploads in progress, close the clients."""
        tasks: list[asyncio.Task[Any]] = list(self._uploads.values())
        if self._sweeper is not None:
            tasks.append(self._sweeper)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._exit.aclose()

    def _s3(self) -> S3Client:
        assert self._client is not None, "S3Store.start() was not called"
        return self._client

    def _key(self, kind: Kind, digest: str) -> str:
        return object_key(self._prefix, kind, digest)

    def failed(self, error: BaseException) -> None:
        """Storage failed: lookups miss and blobs are relayed uncached for a while. An
        object found missing is no failure: another replica evicted it a moment ago."""
        if isinstance(error, ClientError) and _code(error) in _MISSING:
            return
        now = time.monotonic()
        self._paused_until = now + STORAGE_PAUSE_SECONDS
        self._metrics.cache_infrastructure_errors.labels("storage").inc()
        if now - self._warned >= WARN_EVERY_SECONDS:
            self._warned = now
            log.warning(
                "the cache's storage failed (%s: %s): relaying uncached for %g s",
                type(error).__name__,
                _cause(error),
                STORAGE_PAUSE_SECONDS,
            )

    def refused(self, error: OSError) -> None:
        """The spool folder refused a write: relay blobs without keeping them for a while."""
        if time.monotonic() >= self._spool_refused_until:
            log.warning(
                "the cache's spool folder refused a write (%s): relaying blobs uncached for %g s",
                error.strerror or error,
                STORAGE_PAUSE_SECONDS,
            )
        self._spool_refused_until = time.monotonic() + STORAGE_PAUSE_SECONDS

    async def kept(self, digest: str) -> StoredBlob | None:
        """Blob ``digest`` if the bucket holds it, or None. Not yet noted as used: the client
        asking may be refused, and must not keep objects from eviction."""
        if not self.available:
            return None
        try:
            async with asyncio.timeout(QUICK_SECONDS):
                head = await self._s3().head_object(
                    Bucket=self._bucket, Key=self._key(Kind.BLOB, digest)
                )
        except STORAGE_ERRORS as error:
            self.failed(error)  # a missing object is a miss, which failed() knows
            return None
        return StoredBlob(digest, int(head["ContentLength"]), self)

    async def read(
        self, digest: str, first: int, last: int, size: int
    ) -> AsyncGenerator[bytes, None]:
        """Bytes ``first`` to ``last`` of blob ``digest`` (of ``size`` bytes), noted as used
        and kept from eviction while a client reads it; ``StorageError`` when storage fails."""
        if self.coordination is not None:
            await self.coordination.used(Kind.BLOB, digest, size, PIN_SECONDS)
        try:
            async with asyncio.timeout(QUICK_SECONDS):
                answer = await self._s3().get_object(
                    Bucket=self._bucket,
                    Key=self._key(Kind.BLOB, digest),
                    Range=f"bytes={first}-{last}",
                )
            async with answer["Body"] as body:
                while chunk := await body.read(READ_BYTES):
                    yield chunk
        except STORAGE_ERRORS as error:
            raise StorageError(error) from error

    async def presigned(self, digest: str, size: int) -> str | None:
        """A URL for GET of blob ``digest`` for ``PRESIGN_SECONDS``, kept from eviction as
        long; None if storage cannot say."""
        assert self._signer is not None
        try:
            url: str = await self._signer.generate_presigned_url(
                "get_object",
                Params={"Bucket": self._bucket, "Key": self._key(Kind.BLOB, digest)},
                ExpiresIn=PRESIGN_SECONDS,
            )
        except STORAGE_ERRORS as error:
            self.failed(error)
            return None
        if self.coordination is not None:
            await self.coordination.used(Kind.BLOB, digest, size, PRESIGN_SECONDS)
        return url

    def holds_manifest(self, digest: str) -> bool:
        """Whether this replica kept or served manifest ``digest`` (without asking storage:
        keeping one again is cheap, and the same bytes)."""
        return digest in self._manifests

    def _remember_manifest(self, digest: str) -> None:
        self._manifests[digest] = None
        self._manifests.move_to_end(digest)
        if len(self._manifests) > _REMEMBERED_MANIFESTS:
            self._manifests.popitem(last=False)

    async def manifest(self, digest: str) -> tuple[str, bytes] | None:
        """The media type and bytes of kept manifest ``digest``, verified again, or None."""
        if not self.available:
            return None
        try:
            async with asyncio.timeout(QUICK_SECONDS):
                answer = await self._s3().get_object(
                    Bucket=self._bucket, Key=self._key(Kind.MANIFEST, digest)
                )
                async with answer["Body"] as stream:
                    if int(answer["ContentLength"]) > MAX_MANIFEST_BYTES:
                        return None
                    body = await stream.read()
        except STORAGE_ERRORS as error:
            self.failed(error)  # a missing object is a miss, which failed() knows
            return None
        media_type = answer.get("Metadata", {}).get(_MANIFEST_TYPE, "")
        if f"sha256:{hashlib.sha256(body).hexdigest()}" != digest or not media_type:
            return None
        self._remember_manifest(digest)
        if self.coordination is not None:
            await self.coordination.used(Kind.MANIFEST, digest, len(body))
        return media_type, body

    async def keep_manifest(self, digest: str, media_type: str, body: bytes) -> bool:
        """Keep ``body`` as manifest ``digest`` if it hashes to it; True if kept."""
        if (
            not media_type
            or not self.available
            or len(body) > MAX_MANIFEST_BYTES
            or not media_type.isascii()
            or f"sha256:{hashlib.sha256(body).hexdigest()}" != digest
        ):
            return False
        try:
            async with asyncio.timeout(QUICK_SECONDS):
                await self._s3().put_object(
                    Bucket=self._bucket,
                    Key=self._key(Kind.MANIFEST, digest),
                    Body=body,
                    ContentType=media_type,
                    Metadata={_MANIFEST_TYPE: media_type},
                )
        except STORAGE_ERRORS as error:
            self.failed(error)
            return False
        self._remember_manifest(digest)
        await self._kept(Kind.MANIFEST, digest, len(body))
        return True

    def begin(
        self, digest: str, size: int, on_abandoned: Callable[[Download], None]
    ) -> Download | None:
        """Begin receiving blob ``digest`` of ``size`` bytes into the spool, uploading its
        parts as they arrive; None if it is not to be kept. ``OSError`` if the spool folder
        refuses the file."""
        if not fits(size, self.reserved, self.max_bytes):
            return None
        descriptor, name = tempfile.mkstemp(
            prefix=f"{digest.removeprefix('sha256:')}.", suffix=".part", dir=self._spool
        )
        temporary = Path(name)
        download = Download(digest, size, temporary, descriptor, temporary, on_abandoned)
        self.reserved += size
        self.downloads[digest] = download
        if size > PART_BYTES:
            self._uploads[download] = asyncio.create_task(self._upload_parts(download))
        return download

    async def _upload_parts(self, download: Download) -> tuple[str, list[dict[str, Any]]]:
        """Upload the parts of ``download`` as its file grows; the upload's id and parts.

        Aborted (no parts left behind) if anything fails or the download stops.
        """
        key = self._key(Kind.BLOB, download.digest)
        async with asyncio.timeout(QUICK_SECONDS):
            created = await self._s3().create_multipart_upload(
                Bucket=self._bucket, Key=key, ContentType="application/octet-stream"
            )
        upload_id = created["UploadId"]
        uploaded: list[dict[str, Any]] = []
        try:
            descriptor = await asyncio.to_thread(os.open, download.temporary, os.O_RDONLY)
            try:
                for number, first, last in parts(download.size):
                    if await download.written_beyond(last) <= last:
                        raise DownloadFailed("the download stopped")
                    # One part in memory at a time: at most PART_BYTES per fill.
                    data = await asyncio.to_thread(os.pread, descriptor, last - first + 1, first)
                    async with asyncio.timeout(WRITE_SECONDS):
                        answer = await self._s3().upload_part(
                            Bucket=self._bucket,
                            Key=key,
                            PartNumber=number,
                            UploadId=upload_id,
                            Body=data,
                        )
                    uploaded.append({"PartNumber": number, "ETag": answer["ETag"]})
            finally:
                os.close(descriptor)
        except BaseException:
            await asyncio.shield(self._abort(key, upload_id))
            raise
        return upload_id, uploaded

    async def _abort(self, key: str, upload_id: str) -> None:
        # Bounded: it runs shielded, also when the proxy stops, which must not wait for a
        # storage that stopped answering (the other replicas' sweep aborts what is left).
        try:
            async with asyncio.timeout(QUICK_SECONDS):
                await self._s3().abort_multipart_upload(
                    Bucket=self._bucket, Key=key, UploadId=upload_id
                )
        except STORAGE_ERRORS as error:
            self.failed(error)

    async def end(self, download: Download, complete: bool) -> bool:
        """Keep the download if ``complete`` and verified (its object completed), else drop
        it (its upload aborted); True if kept. Readers learn the outcome once the file
        verified; the object follows, and until then other replicas read the spool file."""
        kept = False
        uploader = self._uploads.pop(download, None)
        try:
            verified = await download.close(complete)
            download.ended(verified)
            if verified:
                kept = await self._keep(download, uploader)
            elif complete:
                log.warning("not caching %s: the download did not verify", download.digest)
        except OSError as error:
            download.ended(False)
            self.refused(error)
        finally:
            if uploader is not None:
                uploader.cancel()  # nothing, once it has finished
                await asyncio.gather(uploader, return_exceptions=True)
            self.reserved -= download.size
            download.temporary.unlink(missing_ok=True)
            if self.downloads.get(download.digest) is download:
                del self.downloads[download.digest]
        if kept:
            await self._kept(Kind.BLOB, download.digest, download.size)
        return kept

    async def _keep(
        self,
        download: Download,
        uploader: asyncio.Task[tuple[str, list[dict[str, Any]]]] | None,
    ) -> bool:
        """Make the verified download an object: its upload completed, or put whole."""
        key = self._key(Kind.BLOB, download.digest)
        try:
            if uploader is None:
                data = await asyncio.to_thread(download.temporary.read_bytes)
                async with asyncio.timeout(WRITE_SECONDS):
                    await self._s3().put_object(
                        Bucket=self._bucket,
                        Key=key,
                        Body=data,
                        ContentType="application/octet-stream",
                    )
                return True
            upload_id, uploaded = await uploader
            try:
                async with asyncio.timeout(WRITE_SECONDS):
                    await self._s3().complete_multipart_upload(
                        Bucket=self._bucket,
                        Key=key,
                        UploadId=upload_id,
                        MultipartUpload={"Parts": uploaded},  # type: ignore[typeddict-item]
                    )
            except BaseException:
                await asyncio.shield(self._abort(key, upload_id))
                raise
        except DownloadFailed:
            return False
        except STORAGE_ERRORS as error:
            self.failed(error)
            return False
        return True

    async def _kept(self, kind: Kind, digest: str, size: int) -> None:
        """Index a newly kept object, then evict what no longer fits."""
        self._kept_here += size
        if self.coordination is None:
            return
        await self.coordination.used(kind, digest, size)
        for victim_kind, victim in await self.coordination.evict(self.max_bytes):
            try:
                async with asyncio.timeout(QUICK_SECONDS):
                    await self._s3().delete_object(
                        Bucket=self._bucket, Key=self._key(victim_kind, victim)
                    )
            except STORAGE_ERRORS as error:
                self.failed(error)
                return

    async def _sweep_now_and_then(self) -> None:
        while True:
            await self.sweep_uploads()
            await asyncio.sleep(SWEEP_SECONDS)

    async def sweep_uploads(self, older_than: float | None = None) -> int:
        """Abort uploads under the prefix that no replica is completing: those of replicas
        that died mid-fill. How many were aborted.

        An upload is left alone while this replica fills its digest, while a lease on it is
        held, or while it is younger than ``older_than`` seconds: by default a few leases'
        time with Redis to say who fills what, and a day without (a fill of another replica
        cannot be told from an orphan then; a bucket lifecycle rule is the better sweep).
        Nothing is swept while Redis cannot answer."""
        if older_than is None:
            older_than = ORPHAN_SECONDS if self.coordination is None else 4 * LEASE_SECONDS
        aborted = 0
        limit = datetime.now(UTC) - timedelta(seconds=older_than)
        try:
            async with asyncio.timeout(QUICK_SECONDS):
                listing = await self._s3().list_multipart_uploads(
                    Bucket=self._bucket, Prefix=self._key(Kind.BLOB, "")
                )
            for upload in listing.get("Uploads", []):
                key, started = upload.get("Key", ""), upload.get("Initiated")
                digest = "sha256:" + key.rsplit("/", 1)[-1]
                if started is None or started > limit or digest in self.downloads:
                    continue
                if self.coordination is not None:
                    held = await self.coordination.holder(digest)
                    if held is not None or not self.coordination.available:
                        continue
                await self._abort(key, upload["UploadId"])
                aborted += 1
        except STORAGE_ERRORS as error:
            self.failed(error)
        return aborted


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _cause(error: BaseException) -> str:
    """A storage error as a log line may show it: its code, never a URL (a presigned one
    would carry its signature)."""
    if isinstance(error, ClientError):
        return _code(error) or "error"
    if isinstance(error, TimeoutError):
        return "no answer in time"
    return str(error).split("?", 1)[0]
