"""Scaling out: several proxy processes behind HAProxy, one killed mid-run, pulls go on.

The proxy keeps no state between requests, so a balancer may send each request of a pull to
another process. When one dies, a download in flight on it is cut; the balancer, having seen
the process refuse connections or fail its health check, sends everything after that to the
others. Docker resumes a cut layer with a Range request; skopeo 1.9 does not retry a cut blob by
itself (its ``--retry-times`` skips that error), so the test pulls once more the way a pipeline
retries a failed step.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from balena_registry_proxy.sandbox import Sandbox

from .conftest import Skopeo, haproxy_in_front, proxy_process
from .test_pull import BIG

pytestmark = pytest.mark.e2e

PROXIES = 3


@dataclass
class Balanced:
    """HAProxy in front of several proxy processes."""

    host: str
    proxies: list[subprocess.Popen[bytes]]
    logs: list[Path]


@pytest.fixture(scope="module")
def balanced(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Balanced]:
    directory = tmp_path_factory.mktemp("scale-out")
    with contextlib.ExitStack() as stack:
        proxies = [
            stack.enter_context(
                proxy_process({"REGISTRY_URL": sandbox.registry_url}, directory / f"p{n}.log")
            )
            for n in range(PROXIES)
        ]
        host = stack.enter_context(haproxy_in_front(proxies, directory))
        yield Balanced(
            host, [proxy.process for proxy in proxies], [proxy.log_path for proxy in proxies]
        )


def test_pulls_survive_a_proxy_killed_mid_run(
    client: Skopeo, sandbox: Sandbox, balanced: Balanced, tmp_path: Path
) -> None:
    def pull(n: int) -> subprocess.CompletedProcess[str]:
        return client.pull("gh_acme/big", tmp_path / str(n), "--retry-times=5", host=balanced.host)

    victim = balanced.proxies[0]
    with ThreadPoolExecutor(max_workers=4) as pool:
        pulls = [pool.submit(pull, n) for n in range(4)]
        # Kill it once it has served part of a pull, not only health checks.
        deadline = time.monotonic() + 30
        while "/blobs/" not in balanced.logs[0].read_text() and time.monotonic() < deadline:
            time.sleep(0.02)
        served_before_kill = balanced.logs[0].read_text().count("/blobs/")
        victim.send_signal(signal.SIGKILL)
        during = [future.result() for future in pulls]
    assert served_before_kill > 0, "the killed proxy had served nothing: the test proves little"
    for n, result in enumerate(during):
        if result.returncode != 0:
            # Cut by the kill (mid-body: EOF or reset; before the answer: HAProxy's 502), never
            # anything else; and the same pull again succeeds.
            cut = ("EOF", "connection reset", "502 (Bad Gateway)", "502 Bad Gateway")
            assert any(sign in result.stderr for sign in cut), result.stderr
            again = pull(n)
            assert again.returncode == 0, again.stderr
    for n in range(4, 8):
        after = pull(n)
        assert after.returncode == 0, after.stderr
    for n in range(8):
        layers = sandbox.seed[BIG].layer_digests
        assert all((tmp_path / str(n) / digest.split(":")[1]).exists() for digest in layers)
    for survivor in balanced.proxies[1:]:
        assert survivor.poll() is None
