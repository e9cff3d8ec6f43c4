"""What the real-client tests share: running a client, containerd daemons, checking results.

Every client keeps its state in a fresh directory under /tmp and gets its configuration from
flags and environment variables, so the machine's /etc and /run neither influence the result
nor get written to.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from balena_registry_proxy.sandbox.seed import PushedManifest

from .. import matrix
from ..conftest import missing, require_binary
from .go_tools import go_tool

if TYPE_CHECKING:
    # Only named in annotations: the e2e conftest imports this module's neighbours.
    from .conftest import RunningProxy

# Names the client tests pull: a public release, a private one, a multi-platform index.
WEB, SECRET, MULTI_NAME = "gh_acme/web/1.2.3", "gh_acme/secret/0.2.0", "gh_acme/multi/2.0.0"
# Generous: every pull here moves a few KiB; only a hang should ever reach it.
COMMAND_TIMEOUT = 120
# The proxy's explanation when a name does not resolve for the caller (see ``denial.explain``).
NOT_ALLOWED = "not found, or you are not allowed to pull it"
_REF_NAME = "org.opencontainers.image.ref.name"


def client_env(**extra: str) -> dict[str, str]:
    """A minimal environment plus ``extra``.

    Starting from nothing keeps the caller's CONTAINER_HOST, CONTAINERD_*, REGISTRY_AUTH_FILE or
    DOCKER_CONFIG from redirecting a client to another daemon, store or set of credentials.
    """
    return {"PATH": os.environ.get("PATH", os.defpath), **extra}


def run_client(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run a client command; never raises on failure, the caller checks the outcome."""
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
        stdin=subprocess.DEVNULL,
        env=env,
    )


def require_root(client: str) -> None:
    """Skip (fail under REQUIRE_E2E=1) unless running as root, which these set-ups assume."""
    if os.geteuid() != 0:
        missing(f"the {client} tests run {client} as root with a private store; run them as root")


def short_tempdir(prefix: str) -> Path:
    """A new directory directly under /tmp.

    pytest's tmp_path can be long, and clients put unix sockets under their state directories,
    whose paths must stay below the kernel's 108-byte limit.
    """
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def toml_string(path: Path) -> str:
    """``path`` as a TOML basic string (a JSON string is one, escapes included)."""
    return json.dumps(str(path))


def blobs_of(manifest: PushedManifest) -> set[str]:
    """Digests of ``manifest`` itself, its config and its layers."""
    config = set() if manifest.config_digest is None else {manifest.config_digest}
    return {manifest.digest, *config, *manifest.layer_digests}


def fetched_by_digest(proxy: RunningProxy, name: str, digest: str) -> int:
    """How many times the proxy has served ``GET`` of ``name``'s manifest ``digest`` with 200."""
    line = re.compile(
        rf'"GET /v2/{re.escape(name)}/manifests/{re.escape(digest)}(?:\?[^ "]*)?'
        rf'(?: -> [^"]*)?" 200 '
    )
    return len(line.findall(proxy.log()))


def tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file, for failure messages."""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def sha256_of(data: bytes) -> str:
    """``data``'s digest as registries write it."""
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


# ------------------------------------------------------------------------------ OCI layouts


@dataclass(frozen=True)
class OciLayout:
    """An OCI image layout on disk, as crane and oras write one."""

    directory: Path

    def index(self) -> list[dict[str, Any]]:
        """The descriptors of ``index.json``."""
        document = json.loads((self.directory / "index.json").read_bytes())
        descriptors: list[dict[str, Any]] = document["manifests"]
        return descriptors

    def only(self) -> str:
        """The digest of the one descriptor of ``index.json`` (crane writes one per pull)."""
        (descriptor,) = self.index()
        digest: str = descriptor["digest"]
        return digest

    def tagged(self, tag: str) -> str:
        """The digest ``index.json`` names under ``tag``; fails the test if there is none."""
        for descriptor in self.index():
            if descriptor.get("annotations", {}).get(_REF_NAME) == tag:
                digest: str = descriptor["digest"]
                return digest
        pytest.fail(f"no descriptor tagged {tag!r} in {self.directory}/index.json")

    def blobs(self) -> set[str]:
        """Digests of every blob in the layout, each checked against its content first."""
        found = set()
        for path in (self.directory / "blobs" / "sha256").iterdir():
            digest = f"sha256:{path.name}"
            assert sha256_of(path.read_bytes()) == digest, f"{path} does not hash to its name"
            found.add(digest)
        return found


# ------------------------------------------------------------------------------ containerd


@dataclass(frozen=True)
class Ctr:
    """containerd's ``ctr`` in one namespace of a daemon the tests started."""

    binary: str
    address: str
    namespace: str
    host: str

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run a ctr command in this namespace."""
        return run_client(
            [self.binary, "--address", self.address, "--namespace", self.namespace, *args],
            client_env(),
        )

    def ref(self, name: str) -> str:
        """``name`` on the proxy; ctr, unlike other clients, wants the tag spelled out."""
        return f"{self.host}/{name}" if re.search(r"[:@]", name) else f"{self.host}/{name}:latest"

    def pull(self, name: str, *options: str) -> subprocess.CompletedProcess[str]:
        """``ctr images pull`` of ``name`` from the proxy, unpacked with the native snapshotter."""
        return self.run(
            "images", "pull", "--plain-http", "--snapshotter=native", *options, self.ref(name)
        )

    def image_digest(self, name: str) -> str:
        """The digest containerd recorded for the pulled ``name``; fails the test if missing."""
        return self.image_digest_of(self.ref(name))

    def image_digest_of(self, ref: str) -> str:
        """The digest containerd recorded for the image named ``ref``, as written."""
        for fields in self._table("images", "ls"):
            # Columns: REF TYPE DIGEST SIZE PLATFORMS LABELS; the first three hold no spaces.
            if fields[0] == ref:
                return fields[2]
        pytest.fail(f"{ref} is not among the images in namespace {self.namespace}")

    def unpacked(self, name: str) -> bool:
        """Whether all of ``name``'s content is present and unpacked into native snapshots."""
        for fields in self._table("images", "check", "--snapshotter=native"):
            # Columns: REF TYPE DIGEST STATUS SIZE UNPACKED, STATUS like "complete (2/2)".
            if fields[0] == self.ref(name):
                return fields[3] == "complete" and fields[-1] == "true"
        return False

    def content(self) -> set[str]:
        """Digests of every blob in this namespace's content store."""
        result = self.run("content", "ls", "--quiet")
        assert result.returncode == 0, result.stderr
        return set(result.stdout.split())

    def _table(self, *args: str) -> list[list[str]]:
        """The rows of a ctr listing, header dropped, split on whitespace."""
        result = self.run(*args)
        assert result.returncode == 0, result.stderr
        return [line.split() for line in result.stdout.splitlines()[1:] if line.strip()]


@dataclass(frozen=True)
class Containerd:
    """A containerd daemon on a private socket, with all of its state under ``workdir``."""

    ctr: str
    address: str
    workdir: Path

    def client(self, namespace: str, host: str) -> Ctr:
        """ctr in ``namespace``, pulling from the proxy at ``host``."""
        return Ctr(self.ctr, self.address, namespace, host)


# Kubernetes' CRI would want /etc/cni, /opt/cni and more; snapshotters that need particular
# filesystems or devices are left out too: every pull here unpacks with "native".
_NOT_NEEDED = [
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.devmapper",
]
# The default "shared" policy lets a namespace adopt blobs another namespace already fetched,
# without a request to the proxy; isolated makes every test fetch for itself.
_ISOLATED = '[plugins."io.containerd.metadata.v1.bolt"]\ncontent_sharing_policy = "isolated"\n'


def containerd16_config(workdir: Path) -> str:
    """A containerd 1.6 configuration that keeps every path and socket inside ``workdir``."""
    disabled = [*_NOT_NEEDED, "io.containerd.snapshotter.v1.aufs"]
    return (
        "version = 2\n"
        f"root = {toml_string(workdir / 'root')}\n"
        f"state = {toml_string(workdir / 'state')}\n"
        f"disabled_plugins = {json.dumps(disabled)}\n"
        "[grpc]\n"
        f"address = {toml_string(workdir / 's')}\n"
        "[ttrpc]\n"
        f"address = {toml_string(workdir / 't')}\n"
        "[debug]\n"
        f"address = {toml_string(workdir / 'd')}\n"
        # Its default directory is /opt/containerd, created at start-up.
        '[plugins."io.containerd.internal.v1.opt"]\n'
        f"path = {toml_string(workdir / 'opt')}\n" + _ISOLATED
    )


def containerd2_config(workdir: Path) -> str:
    """A containerd 2 configuration (format 4) that keeps everything inside ``workdir``."""
    disabled = [
        *_NOT_NEEDED,
        # containerd 2 splits the CRI into these; NRI would listen on /var/run/nri.
        "io.containerd.cri.v1.images",
        "io.containerd.cri.v1.runtime",
        "io.containerd.podsandbox.controller.v1.podsandbox",
        "io.containerd.sandbox.controller.v1.shim",
        "io.containerd.nri.v1.nri",
        "io.containerd.snapshotter.v1.blockfile",
        "io.containerd.snapshotter.v1.erofs",
    ]
    return (
        "version = 4\n"
        f"root = {toml_string(workdir / 'root')}\n"
        f"state = {toml_string(workdir / 'state')}\n"
        f"disabled_plugins = {json.dumps(disabled)}\n"
        '[plugins."io.containerd.server.v1.grpc"]\n'
        f"address = {toml_string(workdir / 's')}\n"
        '[plugins."io.containerd.server.v1.ttrpc"]\n'
        f"address = {toml_string(workdir / 't')}\n"
        '[plugins."io.containerd.server.v1.debug"]\n'
        f"address = {toml_string(workdir / 'd')}\n"
        '[plugins."io.containerd.internal.v1.opt"]\n'
        f"path = {toml_string(workdir / 'opt')}\n"
        # containerd 2 pulls in the daemon (the transfer service), which unpacks with overlayfs
        # unless told otherwise; any linux platform (arm64 too) unpacks into native snapshots.
        '[[plugins."io.containerd.transfer.v1.local".unpack_config]]\n'
        'platform = "linux/amd64"\n'
        'snapshotter = "native"\n'
        'differ = "walking"\n' + _ISOLATED
    )


def _wait_for_containerd(
    ctr: str, address: str, process: subprocess.Popen[bytes], log_path: Path
) -> None:
    """Return once containerd answers on ``address``."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            # Typically a kernel feature or permission this machine lacks, not a proxy fault.
            missing(
                f"containerd exited with {process.returncode} during start-up:\n" + tail(log_path)
            )
        version = run_client([ctr, "--address", address, "version"], client_env())
        if version.returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"containerd did not answer within 30 s:\n{tail(log_path)}")


@contextlib.contextmanager
def containerd_daemon(daemon: str, ctr: str, config: Callable[[Path], str]) -> Iterator[Containerd]:
    """A containerd daemon configured by ``config(workdir)``, stopped (by its PID) afterwards."""
    workdir = short_tempdir("ct")
    try:
        config_path = workdir / "config.toml"
        config_path.write_text(config(workdir))
        log_path = workdir / "containerd.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [daemon, "--config", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=client_env(),
            )
        try:
            address = str(workdir / "s")
            _wait_for_containerd(ctr, address, process, log_path)
            yield Containerd(ctr, address, workdir)
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    finally:
        shutil.rmtree(workdir)


def namespace_for(request: pytest.FixtureRequest) -> str:
    """A containerd namespace named after the test, so no pull finds earlier content."""
    return re.sub(r"[^A-Za-z0-9]+", "-", request.node.name).strip("-")


def write_auth_config(path: Path, host: str, credentials: str) -> Path:
    """A Docker ``config.json`` at ``path`` logging in to ``host`` with ``user:password``.

    crane reads it from ``$DOCKER_CONFIG``, oras from ``--registry-config``.
    """
    auth = base64.b64encode(credentials.encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    return path


CTR16 = "ctr (Debian's containerd)"
CTR2 = "ctr (containerd 2)"


@contextlib.contextmanager
def debian_containerd() -> Iterator[Containerd]:
    """Debian's containerd 1.6 daemon, its ctr's version noted for the client matrix."""
    daemon = require_binary("containerd", "containerd")
    ctr = require_binary("ctr", "containerd")
    require_root("containerd")
    matrix.note_version(CTR16, [ctr, "--version"])
    with containerd_daemon(daemon, ctr, containerd16_config) as running:
        yield running


@contextlib.contextmanager
def containerd2_daemon() -> Iterator[Containerd]:
    """containerd 2, built from the Go module proxy, its ctr's version noted too."""
    daemon, ctr = go_tool("containerd"), go_tool("ctr")
    require_root("containerd 2")
    matrix.note_version(CTR2, [str(ctr), "--version"])
    with containerd_daemon(str(daemon), str(ctr), containerd2_config) as running:
        yield running
