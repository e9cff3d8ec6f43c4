"""The blob cache in front of the real registry, pulled through with skopeo."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from balena_registry_proxy.sandbox import Sandbox, sandbox_in_thread

from .conftest import RunningProxy, Skopeo, proxy_process, settled
from .test_pull import ALICE, BIG, MULTI, NEWEST, PINNED, SECRET_PINNED

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def caching_proxy(
    sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunningProxy, Path]]:
    """A proxy with a blob cache, in front of the sandbox's registry."""
    directory = tmp_path_factory.mktemp("cache")
    env = {"REGISTRY_URL": sandbox.registry_url, "CACHE_DIR": str(directory / "blobs")}
    with proxy_process(env, directory / "proxy.log") as running:
        yield running, directory / "blobs"


def blob_gets(sandbox: Sandbox, digests: tuple[str, ...]) -> int:
    """How many blob GETs of ``digests`` the registry has served so far."""
    time.sleep(0.3)  # the registry writes its access line just after the response
    return sum(
        1
        for entry in sandbox.registry_requests()
        if entry.method == "GET" and any(entry.path.endswith(d) for d in digests)
    )


def upstream_requests(sandbox: Sandbox, method: str, suffix: str) -> int:
    """How many ``method`` requests for a path ending in ``suffix`` the registry has served."""
    time.sleep(0.3)  # the registry writes its access line just after the response
    return sum(
        1
        for entry in sandbox.registry_requests()
        if entry.method == method and entry.path.endswith(suffix)
    )


def stored_size(sandbox: Sandbox, digest: str) -> int:
    """The size of a blob in the registry's own storage."""
    hex_digest = digest.removeprefix("sha256:")
    blobs = sandbox.registry.storage_dir / "docker" / "registry" / "v2" / "blobs" / "sha256"
    return (blobs / hex_digest[:2] / hex_digest / "data").stat().st_size


def metric(proxy: RunningProxy, series: str) -> float:
    """One series' value on the proxy's /metrics page."""
    with urllib.request.urlopen(f"http://{proxy.host}/metrics", timeout=30) as page:
        for line in page.read().decode().splitlines():
            if line.startswith(f"{series} "):
                return float(line.split()[1])
    raise AssertionError(f"{series} not on the metrics page")


def test_warm_pull_takes_no_blob_from_upstream(
    client: Skopeo, sandbox: Sandbox, caching_proxy: tuple[RunningProxy, Path], tmp_path: Path
) -> None:
    proxy, cache = caching_proxy
    layers = sandbox.seed[BIG].layer_digests
    before = blob_gets(sandbox, layers)
    for attempt in ("cold", "warm"):
        result = client.pull("gh_acme/big", tmp_path / attempt, host=proxy.host)
        assert result.returncode == 0, result.stderr
        if attempt == "cold":
            assert blob_gets(sandbox, layers) == before + len(layers)
    assert blob_gets(sandbox, layers) == before + len(layers)
    settled(cache)
    for digest in layers:
        assert (cache / "blobs" / "sha256" / digest.removeprefix("sha256:")).exists()
        assert (tmp_path / "warm" / digest.removeprefix("sha256:")).read_bytes() == (
            tmp_path / "cold" / digest.removeprefix("sha256:")
        ).read_bytes()


def test_a_cached_private_layer_does_not_leak(
    client: Skopeo, sandbox: Sandbox, caching_proxy: tuple[RunningProxy, Path], tmp_path: Path
) -> None:
    proxy, cache = caching_proxy
    secret = "gh_acme/secret/0.2.0"
    member = client.pull(secret, tmp_path / "member", f"--src-creds={ALICE}", host=proxy.host)
    assert member.returncode == 0, member.stderr
    layer = sandbox.seed[SECRET_PINNED].manifest.layer_digests[0]
    settled(cache)
    assert (cache / "blobs" / "sha256" / layer.removeprefix("sha256:")).exists()
    # Anonymous, under the private app's name and under a public app's name.
    for name in ("gh_acme/secret/0.2.0", "gh_acme/web/1.2.3"):
        token = sandbox.token_issuer.issue(user=None, scopes=[f"repository:{name}:pull"])
        request = urllib.request.Request(
            f"http://{proxy.host}/v2/{name}/blobs/{layer}",
            headers={"Authorization": f"Bearer {token}"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)  # noqa: S310 - loopback
        assert refused.value.code in (401, 403, 404), name


def test_ten_concurrent_cold_pulls_take_the_big_layer_once(
    client: Skopeo, sandbox: Sandbox, tmp_path: Path
) -> None:
    layers = sandbox.seed[BIG].layer_digests
    env = {"REGISTRY_URL": sandbox.registry_url, "CACHE_DIR": str(tmp_path / "cache")}
    with proxy_process(env, tmp_path / "proxy.log") as proxy:
        before = blob_gets(sandbox, layers)

        def pull(n: int) -> subprocess.CompletedProcess[str]:
            return client.pull("gh_acme/big", tmp_path / str(n), host=proxy.host)

        with ThreadPoolExecutor(max_workers=10) as pool:
            results = list(pool.map(pull, range(10)))
        assert all(result.returncode == 0 for result in results), [r.stderr for r in results]
        assert blob_gets(sandbox, layers) == before + len(layers)


def test_a_download_killed_midway_leaves_nothing_behind(
    client: Skopeo, sandbox: Sandbox, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    env = {
        "REGISTRY_URL": sandbox.registry_url,
        "CACHE_DIR": str(cache),
        "CACHE_MAX_SIZE": "16MiB",
    }
    with proxy_process(env, tmp_path / "first.log") as proxy:
        small = client.pull("gh_acme/web/1.2.3", tmp_path / "web", host=proxy.host)
        assert small.returncode == 0, small.stderr
        settled(cache)
        kept = set(os.listdir(cache / "blobs" / "sha256"))
        assert kept
        # The proxy is killed while it downloads the 64 MiB layer...
        copy = subprocess.Popen(
            [
                client.binary,
                "copy",
                "--src-tls-verify=false",
                f"docker://{proxy.host}/gh_acme/big",
                f"dir:{tmp_path / 'big'}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while not os.listdir(cache / "tmp") and time.monotonic() < deadline:
            time.sleep(0.01)
        proxy.process.kill()
        proxy.process.wait(30)
        copy.wait(60)
    # ...so no file of that size is visible, and the next start removes the temporary.
    blobs = cache / "blobs" / "sha256"
    assert all((blobs / name).stat().st_size < 16 * 1024 * 1024 for name in os.listdir(blobs))
    with proxy_process(env, tmp_path / "second.log"):
        assert os.listdir(cache / "tmp") == []
        assert kept <= set(os.listdir(blobs))


def test_a_platform_manifest_fetched_by_digest_is_served_from_the_cache(
    client: Skopeo, sandbox: Sandbox, caching_proxy: tuple[RunningProxy, Path], tmp_path: Path
) -> None:
    proxy, cache = caching_proxy
    child = sandbox.seed[MULTI].platform_manifests["linux/arm64"]
    by_digest = f"/manifests/{child.digest}"
    before = upstream_requests(sandbox, "GET", by_digest)
    for attempt in ("cold", "warm"):
        # skopeo reads the index by tag, then the arm64 manifest by its digest.
        result = client.pull(
            "gh_acme/multi/2.0.0", tmp_path / attempt, "--override-arch=arm64", host=proxy.host
        )
        assert result.returncode == 0, result.stderr
        assert upstream_requests(sandbox, "GET", by_digest) == before + 1
    kept = cache / "manifests" / "sha256" / child.digest.removeprefix("sha256:")
    assert kept.read_bytes().startswith(child.media_type.encode() + b"\n")
    assert (tmp_path / "warm" / "manifest.json").read_bytes() == (
        tmp_path / "cold" / "manifest.json"
    ).read_bytes()
    assert metric(proxy, 'registry_proxy_cache_requests_total{kind="manifest",outcome="hit"}') >= 1


def test_least_recently_used_layers_are_evicted_under_a_small_limit(
    client: Skopeo, sandbox: Sandbox, tmp_path: Path
) -> None:
    old = sandbox.seed[PINNED]
    new = sandbox.seed[NEWEST]
    old_blobs = [d for d in (*old.manifest.layer_digests, old.manifest.config_digest) if d]
    new_blobs = [d for d in (*new.manifest.layer_digests, new.manifest.config_digest) if d]
    sizes = {d: stored_size(sandbox, d) for d in {*old_blobs, *new_blobs}}
    # Room for the newer release and half of the older one: pulling both must evict.
    limit = sum(sizes[d] for d in set(new_blobs)) + sum(sizes[d] for d in set(old_blobs)) // 2
    assert max(sizes.values()) <= limit / 2  # each small enough to be kept at all
    cache = tmp_path / "cache"
    env = {
        "REGISTRY_URL": sandbox.registry_url,
        "CACHE_DIR": str(cache),
        "CACHE_MAX_SIZE": str(limit),
    }
    with proxy_process(env, tmp_path / "proxy.log") as proxy:
        for name, attempt in (("gh_acme/web", "old"), (f"gh_acme/web/{NEWEST}", "new")):
            result = client.pull(name, tmp_path / attempt, host=proxy.host)
            assert result.returncode == 0, result.stderr
        settled(cache)
        kept = {path.name for path in (cache / "blobs" / "sha256").iterdir()}
        assert {d.removeprefix("sha256:") for d in new_blobs} <= kept
        assert not {d.removeprefix("sha256:") for d in old_blobs} <= kept
        assert sum(path.stat().st_size for path in (cache / "blobs" / "sha256").iterdir()) <= limit
        assert metric(proxy, "registry_proxy_cache_evictions") >= 1
        assert metric(proxy, "registry_proxy_cache_size_bytes") <= limit
        # The evicted layers come from upstream again; the kept ones do not.
        before = blob_gets(sandbox, new.manifest.layer_digests)
        again = client.pull(f"gh_acme/web/{NEWEST}", tmp_path / "new-again", host=proxy.host)
        assert again.returncode == 0, again.stderr
        assert blob_gets(sandbox, new.manifest.layer_digests) == before
        old_again = client.pull("gh_acme/web", tmp_path / "old-again", host=proxy.host)
        assert old_again.returncode == 0, old_again.stderr


def test_a_layer_bigger_than_half_the_cache_is_relayed_and_evicts_nothing(
    client: Skopeo, sandbox: Sandbox, tmp_path: Path
) -> None:
    small = sandbox.seed[PINNED]
    big_layer = max(sandbox.seed[BIG].manifest.layer_digests, key=lambda d: stored_size(sandbox, d))
    limit = stored_size(sandbox, big_layer) * 3 // 2
    cache = tmp_path / "cache"
    env = {
        "REGISTRY_URL": sandbox.registry_url,
        "CACHE_DIR": str(cache),
        "CACHE_MAX_SIZE": str(limit),
    }
    with proxy_process(env, tmp_path / "proxy.log") as proxy:
        assert client.pull("gh_acme/web", tmp_path / "small", host=proxy.host).returncode == 0
        settled(cache)
        before = {path.name for path in (cache / "blobs" / "sha256").iterdir()}
        assert {d.removeprefix("sha256:") for d in small.manifest.layer_digests} <= before
        gets = blob_gets(sandbox, (big_layer,))
        for attempt in ("big", "big-again"):
            result = client.pull("gh_acme/big", tmp_path / attempt, host=proxy.host)
            assert result.returncode == 0, result.stderr
        settled(cache)
        after = {path.name for path in (cache / "blobs" / "sha256").iterdir()}
        assert big_layer.removeprefix("sha256:") not in after
        assert before <= after
        assert blob_gets(sandbox, (big_layer,)) == gets + 2
        assert metric(proxy, "registry_proxy_cache_evictions") == 0


def test_a_corrupted_upstream_layer_fails_the_pull_and_is_not_kept(
    client: Skopeo, registry_binary: Path, tmp_path: Path
) -> None:
    # A registry of its own: its storage is damaged on purpose.
    with sandbox_in_thread() as damaged:
        layer = damaged.seed[PINNED].manifest.layer_digests[0]
        hex_digest = layer.removeprefix("sha256:")
        stored = (
            (damaged.registry.storage_dir / "docker" / "registry" / "v2" / "blobs" / "sha256")
            / hex_digest[:2]
            / hex_digest
            / "data"
        )
        data = bytearray(stored.read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size, other bytes: the registry serves it as is
        stored.write_bytes(bytes(data))
        cache = tmp_path / "cache"
        env = {"REGISTRY_URL": damaged.registry_url, "CACHE_DIR": str(cache)}
        with proxy_process(env, tmp_path / "proxy.log") as proxy:
            result = client.pull("gh_acme/web", tmp_path / "pulled", host=proxy.host)
            assert result.returncode != 0
            assert not (cache / "blobs" / "sha256" / hex_digest).exists()
            assert list((cache / "tmp").iterdir()) == []
            assert not (tmp_path / "pulled" / hex_digest).exists()
        assert "did not verify" in (tmp_path / "proxy.log").read_text()
