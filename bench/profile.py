"""Sample the proxy's Python stacks with py-spy while a workload runs; summarise the hot spots."""

from __future__ import annotations

import collections
import contextlib
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_FRAME_RE = re.compile(r"^(?P<function>.*?) \((?P<file>[^():]+)(?::\d+)?\)$")
_TRIM = ("site-packages/", "/src/", "/lib/python3")
# An executor's worker thread blocked on its empty work queue. With --native, py-spy counts it as
# running; the caching proxy has one (aiohttp opens files in it), and it would otherwise take
# most of the samples of a sendfile workload.
_IDLE_WORKER = "_queue_SimpleQueue_get "


def py_spy_binary() -> str:
    """py-spy from the benchmark's own environment, else from PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    if beside.exists():
        return str(beside)
    found = shutil.which("py-spy")
    if found is None:
        raise RuntimeError("py-spy not found: pip install py-spy (into the same venv)")
    return found


@contextlib.contextmanager
def recording(
    pid: int, out: Path, fmt: str, *, rate: int = 200, native: bool = False
) -> Iterator[None]:
    """``py-spy record`` of ``pid`` while the block runs; written to ``out`` when it ends.

    ``native`` adds C frames (uvloop, aiohttp's parsers, the kernel calls they make).
    """
    argv = [
        py_spy_binary(),
        "record",
        "--pid",
        str(pid),
        "--rate",
        str(rate),
        "--format",
        fmt,
        "--output",
        str(out),
        *(["--native"] if native else []),
    ]
    log = out.with_suffix(out.suffix + ".log")
    with log.open("wb") as log_file:
        process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        yield
    finally:
        if process.poll() is None:
            # py-spy writes its output when interrupted.
            process.send_signal(signal.SIGINT)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        if out.exists():
            log.unlink(missing_ok=True)


def _short(frame: str) -> tuple[str, str]:
    """``(function (file), file)`` with the path trimmed; unresolved C addresses merged."""
    match = _FRAME_RE.match(frame.strip())
    if match is None:
        return frame.strip(), frame.strip()
    path = match["file"]
    for marker in _TRIM:
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "/lib/python3":
                path = "stdlib/" + path.split("/", 1)[-1]
            break
    function = match["function"]
    if function.startswith("0x"):
        function = "[unresolved]"
    return f"{function} ({path})", path


def summarize(raw: Path, top: int = 15) -> dict[str, Any]:
    """Sample shares from py-spy's ``raw`` (collapsed) output.

    ``self``: the innermost frame, per function and per file; ``inclusive``: anywhere on the
    stack, leaving out the frames every sample has (``main``, the event loop's ``run``).
    """
    own: collections.Counter[str] = collections.Counter()
    own_file: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    idle = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        if _IDLE_WORKER in stack:
            idle += count
            continue
        frames = [_short(f) for f in stack.split(";") if f.strip()]
        frames = [f for f in frames if not f[0].startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        own[frames[-1][0]] += count
        own_file[frames[-1][1]] += count
        for function in {f[0] for f in frames}:
            inclusive[function] += count
    if total == 0:
        return {
            "samples": 0,
            "idle_worker_samples": idle,
            "self": [],
            "self_by_file": [],
            "inclusive": [],
        }
    for function in [f for f, n in inclusive.items() if n >= total * 0.995]:
        del inclusive[function]

    def share(counter: collections.Counter[str], key: str) -> list[dict[str, Any]]:
        return [
            {key: name, "percent": round(100 * n / total, 1)}
            for name, n in counter.most_common(top)
        ]

    return {
        "samples": total,
        "idle_worker_samples": idle,
        "self": share(own, "function"),
        "self_by_file": share(own_file, "file"),
        "inclusive": share(inclusive, "function"),
    }
