"""The servers under test: the registry (seeded), nginx and the proxy instances.

Everything lives in one temporary directory and listens on 127.0.0.1 only.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import jwt
import yaml

from bench.procs import LOCALHOST, Service, free_port

REGISTRY_BINARY = "/usr/bin/docker-registry"
NGINX_BINARY = "nginx"
ALIAS = "bench/app/1.0.0"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar"
SMALL_BLOB_SIZE = 4096
CHUNK = 4 << 20
CACHE_PROXY = "proxy-cache"
WORKERS_PROXY = "proxy-static-workers"


@dataclass(frozen=True)
class Blob:
    """A blob in the registry."""

    digest: str
    size: int


@dataclass(frozen=True)
class Image:
    """What the registry was seeded with."""

    repository: str
    big: Blob
    small: Blob
    manifest: bytes
    manifest_digest: str


@dataclass(frozen=True)
class Target:
    """Something the client sends requests to.

    ``hop`` names the service whose CPU is charged per request (the proxy, nginx, or the
    registry itself when it is addressed directly); ``upstream`` the one behind it, if any.
    """

    name: str
    port: int
    repository_path: str
    hop: str
    upstream: str | None

    def url(self, suffix: str) -> str:
        """The full URL of ``/v2/<repository>/<suffix>`` on this target."""
        return f"http://{LOCALHOST}:{self.port}{self.repository_path}/{suffix}"


def pattern_chunks(size: int, base: bytes) -> Iterator[bytes]:
    """``size`` bytes in chunks of ``len(base)``: ``base`` with a per-chunk 32-byte prefix.

    Deterministic for a given ``base``, cheap to make twice (once for the digest, once for the
    upload) and never held whole in memory.
    """
    index = 0
    remaining = size
    while remaining > 0:
        prefix = hashlib.sha256(index.to_bytes(8, "big")).digest()
        chunk = (prefix + base[len(prefix) :])[:remaining]
        yield chunk
        remaining -= len(chunk)
        index += 1


def make_token(repository: str, alias: str = ALIAS) -> str:
    """An HS256 JWT whose ``access`` maps ``alias`` to ``repository`` (the proxy never verifies)."""
    now = int(time.time())
    claims = {
        "iss": "bench",
        "sub": "bench",
        "aud": "bench",
        "iat": now,
        "nbf": now - 60,
        "exp": now + 86400,
        "access": [{"type": "repository", "name": repository, "alias": alias, "actions": ["pull"]}],
    }
    token: str = jwt.encode(claims, secrets.token_bytes(32), algorithm="HS256")
    return token


def request(
    port: int,
    method: str,
    path: str,
    *,
    body: bytes | Iterator[bytes] | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 600.0,
) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection(LOCALHOST, port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data
    finally:
        connection.close()


def upload_blob(
    port: int, repository: str, digest: str, size: int, body: bytes | Iterator[bytes]
) -> None:
    """POST an upload session, then one monolithic ``PUT ?digest=`` streaming ``body``."""
    status, headers, data = request(port, "POST", f"/v2/{repository}/blobs/uploads/")
    if status != 202:
        raise RuntimeError(f"upload POST answered {status}: {data[:500]!r}")
    location = urllib.parse.urlsplit(headers["location"])
    query = (location.query + "&" if location.query else "") + urllib.parse.urlencode(
        {"digest": digest}
    )
    status, _, data = request(
        port,
        "PUT",
        f"{location.path}?{query}",
        body=body,
        headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
    )
    if status != 201:
        raise RuntimeError(f"upload PUT of {digest} answered {status}: {data[:500]!r}")


def seed(port: int, repository: str, big_size: int) -> Image:
    """Push a ``big_size`` blob, a 4 KiB config blob and an OCI manifest tagged ``latest``."""
    base = os.urandom(CHUNK)
    digest = hashlib.sha256()
    for chunk in pattern_chunks(big_size, base):
        digest.update(chunk)
    big = Blob("sha256:" + digest.hexdigest(), big_size)
    upload_blob(port, repository, big.digest, big.size, pattern_chunks(big_size, base))

    config = {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers"}, "pad": ""}
    config_size = len(json.dumps(config, separators=(",", ":")).encode())
    config["pad"] = "x" * (SMALL_BLOB_SIZE - config_size)
    small_body = json.dumps(config, separators=(",", ":")).encode()
    small = Blob("sha256:" + hashlib.sha256(small_body).hexdigest(), len(small_body))
    upload_blob(port, repository, small.digest, small.size, small_body)

    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": {"mediaType": CONFIG_TYPE, "digest": small.digest, "size": small.size},
            "layers": [{"mediaType": LAYER_TYPE, "digest": big.digest, "size": big.size}],
        },
        indent=3,
    ).encode()
    status, headers, data = request(
        port,
        "PUT",
        f"/v2/{repository}/manifests/latest",
        body=manifest,
        headers={"Content-Type": MANIFEST_TYPE},
    )
    if status != 201:
        raise RuntimeError(f"manifest PUT answered {status}: {data[:500]!r}")
    manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    if headers.get("docker-content-digest") != manifest_digest:
        raise RuntimeError(
            f"registry stored the manifest as {headers.get('docker-content-digest')}"
        )
    return Image(repository, big, small, manifest, manifest_digest)


def proxy_argv(port: int, registry_url: str, level: str, *extra: str) -> list[str]:
    """``balena-registry-proxy`` on 127.0.0.1:``port`` in front of ``registry_url``, logging at
    ``level``, with ``extra`` options."""
    return [
        sys.executable,
        "-m",
        "balena_registry_proxy",
        "--host",
        LOCALHOST,
        "--port",
        str(port),
        "--registry-url",
        registry_url,
        "--log-level",
        level,
        "--shutdown-timeout",
        "2",
        *extra,
    ]


def registry_config(storage: Path, port: int) -> str:
    """The registry's configuration: filesystem storage, no auth, quiet logs."""
    document = {
        "version": 0.1,
        "log": {"level": "error", "formatter": "text", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(storage)},
            "cache": {"blobdescriptor": "inmemory"},
            "delete": {"enabled": False},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {"addr": f"{LOCALHOST}:{port}", "secret": secrets.token_hex(16)},
        "health": {"storagedriver": {"enabled": False}},
    }
    text: str = yaml.safe_dump(document)
    return text


def nginx_config(
    workdir: Path, *, pass_port: int, static_port: int, registry_port: int, image: Image
) -> str:
    """One nginx, one worker: a pass-through server to the registry and a static manifest server.

    The static server answers ``GET /v2/<repository>/manifests/latest`` from a file with the
    registry's headers, so a proxy in front of it is not limited by the registry.
    """
    temp = workdir / "nginx-temp"
    manifest_path = workdir / "static" / "manifest"
    return f"""
worker_processes 1;
daemon off;
pid {workdir / "nginx.pid"};
error_log {workdir / "nginx-error.log"} warn;
worker_rlimit_nofile 8192;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
    default_type application/octet-stream;

    upstream registry {{
        server {LOCALHOST}:{registry_port};
        keepalive 512;
        keepalive_requests 1000000;
    }}

    server {{
        listen {LOCALHOST}:{pass_port};
        location / {{
            proxy_pass http://registry;
            proxy_buffering off;
            proxy_buffer_size 256k;
            proxy_buffers 4 256k;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
        }}
    }}

    server {{
        listen {LOCALHOST}:{static_port};
        location = /v2/{image.repository}/manifests/latest {{
            alias {manifest_path};
            default_type {MANIFEST_TYPE};
            add_header Docker-Content-Digest "{image.manifest_digest}" always;
            add_header Docker-Distribution-Api-Version "registry/2.0" always;
        }}
        location / {{
            return 404;
        }}
    }}
}}
"""


@dataclass
class Stack:
    """The temporary directory and every service in it; ``with Stack(...)`` stops them all."""

    big_size: int
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="proxy-bench-")))
    services: dict[str, Service] = field(default_factory=dict)
    targets: dict[str, Target] = field(default_factory=dict)
    image: Image | None = None
    token: str = ""
    seed_seconds: float = 0.0

    def __enter__(self) -> Stack:
        """Start and seed everything; on failure stop what was started."""
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Stop everything and delete the temporary directory."""
        self.close()

    def close(self) -> None:
        """Stop every service (proxies first), then remove the temporary directory."""
        errors: list[str] = []
        for service in reversed(list(self.services.values())):
            try:
                service.stop()
            except Exception as error:  # keep stopping the others
                errors.append(f"{service.name}: {error}")
        self.services.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)
        if errors:
            print("errors while stopping: " + "; ".join(errors), file=sys.stderr)

    def _service(self, name: str, argv: list[str]) -> Service:
        service = Service(name, argv, self.workdir / f"{name}.log")
        self.services[name] = service
        service.start()
        return service

    def _start(self) -> None:
        # nginx's workers run as nobody and read the static manifest from here.
        self.workdir.chmod(0o755)
        repository = "v2/" + secrets.token_hex(16)
        self.token = make_token(repository)

        registry_port = free_port()
        storage = self.workdir / "registry"
        storage.mkdir()
        config_path = self.workdir / "registry.yml"
        config_path.write_text(registry_config(storage, registry_port))
        registry = self._service("registry", [REGISTRY_BINARY, "serve", str(config_path)])
        registry.wait_http(registry_port, "/v2/")
        started = time.monotonic()
        self.image = image = seed(registry_port, repository, self.big_size)
        self.seed_seconds = time.monotonic() - started

        static = self.workdir / "static"
        static.mkdir(mode=0o755)
        (static / "manifest").write_bytes(image.manifest)
        (static / "manifest").chmod(0o644)
        (self.workdir / "nginx-temp").mkdir()
        pass_port, static_port = free_port(), free_port()
        nginx_conf = self.workdir / "nginx.conf"
        nginx_conf.write_text(
            nginx_config(
                self.workdir,
                pass_port=pass_port,
                static_port=static_port,
                registry_port=registry_port,
                image=image,
            )
        )
        nginx = self._service(
            "nginx", [NGINX_BINARY, "-c", str(nginx_conf), "-p", str(self.workdir)]
        )
        nginx.wait_http(pass_port, "/v2/")
        nginx.wait_http(static_port, f"/v2/{repository}/manifests/latest")

        self.cache_dir.mkdir()
        # One process each, so that CPU per request compares across machines and with earlier
        # runs; WORKERS_PROXY runs as shipped (one worker per core).
        one = ["--workers", "1"]
        proxies: dict[str, tuple[int, str, list[str]]] = {
            "proxy": (registry_port, "warning", one),
            "proxy-static": (static_port, "warning", one),
            "proxy-static-info": (static_port, "info", one),
            WORKERS_PROXY: (static_port, "info", []),
            # With a cache the proxy runs on asyncio's own loop (sendfile), not uvloop.
            CACHE_PROXY: (registry_port, "warning", ["--cache-dir", str(self.cache_dir)]),
        }
        for name, (upstream_port, level, extra) in proxies.items():
            port = free_port()
            service = self._service(
                name, proxy_argv(port, f"http://{LOCALHOST}:{upstream_port}", level, *extra)
            )
            service.wait_http(port, "/ping")
            upstream = "registry" if upstream_port == registry_port else "nginx"
            self.targets[name] = Target(name, port, f"/v2/{ALIAS}", name, upstream)

        direct = f"/v2/{repository}"
        self.targets = {
            "registry": Target("registry", registry_port, direct, "registry", None),
            "nginx": Target("nginx", pass_port, direct, "nginx", "registry"),
            "proxy": self.targets["proxy"],
            "static": Target("static", static_port, direct, "nginx", None),
            "proxy-static": self.targets["proxy-static"],
            "proxy-static-info": self.targets["proxy-static-info"],
            WORKERS_PROXY: self.targets[WORKERS_PROXY],
            CACHE_PROXY: self.targets[CACHE_PROXY],
        }

    @property
    def cache_dir(self) -> Path:
        """The caching proxy's ``--cache-dir``."""
        return self.workdir / "cache"

    def runtimes(self) -> dict[str, dict[int, int]]:
        """Exact on-CPU nanoseconds so far of each service's threads (see ``thread_runtimes``)."""
        return {name: service.runtimes() for name, service in self.services.items()}

    def cpu(self) -> dict[str, float]:
        """CPU seconds used so far by each service."""
        return {name: service.cpu() for name, service in self.services.items()}

    def check_alive(self) -> None:
        """Raise if any service has exited."""
        for service in self.services.values():
            service.check_alive()
