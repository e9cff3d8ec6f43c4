"""Running the sandbox from synchronous code: the thread wrapper and the command line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from balena_registry_proxy.sandbox import CatalogError, sandbox_in_thread


@pytest.fixture
def sandbox_thread_catalog(tmp_path: Path) -> Path:
    path = tmp_path / "empty.yaml"
    path.write_text("orgs: [o]\napps: [{slug: o/app, public: true}]\n")
    return path


def test_startup_error_is_raised_in_the_caller(tmp_path: Path) -> None:
    with (
        pytest.raises(CatalogError, match="cannot read catalog"),
        sandbox_in_thread(tmp_path / "missing.yaml"),
    ):
        pytest.fail("the sandbox must not start")


@pytest.mark.e2e
@pytest.mark.usefixtures("registry_binary")
def test_running_sandbox_is_usable_from_sync_code(sandbox_thread_catalog: Path) -> None:
    with sandbox_in_thread(sandbox_thread_catalog) as sandbox:
        assert sandbox.registry.returncode is None
        registry = sandbox.registry
    assert registry.returncode is not None


@pytest.mark.e2e
@pytest.mark.usefixtures("registry_binary")
def test_module_command_serves_until_sigterm_and_cleans_up(
    sandbox_thread_catalog: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out.txt"
    command = [sys.executable, "-m", "balena_registry_proxy.sandbox", "--port", "0"]
    with output.open("wb") as sink:
        process = subprocess.Popen(
            [*command, "--catalog", str(sandbox_thread_catalog)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TMPDIR": str(tmp_path)},
        )
    try:
        deadline = time.monotonic() + 60
        while "Ctrl-C stops everything" not in output.read_text():
            assert process.poll() is None, output.read_text()
            assert time.monotonic() < deadline, output.read_text()
            time.sleep(0.1)
        assert "o/app" in output.read_text()
        assert list(tmp_path.glob("balena-sandbox-*"))
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    assert not list(tmp_path.glob("balena-sandbox-*"))
