"""Prometheus metrics: what operators graph and alert on.

prometheus-client does the bookkeeping and the exposition format; this module only names the
series. Each proxy process has its own registry, so tests (and several apps in one process) do
not share counters. Workers of one proxy (``workers.py``) count in files of a folder they share
instead (prometheus-client's multiprocess mode), so that a scrape, whichever worker answers it,
sees the whole server.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import lru_cache
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import values as prometheus_values
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

MULTIPROCESS_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Upstream answers range from sub-millisecond (cached manifests) to seconds (cold storage).
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


_Series = TypeVar("_Series", Counter, Histogram)
_shared_folder: str | None = None


def count_in_folder(folder: str) -> None:
    """Make this process count every series created from now on in files under ``folder``,
    which the other workers of the proxy share, and scrapes add up all of them.

    prometheus-client chooses how values are kept once, when it is imported, from the
    environment; a worker is forked from a parent that imported it long before, so the choice
    is made again here.
    """
    global _shared_folder
    os.environ[MULTIPROCESS_VARIABLE] = folder
    prometheus_values.ValueClass = prometheus_values.get_value_class()  # type: ignore[no-untyped-call]
    _shared_folder = folder


def process_gone(pid: int, folder: str) -> None:
    """A worker exited: its gauges no longer count (its counters still do)."""
    mark_process_dead(pid, folder)  # type: ignore[no-untyped-call]


class Labelled(Generic[_Series]):
    """A labelled series whose child for given label values is looked up only once.

    prometheus-client validates and hashes label values on every ``labels`` call, which costs
    more than the increment itself; every label here takes few values, so the children are
    kept.
    """

    def __init__(self, series: _Series) -> None:
        """Wrap ``series``."""
        self.labels: Callable[..., _Series] = lru_cache(maxsize=None)(series.labels)


class Metrics:
    """The proxy's series, in a registry of their own."""

    def __init__(self) -> None:
        """Create every series at zero."""
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Labelled(
            Counter(
                "registry_proxy_requests",
                "Requests answered, by method, route kind and status class.",
                ["method", "route", "status"],
                registry=self.registry,
            )
        )
        self.in_flight = Gauge(
            "registry_proxy_in_flight_requests",
            "Requests being answered right now.",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.body_bytes = Labelled(
            Counter(
                "registry_proxy_response_body_bytes",
                "Response body bytes sent to clients, by route kind.",
                ["route"],
                registry=self.registry,
            )
        )
        self.upstream_latency = Labelled(
            Histogram(
                "registry_proxy_upstream_response_seconds",
                "Time from sending a request upstream to its response headers, by route kind.",
                ["route"],
                buckets=_LATENCY_BUCKETS,
                registry=self.registry,
            )
        )
        self.upstream_errors = Labelled(
            Counter(
                "registry_proxy_upstream_errors",
                "Upstream exchanges that failed: unreachable, timeout, or cut mid-response.",
                ["kind"],
                registry=self.registry,
            )
        )
        self.rewrites = Labelled(
            Counter(
                "registry_proxy_alias_lookups",
                "Token lookups of the requested name: aliased (rewritten), unresolved, "
                "passthrough; in resolver mode resolved and listed.",
                ["outcome"],
                registry=self.registry,
            )
        )
        self.api_requests = Labelled(
            Counter(
                "registry_proxy_api_requests",
                "Resolver mode's requests to the balena API, by outcome: ok, ratelimited, "
                "unavailable.",
                ["outcome"],
                registry=self.registry,
            )
        )
        self.realm_requests = Labelled(
            Counter(
                "registry_proxy_realm_token_requests",
                "Resolver mode's token requests to the real realm, by purpose: login (a "
                "client's) or repositories (tokens for the real repositories a name resolved to).",
                ["purpose"],
                registry=self.registry,
            )
        )
        self.cache_requests = Labelled(
            Counter(
                "registry_proxy_cache_requests",
                "Blob and manifest requests the cache answered: hit (kept), joined (download "
                "in progress), peer (downloading on another replica), miss (fetched from "
                "upstream and kept).",
                ["kind", "outcome"],
                registry=self.registry,
            )
        )
        self.cache_bytes = Counter(
            "registry_proxy_cache_fill_bytes",
            "Bytes downloaded from upstream into the cache.",
            registry=self.registry,
        )
        self.cache_infrastructure_errors = Labelled(
            Counter(
                "registry_proxy_cache_infrastructure_errors",
                "Failures of the shared cache's parts (redis, storage); the proxy went on "
                "without them.",
                ["part"],
                registry=self.registry,
            )
        )
        self.cache_served_bytes = Counter(
            "registry_proxy_cache_served_bytes",
            "Body bytes sent to clients from the cache.",
            registry=self.registry,
        )

    def watch_cache(self, size: Callable[[], float], evictions: Callable[[], float]) -> None:
        """Expose the cache's current size and eviction count, read when scraped."""
        # Read from this process when scraped: files shared by workers cannot hold them
        # (and a cache runs with one worker, see config.worker_count).
        assert _shared_folder is None, "a cache's gauges need a proxy of one process"
        Gauge(
            "registry_proxy_cache_size_bytes", "Bytes in the cache.", registry=self.registry
        ).set_function(size)
        Gauge(
            "registry_proxy_cache_evictions",
            "Blobs and manifests evicted to stay under the size limit since start.",
            registry=self.registry,
        ).set_function(evictions)

    def render(self) -> bytes:
        """The exposition text of every series (of every worker, when there are several)."""
        if _shared_folder is None:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=_shared_folder)  # type: ignore[no-untyped-call]
        return generate_latest(merged)


def status_class(status: int) -> str:
    """``2xx``, ``3xx``, ``4xx`` or ``5xx``: few enough label values to keep series cheap."""
    return f"{status // 100}xx"
