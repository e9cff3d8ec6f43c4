"""The proxy as a process of its own, for tests that count its memory, files and connections."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from balena_registry_proxy.sandbox.ports import free_port

from ..conftest import register_log


@dataclass
class ProxyProcess:
    """The proxy under test, as its own process."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def wait_listening(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port)):
                    return
            except OSError:
                if self.process.poll() is not None:
                    raise AssertionError(self.log.read_text()) from None
                time.sleep(0.1)
        raise AssertionError("the proxy did not listen")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)


def start_proxy(
    upstream_url: str,
    log: Path,
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> ProxyProcess:
    """A proxy process on a free loopback port in front of ``upstream_url``, logging to ``log``."""
    port = free_port()
    with register_log(log).open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "balena_registry_proxy", "--host", "127.0.0.1"],
            env={
                **os.environ,
                "PROXY_PORT": str(port),
                "REGISTRY_URL": upstream_url,
                "UPSTREAM_READ_TIMEOUT": "1",
                "UPSTREAM_CONNECT_TIMEOUT": "1",
                "LOG_LEVEL": "warning",
                # One process: these tests are about what one process holds.
                "WORKERS": "1",
                **(env or {}),
            },
            stdout=sink,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec_fn,
        )
    return ProxyProcess(process, f"http://127.0.0.1:{port}", log)
