"""SeaweedFS (``weed server -s3``, pinned in go-tools.txt) on loopback: the S3-compatible
storage of the shared cache's end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from balena_registry_proxy.sandbox.ports import free_port

from ..redis_server import stop
from .go_tools import go_tool

# Any key pair: without identities configured, SeaweedFS's S3 gateway lets every request in.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "AKIASEAWEEDTEST00001",
    "AWS_SECRET_ACCESS_KEY": "seaweed-test-secret",
    # No probing of a cloud's metadata address for credentials.
    "AWS_EC2_METADATA_DISABLED": "true",
}


@dataclass
class SeaweedFS:
    """A running ``weed server`` with its S3 gateway."""

    s3_port: int
    process: subprocess.Popen[bytes]

    @property
    def endpoint(self) -> str:
        """The S3 endpoint URL."""
        return f"http://127.0.0.1:{self.s3_port}"

    def create_bucket(self, name: str) -> None:
        """Create bucket ``name`` (an unsigned PUT is let in)."""
        request = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")  # noqa: S310
        with urllib.request.urlopen(request, timeout=10):  # noqa: S310 - loopback
            pass

    def list(self, bucket: str, query: str = "list-type=2") -> str:
        """A bucket listing (objects by default; ``uploads`` for multipart uploads)."""
        url = f"{self.endpoint}/{bucket}?{query}"
        with urllib.request.urlopen(url, timeout=10) as answer:  # noqa: S310 - loopback
            return str(answer.read().decode())

    def pause(self) -> None:
        """Freeze every process of it (SIGSTOP): a storage that stopped answering."""
        os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Let it run again."""
        os.killpg(self.process.pid, signal.SIGCONT)


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


@contextlib.contextmanager
def running_seaweedfs(workdir: Path) -> Iterator[SeaweedFS]:
    """``weed server -s3`` on free loopback ports, its data in ``workdir``, once S3 answers."""
    binary = go_tool("weed")
    workdir.mkdir(parents=True, exist_ok=True)
    ports = [free_port() for _ in range(8)]
    names = ("master", "volume", "filer", "s3")
    flags = [f"-{name}.port={ports[2 * n]}" for n, name in enumerate(names)]
    flags += [f"-{name}.port.grpc={ports[2 * n + 1]}" for n, name in enumerate(names)]
    with (workdir / "weed.log").open("ab") as log:
        process = subprocess.Popen(
            [
                str(binary),
                "server",
                f"-dir={workdir}",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                "-s3",
                "-iam=false",
                "-master.volumeSizeLimitMB=64",
                "-volume.max=50",
                *flags,
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # A group of its own: pause() freezes all of it.
            start_new_session=True,
        )
    server = SeaweedFS(ports[6], process)
    try:
        deadline = time.monotonic() + 60
        while not _answers(server.s3_port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"weed server did not start: see {workdir / 'weed.log'}")
            time.sleep(0.1)
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            server.resume()
        stop(process)
