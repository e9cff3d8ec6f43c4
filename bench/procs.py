"""Child processes: start, wait until ready, read CPU time and memory, stop by PID.

Every process the benchmark starts goes through :class:`Service` (servers) or is run to
completion by ``subprocess`` with a timeout (clients), so nothing outlives the run.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
LOCALHOST = "127.0.0.1"


def log(message: str) -> None:
    """Progress on stderr."""
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of process ``pid`` (all its threads) so far."""
    text = Path(f"/proc/{pid}/stat").read_text()
    # Fields after "(comm)": state is field 3, utime field 14, stime field 15.
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def thread_runtimes(pid: int) -> dict[int, int]:
    """On-CPU nanoseconds so far of each live thread of ``pid``, by thread id.

    ``/proc/<pid>/stat`` counts in clock ticks (10 ms): too coarse for a process that serves a
    256 MiB blob in a few tens of milliseconds of CPU. The scheduler's own per-thread total
    (``schedstat``, user and system time together) is exact. A thread that exits takes its
    total with it, so callers subtract per thread (see :func:`runtime_seconds`).
    """
    runtimes: dict[int, int] = {}
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                runtimes[int(task.name)] = int((task / "schedstat").read_text().split()[0])
    return runtimes


def runtime_seconds(before: Mapping[int, int], after: Mapping[int, int]) -> float:
    """CPU seconds between two :func:`thread_runtimes` readings (threads born meanwhile count
    whole; threads that died meanwhile are missed, which only undercounts)."""
    return sum(ns - before.get(tid, 0) for tid, ns in after.items()) / 1e9


def status_kib(pid: int, key: str) -> int:
    """A ``kB`` value of ``/proc/<pid>/status`` (``VmRSS``, ``VmHWM``); 0 if absent."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid``."""
    children: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                children.extend(int(p) for p in (task / "children").read_text().split())
    return children


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Service:
    """A server process the benchmark started; stopped (by PID) by :meth:`stop`."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """Describe the process; :meth:`start` runs it (our environment with ``env`` on top),
        output going to ``log_path``."""
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = {**os.environ, **env} if env else None
        self.process: subprocess.Popen[bytes] | None = None
        self._descendants: set[int] = set()

    @property
    def pid(self) -> int:
        """The PID of the started process."""
        if self.process is None:
            raise RuntimeError(f"{self.name} was not started")
        return self.process.pid

    def start(self) -> None:
        """Start the process in its own session (Ctrl-C reaches only the benchmark)."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=self.env,
            )

    def pids(self) -> list[int]:
        """The process and its children (nginx's workers), remembered for :meth:`stop`."""
        pids = [self.pid, *child_pids(self.pid)]
        self._descendants.update(pids[1:])
        return pids

    def cpu(self) -> float:
        """CPU seconds used so far by the process and its current children."""
        total = 0.0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                total += cpu_seconds(pid)
        return total

    def runtimes(self) -> dict[int, int]:
        """:func:`thread_runtimes` of the process and its current children, merged."""
        merged: dict[int, int] = {}
        for pid in self.pids():
            merged.update(thread_runtimes(pid))
        return merged

    def log_tail(self, chars: int = 2000) -> str:
        """The end of the process's output, for error messages."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def check_alive(self) -> None:
        """Raise if the process has exited."""
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with status {self.process.returncode}:\n{self.log_tail()}"
            )

    def wait_http(self, port: int, path: str, timeout: float = 20.0) -> None:
        """Wait until ``GET path`` on ``port`` answers with any status below 500."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            try:
                status = http_status(port, path)
            except OSError:
                status = 0
            if 0 < status < 500:
                self.pids()
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; then any child it left behind, by PID."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(OSError):
                self._descendants.update(child_pids(process.pid))
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        for pid in self._descendants:
            if _alive(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        self.process = None


def http_status(port: int, path: str, headers: Mapping[str, str] | None = None) -> int:
    """The status of ``GET path`` on 127.0.0.1:``port`` (body read and discarded)."""
    connection = http.client.HTTPConnection(LOCALHOST, port, timeout=5)
    try:
        connection.request("GET", path, headers=dict(headers or {}))
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


class RssSampler:
    """Samples a process's VmRSS in a thread while in use; ``peak_kib`` is the highest seen."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        """Watch ``pid`` every ``interval`` seconds."""
        self.pid = pid
        self.interval = interval
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                self.peak_kib = max(self.peak_kib, status_kib(self.pid, "VmRSS"))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        """Start sampling."""
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Stop sampling."""
        self._stop.set()
        self._thread.join()


@contextlib.contextmanager
def reaped(processes: list[subprocess.Popen[bytes]]) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Kill (by PID) every process still running in ``processes`` when the block is left."""
    try:
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(5)
