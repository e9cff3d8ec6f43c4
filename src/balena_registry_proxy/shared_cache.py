"""The edge cache shared by replicas: object storage, Redis and the replicas' endpoint, from
the settings (``CACHE_S3_URL`` and what goes with it)."""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

from .config import Settings
from .coordination import Coordination
from .edge_cache import EdgeCache, Sharing
from .metrics import Metrics
from .peers import Peers
from .s3_store import S3Store
from .sharing import Holder, namespace
from .upstream import Upstream


def shared_edge_cache(settings: Settings, upstream: Upstream, metrics: Metrics) -> EdgeCache:
    """The edge cache on ``CACHE_S3_URL``, coordinated through ``CACHE_REDIS_URL`` if set;
    it connects when started (``EdgeCache.start``)."""
    assert settings.cache_s3_url is not None
    assert settings.cache_s3_bucket is not None
    space = namespace(settings.cache_s3_bucket, settings.cache_s3_prefix)
    coordination = None
    peers = None
    if settings.cache_redis_url is not None:
        assert settings.cache_peer_secret is not None
        me = Holder(uuid.uuid4().hex[:16], settings.cache_peer_url or _own_url(settings.port))
        coordination = Coordination(
            settings.cache_redis_url, space, me, metrics, settings.cache_peer_secret
        )
        peers = Peers(settings.cache_peer_secret, upstream)
    # Downloads in progress: in CACHE_DIR if given (a volume sized for them), else in a
    # temporary folder of the store's own.
    spool = Path(settings.cache_dir) if settings.cache_dir is not None else None
    store = S3Store(
        endpoint=settings.cache_s3_url,
        bucket=settings.cache_s3_bucket,
        prefix=settings.cache_s3_prefix,
        region=settings.cache_s3_region,
        spool=spool,
        max_bytes=settings.cache_max_size,
        metrics=metrics,
        coordination=coordination,
        public_endpoint=settings.cache_s3_public_url,
    )
    metrics.watch_cache(lambda: store.size, lambda: store.evictions)
    sharing = Sharing(coordination, peers, redirect=settings.cache_s3_redirect)
    return EdgeCache(upstream, store, metrics, send_timeout=settings.send_timeout, sharing=sharing)


def _own_url(port: int) -> str:
    """Where the other replicas reach this one by default: this host's address."""
    try:
        address = socket.gethostbyname(socket.gethostname())
    except OSError:
        address = "127.0.0.1"
    return f"http://{address}:{port}"
