"""Many replicas, one upstream: concurrent whole pulls through HAProxy, cold then warm, and
how many bytes each kind of cache fetched from upstream for them.

Like the whole pull (bench/pull.py, whose skopeo machinery this reuses), this part runs
against the project's sandbox: the real registry with token auth and the balena API stand-in,
seeded from the sandbox's default catalog. The image is ``gh_acme/big`` (release 1.0.0), one
uncached 64 MiB layer of random bytes after a small one. Three setups, each of
:data:`REPLICAS` instances behind one HAProxy (round robin, health-checked), started afresh
with empty caches, then ``pulls`` concurrent ``skopeo copy`` runs through HAProxy (cold), the
caches left to settle, and as many again (warm):

- ``local``: this proxy with one ``--cache-dir`` per replica (no sharing);
- ``shared``: this proxy with the shared cache: one SeaweedFS bucket (``weed server -s3``,
  the pin of go-tools.txt) and one Redis (Debian's ``redis-server``), each replica with its
  peer URL and a spool folder;
- ``distribution``: Debian's registry (distribution 2.8) as a pull-through cache
  (``proxy.remoteurl`` the sandbox's registry, with a sandbox user's credentials for its token
  auth), each instance with its own filesystem storage. Distribution knows nothing of balena
  names, so its clients pull by the real repository name, ``v2/<hash>:latest``.

What upstream served is read from the sandbox registry's own access log, whatever the caches
say of themselves: every blob GET (its count and the bytes the log says were sent) and the GETs
of the 64 MiB layer alone, between the start of a phase and the moment the log has been quiet
for a second with the caches settled. A pulled byte is a byte of a blob (config and layers) in
a copy that skopeo completed and that checks against the seeded image.
"""

from __future__ import annotations

import re
import shutil
import socket
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench import blobcache
from bench.measure import require
from bench.procs import LOCALHOST, Service, free_port, log
from bench.pull import Pull, PullBench, pull_bench
from bench.stack import REGISTRY_BINARY, proxy_argv, registry_config, request

REPO = Path(__file__).resolve().parent.parent
REPLICAS = 3
# gh_acme/big 1.0.0 of the sandbox's default catalog: a 64 MiB layer after release.txt.
BIG = "99b6b1d3944b1ea6cea6317bd9bdb9c3"
NAME = "gh_acme/big"
SETUPS = ("local", "shared", "distribution")
PHASES = ("cold", "warm")
PEER_SECRET = "bench-shared-cache-peer-secret"  # noqa: S105 - loopback only, made up
# Any key pair: without identities configured, SeaweedFS's S3 gateway lets every request in.
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIASEAWEEDBENCH0001",
    "AWS_SECRET_ACCESS_KEY": "seaweed-bench-secret",
    "AWS_EC2_METADATA_DISABLED": "true",
}
# A user of the sandbox's default catalog: distribution's proxy logs in upstream with it.
REMOTE_USER = ("alice", "alice-sandbox-api-key-0001")
SETTLE_TIMEOUT = 120.0
QUIET_SECONDS = 1.0
# The registry's access log line: "GET /v2/... HTTP/1.1" 200 67108864 ...
_ACCESS_RE = re.compile(r'"(\S+) (\S+) [^"]*" (\d{3}) (\d+|-)')


@dataclass(frozen=True)
class Fetched:
    """The blob GETs in a stretch of the upstream registry's access log."""

    blob_gets: int
    layer_gets: int
    bytes: int


def fetched(text: str, layer: str) -> Fetched:
    """Blob GETs answered 200 or 206 in access-log ``text``: how many, how many of ``layer``,
    and the bytes sent."""
    blob_gets = layer_gets = sent = 0
    for match in _ACCESS_RE.finditer(text):
        method, path, status, size = match.groups()
        if method != "GET" or "/blobs/sha256:" not in path or status not in ("200", "206"):
            continue
        blob_gets += 1
        layer_gets += path.endswith(layer)
        sent += 0 if size == "-" else int(size)
    return Fetched(blob_gets, layer_gets, sent)


class AccessLog:
    """The upstream registry's access log, read from a mark on."""

    def __init__(self, path: Path) -> None:
        """Read ``path``; :meth:`mark` sets where a phase starts."""
        self.path = path
        self.offset = 0

    def size(self) -> int:
        """The log's size now."""
        return self.path.stat().st_size

    def mark(self) -> None:
        """A phase starts here."""
        self.offset = self.size()

    def since(self) -> str:
        """Everything logged since :meth:`mark`."""
        with self.path.open("rb") as file:
            file.seek(self.offset)
            return file.read().decode(errors="replace")


@dataclass
class Setup:
    """Replicas of one kind behind HAProxy, and how to tell that their caches settled."""

    name: str
    host: str
    image_name: str
    ports: list[int]
    kept: Callable[[], bool]
    counts: bool
    """Whether the replicas are this proxy (with /metrics cache counters)."""
    services: list[Service]


class Cluster:
    """Redis and SeaweedFS for the shared setup; the replicas and HAProxy of each setup."""

    def __init__(self, bench: PullBench) -> None:
        """Start processes through ``bench`` (it stops them all on close)."""
        self.bench = bench
        self.workdir = bench.workdir
        self.haproxy = require("haproxy", "haproxy")
        self.layer = biggest_layer(bench)
        self.redis_url = ""
        self.s3_port = 0
        self._started = 0

    def service(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> Service:
        """Start a process whose log goes to the work folder; stopped with the others."""
        self._started += 1
        service = Service(name, argv, self.workdir / f"{name}-{self._started}.log", env)
        self.bench.services.append(service)
        service.start()
        return service

    def infrastructure(self) -> None:
        """Redis and SeaweedFS on loopback."""
        port = free_port()
        redis_server = require("redis-server", "redis-server")
        options = ["--port", str(port), "--bind", LOCALHOST, "--save", "", "--appendonly", "no"]
        redis = self.service("redis", [redis_server, *options])
        _wait_for_redis(redis, port)
        self.redis_url = f"redis://{LOCALHOST}:{port}/0"
        ports = [free_port() for _ in range(8)]
        roles = ("master", "volume", "filer", "s3")
        flags = [f"-{role}.port={ports[2 * n]}" for n, role in enumerate(roles)]
        flags += [f"-{role}.port.grpc={ports[2 * n + 1]}" for n, role in enumerate(roles)]
        folder = self.workdir / "seaweedfs"
        folder.mkdir()
        weed_path = weed_binary()
        if weed_path is None:
            raise RuntimeError(str(missing()))
        argv = [str(weed_path), "server", f"-dir={folder}", f"-ip={LOCALHOST}"]
        argv += [f"-ip.bind={LOCALHOST}", "-s3", "-iam=false", "-master.volumeSizeLimitMB=64"]
        weed = self.service("weed", [*argv, "-volume.max=50", *flags])
        self.s3_port = ports[6]
        weed.wait_http(self.s3_port, "/", timeout=90)

    def start(self, name: str, image_name: str) -> Setup:
        """The replicas of setup ``name`` and HAProxy in front, every cache empty."""
        folder = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.workdir))
        first = len(self.bench.services)
        ports = [free_port() for _ in range(REPLICAS)]
        if name == "distribution":
            for n, port in enumerate(ports):
                config = folder / f"config{n}.yml"
                config.write_text(distribution_config(folder / f"storage{n}", port, self._upstream))
                self.service(f"distribution{n}", [REGISTRY_BINARY, "serve", str(config)])
            health = "/v2/"
            kept: Callable[[], bool] = lambda: True  # noqa: E731 - its access log says
        elif name == "local":
            for n, port in enumerate(ports):
                extra = ("--cache-dir", str(folder / f"cache{n}"))
                self.service(f"local{n}", proxy_argv(port, self._upstream, "warning", *extra))
            health = "/ping"

            def kept() -> bool:
                return not any(folder.rglob("*.part"))

        else:
            bucket = f"layers-{uuid.uuid4().hex[:12]}"
            status, _, body = request(self.s3_port, "PUT", f"/{bucket}")
            if status != 200:
                raise RuntimeError(f"SeaweedFS: creating {bucket} answered {status}: {body!r}")
            for n, port in enumerate(ports):
                options = [
                    *("--cache-s3-url", f"http://{LOCALHOST}:{self.s3_port}"),
                    *("--cache-s3-bucket", bucket, "--cache-redis-url", self.redis_url),
                    *("--cache-peer-url", f"http://{LOCALHOST}:{port}"),
                    *("--cache-dir", str(folder / f"spool{n}")),
                ]
                env = {"CACHE_PEER_SECRET": PEER_SECRET, **S3_ENV}
                argv = proxy_argv(port, self._upstream, "warning", *options)
                self.service(f"shared{n}", argv, env)
            health = "/ping"
            layer = self.layer.removeprefix("sha256:")

            def kept() -> bool:
                _, _, objects = request(self.s3_port, "GET", f"/{bucket}?list-type=2")
                _, _, uploads = request(self.s3_port, "GET", f"/{bucket}?uploads")
                return layer.encode() in objects and b"<UploadId>" not in uploads

        for service, port in zip(self.bench.services[-REPLICAS:], ports, strict=True):
            service.wait_http(port, health, timeout=60)
        host = self.balancer(name, ports, health, folder)
        services = self.bench.services[first:]
        return Setup(name, host, image_name, ports, kept, name != "distribution", services)

    @property
    def _upstream(self) -> str:
        return self.bench.sandbox.registry_url

    def balancer(self, name: str, ports: list[int], health: str, folder: Path) -> str:
        """HAProxy on a free port, round robin over ``ports``: its host."""
        port = free_port()
        config = folder / "haproxy.cfg"
        config.write_text(haproxy_config(port, ports, health))
        balancer = self.service(f"haproxy-{name}", [self.haproxy, "-f", str(config), "-db"])
        balancer.wait_http(port, health, timeout=30)
        return f"{LOCALHOST}:{port}"

    def stop(self, setup: Setup) -> None:
        """Stop the replicas and HAProxy of ``setup``."""
        for service in reversed(setup.services):
            self.bench.stop(service)


def stored_size(bench: PullBench, digest: str) -> int:
    """The size of a blob in the sandbox registry's own storage."""
    hex_digest = digest.removeprefix("sha256:")
    blobs = bench.sandbox.registry.storage_dir / "docker" / "registry" / "v2" / "blobs"
    return (blobs / "sha256" / hex_digest[:2] / hex_digest / "data").stat().st_size


def biggest_layer(bench: PullBench) -> str:
    """The digest of the image's largest layer."""
    return max(bench.image.layer_digests, key=lambda digest: stored_size(bench, digest))


def weed_binary() -> Path | None:
    """SeaweedFS's ``weed`` where ``make go-tools`` builds the pin of go-tools.txt, if built."""
    for line in (REPO / "go-tools.txt").read_text().splitlines():
        if line.startswith("weed "):
            version = line.split()[1].rpartition("@")[2]
            binary = REPO / ".tools" / f"weed@{version}" / "weed"
            return binary if binary.exists() else None
    return None


def missing() -> str | None:
    """What this part needs and does not find, as a sentence; None when all is there."""
    if weed_binary() is None:
        return "SeaweedFS's weed is not built: make go-tools"
    if not Path(REGISTRY_BINARY).exists():
        return f"{REGISTRY_BINARY} not found: apt-get install docker-registry"
    for tool in ("haproxy", "redis-server", "skopeo"):
        if shutil.which(tool) is None:
            return f"{tool} not found: apt-get install {tool}"
    return None


def _wait_for_redis(service: Service, port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        service.check_alive()
        try:
            with socket.create_connection((LOCALHOST, port), timeout=1) as connection:
                connection.sendall(b"PING\r\n")
                if connection.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"redis-server did not answer:\n{service.log_tail()}")
        time.sleep(0.05)


def distribution_config(storage: Path, port: int, remote_url: str) -> str:
    """Debian's registry as a pull-through cache of the sandbox's registry, logging in to its
    token auth as a sandbox user; its own filesystem storage, no auth of its own."""
    document = yaml.safe_load(registry_config(storage, port))
    username, password = REMOTE_USER
    document["proxy"] = {
        "remoteurl": remote_url,
        "username": username,
        "password": password,
    }
    text: str = yaml.safe_dump(document)
    return text


def haproxy_config(port: int, backends: list[int], health: str) -> str:
    """Round robin over ``backends``, each checked with ``GET health``; long transfers allowed."""
    servers = "".join(
        f"    server r{n} {LOCALHOST}:{backend} check inter 200ms fall 1 rise 2\n"
        for n, backend in enumerate(backends)
    )
    return (
        "global\n    maxconn 1024\n\n"
        "defaults\n    mode http\n    timeout connect 2s\n"
        "    timeout client 300s\n    timeout server 300s\n\n"
        f"frontend pulls\n    bind {LOCALHOST}:{port}\n    default_backend replicas\n\n"
        f"backend replicas\n    balance roundrobin\n    option httpchk GET {health}\n{servers}"
    )


def _outcomes(setup: Setup) -> dict[str, float]:
    """The replicas' cache counters (hit, joined, miss), summed."""
    total: dict[str, float] = {}
    for port in setup.ports if setup.counts else ():
        for key, value in blobcache.cache_outcomes(port).items():
            total[key] = total.get(key, 0.0) + value
    return total


def _settle(access: AccessLog, setup: Setup) -> float:
    """Wait until upstream's log has been quiet for :data:`QUIET_SECONDS` and the caches
    have kept what they fetched; the seconds waited."""
    started = time.monotonic()
    last, quiet_since = -1, started
    while True:
        now = time.monotonic()
        size = access.size()
        if size != last:
            last, quiet_since = size, now
        elif now - quiet_since >= QUIET_SECONDS and setup.kept():
            return round(now - started, 1)
        if now - started > SETTLE_TIMEOUT:
            raise RuntimeError(f"{setup.name}: the caches did not settle in {SETTLE_TIMEOUT:g} s")
        time.sleep(0.1)


def _concurrent(bench: PullBench, setup: Setup, pulls: int) -> tuple[float, list[Pull | str]]:
    """``pulls`` concurrent pulls through the setup's HAProxy: wall seconds, and each pull or
    the error that ended it."""

    def one(_: int) -> Pull | str:
        try:
            return bench.pull(setup.host, setup.image_name)
        except (RuntimeError, OSError) as error:
            return str(error)[-300:]

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=pulls) as pool:
        outcomes = list(pool.map(one, range(pulls)))
    return time.monotonic() - started, outcomes


def phase(
    cluster: Cluster, access: AccessLog, setup: Setup, name: str, pulls: int
) -> dict[str, Any]:
    """One phase (cold or warm) of a setup: the pulls, then what upstream served for them."""
    before = _outcomes(setup)
    access.mark()
    wall, outcomes = _concurrent(cluster.bench, setup, pulls)
    settle = _settle(access, setup)
    got = fetched(access.since(), cluster.layer)
    done = [o for o in outcomes if isinstance(o, Pull)]
    errors = [o for o in outcomes if isinstance(o, str)]
    pulled = sum(p.bytes for p in done)
    after = _outcomes(setup)
    record: dict[str, Any] = {
        "setup": setup.name,
        "phase": name,
        "pulls": pulls,
        "failed": len(errors),
        "wall_s": round(wall, 2),
        "median_pull_s": round(statistics.median(p.seconds for p in done), 2) if done else None,
        "settle_s": settle,
        "pulled_bytes": pulled,
        "upstream_blob_gets": got.blob_gets,
        "upstream_layer_gets": got.layer_gets,
        "upstream_bytes": got.bytes,
        "upstream_per_pulled": round(got.bytes / pulled, 4) if pulled else None,
        "counted": {k: round(v - before.get(k, 0.0)) for k, v in after.items()} or None,
        "errors": errors[:3],
    }
    log(
        f"  {setup.name:12} {name}: {pulls} pulls in {wall:6.1f} s, {len(errors)} failed; "
        f"upstream {got.layer_gets} GETs of the layer, {got.bytes / (1 << 20):.0f} MiB "
        f"({record['upstream_per_pulled']} per pulled byte)"
    )
    return record


def shared_runs(pulls: int, setups: Sequence[str] = SETUPS) -> dict[str, Any]:
    """Start the sandbox, then each setup in turn: ``pulls`` cold pulls, then ``pulls`` warm;
    stop everything. The runs and what was pulled."""
    started = time.monotonic()
    with pull_bench("shared", None, BIG) as bench:
        cluster = Cluster(bench)
        if "shared" in setups:
            cluster.infrastructure()
        setup_seconds = round(time.monotonic() - started, 1)
        access = AccessLog(bench.sandbox.registry_log_path)
        runs = []
        for name in setups:
            image_name = NAME if name != "distribution" else f"{bench.image.repository}:latest"
            setup = cluster.start(name, image_name)
            try:
                runs += [phase(cluster, access, setup, p, pulls) for p in PHASES]
            finally:
                cluster.stop(setup)
        layer_bytes = stored_size(bench, cluster.layer)
    first = next(r for r in runs if r["pulled_bytes"])
    return {
        "image": {
            "name": NAME,
            "repository": bench.image.repository,
            "digest": bench.image.digest,
            "layer": cluster.layer,
            "layer_bytes": layer_bytes,
            "bytes": first["pulled_bytes"] // (first["pulls"] - first["failed"]),
        },
        "replicas": REPLICAS,
        "pulls": pulls,
        "setup_seconds": setup_seconds,
        "runs": runs,
    }
