"""Running the sandbox from synchronous code: the thread wrapper and the command line."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
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
def test_command_line_prints_endpoints_and_stops_on_sigterm(sandbox_thread_catalog: Path) -> None:
    command = [sys.executable, "-m", "balena_registry_proxy.sandbox"]
    with subprocess.Popen(
        [*command, "--catalog", str(sandbox_thread_catalog)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stdout is not None
        description = json.loads(process.stdout.readline())
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    assert description["registry_url"].startswith("http://127.0.0.1:")
    assert description["token_url"].endswith("/auth/v1/token")
    assert description["apps"] == {"o/app": None}
    assert not Path(description["workdir"]).exists()
