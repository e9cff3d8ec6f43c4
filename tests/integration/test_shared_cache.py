"""The shared cache in-process: replicas on one bucket (moto's server) and one Redis
(redis-server), in front of a fake upstream that counts blob GETs."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from balena_registry_proxy import coordination, edge_cache, s3_store
from balena_registry_proxy.app import create_app, runner_options
from balena_registry_proxy.config import Settings
from balena_registry_proxy.metrics import Metrics
from balena_registry_proxy.sandbox.ports import free_port
from balena_registry_proxy.sharing import (
    LEASE_SECONDS,
    PEER_HEADER,
    PEER_PATH,
    Holder,
    Kind,
    index_member,
    lease_key,
    lease_value,
    namespace,
    peer_signature,
    pin_key,
)

from ..e2e.moto_s3 import MotoS3
from ..redis_server import RedisServer

# Three parts of a multipart upload, and a single-part blob.
BIG = os.urandom(20 * 1024 * 1024 + 123)
SMALL = os.urandom(300_000)
OTHER = os.urandom(300_000)
WRONG = os.urandom(9 * 1024 * 1024)


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


BLOBS = {digest_of(BIG): BIG, digest_of(SMALL): SMALL, digest_of(OTHER): OTHER}
# A blob whose bytes do not hash to the digest it is served under.
CORRUPT = "sha256:" + "e" * 64
GOOD = "Bearer alice-token"
SECRET = "a-secret-the-replicas-share"


@dataclass
class Upstream:
    """Blobs under a public and a private repository; every blob GET counted."""

    gets: list[str] = field(default_factory=list)
    delay: float = 0.0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/v2/{repo:.+}/blobs/{digest}", self.blob)
        return app

    async def blob(self, request: web.Request) -> web.StreamResponse:
        repo, digest = request.match_info["repo"], request.match_info["digest"]
        if repo == "private/app" and request.headers.get("Authorization") != GOOD:
            return web.json_response({"errors": [{"code": "UNAUTHORIZED"}]}, status=401)
        body = WRONG if digest == CORRUPT else BLOBS.get(digest)
        if repo not in ("public/app", "private/app") or body is None:
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN"}]}, status=404)
        headers = {"Docker-Content-Digest": digest, "Content-Length": str(len(body))}
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        self.gets.append(digest)
        step = 1 << 20
        for start in range(0, len(body), step):
            await response.write(body[start : start + step])
            if self.delay:
                await asyncio.sleep(self.delay)
        return response


@dataclass
class Replica:
    server: TestServer
    url: str

    async def get(self, path: str, **headers: str) -> tuple[int, bytes, dict[str, str]]:
        async with (
            aiohttp.ClientSession(auto_decompress=False) as session,
            session.get(f"{self.url}{path}", headers=headers, allow_redirects=False) as answer,
        ):
            try:
                body = await answer.read()
            except aiohttp.ClientPayloadError:
                body = b"<cut>"
            return answer.status, body, dict(answer.headers)

    async def metrics(self) -> str:
        return (await self.get("/metrics"))[1].decode()


@pytest.fixture(autouse=True)
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """moto's keys; and no probing of a cloud's metadata address for others."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIASHAREDCACHETEST1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "shared-cache-test-secret")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@dataclass
class Cluster:
    upstream: Upstream
    moto: MotoS3
    bucket: str
    replicas: list[Replica]

    def objects(self) -> list[str]:
        listing = _plain(f"{self.moto.endpoint}/{self.bucket}?list-type=2")
        return re.findall(r"<Key>([^<]+)</Key>", listing)

    def uploads(self) -> list[str]:
        listing = _plain(f"{self.moto.endpoint}/{self.bucket}?uploads")
        return re.findall(r"<UploadId>([^<]+)</UploadId>", listing)


def _plain(url: str, method: str = "GET") -> str:
    request = urllib.request.Request(url, method=method)  # noqa: S310 - loopback
    with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310
        return str(answer.read().decode())


@pytest.fixture
async def cluster(
    aiohttp_server: Any, moto: MotoS3, redis: RedisServer, request: pytest.FixtureRequest
) -> AsyncIterator[Any]:
    """``make(n, **settings)``: n replicas on a new bucket, the same Redis, one upstream."""
    servers: list[TestServer] = []

    async def make(count: int = 2, delay: float = 0.0, **settings: Any) -> Cluster:
        upstream = Upstream(delay=delay)
        registry = await aiohttp_server(upstream.app())
        bucket = f"cache-{uuid.uuid4().hex[:12]}"
        _plain(f"{moto.endpoint}/{bucket}", "PUT")
        replicas = []
        for _ in range(count):
            port = free_port()
            options: dict[str, Any] = {
                "registry_url": str(registry.make_url("")).rstrip("/"),
                "cache_s3_url": moto.endpoint,
                "cache_s3_bucket": bucket,
                "cache_redis_url": redis.url,
                "cache_peer_secret": SECRET,
                "cache_peer_url": f"http://127.0.0.1:{port}",
            } | settings
            config = Settings(**options)
            server = TestServer(create_app(config), port=port)
            run = runner_options(config)
            run.pop("handler_cancellation")
            await server.start_server(**run)
            servers.append(server)
            replicas.append(Replica(server, f"http://127.0.0.1:{port}"))
        return Cluster(upstream, moto, bucket, replicas)

    yield make
    for server in servers:
        await server.close()


async def settled(cluster: Cluster, count: int) -> None:
    """Wait (20 s at most) until the bucket holds ``count`` objects: they are kept just
    after the clients' last byte."""
    for _ in range(400):
        if len(cluster.objects()) >= count:
            return
        await asyncio.sleep(0.05)


async def upstream_asked(upstream: Upstream) -> None:
    """Wait until the upstream had a blob GET."""
    for _ in range(200):
        if upstream.gets:
            return
        await asyncio.sleep(0.01)


def blob(digest: str, repo: str = "public/app") -> str:
    return f"/v2/{repo}/blobs/{digest}"


async def test_concurrent_clients_of_two_replicas_take_one_upstream_get(cluster: Any) -> None:
    shared: Cluster = await cluster(2, delay=0.02)
    first, second = shared.replicas
    digest = digest_of(BIG)
    pulls = [replica.get(blob(digest)) for replica in (first, second, first, second, second)]
    answers = await asyncio.gather(*pulls)
    assert [(status, body == BIG) for status, body, _ in answers] == [(200, True)] * 5
    assert shared.upstream.gets == [digest]
    await settled(shared, 1)
    assert shared.objects() == [f"blobs/sha256/{digest.removeprefix('sha256:')}"]
    assert shared.uploads() == []
    # Warm, through either: from storage, no upstream GET.
    for replica in (first, second):
        status, body, _ = await replica.get(blob(digest))
        assert (status, body == BIG) == (200, True)
    assert shared.upstream.gets == [digest]
    # The other replica's clients were served from the holder while it filled.
    peer = [cache_requests(await replica.metrics(), "peer") for replica in (first, second)]
    assert sum(peer) >= 1, peer
    ranged = await second.get(blob(digest), Range="bytes=100-199")
    assert ranged[0] == 206
    assert ranged[1] == BIG[100:200]


async def test_a_private_layer_filled_at_one_replica_is_refused_at_another(cluster: Any) -> None:
    shared: Cluster = await cluster(2)
    first, second = shared.replicas
    digest = digest_of(SMALL)
    status, body, _ = await first.get(blob(digest, "private/app"), Authorization=GOOD)
    assert (status, body == SMALL) == (200, True)
    await settled(shared, 1)
    for headers in ({}, {"Authorization": "Bearer bob-token"}):
        status, body, _ = await second.get(blob(digest, "private/app"), **headers)
        assert status == 401, headers
        assert SMALL not in body
    # Through a public app's name, the registry does not link it: no byte either.
    status, body, _ = await second.get(blob(digest, "other/app"))
    assert status == 404
    # Alice at the other replica: confirmed once (shared through Redis), served from storage.
    status, body, _ = await second.get(blob(digest, "private/app"), Authorization=GOOD)
    assert (status, body == SMALL) == (200, True)
    assert shared.upstream.gets == [digest]


def cache_of(replica: Replica) -> Any:
    """The replica's edge cache (the object behind its replicas' endpoint)."""
    return next(
        getattr(route.handler, "__self__", None)
        for route in replica.server.app.router.routes()
        if getattr(route.handler, "__name__", "") == "serve_peer"
    )


async def filled(replica: Replica) -> None:
    """Wait (10 s at most) until the replica has no fill running."""
    cache = cache_of(replica)
    for _ in range(200):
        if not cache._fills:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("a fill still runs after 10 s")


def cache_requests(page: str, outcome: str) -> float:
    """The blob requests of ``outcome`` a metrics page counts."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(page)
        for sample in family.samples
        if sample.name == "registry_proxy_cache_requests_total"
        and sample.labels.get("outcome") == outcome
        and sample.labels.get("kind") == "blob"
    )


def die(replica: Replica) -> None:
    """What a replica's death looks like to the others: its connections reset, its downloads
    stopped, its lease left to lapse (a process killed releases nothing)."""
    cache = cache_of(replica)

    async def never(digest: str) -> None:
        return None

    cache.coordination.release = never
    for task in cache._fills.values():
        task.cancel()
    runner: Any = replica.server.runner
    for connection in runner.server.connections:
        connection.transport.abort()


Answer = tuple[int, bytes, dict[str, str]]


async def read_through_a_holder(
    cluster: Any, seconds: float
) -> tuple[Cluster, Replica, asyncio.Task[Answer], asyncio.Task[Answer]]:
    """Two replicas: the first filling the big blob for its client, the second's client
    reading it from the first for ``seconds``."""
    shared: Cluster = await cluster(2, delay=0.1)
    holder, other = shared.replicas
    filling = asyncio.create_task(holder.get(blob(digest_of(BIG))))
    await upstream_asked(shared.upstream)
    reading = asyncio.create_task(other.get(blob(digest_of(BIG))))
    await asyncio.sleep(seconds)
    return shared, holder, filling, reading


async def test_the_holder_gone_mid_fill_another_replica_completes_its_clients(
    cluster: Any,
) -> None:
    shared, holder, filling, reading = await read_through_a_holder(cluster, 0.5)
    digest = digest_of(BIG)
    died = time.monotonic()
    die(holder)
    status, body, _ = await reading
    assert (status, body == BIG) == (200, True)
    await asyncio.gather(filling, return_exceptions=True)
    assert shared.upstream.gets == [digest, digest]
    # The dead holder's lease lapsed before another replica took over.
    assert time.monotonic() - died >= LEASE_SECONDS / 2
    await settled(shared, 1)
    assert shared.objects() == [f"blobs/sha256/{digest.removeprefix('sha256:')}"]


async def test_without_redis_each_replica_downloads_on_its_own_and_hits_come_from_storage(
    cluster: Any,
) -> None:
    shared: Cluster = await cluster(2, cache_redis_url=f"redis://127.0.0.1:{free_port()}/0")
    first, second = shared.replicas
    digest = digest_of(SMALL)
    answers = await asyncio.gather(*(r.get(blob(digest)) for r in (first, first, second)))
    assert all(status == 200 and body == SMALL for status, body, _ in answers)
    assert len(shared.upstream.gets) <= 2
    await settled(shared, 1)
    before = len(shared.upstream.gets)
    for replica in (first, second):
        status, body, _ = await replica.get(blob(digest))
        assert (status, body == SMALL) == (200, True)
    assert len(shared.upstream.gets) == before
    page = await first.metrics()
    assert 'registry_proxy_cache_infrastructure_errors_total{part="redis"}' in page
    assert (await first.get("/ready"))[0] == 200


async def test_with_storage_down_blobs_are_relayed(cluster: Any) -> None:
    shared: Cluster = await cluster(1, cache_s3_url=f"http://127.0.0.1:{free_port()}")
    (replica,) = shared.replicas
    for digest, data in ((digest_of(SMALL), SMALL), (digest_of(BIG), BIG)):
        status, body, _ = await replica.get(blob(digest))
        assert (status, body == data) == (200, True)
    page = await replica.metrics()
    assert re.search(r'cache_infrastructure_errors_total\{part="storage"\} [1-9]', page)
    assert (await replica.get("/ready"))[0] == 200


async def test_a_blob_that_does_not_verify_leaves_no_object_and_no_parts(cluster: Any) -> None:
    shared: Cluster = await cluster(1)
    (replica,) = shared.replicas
    status, body, _ = await replica.get(blob(CORRUPT))
    assert status == 200
    assert len(body) < len(WRONG)
    # Absent only means something once the fill has ended.
    await filled(replica)
    assert shared.objects() == []
    assert shared.uploads() == []


async def test_least_recently_used_objects_are_evicted_across_replicas(cluster: Any) -> None:
    # Room for two of the small blobs, not three.
    shared: Cluster = await cluster(2, cache_max_size=700_000)
    first, second = shared.replicas
    for replica, data in ((first, SMALL), (second, OTHER)):
        assert (await replica.get(blob(digest_of(data))))[0] == 200
        await asyncio.sleep(0.2)
    await settled(shared, 2)
    third = os.urandom(300_000)
    third_hex = digest_of(third).removeprefix("sha256:")
    BLOBS[digest_of(third)] = third
    try:
        assert (await first.get(blob(digest_of(third))))[0] == 200
        for _ in range(200):
            if len(shared.objects()) == 2 and any(third_hex in k for k in shared.objects()):
                break
            await asyncio.sleep(0.05)
    finally:
        del BLOBS[digest_of(third)]
    # The least recently used went, whichever replica kept it.
    names = {key.rsplit("/", 1)[1] for key in shared.objects()}
    assert names == {third_hex, digest_of(OTHER).removeprefix("sha256:")}


async def test_hits_redirect_to_a_presigned_url_when_asked_to(cluster: Any) -> None:
    shared: Cluster = await cluster(1, cache_s3_redirect=True)
    (replica,) = shared.replicas
    digest = digest_of(SMALL)
    assert (await replica.get(blob(digest)))[0] == 200
    await settled(shared, 1)
    status, _, headers = await replica.get(blob(digest))
    assert status == 307
    location = headers["Location"]
    assert location.startswith(shared.moto.endpoint)
    assert "X-Amz-Signature=" in location
    async with aiohttp.ClientSession() as session, session.get(location) as stored:
        assert await stored.read() == SMALL
    assert shared.upstream.gets == [digest]


async def test_the_replicas_endpoint_needs_the_shared_secrets_signature(cluster: Any) -> None:
    shared: Cluster = await cluster(1, delay=0.2)
    (replica,) = shared.replicas
    digest = digest_of(BIG)
    filling = asyncio.create_task(replica.get(blob(digest)))
    await upstream_asked(shared.upstream)
    expires = int(time.time()) + 30
    refused = [
        {},
        {"Authorization": GOOD},
        {PEER_HEADER: peer_signature("another-secret-entirely", digest, expires)},
        {PEER_HEADER: peer_signature(SECRET, digest_of(SMALL), expires)},
        {PEER_HEADER: peer_signature(SECRET, digest, int(time.time()) - 1)},
    ]
    for headers in refused:
        status, body, _ = await replica.get(PEER_PATH + digest, **headers)
        assert status == 403, headers
        assert b"DENIED" in body
    signed = {PEER_HEADER: peer_signature(SECRET, digest, expires), "Range": "bytes=5-"}
    status, body, _ = await replica.get(PEER_PATH + digest, **signed)
    assert (status, body == BIG[5:]) == (206, True)
    assert (await filling)[1] == BIG


async def test_the_sweep_leaves_a_live_upload_alone_without_redis(cluster: Any) -> None:
    shared: Cluster = await cluster(1, delay=0.15, cache_redis_url=None, cache_peer_secret=None)
    (replica,) = shared.replicas
    store = cache_of(replica).store
    digest = digest_of(BIG)
    pull = asyncio.create_task(replica.get(blob(digest)))
    for _ in range(200):
        if shared.uploads():
            break
        await asyncio.sleep(0.05)
    assert shared.uploads(), "the fill never started its upload"
    # What the periodic sweep does to an upload as old as it wants, and this one's own.
    assert await store.sweep_uploads(older_than=0) == 0
    status, body, _ = await pull
    assert (status, body == BIG) == (200, True)
    await settled(shared, 1)
    assert shared.objects() == [f"blobs/sha256/{digest.removeprefix('sha256:')}"]
    assert store.available


async def test_a_failing_upstream_after_the_holder_died_is_not_asked_in_a_loop(
    cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Short patience: the lease lapses (10 s), then every new download the reading replica
    # starts is refused; before the fix it asked again at once, hundreds of times.
    monkeypatch.setattr(edge_cache, "SOURCE_PATIENCE_SECONDS", LEASE_SECONDS + 6)
    refused = 0
    serve = Upstream.blob

    async def blob_or_refuse(self: Upstream, request: web.Request) -> web.StreamResponse:
        nonlocal refused
        if failing.is_set():
            refused += 1
            return web.json_response({"errors": [{"code": "UNAVAILABLE"}]}, status=503)
        return await serve(self, request)

    failing = asyncio.Event()
    monkeypatch.setattr(Upstream, "blob", blob_or_refuse)
    _, holder, filling, reading = await read_through_a_holder(cluster, 0.8)
    failing.set()
    die(holder)
    status, body, _ = await reading
    await asyncio.gather(filling, return_exceptions=True)
    assert status == 200
    assert body == b"<cut>" or len(body) < len(BIG)
    assert 1 <= refused <= 8


async def test_a_refused_client_neither_pins_nor_refreshes_an_object(
    cluster: Any, redis: RedisServer
) -> None:
    shared: Cluster = await cluster(2)
    first, second = shared.replicas
    digest = digest_of(SMALL)
    assert (await first.get(blob(digest, "private/app"), Authorization=GOOD))[0] == 200
    await settled(shared, 1)
    space = namespace(shared.bucket, "")
    member = index_member(Kind.BLOB, digest)
    async with Redis.from_url(redis.url, decode_responses=True) as connection:
        await connection.delete(pin_key(space, member))
        before = await connection.zscore(space + "lru", member)
        assert before is not None
        await asyncio.sleep(1.1)
        assert (await second.get(blob(digest, "private/app")))[0] == 401
        assert await connection.exists(pin_key(space, member)) == 0
        assert await connection.zscore(space + "lru", member) == before
        # A client that may read it does both.
        assert (await second.get(blob(digest, "private/app"), Authorization=GOOD))[0] == 200
        assert await connection.exists(pin_key(space, member)) == 1


async def one_replica_keeping(cluster: Any, data: bytes) -> tuple[Cluster, Replica, Any]:
    """One replica whose storage keeps ``data`` (pulled through it once), and its store."""
    shared: Cluster = await cluster(1)
    (replica,) = shared.replicas
    assert (await replica.get(blob(digest_of(data))))[0] == 200
    await settled(shared, 1)
    return shared, replica, cache_of(replica).store


async def test_an_object_evicted_between_lookup_and_read_is_a_miss_not_a_failure(
    cluster: Any,
) -> None:
    shared, replica, store = await one_replica_keeping(cluster, SMALL)
    digest = digest_of(SMALL)
    read = store.read

    async def evicted_first(digest: str, first: int, last: int, size: int) -> AsyncIterator[bytes]:
        # Another replica's eviction, between this one's lookup and its read.
        await store._s3().delete_object(Bucket=shared.bucket, Key=shared.objects()[0])
        async for chunk in read(digest, first, last, size):
            yield chunk

    store.read = evicted_first
    status, body, _ = await replica.get(blob(digest))
    assert (status, body == SMALL) == (200, True)
    assert store.available


async def test_the_lease_outlasts_a_slow_first_answer_from_upstream(
    cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    serve = Upstream.blob
    slow = [True]

    async def slow_headers(self: Upstream, request: web.Request) -> web.StreamResponse:
        if request.method == "GET" and slow:
            slow.pop()
            await asyncio.sleep(LEASE_SECONDS + 2)
        return await serve(self, request)

    monkeypatch.setattr(Upstream, "blob", slow_headers)
    shared: Cluster = await cluster(2)
    first, second = shared.replicas
    digest = digest_of(SMALL)
    early = asyncio.create_task(first.get(blob(digest)))
    await asyncio.sleep(LEASE_SECONDS + 1)
    late = asyncio.create_task(second.get(blob(digest)))
    answers = await asyncio.gather(early, late)
    assert [(status, body == SMALL) for status, body, _ in answers] == [(200, True)] * 2
    assert shared.upstream.gets == [digest]


async def test_a_silent_holder_holds_a_client_no_longer_than_its_lease(
    cluster: Any, redis: RedisServer
) -> None:
    shared: Cluster = await cluster(1)
    (replica,) = shared.replicas
    digest = digest_of(SMALL)
    held: list[asyncio.StreamWriter] = []

    async def accept_and_say_nothing(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    silent = await asyncio.start_server(accept_and_say_nothing, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    space = namespace(shared.bucket, "")
    async with Redis.from_url(redis.url, decode_responses=True) as connection:
        lease = lease_value(Holder("deadbeefdeadbeef", f"http://127.0.0.1:{port}"))
        await connection.set(lease_key(space, digest), lease, px=int(LEASE_SECONDS * 1000))
    started = time.monotonic()
    status, body, _ = await replica.get(blob(digest))
    assert (status, body == SMALL) == (200, True)
    assert time.monotonic() - started < 2 * LEASE_SECONDS
    silent.close()
    for writer in held:
        writer.close()


def test_a_proxy_without_the_shared_cache_loads_none_of_its_clients() -> None:
    # botocore and redis-py cost a process about 17 MiB: a device's proxy has no use for them.
    code = (
        "import sys\n"
        "from balena_registry_proxy.app import create_app\n"
        "from balena_registry_proxy.config import Settings\n"
        "create_app(Settings(cache_dir=sys.argv[1]))\n"
        "print(sorted({'botocore', 'aiobotocore', 'redis'} & set(sys.modules)))\n"
    )
    with tempfile.TemporaryDirectory() as folder:
        loaded = subprocess.run(
            [sys.executable, "-c", code, folder], capture_output=True, text=True, check=True
        )
    assert loaded.stdout.strip() == "[]"


async def test_a_spool_folder_of_the_stores_own_goes_when_it_closes(cluster: Any) -> None:
    shared: Cluster = await cluster(1)
    (replica,) = shared.replicas
    spool = cache_of(replica).store.spool
    assert spool.is_dir()
    await replica.server.close()
    assert not spool.exists()


async def test_a_blob_kept_just_before_the_lease_was_taken_is_not_fetched_again(
    cluster: Any,
) -> None:
    shared, replica, store = await one_replica_keeping(cluster, SMALL)
    digest = digest_of(SMALL)
    look = store.kept
    looked = 0

    async def kept_after_the_first_look(digest: str) -> Any:
        # The first look misses, as one a moment before another replica kept the blob.
        nonlocal looked
        looked += 1
        return None if looked == 1 else await look(digest)

    store.kept = kept_after_the_first_look
    status, body, _ = await replica.get(blob(digest))
    assert (status, body == SMALL) == (200, True)
    assert shared.upstream.gets == [digest]


async def test_the_sweep_aborts_an_upload_no_replica_is_filling(cluster: Any) -> None:
    # What a replica killed mid-fill leaves behind: parts of an upload nobody will complete.
    shared: Cluster = await cluster(1)
    (replica,) = shared.replicas
    store = cache_of(replica).store
    orphan = f"blobs/sha256/{digest_of(OTHER).removeprefix('sha256:')}"
    await store._s3().create_multipart_upload(Bucket=shared.bucket, Key=orphan)
    assert len(shared.uploads()) == 1
    assert await store.sweep_uploads(older_than=0) == 1
    assert shared.uploads() == []


def test_the_waits_the_readme_gives() -> None:
    # Redis left alone 5 s after a failure; a storage lookup may take 5 s, then blobs are
    # relayed uncached for 15 s; each part warns at most every 30 s; presigned URLs last 5 min.
    assert (coordination.PAUSE_SECONDS, coordination.WARN_EVERY_SECONDS) == (5.0, 30.0)
    assert (s3_store.QUICK_SECONDS, s3_store.STORAGE_PAUSE_SECONDS) == (5.0, 15.0)
    assert (s3_store.WARN_EVERY_SECONDS, s3_store.PRESIGN_SECONDS) == (30.0, 300)


async def test_eviction_skips_pinned_and_leased_objects(redis: RedisServer) -> None:
    space = namespace("evict-" + uuid.uuid4().hex, "")
    me = Holder("me", "http://127.0.0.1:1")
    index = coordination.Coordination(redis.url, space, me, Metrics(), "a secret of 16+ chars")
    pinned, leased, old = (f"sha256:{n * 64}" for n in "abc")
    try:
        await index.used(Kind.BLOB, old, 100)
        await index.used(Kind.BLOB, pinned, 100, pin_seconds=60)
        await index.used(Kind.BLOB, leased, 100)
        assert await index.acquire(leased) == me  # filling it
        # Room for none: only the object neither pinned nor being filled goes.
        assert await index.evict(0) == [(Kind.BLOB, old)]
        await index.release(leased)
        assert await index.evict(0) == [(Kind.BLOB, leased)]
    finally:
        await index.close()
