"""The clients: ``curl`` for blob throughput, ``wrk`` for small requests.

Each function runs its client to completion (with a timeout) and returns plain numbers.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.procs import reaped

WRK_SCRIPT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests": %d, "duration_us": %d, "bytes": %d, '
    .. '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, '
    .. '"p50_us": %d, "p90_us": %d, "p99_us": %d, "mean_us": %.1f, "max_us": %d}\\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end
"""


def require(tool: str, package: str) -> str:
    """The path of ``tool``, or an error naming the Debian package to install."""
    path = shutil.which(tool)
    if path is None:
        raise RuntimeError(
            f"{tool} not found: apt-get install -y --no-install-recommends {package}"
        )
    return path


@dataclass(frozen=True)
class WrkResult:
    """One ``wrk`` run."""

    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    errors: int

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)


def run_wrk(
    url: str, *, connections: int, seconds: int, headers: dict[str, str], script: Path
) -> WrkResult:
    """``wrk -t1 -c<connections> -d<seconds>s --latency`` with ``headers``; errors counted."""
    argv = [
        require("wrk", "wrk"),
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(script),
    ]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    argv.append(url)
    completed = subprocess.run(
        argv, capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    line = next((x for x in completed.stdout.splitlines() if x.startswith("BENCH ")), None)
    if completed.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({completed.returncode}): {completed.stderr[-1000:]}")
    data = json.loads(line[len("BENCH ") :])
    seconds_run = data["duration_us"] / 1e6
    errors = sum(data["errors"].values())
    return WrkResult(
        requests=data["requests"],
        seconds=seconds_run,
        rps=data["requests"] / seconds_run,
        p50_ms=data["p50_us"] / 1000,
        p90_ms=data["p90_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        mean_ms=data["mean_us"] / 1000,
        max_ms=data["max_us"] / 1000,
        errors=errors,
    )


@dataclass(frozen=True)
class Download:
    """One ``curl`` download."""

    status: int
    size: int
    seconds: float


def download_record(
    *,
    name: str,
    kind: str,
    round_: int,
    downloads: Sequence[Download],
    size: int,
    wall: float,
    cpu: dict[str, float],
    hop: str,
    upstream: str | None,
    digits: int = 3,
) -> dict[str, Any]:
    """The common part of a blob run's record; every download must be a whole ``size`` 200."""
    for item in downloads:
        if item.status != 200 or item.size != size:
            raise RuntimeError(f"{name}: blob GET answered {item.status}, {item.size} B")
    total = sum(item.size for item in downloads)
    gib = total / (1 << 30)
    return {
        "round": round_,
        "target": name,
        "kind": kind,
        "streams": len(downloads),
        "bytes": total,
        "seconds": round(wall, 3),
        "mb_per_s": round(total / wall / 1e6, 1),
        "cpu_s": cpu,
        "hop_cpu_s_per_gib": round(cpu[hop] / gib, digits),
        "upstream_cpu_s_per_gib": round(cpu[upstream] / gib, digits) if upstream else None,
    }


def _curl_argv(url: str, headers: dict[str, str]) -> list[str]:
    argv = [
        require("curl", "curl"),
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{size_download} %{time_total}",
    ]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    argv.append(url)
    return argv


def _parse_curl(output: bytes) -> Download:
    status, size, seconds = output.decode().split()
    return Download(int(status), int(size), float(seconds))


def download(url: str, headers: dict[str, str], timeout: float = 600.0) -> Download:
    """One ``curl`` download to /dev/null."""
    completed = subprocess.run(
        _curl_argv(url, headers), capture_output=True, timeout=timeout, check=True
    )
    return _parse_curl(completed.stdout)


def download_parallel(
    url: str, headers: dict[str, str], streams: int, timeout: float = 900.0
) -> tuple[list[Download], float]:
    """``streams`` concurrent ``curl`` downloads; their results and the wall time of all."""
    return download_each(url, [headers] * streams, timeout)


def download_each(
    url: str, headers: Sequence[dict[str, str]], timeout: float = 900.0
) -> tuple[list[Download], float]:
    """One concurrent ``curl`` download per entry of ``headers`` (each client its own
    credentials); their results and the wall time of all."""
    argvs = [_curl_argv(url, each) for each in headers]
    with reaped([]) as processes:
        started = time.monotonic()
        for argv in argvs:
            processes.append(
                subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
            )
        results = []
        for process in processes:
            output, _ = process.communicate(timeout=max(1.0, started + timeout - time.monotonic()))
            if process.returncode != 0:
                raise RuntimeError(f"curl exited with {process.returncode}")
            results.append(_parse_curl(output))
        wall = time.monotonic() - started
    return results, wall


def sha256_of(url: str, headers: dict[str, str], timeout: float = 600.0) -> tuple[str, int]:
    """Stream ``url`` through ``curl`` into SHA-256; the digest and the byte count."""
    argv = [require("curl", "curl"), "-sf"]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    argv.append(url)
    digest = hashlib.sha256()
    size = 0
    deadline = time.monotonic() + timeout
    with reaped([]) as processes:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        processes.append(process)
        assert process.stdout is not None
        while chunk := process.stdout.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
            if time.monotonic() > deadline:
                raise RuntimeError(f"download of {url} took longer than {timeout}s")
        if process.wait(timeout=30) != 0:
            raise RuntimeError(f"curl {url} exited with {process.returncode}")
    return "sha256:" + digest.hexdigest(), size
