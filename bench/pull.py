"""The whole pull: an image of five 8 MiB layers copied with skopeo, wall clock end to end.

Unlike the rest of the benchmark, this part runs against the project's sandbox
(``balena_registry_proxy.sandbox``): the real registry with token auth, and the balena API
stand-in with its token service and the ``/v7`` read side, seeded from ``pull_catalog.yaml``
(one public app, ``bench/pull``, whose release 1.0.0 is the image). A pull there does what a
device's does: a 401, a token from the realm, the manifest, the config and the layers. Each
sample is one ``skopeo copy --src-tls-verify=false docker://<host>/<name> dir:<folder>``,
timed from start to exit (skopeo's own start-up included, the same for every target) and
checked: the manifest it wrote has the seeded digest and every blob is there. The proxy's CPU
per pull is its threads' exact on-CPU time (``/proc/<pid>/task/*/schedstat``).

Targets, each addressed as a client would address it:

- ``registry``: the registry direct, by its real repository name ``v2/<hash>``;
- ``alias``: a proxy in alias mode (the default) as ``bench/pull/1.0.0``, running for the whole
  part (it has served a warm-up pull before the first sample);
- ``resolver-cold`` / ``resolver-warm``: a proxy in resolver mode (``--resolve``,
  ``--api-url`` the stand-in), started afresh for each sample: its first pull finds the API
  cache empty (and the proxy's connections new), the second, right after on the same process,
  finds the API's answers kept (``--api-cache-ttl`` 60 s);
- ``cache-cold`` / ``cache-warm``: a proxy in alias mode with ``--cache-dir`` (a new empty
  folder), started afresh for each sample: its first pull fills the cache, the second is served
  from it. The proxy's cache counters must say so (blob misses, then only hits).

The targets alternate within a sample, their order rotating from one sample to the next.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from balena_registry_proxy.sandbox import Sandbox, SeededImage, sandbox_in_thread
from bench import blobcache
from bench.measure import require
from bench.procs import LOCALHOST, Service, free_port, log, runtime_seconds
from bench.stack import proxy_argv, request

CATALOG = Path(__file__).resolve().with_name("pull_catalog.yaml")
NAME = "bench/pull/1.0.0"
COMMIT = "5b0c1e3a8d9f4e2b7a6c5d4e3f2a1b0c"
TARGETS = (
    "registry",
    "alias",
    "resolver-cold",
    "resolver-warm",
    "cache-cold",
    "cache-warm",
)
# What is run together in one step of a sample: a fresh proxy serves a cold pull, then a warm one.
STEPS = (
    ("registry",),
    ("alias",),
    ("resolver-cold", "resolver-warm"),
    ("cache-cold", "cache-warm"),
)
API_CACHE_TTL = 60
PULL_TIMEOUT = 300.0


@dataclass(frozen=True)
class Pull:
    """One timed ``skopeo copy``."""

    seconds: float
    blobs: int
    bytes: int


class PullBench:
    """The sandbox, the long-running alias proxy, skopeo, and the proxies started per sample."""

    def __init__(self, sandbox: Sandbox, workdir: Path, copies: Path) -> None:
        """Pull from ``sandbox``; keep logs and cache folders under ``workdir``, the pulled
        copies (each deleted once checked) under ``copies``."""
        self.sandbox = sandbox
        self.workdir = workdir
        self.copies = copies
        self.skopeo = require("skopeo", "skopeo")
        self.image: SeededImage = sandbox.seed[COMMIT]
        self.services: list[Service] = []
        self._count = 0
        # No auth file of the machine's may change what skopeo sends: an empty one of its own.
        self.auth_file = workdir / "auth.json"
        self.auth_file.write_text("{}")

    def close(self) -> None:
        """Stop every proxy still running (by PID)."""
        for service in reversed(self.services):
            service.stop()
        self.services.clear()

    def proxy(self, name: str, *extra: str) -> tuple[Service, str]:
        """Start ``balena-registry-proxy`` in front of the sandbox's registry; it and its host."""
        port = free_port()
        self._count += 1
        service = Service(
            name,
            proxy_argv(port, self.sandbox.registry_url, "warning", *extra),
            self.workdir / f"{name}-{self._count}.log",
        )
        self.services.append(service)
        service.start()
        service.wait_http(port, "/ping")
        return service, f"{LOCALHOST}:{port}"

    def stop(self, service: Service) -> None:
        """Stop one proxy started by :meth:`proxy`."""
        service.stop()
        self.services.remove(service)

    @contextmanager
    def fresh(self, kind: str) -> Iterator[tuple[Service, str, Path | None]]:
        """A proxy started for one sample: ``resolver`` mode, or alias mode with an empty
        ``cache`` folder (its path given); stopped when the block ends."""
        cache_dir: Path | None = None
        if kind == "resolver":
            extra = ["--resolve", "--api-url", self.sandbox.api_url]
            extra += ["--api-cache-ttl", str(API_CACHE_TTL)]
        else:
            cache_dir = Path(tempfile.mkdtemp(prefix="cache-", dir=self.workdir))
            extra = ["--cache-dir", str(cache_dir)]
        service, host = self.proxy(kind, *extra)
        try:
            yield service, host, cache_dir
        finally:
            self.stop(service)
            if cache_dir is not None:
                shutil.rmtree(cache_dir, ignore_errors=True)

    def pull(self, host: str, name: str) -> Pull:
        """``skopeo copy`` of ``name`` from ``host`` into a new folder, timed; the copy checked
        against the seeded image, then deleted."""
        destination = Path(tempfile.mkdtemp(prefix="pull-", dir=self.copies))
        argv = [
            self.skopeo,
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            f"docker://{host}/{name}",
            f"dir:{destination}",
        ]
        env = {**os.environ, "REGISTRY_AUTH_FILE": str(self.auth_file)}
        try:
            started = time.monotonic()
            completed = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=PULL_TIMEOUT,
                check=False,
                env=env,
                stdin=subprocess.DEVNULL,
            )
            seconds = time.monotonic() - started
            if completed.returncode != 0:
                raise RuntimeError(f"skopeo copy from {host}/{name}: {completed.stderr[-1500:]}")
            return self._checked(destination, seconds)
        finally:
            shutil.rmtree(destination, ignore_errors=True)

    def _checked(self, destination: Path, seconds: float) -> Pull:
        manifest = (destination / "manifest.json").read_bytes()
        digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
        if digest != self.image.digest:
            raise RuntimeError(f"pulled manifest {digest}, not the seeded {self.image.digest}")
        document = json.loads(manifest)
        blobs = [document["config"], *document["layers"]]
        size = 0
        for blob in blobs:
            path = destination / blob["digest"].removeprefix("sha256:")
            if path.stat().st_size != blob["size"]:
                raise RuntimeError(f"{path.name}: {path.stat().st_size} bytes, not {blob['size']}")
            size += blob["size"]
        return Pull(round(seconds, 4), len(blobs), size)


def _rotated(steps: Sequence[tuple[str, ...]], by: int) -> list[tuple[str, ...]]:
    by %= len(steps)
    return [*steps[by:], *steps[:by]]


def _record(
    target: str, sample: int, pull: Pull, cpu: float | None, counted: dict[str, int] | None
) -> dict[str, Any]:
    log(f"  pull {target:14} {pull.seconds:7.3f} s" + (f"  proxy {cpu:.3f} CPU s" if cpu else ""))
    return {
        "target": target,
        "sample": sample,
        "seconds": pull.seconds,
        "blobs": pull.blobs,
        "bytes": pull.bytes,
        "proxy_cpu_s": None if cpu is None else round(cpu, 4),
        "counted": counted,
    }


def _timed(
    bench: PullBench, service: Service | None, host: str, name: str
) -> tuple[Pull, float | None]:
    """A pull from ``host`` and the exact CPU seconds ``service`` (the proxy) spent meanwhile."""
    before = service.runtimes() if service else {}
    pulled = bench.pull(host, name)
    return pulled, runtime_seconds(before, service.runtimes()) if service else None


def _fresh_pair(bench: PullBench, kind: str, sample: int) -> list[dict[str, Any]]:
    """A cold pull then a warm one from a proxy started for them, each checked against the
    proxy's own counters."""
    records = []
    with bench.fresh(kind) as (service, host, cache_dir):
        port = _port(host)
        for step in ("cold", "warm"):
            before = _counted(port, caching=cache_dir is not None)
            pulled, cpu = _timed(bench, service, host, NAME)
            if cache_dir is not None:
                _settled(cache_dir, bench.image)
            after = _counted(port, caching=cache_dir is not None)
            counted = {key: round(after[key] - before[key]) for key in after}
            _check_counted(f"{kind}-{step}", counted, pulled.blobs)
            records.append(_record(f"{kind}-{step}", sample, pulled, cpu, counted))
    return records


# Counters of the proxy's /metrics that tell a cold pull from a warm one, in resolver mode.
_API_COUNTERS = {
    "api_requests": "registry_proxy_api_requests_total",
    "realm_token_requests": "registry_proxy_realm_token_requests_total",
}


def _counted(port: int, *, caching: bool) -> dict[str, float]:
    """The blob cache's outcomes (``caching``), or the requests to the balena API and its
    token realm, so far."""
    if caching:
        return blobcache.cache_outcomes(port)
    status, _, body = request(port, "GET", "/metrics", timeout=10)
    if status != 200:
        raise RuntimeError(f"the proxy's /metrics answered {status}")
    totals = dict.fromkeys(_API_COUNTERS, 0.0)
    for line in body.decode().splitlines():
        sample, _, value = line.rpartition(" ")
        for key, metric in _API_COUNTERS.items():
            if sample.split("{", 1)[0] == metric:
                totals[key] += float(value)
    return totals


def _port(host: str) -> int:
    return int(host.rsplit(":", 1)[1])


def _settled(cache_dir: Path, image: SeededImage, timeout: float = 60.0) -> None:
    """Wait until the caching proxy has kept every blob of ``image`` (flushed, then renamed
    into place just after its client had the last byte)."""
    names = [d.removeprefix("sha256:") for d in image.layer_digests]
    if image.manifest.config_digest:
        names.append(image.manifest.config_digest.removeprefix("sha256:"))
    deadline = time.monotonic() + timeout
    while not all(any(cache_dir.rglob(name)) for name in names):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the caching proxy kept not every blob within {timeout:g} s")
        time.sleep(0.02)


def _check_counted(target: str, counted: dict[str, int], blobs: int) -> None:
    """Refuse a figure whose label the proxy's counters contradict: a cold cache misses every
    blob and a warm one hits every blob; a cold API cache asks the API, a warm one does not."""
    right = {
        "cache-cold": counted.get("miss") == blobs and counted.get("hit") == 0,
        "cache-warm": counted.get("hit") == blobs and counted.get("miss") == 0,
        "resolver-cold": counted.get("api_requests", 0) > 0,
        "resolver-warm": counted.get("api_requests") == 0,
    }[target]
    if not right or counted.get("joined", 0):
        raise RuntimeError(f"{target}: the proxy counted {counted} for {blobs} blobs")


def pull_runs(samples: int) -> dict[str, Any]:
    """Start the sandbox and the alias proxy, take ``samples`` samples of every target, stop
    everything; the runs, the summary and what was pulled."""
    require("skopeo", "skopeo")
    workdir = Path(tempfile.mkdtemp(prefix="proxy-bench-pull-"))
    # The client's copies go to memory where there is a tmpfs: on a disk shared with others,
    # its writes made the noisiest part of a pull, and the same for every target.
    memory = Path("/dev/shm")  # noqa: S108 - only mkdtemp's private folder in it
    copies = Path(
        tempfile.mkdtemp(prefix="proxy-bench-pulls-", dir=memory if memory.is_dir() else None)
    )
    started = time.monotonic()
    try:
        with sandbox_in_thread(CATALOG, workdir / "sandbox", timeout_seconds=180) as sandbox:
            bench = PullBench(sandbox, workdir, copies)
            try:
                setup = time.monotonic() - started
                return _sampled(bench, samples) | {"setup_seconds": round(setup, 1)}
            finally:
                bench.close()
    finally:
        shutil.rmtree(copies, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)


def _sampled(bench: PullBench, samples: int) -> dict[str, Any]:
    direct = f"{bench.image.repository}:latest"
    alias, alias_host = bench.proxy("alias")
    registry_host = bench.sandbox.registry_host
    log("whole pull (skopeo copy): warm-up pulls from the registry and the alias proxy")
    warm_up = [bench.pull(registry_host, direct).seconds, bench.pull(alias_host, NAME).seconds]
    runs: list[dict[str, Any]] = []
    for sample in range(samples):
        for step in _rotated(STEPS, sample):
            if step == ("registry",):
                pulled, _ = _timed(bench, None, registry_host, direct)
                runs.append(_record("registry", sample, pulled, None, None))
            elif step == ("alias",):
                pulled, cpu = _timed(bench, alias, alias_host, NAME)
                runs.append(_record("alias", sample, pulled, cpu, None))
            else:
                runs.extend(_fresh_pair(bench, step[0].split("-")[0], sample))
        alias.check_alive()
    first = runs[0]
    return {
        "image": {
            "name": NAME,
            "repository": bench.image.repository,
            "digest": bench.image.digest,
            "blobs": first["blobs"],
            "layers": len(bench.image.layer_digests),
            "bytes": first["bytes"],
        },
        "samples": samples,
        "warm_up_seconds": warm_up,
        "summary": summarize(runs),
        "runs": runs,
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per target: median, min, max and spread of the pull's seconds, the proxy's CPU, and what
    it adds over the registry direct (median against median)."""
    summary: dict[str, Any] = {}
    for target in TARGETS:
        seconds = [r["seconds"] for r in runs if r["target"] == target]
        if not seconds:
            continue
        cpu = [r["proxy_cpu_s"] for r in runs if r["target"] == target]
        summary[target] = {
            "median_s": round(statistics.median(seconds), 3),
            "min_s": round(min(seconds), 3),
            "max_s": round(max(seconds), 3),
            "spread_s": round(max(seconds) - min(seconds), 3),
            "proxy_cpu_s": None if None in cpu else round(statistics.median(cpu), 4),
        }
    base = summary["registry"]["median_s"]
    for row in summary.values():
        row["added_s"] = round(row["median_s"] - base, 3)
        row["vs_direct"] = round(row["median_s"] / base, 3)
    return summary
