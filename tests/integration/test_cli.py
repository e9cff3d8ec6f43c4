"""The command as an operator runs it: start-up errors, serving, draining on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from balena_registry_proxy import cli, logs, workers
from balena_registry_proxy.config import load_settings, worker_count
from balena_registry_proxy.resources import usable_cores
from balena_registry_proxy.sandbox.ports import free_port

from ..conftest import until_serving


@contextlib.asynccontextmanager
async def cli_process(*args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """The command as a process; killed on the way out if a test left it running."""
    process = await run_cli(*args)
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def run_cli(*args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    """Start ``python -m balena_registry_proxy`` with ``args``, output piped."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "balena_registry_proxy",
        *args,
        env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--port", "x"], {}, "PROXY_PORT (--port) 'x': must be a port number"),
        ([], {"REGISTRY_URL": "ftp://x"}, "REGISTRY_URL (--registry-url) 'ftp://x'"),
        ([], {"TRUST_PROXY": "sometimes"}, "TRUST_PROXY (--trust-proxy) 'sometimes'"),
    ],
)
async def test_bad_settings_stop_start_up_with_one_line(
    args: list[str], env: dict[str, str], expected: str
) -> None:
    process = await run_cli(*args, env=env)
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1
    assert expected in lines[0]


async def test_port_in_use_is_one_clear_line() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        process = await run_cli("--host", "127.0.0.1", "--port", str(port))
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert stderr.decode().startswith(f"balena-registry-proxy: PROXY_PORT (--port) {port}: ")
    assert "cannot listen on 127.0.0.1" in stderr.decode()
    assert "Traceback" not in stderr.decode()


@pytest.mark.parametrize("host", ["999.1.1.1", "no-such-host.invalid", "192.0.2.1"])
async def test_a_host_that_cannot_be_listened_on_is_blamed(host: str) -> None:
    process = await run_cli("--host", host, "--port", str(free_port()))
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"balena-registry-proxy: PROXY_HOST (--host) '{host}': ")


async def test_a_setting_the_workers_would_refuse_is_one_line_from_the_parent(
    tmp_path: Path,
) -> None:
    missing = str(tmp_path / "missing.pem")
    process = await run_cli(
        "--port", str(free_port()), "--workers", "2", "--tls-cert", missing, "--tls-key", missing
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("balena-registry-proxy: TLS_CERT (--tls-cert) / TLS_KEY")


@pytest.mark.parametrize("shared", [False, True], ids=["busy", "other-workers"])
async def test_workers_on_a_busy_port_fail_without_claiming_to_have_started(shared: bool) -> None:
    with socket.socket() as busy:
        if shared:
            # Another proxy's workers: the new one must not join them on the port.
            busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        process = await run_cli("--host", "127.0.0.1", "--port", str(port), "--workers", "2")
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    # Found by the parent, before any worker started: one line, not one per worker.
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"balena-registry-proxy: PROXY_PORT (--port) {port}: ")


@pytest.fixture
async def slow_upstream(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> TestServer:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(1.5)
        return web.Response(text="finished")

    app = web.Application()
    app.router.add_get("/{tail:.*}", slow)
    return await aiohttp_server(app)


async def test_sigterm_drains_in_flight_requests_then_exits_0(slow_upstream: TestServer) -> None:
    port = free_port()
    upstream = str(slow_upstream.make_url("")).rstrip("/")
    async with cli_process(
        "--host", "127.0.0.1", "--port", str(port), "--registry-url", upstream
    ) as process:
        async with aiohttp.ClientSession() as session:
            await until_serving(f"http://127.0.0.1:{port}")
            in_flight = asyncio.ensure_future(session.get(f"http://127.0.0.1:{port}/v2/"))
            await asyncio.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            response = await in_flight
            assert response.status == 200
            assert await response.text() == "finished"
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == 0
        assert b"Traceback" not in stderr
        assert b'"GET /v2/" 200' in stderr


def children_of(pid: int) -> list[str]:
    """Process ids of ``pid``'s children."""
    return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()


def two_workers(
    port: int, upstream: TestServer
) -> contextlib.AbstractAsyncContextManager[asyncio.subprocess.Process]:
    """The command with two workers on ``port``, in front of ``upstream``."""
    return cli_process(
        "--host", "127.0.0.1", "--port", str(port),
        "--registry-url", str(upstream.make_url("")).rstrip("/"), "--workers", "2",
    )  # fmt: skip


def is_running(pid: str) -> bool:
    """Whether process ``pid`` still exists."""
    return Path(f"/proc/{pid}").exists()


async def test_workers_share_the_port_and_drain_on_sigterm(slow_upstream: TestServer) -> None:
    port = free_port()
    async with two_workers(port, slow_upstream) as process:
        async with aiohttp.ClientSession() as session:
            await until_serving(f"http://127.0.0.1:{port}")
            children = children_of(process.pid)
            assert len(children) == 2
            assert process.stderr is not None
            # Said once both listen; what a worker logs first is its own "listening" line.
            started = await asyncio.wait_for(process.stderr.readuntil(b"workers on port"), 10)
            assert started.count(b"listening on") == 2
            in_flight = [
                asyncio.ensure_future(session.get(f"http://127.0.0.1:{port}/v2/")) for _ in range(4)
            ]
            await asyncio.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            for request in in_flight:
                response = await request
                assert await response.text() == "finished"
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == 0
        assert b"Traceback" not in stderr
        assert not [child for child in children if is_running(child)]


async def pings_counted(port: int) -> float:
    """The ``/ping`` requests ``/metrics`` counts, read over a new connection."""
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        text = await response.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "registry_proxy_requests_total" and sample.labels["route"] == "ping"
    )


async def test_every_worker_reports_the_whole_servers_metrics() -> None:
    port = free_port()
    async with cli_process("--host", "127.0.0.1", "--port", str(port), "--workers", "2"):
        await until_serving(f"http://127.0.0.1:{port}")
        before = await pings_counted(port)
        # A new connection each: the kernel spreads them over both workers.
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True)
        ) as session:
            for _ in range(20):
                async with session.get(f"http://127.0.0.1:{port}/ping") as ping:
                    assert await ping.text() == "pong"
        await asyncio.sleep(0.2)  # counted once the answer is out
        assert [await pings_counted(port) for _ in range(6)] == [before + 20] * 6


async def test_workers_are_one_per_core_by_default() -> None:
    port = free_port()
    expected = worker_count(load_settings({}, {"port": str(port)}), usable_cores())
    async with cli_process("--host", "127.0.0.1", "--port", str(port)) as process:
        await until_serving(f"http://127.0.0.1:{port}")
        children = children_of(process.pid)
        assert len(children) == (expected if expected > 1 else 0)
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == 0


async def test_workers_serve_when_the_supervisor_is_pid_1() -> None:
    # As in a container without an init: the workers' parent is process 1.
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare")
    trial = await asyncio.create_subprocess_exec(unshare, "-Urpf", "--mount-proc", "true")
    if await trial.wait():
        pytest.skip("unshare cannot make a process namespace here")
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        unshare, "-Urpf", "--mount-proc", "--kill-child",
        sys.executable, "-m", "balena_registry_proxy",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await until_serving(f"http://127.0.0.1:{port}")
        assert process.returncode is None
        # unshare's child: the supervisor, process 1 of the new namespace.
        (supervisor,) = children_of(process.pid)
        assert len(children_of(int(supervisor))) == 2
        os.kill(int(supervisor), signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, stderr.decode()
    assert b"started 2 workers" in stderr


async def test_a_worker_that_ends_on_its_own_stops_the_proxy(slow_upstream: TestServer) -> None:
    port = free_port()
    async with two_workers(port, slow_upstream) as process:
        await until_serving(f"http://127.0.0.1:{port}")
        children = children_of(process.pid)
        assert len(children) == 2
        # Drains and exits 0: still one worker short of what was started.
        os.kill(int(children[0]), signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == 1
        assert b"exited with 0: stopping" in stderr


async def test_ipv6_workers_start_beside_an_ipv4_listener_on_the_port() -> None:
    with socket.socket() as ipv4:
        ipv4.bind(("0.0.0.0", 0))  # noqa: S104 - the wildcard is the point
        ipv4.listen()
        port = ipv4.getsockname()[1]
        async with cli_process("--host", "::", "--port", str(port), "--workers", "2") as process:
            await until_serving(f"http://[::1]:{port}")
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.communicate(), 30)
            assert process.returncode == 0


@contextlib.asynccontextmanager
async def group_process(
    port: int, upstream: TestServer
) -> AsyncIterator[asyncio.subprocess.Process]:
    """Two workers in a process group of their own, as a terminal or systemd runs them;
    the whole group killed on the way out if a test left it running."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "balena_registry_proxy", "--host", "127.0.0.1",
        "--port", str(port), "--registry-url", str(upstream.make_url("")).rstrip("/"),
        "--workers", "2",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        yield process
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_to_the_whole_group_still_drains(
    slow_upstream: TestServer, signum: int
) -> None:
    # Every worker gets the signal, then the one the supervisor passes on: the second must
    # not cut the drain short.
    port = free_port()
    async with group_process(port, slow_upstream) as process:
        await until_serving(f"http://127.0.0.1:{port}")
        async with aiohttp.ClientSession() as session:
            in_flight = [
                asyncio.ensure_future(session.get(f"http://127.0.0.1:{port}/v2/")) for _ in range(4)
            ]
            await asyncio.sleep(0.5)
            os.killpg(process.pid, signum)
            for request in in_flight:
                response = await request
                assert await response.text() == "finished"
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, stderr.decode()


async def test_a_signal_while_the_workers_start_stops_them_cleanly(
    slow_upstream: TestServer,
) -> None:
    async with group_process(free_port(), slow_upstream) as process:
        for _ in range(1000):
            if len(children_of(process.pid)) == 2:
                break
            await asyncio.sleep(0.005)
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, stderr.decode()


async def test_a_dying_worker_stops_the_others(slow_upstream: TestServer) -> None:
    port = free_port()
    async with two_workers(port, slow_upstream) as process:
        children: list[str] = []
        for _ in range(100):
            children = children_of(process.pid)
            if len(children) == 2:
                break
            await asyncio.sleep(0.1)
        assert len(children) == 2
        os.kill(int(children[0]), signal.SIGKILL)
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == 1
        assert b"exited with -9: stopping" in stderr
        assert not [child for child in children if is_running(child)]


async def test_a_second_proxy_on_the_same_cache_folder_refuses_to_start(tmp_path: Path) -> None:
    port = free_port()
    cache = str(tmp_path / "cache")
    async with cli_process(
        "--host", "127.0.0.1", "--port", str(port), "--cache-dir", cache
    ) as first:
        await until_serving(f"http://127.0.0.1:{port}")
        second = await run_cli(
            "--host", "127.0.0.1", "--port", str(free_port()), "--cache-dir", cache
        )
        _, stderr = await asyncio.wait_for(second.communicate(), 30)
        assert second.returncode == 2
        lines = stderr.decode().strip().splitlines()
        assert lines == [
            f"balena-registry-proxy: CACHE_DIR (--cache-dir) '{cache}': another process uses "
            "this cache folder"
        ]
        assert first.returncode is None


def test_workers_keep_their_metrics_in_memory_else_in_the_temporary_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not os.access("/dev/shm", os.W_OK):
        pytest.skip("no writable /dev/shm here")
    made = workers.metrics_folder()
    assert made is not None
    try:
        assert Path(made).parent == Path("/dev/shm")
        assert Path(made).stat().st_mode & 0o777 == 0o700
    finally:
        os.rmdir(made)
    monkeypatch.setattr(workers, "_SHARED_MEMORY", str(tmp_path / "no-tmpfs"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    made = workers.metrics_folder()
    assert made is not None
    assert Path(made).parent == tmp_path
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    assert workers.metrics_folder() is None


def test_workers_asked_for_without_a_folder_for_their_metrics_refuse_to_start(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "metrics_folder", lambda: None)
    # In this process, the logging of the tests stays as it is.
    monkeypatch.setattr(logs, "configure", lambda level, log_format: None)
    assert cli.main(["--workers", "2", "--port", str(free_port())]) == 2
    assert capsys.readouterr().err.startswith(
        "balena-registry-proxy: WORKERS (--workers) 2: no writable folder for the workers' metrics"
    )
