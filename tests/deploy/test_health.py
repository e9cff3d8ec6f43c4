"""The health checks run for real: the Dockerfile's and the compose file's command, and the
paths the Kubernetes probes and Prometheus' annotations name, against the proxy started as the
image starts it (its ENV, the console script), on a free loopback port, with an upstream that
does not answer (a closed loopback port), as when balenaCloud cannot be reached.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from balena_registry_proxy.sandbox.ports import free_port

from .files import (
    COMPOSE,
    KUBERNETES_BASE,
    SETTINGS,
    find_tool,
    image,
    load_yaml,
    mapping,
    sequence,
)


def _environment(port: int) -> dict[str, str]:
    """This machine's environment without any proxy setting, plus the image's ENV."""
    base = {key: value for key, value in os.environ.items() if key not in SETTINGS}
    return {**base, **image().environment, "PROXY_PORT": str(port)}


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1) as response:
            return bool(response.read() == b"pong")
    except (urllib.error.URLError, OSError):
        return False


def _get(port: int, path: str) -> tuple[int, str, bytes]:
    """Status, Content-Type and body of ``GET path``, error statuses included."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("Content-Type", ""), error.read()


@pytest.fixture(scope="module")
def proxy_port() -> Iterator[int]:
    """The port of a running proxy, started by the image's ENTRYPOINT with the image's ENV."""
    script = find_tool("balena-registry-proxy")
    command = [script] if script else [sys.executable, "-m", "balena_registry_proxy"]
    port = free_port()
    unreachable = f"http://127.0.0.1:{free_port()}"
    process = subprocess.Popen(
        command,
        env={**_environment(port), "PROXY_HOST": "127.0.0.1", "REGISTRY_URL": unreachable},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not _answers(port):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                _, error = process.communicate(timeout=10)
                pytest.fail(f"the proxy did not start (exit {process.returncode}): {error}")
            time.sleep(0.1)
        yield port
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.communicate(timeout=40)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate(timeout=10)
    assert process.returncode == 0, "SIGTERM should stop the proxy with status 0"


def _health_commands() -> dict[str, list[str]]:
    service = mapping(load_yaml(COMPOSE)["services"]["registry-proxy"], "registry-proxy")
    test = sequence(mapping(service["healthcheck"], "healthcheck")["test"], "test")
    assert test[0] == "CMD"
    return {"Dockerfile": image().health_command, "docker-compose.yml": test[1:]}


def _run(command: list[str], port: int) -> subprocess.CompletedProcess[str]:
    assert command[0] == "python", command
    return subprocess.run(
        [sys.executable, *command[1:]],
        env=_environment(port),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize("source", ["Dockerfile", "docker-compose.yml"])
def test_health_command_passes_while_the_proxy_serves(source: str, proxy_port: int) -> None:
    result = _run(_health_commands()[source], proxy_port)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("source", ["Dockerfile", "docker-compose.yml"])
def test_health_command_fails_when_nothing_answers(source: str) -> None:
    result = _run(_health_commands()[source], free_port())
    assert result.returncode != 0


def _pod_template() -> dict[str, Any]:
    deployment = load_yaml(KUBERNETES_BASE / "deployment.yaml")
    return mapping(deployment["spec"]["template"], "pod template")


def test_kubernetes_probes_pass_while_the_upstream_is_unreachable(proxy_port: int) -> None:
    (container,) = sequence(_pod_template()["spec"]["containers"], "containers")
    for probe in ("readinessProbe", "livenessProbe"):
        path = container[probe]["httpGet"]["path"]
        status, _, _ = _get(proxy_port, path)
        # Kubernetes counts 200-399 as success.
        assert 200 <= status < 400, f"{probe} {path}: {status}"
    # What a readiness probe on /ready would have done: taken every pod out.
    assert _get(proxy_port, "/ready")[0] == 503


def test_the_scraped_path_serves_prometheus_metrics(proxy_port: int) -> None:
    annotations = mapping(_pod_template()["metadata"]["annotations"], "pod annotations")
    status, content_type, body = _get(proxy_port, annotations["prometheus.io/path"])
    assert status == 200
    assert content_type.startswith("text/plain")
    assert b"# TYPE registry_proxy_requests_total counter" in body
