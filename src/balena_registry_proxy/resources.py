"""What the process asks of the operating system: open files, cores, and memory given back.

Thin wrappers over ``resource`` and glibc, each a no-op where the platform lacks it.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("balena_registry_proxy")

# Memory is handed back after this many connections closed, at most this often: a burst of
# clients leaves freed buffers scattered over the heap, which glibc keeps until told.
TRIM_AFTER_CLOSED = 64
TRIM_INTERVAL_SECONDS = 10.0
TRIM_DELAY_SECONDS = 1.0
# Descriptors kept for what is not a client connection: upstream pools, cache files, logs.
RESERVED_FILES = 256
FILES_PER_CONNECTION = 3
"""A client connection's own socket, its upstream connection, and a cache file it reads."""


def raise_open_file_limit() -> int:
    """Raise the soft limit on open files to the hard limit; the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == hard:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return soft
    return hard


PROC_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def cpu_quota(text: str) -> int | None:
    """The cores a CPU quota allows, rounded up: ``"<quota> <period>"`` (cgroup v2's
    ``cpu.max``, or v1's two files joined); None for no limit (``max``, ``-1``) or text that
    is not one."""
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return max(1, math.ceil(quota / period))


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return ""


def _folder_and_parents(mount: Path, path: str) -> list[Path]:
    parts = [part for part in path.split("/") if part]
    return [mount.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def cpu_limit(proc_cgroup: Path = PROC_CGROUP, root: Path = CGROUP_ROOT) -> int | None:
    """The fewest cores that this process's cgroups, or any cgroup above them, allow (v2's
    ``cpu.max``, v1's ``cpu.cfs_quota_us``); None where none sets a limit."""
    limits: list[int | None] = []
    for line in _read(proc_cgroup).splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and not controllers:
            for folder in _folder_and_parents(root, path):
                limits.append(cpu_quota(_read(folder / "cpu.max")))
        elif "cpu" in controllers.split(","):
            for folder in _folder_and_parents(root / controllers, path):
                quota, period = (
                    _read(folder / "cpu.cfs_quota_us"),
                    _read(folder / "cpu.cfs_period_us"),
                )
                limits.append(cpu_quota(f"{quota} {period}"))
    found = [limit for limit in limits if limit is not None]
    return min(found) if found else None


def usable_cores(proc_cgroup: Path = PROC_CGROUP, root: Path = CGROUP_ROOT) -> int:
    """Cores this process may run on: its CPU affinity, within its cgroups' CPU limits."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    limit = cpu_limit(proc_cgroup, root)
    return min(cores, limit) if limit is not None else cores


def connections_for(open_files: int) -> int:
    """How many client connections ``open_files`` descriptors can serve."""
    return max(1, (open_files - RESERVED_FILES) // FILES_PER_CONNECTION)


def _malloc_trim() -> Callable[[], object] | None:
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc
    return lambda: trim(0)


class MemoryTrim:
    """Gives freed heap memory back to the system after connections closed in numbers.

    The trim runs a moment after the count is reached, so that the rest of a burst of
    departing clients has freed its memory too.
    """

    def __init__(self, schedule: Callable[[float, Callable[[], None]], object]) -> None:
        """Trim through ``schedule(delay, callback)`` (the event loop's ``call_later``)."""
        self._trim = _malloc_trim()
        self._schedule = schedule
        self._closed = 0
        self._pending = False
        # No trim yet: the first waits for the rest of its burst only, not for an interval
        # counted from the start.
        self._last = -math.inf
        self.trims = 0

    def closed(self) -> None:
        """A connection closed: trim soon if enough did, and not too recently."""
        self._closed += 1
        if self._closed < TRIM_AFTER_CLOSED or self._pending:
            return
        self._pending = True
        wait = max(TRIM_DELAY_SECONDS, self._last + TRIM_INTERVAL_SECONDS - time.monotonic())
        self._schedule(wait, self._run)

    def _run(self) -> None:
        self._pending = False
        self._closed = 0
        self._last = time.monotonic()
        self.trims += 1
        if self._trim is not None:
            started = time.perf_counter()
            self._trim()
            log.debug("freed memory returned in %.1f ms", (time.perf_counter() - started) * 1000)
