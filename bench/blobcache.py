"""The blob cache (issue 6): warm and cold pulls through a caching proxy, in one run with the
registry direct and the proxy without a cache.

The caching proxy (``proxy-cache``, ``--cache-dir`` in the stack's temporary directory) is
addressed like a real client addresses the proxy: the alias path with a Bearer JWT mapping it.
Every download gets a token of its own, as every pull fetches a new one, so every warm download
pays the access check a real one pays (one HEAD upstream; a token's confirmation is remembered
for 60 s, so reusing one token would measure less than a fleet costs).

A cold run deletes the kept file first: the proxy notices it is gone and fills the cache
again, exactly as after an eviction. Each run reads the proxy's ``cache_requests`` counters
before and after, so a figure labelled warm was served from disk and a cold one was a miss.
"""

from __future__ import annotations

import hashlib
import re
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import measure
from bench.procs import RssSampler, log, runtime_seconds
from bench.stack import CACHE_PROXY, Stack, make_token, request

GIB = 1 << 30
KINDS = ("single", "parallel")
TARGETS = ("registry", "proxy", "cache-cold", "cache-warm")
# Which stack target each measured target is.
SERVES = {
    "registry": "registry",
    "proxy": "proxy",
    "cache-cold": CACHE_PROXY,
    "cache-warm": CACHE_PROXY,
}
WARM_SPEEDUP_GOAL = 1.5
WARM_CPU_GOAL = 0.2
_SAMPLE_RE = re.compile(
    r"^registry_proxy_cache_requests_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$"
)
_LABEL_RE = re.compile(r'(\w+)="([^"]*)"')


def fresh_headers(stack: Stack) -> dict[str, str]:
    """A new client's headers: a token of its own for the alias (see the module's docstring)."""
    assert stack.image is not None
    return {"Authorization": f"Bearer {make_token(stack.image.repository)}"}


def cache_outcomes(port: int) -> dict[str, float]:
    """The caching proxy's blob ``cache_requests`` counters (hit, joined, miss) from /metrics."""
    status, _, body = request(port, "GET", "/metrics", timeout=10)
    if status != 200:
        raise RuntimeError(f"{CACHE_PROXY}: /metrics answered {status}")
    outcomes = {"hit": 0.0, "joined": 0.0, "miss": 0.0}
    for line in body.decode().splitlines():
        match = _SAMPLE_RE.match(line)
        if match is None:
            continue
        labels = dict(_LABEL_RE.findall(match["labels"]))
        # Manifests may be counted in the same series; only blobs matter here.
        if labels.get("kind", "blob") == "blob" and "outcome" in labels:
            outcomes[labels["outcome"]] = outcomes.get(labels["outcome"], 0.0) + float(
                match["value"]
            )
    return outcomes


def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    return {key: round(after[key] - before.get(key, 0.0)) for key in after}


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def cached_file(stack: Stack, digest: str) -> Path:
    """The file the caching proxy kept for ``digest``: the one named by its hex, wherever the
    cache lays its folders out (a temporary has a suffix, so it does not match)."""
    name = digest.removeprefix("sha256:")
    found = [path for path in stack.cache_dir.rglob(name) if path.is_file()]
    if len(found) != 1:
        raise RuntimeError(f"{CACHE_PROXY}: expected one cached file named {name}, found {found}")
    return found[0]


def wait_until_kept(path: Path, timeout: float = 120.0) -> None:
    """Wait for a filled blob to be renamed into the cache: the proxy flushes it to disk first,
    after its clients have their last byte."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{CACHE_PROXY}: {path} was not kept within {timeout:g} s")
        time.sleep(0.02)


def warm_up(stack: Stack) -> tuple[Path, dict[str, Any]]:
    """Fill the cache with one GET of the big blob and check it: the client's bytes, the kept
    file's bytes, and a second GET served from the file all hash to the digest."""
    image = stack.image
    assert image is not None
    url = stack.targets[CACHE_PROXY].url(f"blobs/{image.big.digest}")
    expected = (image.big.digest, image.big.size)
    checks: dict[str, Any] = {}
    _checked_get(stack, url, "fill", "miss", checks)
    name = image.big.digest.removeprefix("sha256:")
    deadline = time.monotonic() + 120
    while not any(stack.cache_dir.rglob(name)) and time.monotonic() < deadline:
        time.sleep(0.02)  # flushed to disk, then renamed into place
    path = cached_file(stack, image.big.digest)
    started = time.monotonic()
    kept = (_sha256_file(path), path.stat().st_size)
    checks["file_sha256_seconds"] = round(time.monotonic() - started, 2)
    if kept != expected:
        raise RuntimeError(f"{CACHE_PROXY}: the kept file {path} is {kept}")
    checks["file"] = str(path.relative_to(stack.cache_dir))
    _checked_get(stack, url, "warm", "hit", checks)
    return path, checks


def _checked_get(stack: Stack, url: str, step: str, outcome: str, checks: dict[str, Any]) -> None:
    """GET ``url`` through the caching proxy as a new client: right bytes, one ``outcome``."""
    image = stack.image
    assert image is not None
    port = stack.targets[CACHE_PROXY].port
    before = cache_outcomes(port)
    started = time.monotonic()
    got = measure.sha256_of(url, fresh_headers(stack))
    checks[f"{step}_get_sha256_seconds"] = round(time.monotonic() - started, 2)
    if got != (image.big.digest, image.big.size):
        raise RuntimeError(f"{CACHE_PROXY}: {step} GET of the big blob arrived as {got}")
    counted = _delta(before, cache_outcomes(port))
    if counted[outcome] != 1 or sum(counted.values()) != 1:
        raise RuntimeError(f"{CACHE_PROXY}: {step} GET counted as {counted}, not one {outcome}")


def _measure(
    stack: Stack, name: str, kind: str, streams: int, round_: int, kept: Path
) -> dict[str, Any]:
    """One run: throughput, exact CPU per service, the cache's counters, the hop's peak RSS."""
    image = stack.image
    assert image is not None
    target = stack.targets[SERVES[name]]
    caching = target.name == CACHE_PROXY
    if name == "cache-cold":
        kept.unlink()
    elif name == "cache-warm" and not kept.exists():
        raise RuntimeError(f"{CACHE_PROXY}: {kept} is not in the cache before a warm run")
    clients = [fresh_headers(stack) for _ in range(streams if kind == "parallel" else 1)]
    counted_before = cache_outcomes(target.port) if caching else {}
    ticks_before = stack.cpu()
    before = stack.runtimes()
    with RssSampler(stack.services[target.hop].pid) as sampler:
        downloads, wall = measure.download_each(target.url(f"blobs/{image.big.digest}"), clients)
    after = stack.runtimes()
    ticks_after = stack.cpu()
    stack.check_alive()
    if len(downloads) == 1:
        # curl's own timing, as the other single-stream runs: no process start-up in it.
        wall = downloads[0].seconds
    record = measure.download_record(
        name=name,
        kind=kind,
        round_=round_,
        downloads=downloads,
        size=image.big.size,
        wall=wall,
        cpu={
            service: round(runtime_seconds(before[service], after[service]), 4) for service in after
        },
        hop=target.hop,
        upstream=target.upstream,
        digits=4,
    )
    if name == "cache-cold":
        wait_until_kept(kept)
    counted = _delta(counted_before, cache_outcomes(target.port)) if caching else None
    _check_outcomes(name, counted, len(clients))
    hop_ticks = ticks_after[target.hop] - ticks_before[target.hop]
    return record | {
        "hop": target.hop,
        # The same from /proc/<pid>/stat, as the other blob runs count it (10 ms ticks).
        "hop_cpu_s_per_gib_ticks": round(hop_ticks / (record["bytes"] / GIB), 3),
        "cache_outcomes": counted,
        "hop_peak_rss_mib": round(sampler.peak_kib / 1024, 1),
    }


def _check_outcomes(name: str, counted: dict[str, int] | None, clients: int) -> None:
    """Refuse figures whose label the proxy's own counters contradict."""
    if counted is None:
        return
    if name == "cache-warm":
        right = counted["hit"] == clients and counted["miss"] == counted["joined"] == 0
    else:
        # Clients arriving during the fill join it; one arriving after it would hit the file.
        right = counted["miss"] == 1 and counted["hit"] + counted["joined"] == clients - 1
    if not right:
        raise RuntimeError(f"{name}: the proxy counted {counted} for {clients} client(s)")


def _rotated(names: Sequence[str], by: int) -> list[str]:
    by %= len(names)
    return [*names[by:], *names[:by]]


def cache_runs(
    stack: Stack, kept: Path, *, single_rounds: int, parallel_rounds: int, streams: int
) -> list[dict[str, Any]]:
    """One stream, then ``streams`` concurrent streams, of the big blob from each target,
    alternating targets (their order rotating between rounds), each kind its number of rounds.
    """
    runs: list[dict[str, Any]] = []
    for round_ in range(max(single_rounds, parallel_rounds)):
        for kind, rounds in (("single", single_rounds), ("parallel", parallel_rounds)):
            if round_ >= rounds:
                continue
            for name in _rotated(TARGETS, round_):
                run = _measure(stack, name, kind, streams, round_, kept)
                runs.append(run)
                log(
                    f"  cache {kind:8} {name:10} {run['mb_per_s']:8.1f} MB/s  "
                    f"{run['hop']} {run['hop_cpu_s_per_gib']:.3f} CPU s/GiB"
                )
    return runs


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 4)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds per stream count and target, ratios, and the goals of issue 6."""
    summary: dict[str, Any] = {}
    for kind in KINDS:
        rows: dict[str, dict[str, Any]] = {}
        for name in TARGETS:
            chosen = [r for r in runs if r["kind"] == kind and r["target"] == name]
            if not chosen:
                continue
            row: dict[str, Any] = {
                key: _median([r[key] for r in chosen])
                for key in ("mb_per_s", "hop_cpu_s_per_gib", "hop_cpu_s_per_gib_ticks")
            }
            upstream = [r["upstream_cpu_s_per_gib"] for r in chosen]
            row["upstream_cpu_s_per_gib"] = None if None in upstream else _median(upstream)
            row["hop_peak_rss_mib"] = max(r["hop_peak_rss_mib"] for r in chosen)
            rows[name] = row
        for name, row in rows.items():
            row["vs_direct"] = round(row["mb_per_s"] / rows["registry"]["mb_per_s"], 3)
            row["cpu_vs_uncached"] = (
                round(row["hop_cpu_s_per_gib"] / rows["proxy"]["hop_cpu_s_per_gib"], 3)
                if name != "registry" and rows["proxy"]["hop_cpu_s_per_gib"] > 0
                else None
            )
        summary[kind] = rows
    single = summary["single"]
    speedup = single["cache-warm"]["vs_direct"]
    cpu_share = single["cache-warm"]["cpu_vs_uncached"]
    summary["goals"] = {
        "warm_vs_direct_single": speedup,
        "warm_vs_direct_goal": WARM_SPEEDUP_GOAL,
        "warm_vs_direct_met": speedup >= WARM_SPEEDUP_GOAL,
        "warm_cpu_vs_uncached_single": cpu_share,
        "warm_cpu_vs_uncached_goal": WARM_CPU_GOAL,
        "warm_cpu_vs_uncached_met": cpu_share is not None and cpu_share <= WARM_CPU_GOAL,
    }
    return summary
