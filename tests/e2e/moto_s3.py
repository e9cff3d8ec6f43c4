"""moto's S3 server on loopback, as the bucket behind the sandbox's registry.

moto checks no signatures and happily serves a presigned URL that also carries an
``Authorization: Bearer`` (real S3 refuses that), so its request recorder is what tells the
tests which headers reached the bucket, and :func:`presigned_signature_valid` checks the query
signature the way S3 would, with botocore's SigV4 canonicalisation.
"""

from __future__ import annotations

import contextlib
import hmac
import importlib.util
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from balena_registry_proxy.sandbox.ports import free_port
from balena_registry_proxy.sandbox.registry import S3Storage

from ..redis_server import stop

__all__ = [
    "MOTO_MISSING",
    "MotoS3",
    "S3Request",
    "moto_available",
    "presigned_signature_valid",
    "run_moto_s3",
]

MOTO_MISSING = "moto's S3 server not found; install it with: pip install 'moto[server]'"
_HOST = "127.0.0.1"
_REGION = "us-east-1"
# moto takes any key pair; these only have to match between the registry's config and the
# signature check below.
_ACCESS_KEY = "AKIASANDBOXEXAMPLE01"
_SECRET_KEY = "sandbox-moto-secret-key"
_START_ATTEMPTS = 3
_STARTUP_SECONDS = 60.0


def moto_available() -> bool:
    """Whether moto and the web stack of its server (the ``server`` extra) are installed."""
    return all(importlib.util.find_spec(name) is not None for name in ("moto", "flask", "werkzeug"))


@dataclass(frozen=True)
class S3Request:
    """One request as moto's recorder saw it arrive."""

    method: str
    url: str
    """The URL as received: path and query exactly as the client sent them."""
    headers: dict[str, str]

    @property
    def path(self) -> str:
        """The raw path, e.g. ``/bucket/docker/registry/v2/blobs/sha256/ab/ab12.../data``."""
        return urlsplit(self.url).path

    @property
    def query(self) -> dict[str, str]:
        """The decoded query parameters."""
        return dict(parse_qsl(urlsplit(self.url).query, keep_blank_values=True))

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (any case), or ``None``."""
        wanted = name.lower()
        return next((v for k, v in self.headers.items() if k.lower() == wanted), None)


@dataclass(frozen=True)
class MotoS3:
    """A running moto server with one bucket, recording what it receives once asked to."""

    endpoint: str
    bucket: str
    recording_path: Path
    process: subprocess.Popen[bytes]

    @property
    def host(self) -> str:
        """``127.0.0.1:<port>``, the host presigned URLs point at."""
        return urlsplit(self.endpoint).netloc

    @property
    def storage(self) -> S3Storage:
        """The registry's storage settings for this bucket."""
        return S3Storage(
            endpoint=self.endpoint,
            bucket=self.bucket,
            region=_REGION,
            access_key=_ACCESS_KEY,
            secret_key=_SECRET_KEY,
        )

    def start_recording(self) -> None:
        """Record every request from now on (seeding's uploads would fill the log with bodies)."""
        _call(f"{self.endpoint}/moto-api/recorder/start-recording", "POST")

    def requests(self) -> list[S3Request]:
        """Every request received since :meth:`start_recording`, oldest first.

        moto writes each entry before it handles the request, so a request whose answer the
        caller has seen is always there.
        """
        if not self.recording_path.exists():
            return []
        # The last line may be half written by a request arriving right now: not one yet.
        lines = self.recording_path.read_text().split("\n")[:-1]
        entries = [json.loads(line) for line in lines if line]
        return [S3Request(e["method"], e["url"], dict(e["headers"])) for e in entries]

    def blob_data_requests(self, digest: str, since: int = 0) -> list[S3Request]:
        """Requests, from index ``since`` on, for the object holding the bytes of ``digest``."""
        hex_digest = digest.removeprefix("sha256:")
        suffix = f"/blobs/sha256/{hex_digest[:2]}/{hex_digest}/data"
        return [r for r in self.requests()[since:] if r.path.endswith(suffix)]


def presigned_signature_valid(request: S3Request, storage: S3Storage) -> bool:
    """Whether ``request`` carries a SigV4 query signature S3 would accept for ``storage``.

    moto skips this check, so the tests do it: it proves the presigned URL reached the bucket
    intact (a URL mangled on the way, or followed with another method, fails it). Only the
    ``host`` header is signed in the registry's presigned URLs. The canonical request, the
    string to sign and the signature are botocore's own (moto depends on it): the request is
    signed again at the time it names, and the signatures must agree.
    """
    # botocore comes with moto: imported here, so that without moto the tests skip, not fail.
    from botocore.auth import S3SigV4QueryAuth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    parts = urlsplit(request.url)
    params = parse_qsl(parts.query, keep_blank_values=True)
    given = dict(params)
    if given.get("X-Amz-Algorithm") != "AWS4-HMAC-SHA256" or "X-Amz-Signature" not in given:
        return False
    if given.get("X-Amz-SignedHeaders") != "host":
        return False
    timestamp = given.get("X-Amz-Date", "")
    scope = f"{timestamp[:8]}/{storage.region}/s3/aws4_request"
    if given.get("X-Amz-Credential") != f"{storage.access_key}/{scope}":
        return False
    host = request.header("Host") or parts.netloc
    # As S3 does, sign the query as received, decoded, less the signature (botocore encodes it
    # again and sorts it); the path as received, not normalised.
    unsigned = AWSRequest(
        method=request.method,
        url=urlunsplit(("http", host, parts.path, "", "")),
        headers={"Host": host},
        # A list, as received (a repeated name stays repeated); botocore takes one, its stubs
        # say a mapping.
        params=[(k, v) for k, v in params if k != "X-Amz-Signature"],  # type: ignore[arg-type]
    )
    unsigned.context["timestamp"] = timestamp
    signer = S3SigV4QueryAuth(
        Credentials(storage.access_key, storage.secret_key), "s3", storage.region
    )
    string_to_sign = signer.string_to_sign(unsigned, signer.canonical_request(unsigned))
    expected = signer.signature(string_to_sign, unsigned)
    return hmac.compare_digest(expected, given["X-Amz-Signature"])


def _call(url: str, method: str) -> int:
    request = urllib.request.Request(url, method=method)  # noqa: S310 - loopback http only
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        response.read()
        return int(response.status)


def _answers(url: str) -> bool:
    try:
        _call(url, "GET")
    except urllib.error.HTTPError:
        return True  # any HTTP answer means it serves
    except OSError:
        return False
    return True


def _spawn(workdir: Path, recording_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port(_HOST)
    with (workdir / "moto.log").open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", _HOST, "-p", str(port)],
            # Nothing of the machine's AWS or moto settings (a recording switched on from the
            # start, say) may change what this server does.
            env={
                **{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MOTO_"))},
                "MOTO_RECORDER_FILEPATH": str(recording_path),
            },
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return process, f"http://{_HOST}:{port}"


def _wait_ready(process: subprocess.Popen[bytes], endpoint: str) -> bool:
    """Whether moto answers before the deadline; ``False`` if it exited (a port clash)."""
    deadline = time.monotonic() + _STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        if _answers(f"{endpoint}/moto-api/"):
            return True
        time.sleep(0.1)
    raise RuntimeError(f"moto's S3 server did not answer within {_STARTUP_SECONDS:.0f} s")


@contextlib.contextmanager
def run_moto_s3(workdir: Path, bucket: str = "registry") -> Iterator[MotoS3]:
    """moto's server on a free loopback port with ``bucket`` created, stopped on exit.

    Its log is ``workdir/moto.log``; requests are recorded (once asked) to
    ``workdir/recording.jsonl``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    recording_path = workdir / "recording.jsonl"
    for attempt in range(1, _START_ATTEMPTS + 1):
        process, endpoint = _spawn(workdir, recording_path)
        try:
            ready = _wait_ready(process, endpoint)
        except BaseException:
            stop(process, 15)
            raise
        if ready:
            break
        # Exited during start-up: most likely another process took the probed port first.
        if attempt == _START_ATTEMPTS:
            log = (workdir / "moto.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"moto's S3 server exited with {process.returncode}: {log}")
    try:
        # moto checks no signature by default, so an unsigned CreateBucket is enough.
        _call(f"{endpoint}/{bucket}", "PUT")
        yield MotoS3(endpoint, bucket, recording_path, process)
    finally:
        stop(process, 15)
