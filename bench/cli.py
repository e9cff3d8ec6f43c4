"""``python -m bench [--quick] [--profile]``: start the stack, measure, report, stop everything."""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from bench import blobcache, measure, profile, pull, report, shared
from bench.procs import RssSampler, log, status_kib
from bench.stack import (
    CACHE_PROXY,
    MANIFEST_TYPE,
    REGISTRY_BINARY,
    WORKERS_PROXY,
    Stack,
    Target,
    request,
)

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
GIB = 1 << 30
MIB = 1 << 20
BLOB_TARGETS = ("registry", "nginx", "proxy")
MANIFEST_TARGETS = (
    "registry",
    "nginx",
    "proxy",
    "static",
    "proxy-static",
    "proxy-static-info",
    WORKERS_PROXY,
)
# Measured at ``info_connections`` only.
INFO_TARGETS = ("proxy-static-info", WORKERS_PROXY)


@dataclass(frozen=True)
class Settings:
    """How much to measure."""

    mode: str
    blob_mib: int
    rounds: int
    streams: int
    connections: tuple[int, ...]
    info_connections: tuple[int, ...]
    seconds: int
    warmup_seconds: int
    profile_seconds: int
    # Rounds of the blob cache's single-stream runs, which its goals are about: a warm 256 MiB
    # download takes a tenth of a second, so more rounds cost little and steady the medians.
    # Its parallel runs repeat ``rounds`` times, as the other blob runs do.
    cache_rounds: int
    # Samples of each whole pull (bench/pull.py): a pull of 40 MiB takes a few tenths of a second.
    pull_samples: int
    # Concurrent pulls through the replicas of each shared-cache setup (bench/shared.py).
    shared_pulls: int


QUICK = Settings("quick", 256, 1, 8, (1, 64), (1, 64), 3, 1, 4, 3, 3, 12)
FULL = Settings("full", 1024, 2, 8, (1, 4, 16, 64, 256), (1, 64), 5, 2, 8, 3, 5, 30)
PARTS = ("pull", "shared")


def _rotated(names: Sequence[str], by: int) -> list[str]:
    by %= len(names)
    return [*names[by:], *names[:by]]


def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: round(after[name] - before.get(name, 0.0), 3) for name in after}


def _headers(stack: Stack, accept: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {stack.token}"}
    if accept is not None:
        headers["Accept"] = accept
    return headers


def verify(stack: Stack, settings: Settings) -> dict[str, Any]:
    """Every target answers the manifest byte for byte; the blob through the proxy hashes right."""
    image = stack.image
    assert image is not None
    for name in MANIFEST_TARGETS:
        target = stack.targets[name]
        status, headers, body = _get(target, "manifests/latest", _headers(stack, MANIFEST_TYPE))
        if status != 200 or body != image.manifest:
            raise RuntimeError(f"{name}: manifest GET answered {status}, {len(body)} bytes")
        if headers.get("docker-content-digest") != image.manifest_digest:
            raise RuntimeError(f"{name}: wrong Docker-Content-Digest {headers}")
    for name in BLOB_TARGETS:
        status, _, body = _get(stack.targets[name], f"blobs/{image.small.digest}", _headers(stack))
        if status != 200 or len(body) != image.small.size:
            raise RuntimeError(f"{name}: small blob GET answered {status}, {len(body)} bytes")
    started = time.monotonic()
    digest, size = measure.sha256_of(
        stack.targets["proxy"].url(f"blobs/{image.big.digest}"), _headers(stack)
    )
    if (digest, size) != (image.big.digest, image.big.size):
        raise RuntimeError(f"proxy: big blob arrived as {digest} ({size} bytes)")
    return {"big_blob_sha256_through_proxy_seconds": round(time.monotonic() - started, 2)}


def _get(target: Target, suffix: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    return request(target.port, "GET", f"{target.repository_path}/{suffix}", headers=headers)


def blob_runs(stack: Stack, settings: Settings) -> list[dict[str, Any]]:
    """Single-stream and N-stream downloads of the big blob, alternating targets, per round."""
    image = stack.image
    assert image is not None
    headers = _headers(stack)
    runs: list[dict[str, Any]] = []
    for round_ in range(settings.rounds):
        for kind in ("single", "parallel"):
            for name in _rotated(BLOB_TARGETS, round_):
                target = stack.targets[name]
                url = target.url(f"blobs/{image.big.digest}")
                watched = stack.services["proxy"].pid
                before = stack.cpu()
                with RssSampler(watched) as sampler:
                    if kind == "single":
                        downloads = [measure.download(url, headers)]
                        wall = downloads[0].seconds
                    else:
                        downloads, wall = measure.download_parallel(url, headers, settings.streams)
                cpu = _delta(before, stack.cpu())
                stack.check_alive()
                run = measure.download_record(
                    name=name,
                    kind=kind,
                    round_=round_,
                    downloads=downloads,
                    size=image.big.size,
                    wall=wall,
                    cpu=cpu,
                    hop=target.hop,
                    upstream=target.upstream,
                )
                run["proxy_peak_rss_mib"] = round(sampler.peak_kib / 1024, 1)
                runs.append(run)
                log(
                    f"  blob {kind:8} {name:8} {run['mb_per_s']:8.1f} MB/s  "
                    f"{target.hop} {run['hop_cpu_s_per_gib']:.2f} CPU s/GiB"
                )
    return runs


def manifest_runs(stack: Stack, settings: Settings, script: Path) -> list[dict[str, Any]]:
    """``wrk`` on the manifest at each connection count, alternating targets, per round."""
    headers = _headers(stack, MANIFEST_TYPE)
    top = max(settings.connections)
    # The proxies fill their upstream pools; the other servers were warmed by verify().
    for name in (n for n in MANIFEST_TARGETS if n.startswith("proxy")):
        measure.run_wrk(
            stack.targets[name].url("manifests/latest"),
            connections=top,
            seconds=settings.warmup_seconds,
            headers=headers,
            script=script,
        )
    runs: list[dict[str, Any]] = []
    for round_ in range(settings.rounds):
        for index, connections in enumerate(settings.connections):
            for name in _rotated(MANIFEST_TARGETS, round_ + index):
                if name in INFO_TARGETS and connections not in settings.info_connections:
                    continue
                target = stack.targets[name]
                before = stack.cpu()
                result = measure.run_wrk(
                    target.url("manifests/latest"),
                    connections=connections,
                    seconds=settings.seconds,
                    headers=headers,
                    script=script,
                )
                cpu = _delta(before, stack.cpu())
                stack.check_alive()
                requests = max(result.requests, 1)
                run: dict[str, Any] = {
                    "round": round_,
                    "target": name,
                    "connections": connections,
                    **result.as_dict(),
                    "cpu_s": cpu,
                    "hop_cpu_ms_per_req": round(1000 * cpu[target.hop] / requests, 4),
                    "upstream_cpu_ms_per_req": (
                        round(1000 * cpu[target.upstream] / requests, 4)
                        if target.upstream
                        else None
                    ),
                }
                runs.append(run)
                warn = f"  {result.errors} ERRORS" if result.errors else ""
                log(
                    f"  wrk c={connections:<3} {name:17} {result.rps:9.0f} req/s  "
                    f"p50 {result.p50_ms:7.3f} ms  p99 {result.p99_ms:7.3f} ms  "
                    f"{target.hop} {run['hop_cpu_ms_per_req']:.3f} CPU ms/req{warn}"
                )
    return runs


def profile_runs(stack: Stack, settings: Settings, script: Path, out_dir: Path) -> dict[str, Any]:
    """py-spy on the proxy during a manifest ``wrk`` run and N-stream blob runs, and on the
    caching proxy during N-stream warm downloads and single-stream cold ones."""
    image = stack.image
    assert image is not None
    summaries: dict[str, Any] = {}
    streams = settings.streams
    # workload: (target, description, concurrent downloads (0: wrk instead), cold cache)
    workloads = {
        "manifest": ("proxy-static", "wrk c=64 on the manifest, static upstream", 0, False),
        "blob": (
            "proxy",
            f"{streams} concurrent blob downloads, registry upstream",
            streams,
            False,
        ),
        "blob-cache-warm": (CACHE_PROXY, f"{streams} concurrent downloads, warm", streams, False),
        "blob-cache-cold": (CACHE_PROXY, "one download at a time, cold cache", 1, True),
    }
    kept = blobcache.cached_file(stack, image.big.digest)
    for workload, (name, description, downloads, cold) in workloads.items():
        target = stack.targets[name]
        pid = stack.services[name].pid
        entry: dict[str, Any] = {"proxy": name, "workload": description}
        for fmt, suffix in (("flamegraph", "svg"), ("raw", "txt")):
            out = out_dir / f"profile-{workload}.{suffix}"
            log(f"  py-spy --native {fmt} of {name} during {description} -> {out}")
            with profile.recording(pid, out, fmt, native=True):
                if downloads:
                    _repeat_downloads(
                        stack, settings, target, downloads, kept=kept if cold else None
                    )
                else:
                    measure.run_wrk(
                        target.url("manifests/latest"),
                        connections=64,
                        seconds=settings.profile_seconds,
                        headers=_headers(stack, MANIFEST_TYPE),
                        script=script,
                    )
            entry[suffix] = str(out)
        entry["summary"] = profile.summarize(out_dir / f"profile-{workload}.txt")
        summaries[workload] = entry
    return summaries


def _repeat_downloads(
    stack: Stack, settings: Settings, target: Target, clients: int, *, kept: Path | None
) -> None:
    """``clients`` concurrent downloads of the big blob, repeated (at most 20 times) for about
    ``profile_seconds``; with ``kept``, that cached file is deleted before each (a cold cache).
    """
    image = stack.image
    assert image is not None
    deadline = time.monotonic() + settings.profile_seconds
    for _ in range(20):
        if kept is not None:
            kept.unlink()
        # New clients each time, so the warm cache's access checks show too.
        measure.download_each(
            target.url(f"blobs/{image.big.digest}"),
            [blobcache.fresh_headers(stack) for _ in range(clients)],
        )
        if kept is not None:
            blobcache.wait_until_kept(kept)
        if time.monotonic() > deadline:
            break


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 4)


def summarize(blob: list[dict[str, Any]], manifest: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds, ratios and the added latency at one connection."""
    blobs: dict[str, Any] = {}
    for name in BLOB_TARGETS:
        entry: dict[str, Any] = {}
        for kind in ("single", "parallel"):
            runs = [r for r in blob if r["target"] == name and r["kind"] == kind]
            entry[f"{kind}_mb_per_s"] = _median([r["mb_per_s"] for r in runs])
            entry[f"{kind}_hop_cpu_s_per_gib"] = _median([r["hop_cpu_s_per_gib"] for r in runs])
            if runs and runs[0]["upstream_cpu_s_per_gib"] is not None:
                entry[f"{kind}_upstream_cpu_s_per_gib"] = _median(
                    [r["upstream_cpu_s_per_gib"] for r in runs]
                )
        if name == "proxy":
            entry["parallel_peak_rss_mib"] = max(
                r["proxy_peak_rss_mib"] for r in blob if r["target"] == name
            )
        blobs[name] = entry
    for kind in ("single", "parallel"):
        for base in ("registry", "nginx"):
            blobs[f"proxy_vs_{base}_{kind}"] = round(
                blobs["proxy"][f"{kind}_mb_per_s"] / blobs[base][f"{kind}_mb_per_s"], 3
            )

    manifests: dict[str, dict[str, Any]] = {}
    for name in MANIFEST_TARGETS:
        per_connections: dict[str, Any] = {}
        for connections in sorted({r["connections"] for r in manifest}):
            runs = [r for r in manifest if r["target"] == name and r["connections"] == connections]
            if not runs:
                continue
            row: dict[str, Any] = {
                key: _median([r[key] for r in runs])
                for key in ("rps", "p50_ms", "p99_ms", "hop_cpu_ms_per_req")
            }
            if runs[0]["upstream_cpu_ms_per_req"] is not None:
                row["upstream_cpu_ms_per_req"] = _median(
                    [r["upstream_cpu_ms_per_req"] for r in runs]
                )
            row["errors"] = sum(r["errors"] for r in runs)
            per_connections[str(connections)] = row
        manifests[name] = per_connections

    def added(name: str, base: str) -> float | None:
        if "1" not in manifests[name] or "1" not in manifests[base]:
            return None
        difference: float = manifests[name]["1"]["p50_ms"] - manifests[base]["1"]["p50_ms"]
        return round(difference, 4)

    ratios: dict[str, dict[str, float]] = {}
    for name, base in (("proxy", "nginx"), ("proxy", "registry"), ("proxy-static", "static")):
        ratios[f"{name}_vs_{base}_rps"] = {
            c: round(row["rps"] / manifests[base][c]["rps"], 3)
            for c, row in manifests[name].items()
            if c in manifests[base]
        }
    return {
        "blob": blobs,
        "manifest": manifests,
        "manifest_rps_ratios": ratios,
        "added_p50_ms_at_1_connection": {
            "proxy_vs_registry": added("proxy", "registry"),
            "nginx_vs_registry": added("nginx", "registry"),
            "proxy-static_vs_static": added("proxy-static", "static"),
            "proxy-static-info_vs_static": added("proxy-static-info", "static"),
            f"{WORKERS_PROXY}_vs_static": added(WORKERS_PROXY, "static"),
        },
    }


def _version(argv: list[str]) -> str:
    try:
        completed = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "?"
    text = (completed.stdout + completed.stderr).strip().splitlines()
    return text[0] if text else "?"


def machine() -> dict[str, Any]:
    """Where and with what the figures were taken."""
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    packages: dict[str, str | None] = {}
    for package in ("aiohttp", "uvloop", "balena-registry-proxy"):
        try:
            packages[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            packages[package] = None
    commit = _version(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = _version(["git", "-C", str(REPO), "status", "--porcelain", "--", "src"])
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": packages,
        "commit": commit + ("+dirty-src" if dirty not in ("", "?") else ""),
        "nginx": _version(["nginx", "-v"]),
        "registry": _version([REGISTRY_BINARY, "--version"]),
        "wrk": _version(["wrk", "-v"]),
        "skopeo": _version(["skopeo", "--version"]),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the proxy against the registry and nginx on 127.0.0.1.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="256 MiB blob, 1 round, c=1,64, 3 s (about 1 min)"
    )
    parser.add_argument("--profile", action="store_true", help="also py-spy the proxy")
    parser.add_argument(
        "--out", type=Path, default=RESULTS / "latest.json", help="JSON results path"
    )
    parser.add_argument(
        "--chart", type=Path, help="PNG chart path (default: results/chart.png, or --out as .png)"
    )
    parser.add_argument("--rounds", type=int, help="override rounds")
    parser.add_argument(
        "--cache-rounds", type=int, help="override the blob cache's single-stream rounds"
    )
    parser.add_argument("--seconds", type=int, help="override wrk duration per run")
    parser.add_argument("--blob-mib", type=int, help="override the big blob's size")
    parser.add_argument(
        "--connections", help="override wrk connection counts, comma-separated (e.g. 1,64)"
    )
    parser.add_argument(
        "--pull-samples", type=int, help="override the samples of each whole pull (skopeo)"
    )
    parser.add_argument(
        "--shared-pulls", type=int, help="override the concurrent pulls of the shared-cache part"
    )
    parser.add_argument(
        "--only",
        choices=PARTS,
        help="run only this part: pull, the whole-pull figure; shared, the shared-cache "
        "figure (replicas behind HAProxy) (default --out: results/<part>.json)",
    )
    return parser.parse_args(argv)


def _settings(args: argparse.Namespace) -> Settings:
    base = QUICK if args.quick else FULL
    values = asdict(base)
    if args.rounds:
        values["rounds"] = args.rounds
    if args.cache_rounds:
        values["cache_rounds"] = args.cache_rounds
    if args.seconds:
        values["seconds"] = args.seconds
    if args.blob_mib:
        values["blob_mib"] = args.blob_mib
    if args.connections:
        values["connections"] = tuple(int(c) for c in args.connections.split(","))
    if args.pull_samples:
        values["pull_samples"] = args.pull_samples
    if args.shared_pulls:
        values["shared_pulls"] = args.shared_pulls
    return Settings(**values)


def _terminate(signum: int, frame: FrameType | None) -> None:
    log("terminated: stopping every process started")
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; everything started is stopped on exit, error, Ctrl-C or SIGTERM."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        log("interrupted: every process started was stopped")
        return 130


def _whole_pulls(settings: Settings, results: dict[str, Any], phases: dict[str, float]) -> None:
    """The whole-pull part (bench/pull.py) into ``results["pull"]``, its time into ``phases``."""
    log(f"whole pulls (skopeo copy through the sandbox), {settings.pull_samples} sample(s) each")
    mark = time.monotonic()
    results["pull"] = pull.pull_runs(settings.pull_samples)
    phases["pull"] = time.monotonic() - mark


def _shared_cache(settings: Settings, results: dict[str, Any], phases: dict[str, float]) -> None:
    """The shared-cache part (bench/shared.py) into ``results["shared"]``, its time into
    ``phases``; skipped, with the reason, where a program it needs is missing."""
    missing = shared.missing()
    if missing:
        log(f"shared cache: skipped, {missing}")
        results["shared"] = {"skipped": missing}
        return
    log(
        f"shared cache: {settings.shared_pulls} concurrent pulls over {shared.REPLICAS} "
        f"replicas behind HAProxy, cold then warm, per setup: {', '.join(shared.SETUPS)}"
    )
    mark = time.monotonic()
    results["shared"] = shared.shared_runs(settings.shared_pulls)
    phases["shared"] = time.monotonic() - mark


PART_RUNS = {"pull": _whole_pulls, "shared": _shared_cache}


def _only(args: argparse.Namespace, settings: Settings) -> int:
    """``--only <part>``: that part alone, its JSON and its table."""
    part: str = args.only
    measure.require("skopeo", "skopeo")
    if part == "shared" and (missing := shared.missing()):
        raise SystemExit(f"--only shared: {missing}")
    signal.signal(signal.SIGTERM, _terminate)
    out: Path = args.out if args.out != RESULTS / "latest.json" else RESULTS / f"{part}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    phases: dict[str, float] = {}
    results: dict[str, Any] = {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "only": part,
        "settings": asdict(settings),
        "machine": machine(),
    }
    log(f"{settings.mode} mode, {part} only")
    PART_RUNS[part](settings, results, phases)
    phases["total"] = time.monotonic() - started
    results["phase_seconds"] = {k: round(v, 1) for k, v in phases.items()}
    report.write_json(results, out)
    print("\n".join(report.ONLY_TABLES[part](results[part])))
    log(f"wrote {out}; took {phases['total']:.0f}s")
    return 0


def _main(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    settings = _settings(args)
    if args.only:
        return _only(args, settings)
    measure.require("skopeo", "skopeo")
    for tool, package in (("nginx", "nginx"), ("wrk", "wrk"), ("curl", "curl")):
        measure.require(tool, package)
    if not Path(REGISTRY_BINARY).exists():
        raise SystemExit(f"{REGISTRY_BINARY} not found: apt-get install docker-registry")
    signal.signal(signal.SIGTERM, _terminate)
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    default_chart = RESULTS / "chart.png" if out == RESULTS / "latest.json" else None
    chart: Path = args.chart or default_chart or out.with_suffix(".png")
    started = time.monotonic()
    phases: dict[str, float] = {}
    results: dict[str, Any] = {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "settings": asdict(settings),
        "machine": machine(),
    }
    log(f"{settings.mode} mode: {settings}")
    with tempfile.TemporaryDirectory(prefix="proxy-bench-wrk-") as scratch:
        script = Path(scratch) / "report.lua"
        script.write_text(measure.WRK_SCRIPT)
        with Stack(settings.blob_mib * MIB) as stack:
            phases["start_and_seed"] = time.monotonic() - started
            log(f"seeded {settings.blob_mib} MiB in {stack.seed_seconds:.1f}s; verifying")
            mark = time.monotonic()
            results["verify"] = verify(stack, settings)
            phases["verify"] = time.monotonic() - mark
            proxy_pids = {n: stack.services[n].pid for n in MANIFEST_TARGETS if "proxy" in n}
            rss_start = {n: round(status_kib(p, "VmRSS") / 1024, 1) for n, p in proxy_pids.items()}
            log("blob downloads")
            mark = time.monotonic()
            blob = blob_runs(stack, settings)
            phases["blob"] = time.monotonic() - mark
            log(f"blob cache ({CACHE_PROXY}): warm-up, then downloads")
            mark = time.monotonic()
            kept, warm_up = blobcache.warm_up(stack)
            cache = blobcache.cache_runs(
                stack,
                kept,
                single_rounds=settings.cache_rounds,
                parallel_rounds=settings.rounds,
                streams=settings.streams,
            )
            results["cache"] = {"warm_up": warm_up, "summary": blobcache.summarize(cache)}
            results["cache"]["runs"] = cache
            phases["cache"] = time.monotonic() - mark
            log("manifest requests (wrk)")
            mark = time.monotonic()
            manifest = manifest_runs(stack, settings, script)
            phases["manifest"] = time.monotonic() - mark
            results["proxy_memory_mib"] = {
                name: {
                    "rss_at_start": rss_start[name],
                    "rss_at_end": round(status_kib(pid, "VmRSS") / 1024, 1),
                    "hwm_at_end": round(status_kib(pid, "VmHWM") / 1024, 1),
                }
                for name, pid in proxy_pids.items()
            }
            if args.profile:
                log("profiles (py-spy)")
                mark = time.monotonic()
                results["profile"] = profile_runs(stack, settings, script, out.parent)
                phases["profile"] = time.monotonic() - mark
            results["seed_seconds"] = round(stack.seed_seconds, 2)
    _whole_pulls(settings, results, phases)
    _shared_cache(settings, results, phases)
    phases["total"] = time.monotonic() - started
    results["phase_seconds"] = {k: round(v, 1) for k, v in phases.items()}
    results["summary"] = summarize(blob, manifest)
    results["blob_runs"] = blob
    results["manifest_runs"] = manifest
    report.write_json(results, out)
    print(report.table(results))
    written = [out, *report.chart(results, chart)]
    log(f"wrote {', '.join(map(str, written))}; took {phases['total']:.0f}s")
    return 0
