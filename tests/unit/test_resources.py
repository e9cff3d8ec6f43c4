"""Memory given back after bursts of connections, and open files."""

from __future__ import annotations

import errno
import logging
import os
import resource
from collections.abc import Callable
from pathlib import Path

import pytest

from balena_registry_proxy import resources
from balena_registry_proxy.resources import (
    TRIM_AFTER_CLOSED,
    TRIM_DELAY_SECONDS,
    MemoryTrim,
    connections_for,
    cpu_limit,
    cpu_quota,
    raise_open_file_limit,
    usable_cores,
)
from balena_registry_proxy.server import LoopErrors


class Later:
    """A stand-in for ``loop.call_later`` that runs nothing until told."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, Callable[[], None]]] = []

    def __call__(self, delay: float, callback: Callable[[], None]) -> None:
        self.calls.append((delay, callback))

    def run(self) -> None:
        calls, self.calls = self.calls, []
        for _, callback in calls:
            callback()


def test_memory_is_trimmed_once_after_a_burst_of_closes() -> None:
    later = Later()
    trim = MemoryTrim(later)
    for _ in range(TRIM_AFTER_CLOSED - 1):
        trim.closed()
    assert later.calls == []
    for _ in range(500):
        trim.closed()
    assert len(later.calls) == 1
    # The first trim waits for the rest of the burst only, however soon after the start.
    assert later.calls[0][0] == TRIM_DELAY_SECONDS
    later.run()
    assert trim.trims == 1
    for _ in range(TRIM_AFTER_CLOSED):
        trim.closed()
    # Not more often than every interval: the next waits out the rest of it.
    assert later.calls[0][0] > TRIM_DELAY_SECONDS
    later.run()
    assert trim.trims == 2


def test_connections_fit_the_open_files() -> None:
    assert connections_for(1024) == (1024 - resources.RESERVED_FILES) // 3
    assert connections_for(10) == 1
    assert connections_for(1_000_000) > 300_000


def test_the_soft_limit_goes_up_to_the_hard_one() -> None:
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, before[1]), before[1]))
        assert raise_open_file_limit() == before[1]
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == before[1]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)


class FakeLoop:
    def __init__(self) -> None:
        self.defaults: list[dict[str, object]] = []

    def default_exception_handler(self, context: dict[str, object]) -> None:
        self.defaults.append(context)


def test_accepting_without_descriptors_is_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    handler = LoopErrors()
    loop = FakeLoop()
    failure = {
        "message": "socket.accept() out of system resource",
        "exception": OSError(errno.EMFILE, "Too many open files"),
    }
    for _ in range(5):
        handler(loop, failure)  # type: ignore[arg-type]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "cannot accept connections: Too many open files; raise the open-file limit or lower "
        "MAX_CONNECTIONS"
    ]
    other = {"message": "something else", "exception": ValueError("x")}
    handler(loop, other)  # type: ignore[arg-type]
    assert loop.defaults == [other]


@pytest.mark.parametrize(
    ("text", "cores"),
    [
        ("max 100000\n", None),
        ("200000 100000\n", 2),
        ("150000 100000", 2),
        ("50000 100000", 1),
        ("100000 100000", 1),
        ("", None),
        ("max", None),
        ("x 100000", None),
        ("0 100000", None),
        ("100000 0", None),
    ],
)
def test_a_containers_cpu_limit_in_cores(text: str, cores: int | None) -> None:
    assert cpu_quota(text) == cores


def cgroups(tmp_path: Path, membership: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A /proc/self/cgroup with ``membership`` and a cgroup tree holding ``files``."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    proc = tmp_path / "cgroup"
    proc.write_bytes(membership.encode(errors="surrogateescape"))
    root = tmp_path / "fs"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return proc, root


@pytest.mark.parametrize(
    ("membership", "files", "limit"),
    [
        # cgroup v2 in a container with its own cgroup namespace: the root is its own.
        ("0::/\n", {"cpu.max": "200000 100000\n"}, 2),
        ("0::/\n", {"cpu.max": "max 100000\n"}, None),
        ("0::/\n", {}, None),
        # v2 seen from the host (systemd, --cgroupns=host): a parent may hold the limit.
        (
            "0::/system.slice/proxy.service\n",
            {
                "system.slice/proxy.service/cpu.max": "max 100000\n",
                "system.slice/cpu.max": "150000 100000\n",
                "cpu.max": "max 100000\n",
            },
            2,
        ),
        (
            "0::/a/b\n",
            {"a/b/cpu.max": "100000 100000\n", "a/cpu.max": "400000 100000\n"},
            1,
        ),
        # cgroup v1: quota and period in two files, -1 for none.
        (
            "12:memory:/docker/x\n4:cpu,cpuacct:/docker/x\n",
            {
                "cpu,cpuacct/docker/x/cpu.cfs_quota_us": "300000\n",
                "cpu,cpuacct/docker/x/cpu.cfs_period_us": "100000\n",
            },
            3,
        ),
        (
            "4:cpu,cpuacct:/\n",
            {"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000"},
            None,
        ),
        ("garbage\n", {}, None),
        # A cgroup path of bytes that are no UTF-8: read, not a crash at start-up.
        ("0::/caf\udce9\n", {}, None),
        ("", {}, None),
    ],
)
def test_a_cgroups_cpu_limit(
    tmp_path: Path, membership: str, files: dict[str, str], limit: int | None
) -> None:
    assert cpu_limit(*cgroups(tmp_path, membership, files)) == limit


def test_usable_cores_are_the_affinity_within_the_limit(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    assert usable_cores(*cgroups(tmp_path / "none", "0::/\n", {})) == affinity
    assert usable_cores(*cgroups(tmp_path / "one", "0::/\n", {"cpu.max": "100000 100000"})) == 1
    many = f"{(affinity + 5) * 100000} 100000"
    assert usable_cores(*cgroups(tmp_path / "many", "0::/\n", {"cpu.max": many})) == affinity
    assert usable_cores(tmp_path / "missing", tmp_path / "missing") == affinity
