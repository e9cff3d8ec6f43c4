"""The store on disk: verification, the held-back last byte, manifests, LRU, limits, the lock."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest

from balena_registry_proxy.config import parse_size
from balena_registry_proxy.confirmations import CONFIRMATION_SECONDS, Confirmations, key
from balena_registry_proxy.digests import MAX_MANIFEST_BYTES, cacheable
from balena_registry_proxy.disk_store import DiskStore, StoreInUse
from balena_registry_proxy.download import Download, DownloadFailed

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def ignore(download: Download) -> None:
    """No reader ever leaves these downloads early."""


def opened(root: Path, max_bytes: int = 10_000) -> DiskStore:
    store = DiskStore(root, max_bytes)
    store.open()
    return store


def begin(store: DiskStore, data: bytes, claimed: str | None = None) -> Download:
    download = store.begin(claimed or digest_of(data), len(data), ignore)
    assert download is not None
    return download


async def fill(store: DiskStore, data: bytes, claimed: str | None = None) -> bool:
    download = begin(store, data, claimed)
    await download.write(data)
    return await store.end(download, complete=True)


def temporaries(root: Path) -> list[Path]:
    return list((root / "tmp").iterdir())


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


async def test_verified_downloads_are_kept_and_others_are_not(tmp_path: Path) -> None:
    store = opened(tmp_path)
    assert await fill(store, b"good")
    assert store.lookup(digest_of(b"good")) == store.path(digest_of(b"good"))
    assert not await fill(store, b"evil", claimed=digest_of(b"good!"))
    assert store.lookup(digest_of(b"good!")) is None
    assert temporaries(tmp_path) == []
    assert (store.size, store.reserved) == (4, 0)


async def test_readers_get_the_last_byte_only_once_verified(tmp_path: Path) -> None:
    store = opened(tmp_path)
    data = b"0123456789"
    download = begin(store, data)
    await download.write(data)
    assert await download.readable_beyond(0) == len(data) - 1
    pending = asyncio.ensure_future(download.readable_beyond(len(data) - 1))
    await asyncio.sleep(0.05)
    assert not pending.done()
    await store.end(download, complete=True)
    assert await pending == len(data)


async def test_readers_fail_when_the_download_does_not_verify(tmp_path: Path) -> None:
    store = opened(tmp_path)
    download = begin(store, b"received", claimed=digest_of(b"expected"))
    await download.write(b"received")
    assert await download.readable_beyond(0) == 7
    await store.end(download, complete=True)
    with pytest.raises(DownloadFailed):
        await download.readable_beyond(7)


async def test_a_download_cut_short_is_not_kept(tmp_path: Path) -> None:
    store = opened(tmp_path)
    download = begin(store, b"0123456789")
    await download.write(b"01234")
    assert not await store.end(download, complete=True)
    assert temporaries(tmp_path) == []


async def test_more_bytes_than_announced_fail_the_download(tmp_path: Path) -> None:
    store = opened(tmp_path)
    download = begin(store, b"ab")
    with pytest.raises(DownloadFailed):
        await download.write(b"abc")
    assert not await store.end(download, complete=False)


@pytest.mark.parametrize("change", ["truncate", "append"])
async def test_a_file_whose_size_changed_under_the_download_is_not_kept(
    tmp_path: Path, change: str
) -> None:
    store = opened(tmp_path, 100_000)
    data = b"0123456789" * 1000
    download = begin(store, data)
    await download.write(data)
    await download.readable_beyond(0)
    if change == "truncate":
        os.truncate(download.temporary, 100)  # what a second process once did
    else:
        with download.temporary.open("ab") as other:
            other.write(b"more")
    assert not await store.end(download, complete=True)
    assert store.lookup(digest_of(data)) is None


async def test_least_recently_used_goes_first(tmp_path: Path) -> None:
    store = opened(tmp_path, 10)
    for data in (b"aaaa", b"bbbb"):
        await fill(store, data)
    store.lookup(digest_of(b"aaaa"))  # used: now the newest
    await fill(store, b"cccc")
    assert store.lookup(digest_of(b"bbbb")) is None
    assert store.lookup(digest_of(b"aaaa")) is not None
    assert store.evictions == 1
    assert store.size == 8


async def test_a_blob_too_big_for_the_cache_is_not_kept_and_evicts_nothing(
    tmp_path: Path,
) -> None:
    store = opened(tmp_path, 100)
    await fill(store, b"k" * 40)
    assert store.begin(digest_of(b"x" * 51), 51, ignore) is None
    assert store.lookup(digest_of(b"k" * 40)) is not None
    assert (store.evictions, store.reserved) == (0, 0)


async def test_downloads_in_progress_count_toward_the_limit_as_their_bytes_arrive(
    tmp_path: Path,
) -> None:
    store = opened(tmp_path, 100)
    await fill(store, b"k" * 30)
    first, second = begin(store, b"a" * 45), begin(store, b"b" * 45)
    assert store.reserved == 90
    assert store.begin(digest_of(b"c" * 20), 20, ignore) is None  # no room beside them
    await first.write(b"a" * 45)
    await first.readable_beyond(0)
    assert store.lookup(digest_of(b"k" * 30)) is not None  # 75 of 100: no need yet
    await second.write(b"b" * 45)
    await second.readable_beyond(0)
    assert store.lookup(digest_of(b"k" * 30)) is None  # 120 of 100: made room
    for download in (first, second):
        assert await store.end(download, complete=True)
    assert (store.size, store.reserved) == (90, 0)


async def test_a_download_stopped_before_its_bytes_came_evicts_nothing(tmp_path: Path) -> None:
    store = opened(tmp_path, 100)
    await fill(store, b"k" * 30)
    await fill(store, b"l" * 30)
    stopped = begin(store, b"x" * 50)
    assert not await store.end(stopped, complete=False)
    assert store.lookup(digest_of(b"k" * 30)) is not None
    assert store.lookup(digest_of(b"l" * 30)) is not None
    assert store.evictions == 0


async def test_open_indexes_kept_blobs_and_drops_temporaries(tmp_path: Path) -> None:
    store = opened(tmp_path)
    await fill(store, b"kept")
    store.close()
    (tmp_path / "tmp" / "crashed.part").write_bytes(b"half")
    reopened = opened(tmp_path)
    assert reopened.size == 4
    assert reopened.lookup(digest_of(b"kept")) is not None
    assert temporaries(tmp_path) == []


def test_a_second_process_cannot_open_the_same_folder(tmp_path: Path) -> None:
    first = opened(tmp_path)
    (tmp_path / "tmp" / "in-flight.part").write_bytes(b"someone's download")
    with pytest.raises(StoreInUse, match="another process"):
        DiskStore(tmp_path, 10_000).open()
    # The refused one removed nothing of the first one's.
    assert [path.name for path in temporaries(tmp_path)] == ["in-flight.part"]
    first.close()
    opened(tmp_path).close()


async def test_temporaries_have_names_of_their_own(tmp_path: Path) -> None:
    store = opened(tmp_path)
    data = b"same digest"
    one, two = begin(store, data), begin(store, data)
    assert one.temporary != two.temporary
    assert one.temporary.name.startswith(digest_of(data).removeprefix("sha256:") + ".")
    for download in (one, two):
        await download.write(data)
        await store.end(download, complete=True)
    assert temporaries(tmp_path) == []


def test_confirmations_are_per_credentials_repository_and_digest() -> None:
    memory = Confirmations()
    confirmed = key("Bearer a", "v2/public", "sha256:" + "1" * 64)
    memory.remember(confirmed, now=100.0)
    assert memory.fresh(confirmed, now=100.0 + CONFIRMATION_SECONDS)
    assert not memory.fresh(confirmed, now=100.0 + CONFIRMATION_SECONDS + 1)
    assert memory.ever(confirmed)
    assert not memory.fresh(key("Bearer a", "v2/private", confirmed[2]), now=100.0)
    assert not memory.fresh(key("Bearer a", "v2/public", "sha256:" + "2" * 64), now=100.0)
    assert not memory.fresh(key("", "v2/public", confirmed[2]), now=100.0)
    assert "Bearer a" not in confirmed[0]  # kept as a hash


async def test_a_reader_arriving_after_the_end_reads_the_kept_file(tmp_path: Path) -> None:
    store = opened(tmp_path)
    data = b"finished before the reader came"
    download = begin(store, data)
    await download.write(data)
    await store.end(download, complete=True)
    descriptor = download.open()
    try:
        assert os.pread(descriptor, 100, 0) == data
    finally:
        os.close(descriptor)


async def test_a_reader_arriving_after_a_failed_end_is_refused(tmp_path: Path) -> None:
    store = opened(tmp_path)
    download = begin(store, b"received", claimed=digest_of(b"expected"))
    await download.write(b"received")
    await store.end(download, complete=True)
    with pytest.raises(DownloadFailed):
        download.open()


async def test_the_last_reader_leaving_early_abandons_the_download(tmp_path: Path) -> None:
    store = opened(tmp_path)
    abandoned: list[Download] = []
    data = b"x" * 1000
    download = store.begin(digest_of(data), len(data), abandoned.append)
    assert download is not None
    download.attach()
    download.attach()
    await download.write(data[:100])
    download.detach()
    assert abandoned == []  # one still reads
    download.detach()
    assert abandoned == [download]
    nearly = store.begin(digest_of(b"y" * 1000), 1000, abandoned.append)
    assert nearly is not None
    nearly.attach()
    await nearly.write(b"y" * 600)
    nearly.detach()
    assert abandoned == [download]  # more than half arrived: it goes on
    for started in (download, nearly):
        await store.end(started, complete=False)


async def test_manifests_are_kept_with_their_media_type(tmp_path: Path) -> None:
    store = opened(tmp_path)
    body = b'{"schemaVersion":2}'
    assert not store.holds_manifest(digest_of(body))
    assert await store.keep_manifest(digest_of(body), OCI_MANIFEST, body)
    assert store.holds_manifest(digest_of(body))
    assert await store.manifest(digest_of(body)) == (OCI_MANIFEST, body)
    assert store.lookup(digest_of(body)) is None  # a manifest is not served as a blob
    assert store.size == len(OCI_MANIFEST) + 1 + len(body)
    assert await store.keep_manifest(digest_of(body), OCI_MANIFEST, body)  # no double count
    assert store.size == len(OCI_MANIFEST) + 1 + len(body)
    store.close()
    reopened = opened(tmp_path)
    assert await reopened.manifest(digest_of(body)) == (OCI_MANIFEST, body)
    assert reopened.size == store.size


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
async def test_manifests_that_would_not_be_served_faithfully_are_not_kept(
    tmp_path: Path, media_type: str, body: bytes, claimed: str | None
) -> None:
    store = opened(tmp_path, 100 << 20)
    digest = claimed or digest_of(body)
    assert not await store.keep_manifest(digest, media_type, body)
    assert await store.manifest(digest) is None
    assert store.size == 0
    assert temporaries(tmp_path) == []


async def test_a_manifest_changed_on_disk_is_dropped(tmp_path: Path) -> None:
    store = opened(tmp_path)
    body = b'{"schemaVersion":2}'
    await store.keep_manifest(digest_of(body), OCI_MANIFEST, body)
    kept = tmp_path / "manifests" / "sha256" / digest_of(body).removeprefix("sha256:")
    kept.write_bytes(kept.read_bytes().replace(b"2", b"1"))
    assert await store.manifest(digest_of(body)) is None
    assert not kept.exists()
    assert store.size == 0


async def test_blobs_and_manifests_share_the_limit_and_the_order(tmp_path: Path) -> None:
    store = opened(tmp_path, 2 * (len(OCI_MANIFEST) + 5))
    old, new = b"old", b"new"
    await store.keep_manifest(digest_of(old), OCI_MANIFEST, old)
    await fill(store, b"x" * (len(OCI_MANIFEST) + 4))
    await store.keep_manifest(digest_of(new), OCI_MANIFEST, new)
    assert await store.manifest(digest_of(old)) is None
    assert store.lookup(digest_of(b"x" * (len(OCI_MANIFEST) + 4))) is not None
    assert await store.manifest(digest_of(new)) == (OCI_MANIFEST, new)
    assert store.evictions == 1


async def test_a_kept_blob_is_on_disk_before_it_is_renamed_into_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = opened(tmp_path)
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
    download = begin(store, b"durable")
    await download.write(b"durable")
    assert await store.end(download, complete=True)
    final = store.path(digest_of(b"durable"))
    assert events == [f"fsync {download.temporary}", "rename", f"fsync {final.parent}"]


async def test_a_kept_blob_removed_behind_the_stores_back_is_forgotten(tmp_path: Path) -> None:
    store = opened(tmp_path)
    await fill(store, b"gone")
    store.path(digest_of(b"gone")).unlink()
    assert store.lookup(digest_of(b"gone")) is None
    assert store.size == 0
