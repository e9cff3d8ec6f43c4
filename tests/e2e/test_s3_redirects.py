"""Blobs kept in S3: the real registry redirects blob GETs to presigned URLs on moto's S3 server.

balenaCloud's registry answers every blob GET with a 307 to its bucket; here the same registry
binary does that for real, so each way the proxy handles a redirect is tried against it: the
cache and ``--follow-redirects`` follow it themselves (never sending the client's token to the
bucket), and a plain proxy hands it to the client.
"""

from __future__ import annotations

import hashlib
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from email.message import Message
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from balena_registry_proxy.sandbox import Sandbox, sandbox_in_thread
from balena_registry_proxy.sandbox.registry import AccessLogEntry, S3Storage

from ..conftest import missing
from .conftest import RunningProxy, Skopeo, proxy_process, settled
from .moto_s3 import (
    MOTO_MISSING,
    MotoS3,
    S3Request,
    moto_available,
    presigned_signature_valid,
)
from .test_pull import ALICE

pytestmark = pytest.mark.e2e

SECRET = "gh_acme/secret"
_LOG_WAIT_SECONDS = 30.0


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def s3_sandbox(registry_binary: Path, moto: MotoS3) -> Iterator[Sandbox]:
    """A seeded sandbox whose registry keeps its blobs in moto's bucket."""
    with sandbox_in_thread(s3=moto.storage, timeout_seconds=120) as sandbox:
        # Only now: recording seeding's uploads would write every layer into the log.
        moto.start_recording()
        yield sandbox


def _proxy(
    sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory, name: str, **env: str
) -> Iterator[RunningProxy]:
    directory = tmp_path_factory.mktemp(name)
    with proxy_process(
        {"REGISTRY_URL": sandbox.registry_url, **env}, directory / "proxy.log"
    ) as running:
        yield running


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the caching proxy keeps blobs."""
    return tmp_path_factory.mktemp("s3-cache") / "blobs"


@pytest.fixture(scope="module")
def caching_proxy(
    s3_sandbox: Sandbox, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningProxy]:
    """A proxy with a blob cache (so it follows redirects itself)."""
    yield from _proxy(s3_sandbox, tmp_path_factory, "caching", CACHE_DIR=str(cache_dir))


@pytest.fixture(scope="module")
def following_proxy(
    s3_sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningProxy]:
    """A proxy without a cache that follows blob redirects itself."""
    yield from _proxy(s3_sandbox, tmp_path_factory, "following", FOLLOW_REDIRECTS="true")


@pytest.fixture(scope="module")
def plain_proxy(
    s3_sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningProxy]:
    """A proxy with neither: redirects go to the client."""
    yield from _proxy(s3_sandbox, tmp_path_factory, "plain")


@pytest.fixture(scope="module")
def skopeo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """skopeo's working directory, with an empty auth file."""
    workdir = tmp_path_factory.mktemp("skopeo-s3")
    (workdir / "auth.json").write_text("{}")
    return workdir


# --------------------------------------------------------------------------- helpers


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None  # the redirect itself is what the tests look at


def fetch(url: str, token: str, method: str = "GET") -> tuple[int, Message, bytes]:
    """One request with a bearer token, redirects not followed: status, headers, body."""
    headers = {"Authorization": f"Bearer {token}"}
    request = urllib.request.Request(url, method=method, headers=headers)  # noqa: S310 - loopback
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=120) as response:
            return int(response.status), response.headers, response.read()
    except urllib.error.HTTPError as answer:
        with answer:
            return answer.code, answer.headers, answer.read()


def pull_token(sandbox: Sandbox, name: str, user: str | None = None) -> str:
    """A token the sandbox's token service would give ``user`` for pulling ``name``."""
    owner = None if user is None else sandbox.catalog.user(user)
    return sandbox.token_issuer.issue(user=owner, scopes=[f"repository:{name}:pull"])


def layers_of(sandbox: Sandbox, name: str, user: str | None = None) -> tuple[str, ...]:
    """The layer digests of the release ``name`` resolves to."""
    release = sandbox.expected_release(name, user)
    assert release is not None, name
    return release.layer_digests


def registry_log_until_now(sandbox: Sandbox) -> list[AccessLogEntry]:
    """The registry's access log, including every request answered before this call.

    The registry writes a line just after answering; a request of our own, answered after all
    earlier ones, marks where the log is complete, instead of a sleep of a guessed length.
    """
    sentinel = f"/v2/sentinel/{uuid.uuid4().hex}/tags/list"
    try:
        urllib.request.urlopen(f"{sandbox.registry_url}{sentinel}", timeout=30).close()  # noqa: S310
    except urllib.error.HTTPError as refused:  # 401: no token, as expected
        refused.close()
    deadline = time.monotonic() + _LOG_WAIT_SECONDS
    while time.monotonic() < deadline:
        entries = sandbox.registry_requests()
        if any(entry.path == sentinel for entry in entries):
            return entries
        time.sleep(0.05)
    raise AssertionError(f"the registry did not log {sentinel} within {_LOG_WAIT_SECONDS} s")


def blob_gets(entries: list[AccessLogEntry], digests: tuple[str, ...]) -> list[AccessLogEntry]:
    """The blob GETs of ``digests`` among ``entries``."""
    return [
        entry
        for entry in entries
        if entry.method == "GET" and "/blobs/" in entry.path and entry.path.endswith(digests)
    ]


def assert_presigned_without_credentials(request: S3Request, moto: MotoS3) -> None:
    """``request`` reached the bucket with the registry's presigned URL and nothing else."""
    assert request.header("Authorization") is None, request.headers
    assert request.header("Cookie") is None, request.headers
    assert "X-Amz-Signature" in request.query, request.url
    assert presigned_signature_valid(request, moto.storage), request.url


def sha256_of(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


# --------------------------------------------------------------------------- tests


def test_the_registry_redirects_blob_requests_to_presigned_urls(
    s3_sandbox: Sandbox, moto: MotoS3
) -> None:
    release = s3_sandbox.expected_release("gh_acme/big")
    assert release is not None
    token = pull_token(s3_sandbox, "gh_acme/big")
    url = f"{s3_sandbox.registry_url}/v2/{release.repository}/blobs/{release.layer_digests[-1]}"
    for method in ("GET", "HEAD"):
        status, headers, _ = fetch(url, token, method)
        assert status == 307, method
        location = headers["Location"]
        parts = urlsplit(location)
        assert (parts.scheme, parts.netloc) == ("http", moto.host)
        assert parts.path.startswith(f"/{moto.bucket}/docker/registry/v2/blobs/sha256/")
        # Signed for the method asked: a HEAD's URL cannot be fetched with GET, nor back.
        other = "HEAD" if method == "GET" else "GET"
        as_sent = S3Request(method, location, {"Host": moto.host})
        assert presigned_signature_valid(as_sent, moto.storage)
        assert not presigned_signature_valid(
            S3Request(other, location, as_sent.headers), moto.storage
        )
    gets = blob_gets(registry_log_until_now(s3_sandbox), (release.layer_digests[-1],))
    assert gets
    assert {entry.status for entry in gets} == {307}


def test_a_caching_proxy_takes_layers_from_the_bucket_once(
    s3_sandbox: Sandbox,
    moto: MotoS3,
    caching_proxy: RunningProxy,
    cache_dir: Path,
    skopeo: str,
    skopeo_dir: Path,
    tmp_path: Path,
) -> None:
    client = Skopeo(skopeo, caching_proxy.host, skopeo_dir)
    pulls = {
        "gh_acme/big": ((), layers_of(s3_sandbox, "gh_acme/big")),
        SECRET: ((f"--src-creds={ALICE}",), layers_of(s3_sandbox, SECRET, "alice")),
    }
    layers = tuple(digest for _, digests in pulls.values() for digest in digests)
    log_mark = len(registry_log_until_now(s3_sandbox))
    s3_mark = len(moto.requests())
    for name, (options, digests) in pulls.items():
        destination = tmp_path / f"cold-{name.replace('/', '_')}"
        result = client.pull(name, destination, *options)
        assert result.returncode == 0, result.stderr
        settled(cache_dir)
        for digest in digests:
            pulled = (destination / digest.removeprefix("sha256:")).read_bytes()
            assert sha256_of(pulled) == digest
            assert (cache_dir / "blobs" / "sha256" / digest.removeprefix("sha256:")).is_file()
    cold = blob_gets(registry_log_until_now(s3_sandbox)[log_mark:], layers)
    assert {entry.path.rsplit("/", 1)[1] for entry in cold} == set(layers)
    assert {entry.status for entry in cold} == {307}
    for digest in layers:
        data_requests = moto.blob_data_requests(digest, since=s3_mark)
        assert data_requests, f"the bucket never served {digest}"
        for request in data_requests:
            assert request.method == "GET"
            assert_presigned_without_credentials(request, moto)

    log_mark = len(registry_log_until_now(s3_sandbox))
    s3_mark = len(moto.requests())
    for name, (options, _) in pulls.items():
        result = client.pull(name, tmp_path / f"warm-{name.replace('/', '_')}", *options)
        assert result.returncode == 0, result.stderr
    assert blob_gets(registry_log_until_now(s3_sandbox)[log_mark:], layers) == []
    assert all(moto.blob_data_requests(digest, since=s3_mark) == [] for digest in layers)


def test_a_following_proxy_answers_with_the_blob_itself(
    s3_sandbox: Sandbox,
    moto: MotoS3,
    following_proxy: RunningProxy,
    skopeo: str,
    skopeo_dir: Path,
    tmp_path: Path,
) -> None:
    digest = layers_of(s3_sandbox, "gh_acme/big")[-1]
    token = pull_token(s3_sandbox, "gh_acme/big")
    s3_mark = len(moto.requests())
    status, headers, body = fetch(
        f"http://{following_proxy.host}/v2/gh_acme/big/blobs/{digest}", token
    )
    assert status == 200, headers
    assert "Location" not in headers
    assert len(body) == int(headers["Content-Length"])
    assert sha256_of(body) == digest
    data_requests = moto.blob_data_requests(digest, since=s3_mark)
    assert len(data_requests) == 1
    assert data_requests[0].method == "GET"
    assert_presigned_without_credentials(data_requests[0], moto)

    client = Skopeo(skopeo, following_proxy.host, skopeo_dir)
    result = client.pull(SECRET, tmp_path / "secret", f"--src-creds={ALICE}")
    assert result.returncode == 0, result.stderr
    for layer in layers_of(s3_sandbox, SECRET, "alice"):
        pulled = (tmp_path / "secret" / layer.removeprefix("sha256:")).read_bytes()
        assert sha256_of(pulled) == layer
        data_requests = moto.blob_data_requests(layer, since=s3_mark)
        assert data_requests, f"the bucket never served {layer}"
        for request in data_requests:
            assert_presigned_without_credentials(request, moto)


def test_a_plain_proxy_hands_the_redirect_to_the_client(
    s3_sandbox: Sandbox,
    moto: MotoS3,
    plain_proxy: RunningProxy,
    skopeo: str,
    skopeo_dir: Path,
    tmp_path: Path,
) -> None:
    digest = layers_of(s3_sandbox, "gh_acme/big")[-1]
    token = pull_token(s3_sandbox, "gh_acme/big")
    status, headers, _ = fetch(f"http://{plain_proxy.host}/v2/gh_acme/big/blobs/{digest}", token)
    assert status == 307
    location = headers["Location"]
    assert urlsplit(location).netloc == moto.host
    assert presigned_signature_valid(S3Request("GET", location, {"Host": moto.host}), moto.storage)

    client = Skopeo(skopeo, plain_proxy.host, skopeo_dir)
    s3_mark = len(moto.requests())
    result = client.pull("gh_acme/big", tmp_path / "big")
    assert result.returncode == 0, result.stderr
    for layer in layers_of(s3_sandbox, "gh_acme/big"):
        pulled = (tmp_path / "big" / layer.removeprefix("sha256:")).read_bytes()
        assert sha256_of(pulled) == layer
        # skopeo itself took the layer from the bucket, sent there by the proxy's answer.
        referers = [r.header("Referer") for r in moto.blob_data_requests(layer, since=s3_mark)]
        assert f"http://{plain_proxy.host}/v2/gh_acme/big/blobs/{layer}" in referers


def test_blob_heads_through_a_caching_proxy_before_and_after_the_blob_is_kept(
    s3_sandbox: Sandbox, caching_proxy: RunningProxy, cache_dir: Path
) -> None:
    # The web app's smallest layer, under the name a client uses.
    name = "gh_acme/web/1.3.0"
    layer = layers_of(s3_sandbox, name)[0]
    token = pull_token(s3_sandbox, name)
    url = f"http://{caching_proxy.host}/v2/{name}/blobs/{layer}"
    kept = cache_dir / "blobs" / "sha256" / layer.removeprefix("sha256:")
    assert not kept.exists()
    # Not kept: the registry's own answer to a HEAD of an S3 blob, a redirect, is relayed.
    status, headers, _ = fetch(url, token, "HEAD")
    assert status == 307
    assert urlsplit(headers["Location"]).path.endswith("/data")
    # The same client's GET fills the cache; the HEAD then comes from the kept file.
    status, _, body = fetch(url, token)
    assert (status, sha256_of(body)) == (200, layer)
    settled(cache_dir)
    assert kept.is_file()
    status, headers, body = fetch(url, pull_token(s3_sandbox, name), "HEAD")
    assert (status, body) == (200, b"")
    assert headers["Docker-Content-Digest"] == layer
    assert headers["Content-Length"] == str(kept.stat().st_size)


def test_the_signature_check_accepts_only_the_url_as_signed() -> None:
    if not moto_available():
        missing(MOTO_MISSING)
    from botocore.auth import S3SigV4QueryAuth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    storage = S3Storage("http://127.0.0.1:9", "registry", "us-east-1", "AKIAEXAMPLE", "secret")
    host = {"Host": "127.0.0.1:9"}
    path = "/registry/docker/registry/v2/blobs/sha256/ab/ab12/data"
    presigned = AWSRequest(
        method="GET", url=f"http://127.0.0.1:9{path}?x-id=Get%20Object", headers=host
    )
    credentials = Credentials(storage.access_key, storage.secret_key)
    S3SigV4QueryAuth(credentials, "s3", storage.region, expires=1200).add_auth(presigned)
    url = presigned.url
    assert url is not None
    assert presigned_signature_valid(S3Request("GET", url, host), storage)
    assert not presigned_signature_valid(S3Request("HEAD", url, host), storage)
    assert not presigned_signature_valid(
        S3Request("GET", url.replace("ab12", "ab13"), host), storage
    )
    assert not presigned_signature_valid(S3Request("GET", url, {"Host": "127.0.0.1:10"}), storage)
    assert not presigned_signature_valid(
        S3Request("GET", url.replace("Get%20Object", "Put%20Object"), host), storage
    )
    other_key = S3Storage(storage.endpoint, storage.bucket, storage.region, "AKIAEXAMPLE", "other")
    assert not presigned_signature_valid(S3Request("GET", url, host), other_key)
