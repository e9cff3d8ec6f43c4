"""The proxy as shipped: one worker per core on one port, real pulls through all of them.

The other end-to-end tests pin one process (they count what one process holds); this one runs
the default, so that the workers, their shared port and their merged metrics meet real clients.
"""

from __future__ import annotations

import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from balena_registry_proxy.config import load_settings, worker_count
from balena_registry_proxy.resources import usable_cores
from balena_registry_proxy.sandbox import Sandbox

from .conftest import Skopeo, proxy_process

pytestmark = pytest.mark.e2e

PULLS = 6


def counted_requests(host: str) -> float:
    """Every request ``/metrics`` counts, but scrapes."""
    with urllib.request.urlopen(f"http://{host}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "registry_proxy_requests_total" and sample.labels["route"] != "metrics"
    )


def test_pulls_through_the_default_workers_are_all_counted(
    client: Skopeo, sandbox: Sandbox, tmp_path: Path
) -> None:
    workers = worker_count(load_settings({}, {}), usable_cores())
    if workers < 2:
        pytest.skip(f"one usable core: the default is one process ({workers})")
    log = tmp_path / "proxy.log"
    # No WORKERS: the default.
    with proxy_process({"REGISTRY_URL": sandbox.registry_url, "WORKERS": ""}, log) as proxy:
        pid = proxy.process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        assert len(children) == workers

        def pull(n: int) -> int:
            return client.pull("gh_acme/web/1.3.0", tmp_path / str(n), host=proxy.host).returncode

        with ThreadPoolExecutor(max_workers=PULLS) as pool:
            assert list(pool.map(pull, range(PULLS))) == [0] * PULLS
        time.sleep(0.5)  # the last access lines are written at the end of a loop turn
        lines = [
            line for line in log.read_text().splitlines() if '"GET ' in line or '"HEAD ' in line
        ]
        served = [line for line in lines if '"GET /metrics' not in line]
        assert len(served) > PULLS * 3
        # Whichever worker answers the scrape, it counts every worker's requests.
        assert [counted_requests(proxy.host) for _ in range(4)] == [float(len(served))] * 4
