"""The shared cache end to end: three proxy processes behind HAProxy, one SeaweedFS bucket,
one Redis, in front of the sandbox's registry, pulled through with skopeo.

What the registry's own access log shows is the measure: how many times a layer was fetched
from upstream, whatever the replicas say of themselves.
"""

from __future__ import annotations

import contextlib
import hashlib
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from redis import Redis

from balena_registry_proxy.sandbox import Sandbox
from balena_registry_proxy.sandbox.ports import free_port
from balena_registry_proxy.sharing import parse_lease

from ..redis_server import RedisServer, start_redis, stop
from .conftest import RunningProxy, Skopeo, haproxy_in_front, proxy_process
from .seaweedfs import CREDENTIALS, SeaweedFS, running_seaweedfs
from .test_cache import blob_gets, stored_size
from .test_pull import ALICE, BIG, SECRET_PINNED
from .test_s3_redirects import pull_token

pytestmark = pytest.mark.e2e

REPLICAS = 3
PULLS = 30
SECRET = "e2e-replicas-shared-secret"


@dataclass
class Cluster:
    """Replicas of one shared cache behind HAProxy."""

    host: str
    """HAProxy's address."""
    replicas: list[RunningProxy]
    bucket: str


@pytest.fixture(scope="module")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    with running_seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@contextlib.contextmanager
def shared_cluster(
    sandbox: Sandbox, storage: SeaweedFS, redis_url: str, directory: Path
) -> Iterator[Cluster]:
    """Three replicas on a new (so cold) bucket, behind HAProxy."""
    bucket = f"layers-{uuid.uuid4().hex[:12]}"
    storage.create_bucket(bucket)
    with contextlib.ExitStack() as stack:
        replicas = []
        for n in range(REPLICAS):
            port = free_port()
            env = {
                "REGISTRY_URL": sandbox.registry_url,
                "CACHE_S3_URL": storage.endpoint,
                "CACHE_S3_BUCKET": bucket,
                "CACHE_REDIS_URL": redis_url,
                "CACHE_PEER_SECRET": SECRET,
                "CACHE_PEER_URL": f"http://127.0.0.1:{port}",
                "CACHE_DIR": str(directory / f"spool{n}"),
                **CREDENTIALS,
            }
            log = directory / f"replica{n}.log"
            replicas.append(stack.enter_context(proxy_process(env, log, port=port)))
        host = stack.enter_context(haproxy_in_front(replicas, directory))
        yield Cluster(host, replicas, bucket)


def big_layer(sandbox: Sandbox) -> str:
    """The 64 MiB layer of the sandbox's big image (its first is the small ``release.txt``)."""
    layer = max(sandbox.seed[BIG].layer_digests, key=lambda digest: stored_size(sandbox, digest))
    assert stored_size(sandbox, layer) >= 64 << 20
    return layer


def pull_all(
    client: Skopeo, host: str, destination: Path, count: int, *options: str
) -> list[subprocess.CompletedProcess[str]]:
    """``count`` concurrent skopeo pulls of the big image through ``host``."""
    destination.mkdir(parents=True, exist_ok=True)

    def pull(n: int) -> subprocess.CompletedProcess[str]:
        return client.pull("gh_acme/big", destination / str(n), *options, host=host)

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(pull, range(count)))


def verify(sandbox: Sandbox, destination: Path, count: int) -> None:
    """Every pull holds every layer, whose bytes hash to its digest."""
    for n in range(count):
        for digest in sandbox.seed[BIG].layer_digests:
            path = destination / str(n) / digest.removeprefix("sha256:")
            assert _sha256(path) == digest, (n, digest)


def after(seconds: float, action: Callable[[], object]) -> None:
    """``action`` once ``seconds`` have passed: a failure in the middle of the pulls."""
    time.sleep(seconds)
    action()


def _sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            hasher.update(chunk)
    return f"sha256:{hasher.hexdigest()}"


def test_thirty_pulls_over_three_replicas_fetch_the_layer_once(
    client: Skopeo,
    sandbox: Sandbox,
    seaweedfs: SeaweedFS,
    redis: RedisServer,
    tmp_path: Path,
) -> None:
    layer = big_layer(sandbox)
    with shared_cluster(sandbox, seaweedfs, redis.url, tmp_path) as cluster:
        before = blob_gets(sandbox, (layer,))
        started = time.monotonic()
        results = pull_all(client, cluster.host, tmp_path / "cold", PULLS)
        cold_seconds = time.monotonic() - started
        assert [r.returncode for r in results] == [0] * PULLS, [r.stderr for r in results]
        verify(sandbox, tmp_path / "cold", PULLS)
        assert blob_gets(sandbox, (layer,)) == before + 1
        served = [r.log().count(f"/blobs/{layer}") for r in cluster.replicas]
        assert all(count > 0 for count in served), served  # the pulls were spread
        # Warm, through each replica directly: none from upstream.
        for n, replica in enumerate(cluster.replicas):
            (tmp_path / "warm").mkdir(exist_ok=True)
            result = client.pull("gh_acme/big", tmp_path / "warm" / str(n), host=replica.host)
            assert result.returncode == 0, result.stderr
        verify(sandbox, tmp_path / "warm", REPLICAS)
        assert blob_gets(sandbox, (layer,)) == before + 1
        hex_digest = layer.removeprefix("sha256:")
        assert f"blobs/sha256/{hex_digest}" in seaweedfs.list(cluster.bucket)
        assert "<UploadId>" not in seaweedfs.list(cluster.bucket, "uploads")
    print(f"30 cold pulls over 3 replicas: {cold_seconds:.1f} s")


def _holder_port(redis: RedisServer, layer: str) -> int | None:
    """The port of the replica holding the lease on ``layer``, if one does."""
    with Redis(port=redis.port, decode_responses=True) as connection:
        for key in connection.scan_iter(match=f"*:lease:{layer}"):
            value = connection.get(key)
            holder = parse_lease(value) if isinstance(value, str) else None
            if holder is not None:
                return urlsplit(holder.url).port
    return None


def _retrying(
    results: list[subprocess.CompletedProcess[str]], again: Callable[[int], object]
) -> None:
    """Pull again what failed (a pipeline retrying its step): once must do."""
    for n, result in enumerate(results):
        if result.returncode != 0:
            retried = again(n)
            assert getattr(retried, "returncode", 1) == 0, getattr(retried, "stderr", "")


def test_the_lease_holder_killed_mid_fill_costs_at_most_one_more_get(
    client: Skopeo,
    sandbox: Sandbox,
    seaweedfs: SeaweedFS,
    redis: RedisServer,
    tmp_path: Path,
) -> None:
    layer = big_layer(sandbox)
    with shared_cluster(sandbox, seaweedfs, redis.url, tmp_path) as cluster:
        before = blob_gets(sandbox, (layer,))
        ports = {int(r.host.rsplit(":", 1)[1]): r for r in cluster.replicas}
        with ThreadPoolExecutor(max_workers=1) as watcher:

            def kill_the_holder() -> int | None:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    port = _holder_port(redis, layer)
                    if port is not None:
                        ports[port].process.send_signal(signal.SIGKILL)
                        return port
                    time.sleep(0.005)
                return None

            killing = watcher.submit(kill_the_holder)
            results = pull_all(client, cluster.host, tmp_path / "pulls", 9)
            killed = killing.result()
        assert killed is not None, "no replica ever held the lease"

        def again(n: int) -> subprocess.CompletedProcess[str]:
            return client.pull("gh_acme/big", tmp_path / "pulls" / str(n), host=cluster.host)

        _retrying(results, again)
        verify(sandbox, tmp_path / "pulls", 9)
        failed = sum(result.returncode != 0 for result in results)
        gets = blob_gets(sandbox, (layer,)) - before
        print(f"holder killed: {failed} of 9 pulls retried, {gets} upstream GETs of the layer")
        assert gets <= 2
        for port, replica in ports.items():
            if port != killed:
                assert replica.process.poll() is None


def test_pulls_go_on_when_redis_dies_mid_run(
    client: Skopeo, sandbox: Sandbox, seaweedfs: SeaweedFS, tmp_path: Path
) -> None:
    own = start_redis(tmp_path / "redis")
    try:
        with shared_cluster(sandbox, seaweedfs, own.url, tmp_path) as cluster:
            with ThreadPoolExecutor(max_workers=1) as killer:
                killer.submit(after, 0.3, own.process.kill)
                results = pull_all(client, cluster.host, tmp_path / "pulls", 6)
            assert own.process.wait(10) is not None
            assert [r.returncode for r in results] == [0] * 6, [r.stderr for r in results]
            later = pull_all(client, cluster.host, tmp_path / "after", 3)
            assert [r.returncode for r in later] == [0] * 3, [r.stderr for r in later]
            verify(sandbox, tmp_path / "after", 3)
            logs = "".join(replica.log() for replica in cluster.replicas)
            assert "the cache's Redis failed" in logs
    finally:
        stop(own.process)


def test_pulls_go_on_when_storage_stops_mid_run(
    client: Skopeo, sandbox: Sandbox, redis: RedisServer, tmp_path: Path
) -> None:
    with (
        running_seaweedfs(tmp_path / "seaweedfs") as storage,
        shared_cluster(sandbox, storage, redis.url, tmp_path) as cluster,
    ):
        with ThreadPoolExecutor(max_workers=1) as stopper:
            stopper.submit(after, 0.3, storage.pause)
            started = time.monotonic()
            results = pull_all(client, cluster.host, tmp_path / "pulls", 6)
        print(f"6 pulls, storage stopped after 0.3 s: {time.monotonic() - started:.1f} s")
        assert [r.returncode for r in results] == [0] * 6, [r.stderr for r in results]
        started = time.monotonic()
        later = pull_all(client, cluster.host, tmp_path / "after", 3)
        print(f"3 pulls, storage stopped: {time.monotonic() - started:.1f} s")
        assert [r.returncode for r in later] == [0] * 3, [r.stderr for r in later]
        verify(sandbox, tmp_path / "after", 3)
        logs = "".join(replica.log() for replica in cluster.replicas)
        assert "the cache's storage failed" in logs


def test_a_private_layer_filled_through_one_replica_does_not_leak_at_another(
    client: Skopeo,
    sandbox: Sandbox,
    seaweedfs: SeaweedFS,
    redis: RedisServer,
    tmp_path: Path,
) -> None:
    secret = "gh_acme/secret/0.2.0"
    layer = sandbox.seed[SECRET_PINNED].manifest.layer_digests[0]
    with shared_cluster(sandbox, seaweedfs, redis.url, tmp_path) as cluster:
        first, second = cluster.replicas[:2]
        member = client.pull(secret, tmp_path / "alice", f"--src-creds={ALICE}", host=first.host)
        assert member.returncode == 0, member.stderr
        deadline = time.monotonic() + 30
        while layer.removeprefix("sha256:") not in seaweedfs.list(cluster.bucket):
            assert time.monotonic() < deadline, "the private layer was never kept"
            time.sleep(0.1)
        for replica in cluster.replicas[1:]:
            # Anonymous, mallory (no member of the org), and under a public app's name.
            for user, name in ((None, secret), ("mallory", secret), (None, "gh_acme/web/1.2.3")):
                token = pull_token(sandbox, name, user)
                request = urllib.request.Request(
                    f"http://{replica.host}/v2/{name}/blobs/{layer}",
                    headers={"Authorization": f"Bearer {token}"},
                )
                with pytest.raises(urllib.error.HTTPError) as refused:
                    urllib.request.urlopen(request, timeout=30)  # noqa: S310 - loopback
                assert refused.value.code in (401, 403, 404), (user, name)
        # Nor through the replicas' endpoint, with a client's token.
        token = pull_token(sandbox, secret)
        request = urllib.request.Request(
            f"http://{second.host}/_cache/blobs/{layer}",
            headers={"Authorization": f"Bearer {token}"},
        )
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(request, timeout=30)  # noqa: S310 - loopback
        assert denied.value.code == 403
