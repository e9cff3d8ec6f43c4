"""The cache on disk: verification, the held-back last byte, manifests, LRU eviction, sizes."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest

from balena_registry_proxy.blobs import CONFIRMATION_SECONDS, Confirmations
from balena_registry_proxy.cache import MAX_MANIFEST_BYTES, BlobCache, DownloadFailed, cacheable
from balena_registry_proxy.config import parse_size


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    ("text", "size"),
    [("20GiB", 20 * 1024**3), ("500MB", 500 * 1000**2), ("1.5G", 1_500_000_000), ("1024", 1024)],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "abc", "0", "-1", "5XB", "1e9"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_only_sha256_is_cacheable() -> None:
    assert cacheable(digest_of(b"x"))
    assert not cacheable("sha512:" + "a" * 128)
    assert not cacheable("sha256:" + "A" * 64)


async def fill(cache: BlobCache, data: bytes, claimed: str | None = None) -> bool:
    download = cache.start(claimed or digest_of(data), len(data))
    await download.write(data)
    return await cache.end(download, ok=True)


async def test_verified_downloads_are_kept_and_others_are_not(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path, 10_000)
    cache.open()
    assert await fill(cache, b"good")
    assert cache.lookup(digest_of(b"good")) == cache.path(digest_of(b"good"))
    assert not await fill(cache, b"evil", claimed=digest_of(b"good!"))
    assert cache.lookup(digest_of(b"good!")) is None
    assert list((tmp_path / "tmp").iterdir()) == []
    assert cache.size == 4


async def test_readers_get_the_last_byte_only_once_verified(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path, 10_000)
    cache.open()
    data = b"0123456789"
    download = cache.start(digest_of(data), len(data))
    reader = download.reader()
    await download.write(data)
    assert await reader.__anext__() == data[:-1]
    pending = asyncio.ensure_future(reader.__anext__())
    await asyncio.sleep(0.05)
    assert not pending.done()
    await cache.end(download, ok=True)
    assert await pending == data[-1:]


async def test_readers_fail_when_the_download_does_not_verify(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path, 10_000)
    cache.open()
    download = cache.start(digest_of(b"expected"), 8)
    reader = download.reader()
    await download.write(b"received")
    assert await reader.__anext__() == b"receive"
    await cache.end(download, ok=True)
    with pytest.raises(DownloadFailed):
        await reader.__anext__()


async def test_more_bytes_than_announced_fail_the_download(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path, 10_000)
    cache.open()
    download = cache.start(digest_of(b"ab"), 2)
    with pytest.raises(DownloadFailed):
        await download.write(b"abc")


async def test_least_recently_used_goes_first(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path, 10)
    cache.open()
    for data in (b"aaaa", b"bbbb"):
        await fill(cache, data)
    cache.lookup(digest_of(b"aaaa"))  # used: now the newest
    await fill(cache, b"cccc")
    assert cache.lookup(digest_of(b"bbbb")) is None
    assert cache.lookup(digest_of(b"aaaa")) is not None
    assert cache.evictions == 1
    assert cache.size == 8


async def test_open_indexes_kept_blobs_and_drops_temporaries(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path, 10_000)
    cache.open()
    await fill(cache, b"kept")
    (tmp_path / "tmp" / "crashed.part").write_bytes(b"half")
    reopened = BlobCache(tmp_path, 10_000)
    reopened.open()
    assert reopened.size == 4
    assert reopened.lookup(digest_of(b"kept")) is not None
    assert list((tmp_path / "tmp").iterdir()) == []


def test_confirmations_are_per_credentials_repository_and_digest() -> None:
    memory = Confirmations()
    key = ("Bearer a", "v2/public", "sha256:" + "1" * 64)
    memory.remember(key, now=100.0)
    assert memory.fresh(key, now=100.0 + CONFIRMATION_SECONDS)
    assert not memory.fresh(key, now=100.0 + CONFIRMATION_SECONDS + 1)
    assert memory.ever(key)
    assert not memory.fresh(("Bearer a", "v2/private", key[2]), now=100.0)
    assert not memory.fresh(("Bearer a", "v2/public", "sha256:" + "2" * 64), now=100.0)
    assert not memory.fresh(("", "v2/public", key[2]), now=100.0)


async def test_a_reader_arriving_after_the_end_reads_the_kept_file(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path, 10_000)
    cache.open()
    data = b"finished before the reader came"
    download = cache.start(digest_of(data), len(data))
    await download.write(data)
    await cache.end(download, ok=True)
    assert b"".join([chunk async for chunk in download.reader()]) == data


async def test_a_reader_arriving_after_a_failed_end_is_refused(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path, 10_000)
    cache.open()
    download = cache.start(digest_of(b"expected"), 8)
    await download.write(b"received")
    await cache.end(download, ok=True)
    with pytest.raises(DownloadFailed):
        download.reader()


OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def test_manifests_are_kept_with_their_media_type(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path, 10_000)
    cache.open()
    body = b'{"schemaVersion":2}'
    assert not cache.holds_manifest(digest_of(body))
    assert cache.keep_manifest(digest_of(body), OCI_MANIFEST, body)
    assert cache.holds_manifest(digest_of(body))
    assert cache.manifest(digest_of(body)) == (OCI_MANIFEST, body)
    assert cache.lookup(digest_of(body)) is None  # a manifest is not served as a blob
    assert cache.size == len(OCI_MANIFEST) + 1 + len(body)
    assert cache.keep_manifest(digest_of(body), OCI_MANIFEST, body)  # again: no double count
    assert cache.size == len(OCI_MANIFEST) + 1 + len(body)
    reopened = BlobCache(tmp_path, 10_000)
    reopened.open()
    assert reopened.manifest(digest_of(body)) == (OCI_MANIFEST, body)
    assert reopened.size == cache.size


@pytest.mark.parametrize(
    ("media_type", "body", "claimed"),
    [
        (OCI_MANIFEST, b"{}", digest_of(b"[]")),
        ("", b"{}", None),
        ("text/plain\nX-Evil: 1", b"{}", None),
        ("application/ünicode", b"{}", None),
        (OCI_MANIFEST, b" " * (MAX_MANIFEST_BYTES + 1), None),
    ],
)
def test_manifests_that_would_not_be_served_faithfully_are_not_kept(
    tmp_path: Path, media_type: str, body: bytes, claimed: str | None
) -> None:
    cache = BlobCache(tmp_path, 100 << 20)
    cache.open()
    digest = claimed or digest_of(body)
    assert not cache.keep_manifest(digest, media_type, body)
    assert cache.manifest(digest) is None
    assert cache.size == 0
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_manifest_changed_on_disk_is_dropped(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path, 10_000)
    cache.open()
    body = b'{"schemaVersion":2}'
    cache.keep_manifest(digest_of(body), OCI_MANIFEST, body)
    kept = tmp_path / "manifests" / "sha256" / digest_of(body).removeprefix("sha256:")
    kept.write_bytes(kept.read_bytes().replace(b"2", b"1"))
    assert cache.manifest(digest_of(body)) is None
    assert not kept.exists()
    assert cache.size == 0


async def test_blobs_and_manifests_share_the_limit_and_the_order(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path, 2 * (len(OCI_MANIFEST) + 5))
    cache.open()
    old, new = b"old", b"new"
    cache.keep_manifest(digest_of(old), OCI_MANIFEST, old)
    await fill(cache, b"x" * (len(OCI_MANIFEST) + 4))
    cache.keep_manifest(digest_of(new), OCI_MANIFEST, new)
    assert cache.manifest(digest_of(old)) is None
    assert cache.lookup(digest_of(b"x" * (len(OCI_MANIFEST) + 4))) is not None
    assert cache.manifest(digest_of(new)) == (OCI_MANIFEST, new)
    assert cache.evictions == 1


async def test_a_kept_blob_is_on_disk_before_it_is_renamed_into_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = BlobCache(tmp_path, 10_000)
    cache.open()
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor: int) -> None:
        events.append("fsync " + os.readlink(f"/proc/self/fd/{descriptor}"))
        real_fsync(descriptor)

    def replace(source: object, target: object) -> None:
        events.append("rename")
        real_replace(source, target)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    assert await fill(cache, b"durable")
    final = cache.path(digest_of(b"durable"))
    assert events == [
        f"fsync {tmp_path / 'tmp' / (final.name + '.part')}",
        "rename",
        f"fsync {final.parent}",
    ]
