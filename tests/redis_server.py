"""Debian's redis-server on a free loopback port, started and stopped by the tests."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from balena_registry_proxy.sandbox.ports import free_port

from .conftest import require_binary


@dataclass
class RedisServer:
    """A running redis-server: its URL, and the process (tests kill it)."""

    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as connection:
            connection.sendall(b"PING\r\n")
            return connection.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(workdir: Path, port: int | None = None) -> RedisServer:
    """redis-server on ``port`` (a free one by default), without persistence, once it answers."""
    binary = require_binary("redis-server", "redis-server")
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    with (workdir / f"redis-{port}.log").open("ab") as log:
        process = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 15
    while not _answers(port):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"redis-server did not start on port {port}")
        time.sleep(0.05)
    return RedisServer(port, process)


def stop(process: subprocess.Popen[bytes], seconds: float = 10) -> None:
    """Stop a process the tests started, by its PID: SIGTERM, then SIGKILL after ``seconds``."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(seconds)


@contextlib.contextmanager
def running_redis(workdir: Path) -> Iterator[RedisServer]:
    """A redis-server for the length of the block."""
    server = start_redis(workdir)
    try:
        yield server
    finally:
        stop(server.process)
