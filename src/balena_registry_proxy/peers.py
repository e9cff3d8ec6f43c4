"""Replicas reading each other's downloads as they grow, over an endpoint of their own.

The replica holding a digest's lease answers ``GET /_cache/blobs/<digest>`` (with ``Range``,
from any offset) from its growing download, exactly as it answers its own clients, last byte
held back until the download verified. Only a request signed with the replicas' shared secret
for that digest, and recently (``sharing.peer_signature``), is answered: the endpoint is
outside ``/v2``, so no client's token means anything there, and the signature is never a
credential for anything else.
"""

from __future__ import annotations

import time
from contextlib import AbstractAsyncContextManager

from .sharing import (
    PEER_HEADER,
    PEER_PATH,
    PEER_SIGNATURE_SECONDS,
    Holder,
    peer_signature,
    peer_signature_valid,
)
from .upstream import Response, Upstream


class Peers:
    """The signature check of this replica's endpoint, and requests to the others'."""

    def __init__(self, secret: str, upstream: Upstream) -> None:
        """Sign and check with ``secret``; reach other replicas through ``upstream``'s pools
        (as it reaches the hosts a registry redirects to)."""
        self._secret = secret
        self._upstream = upstream

    def admits(self, digest: str, signature: str | None) -> bool:
        """Whether a request for ``digest`` carrying ``signature`` comes from a replica."""
        return signature is not None and peer_signature_valid(
            self._secret, digest, signature, time.time()
        )

    def read(
        self, holder: Holder, digest: str, offset: int, request_id: str
    ) -> AbstractAsyncContextManager[Response]:
        """GET ``holder``'s download of ``digest`` from byte ``offset`` on."""
        expires = int(time.time()) + PEER_SIGNATURE_SECONDS
        headers = [
            (PEER_HEADER, peer_signature(self._secret, digest, expires)),
            ("X-Request-Id", request_id),
        ]
        if offset:
            headers.append(("Range", f"bytes={offset}-"))
        return self._upstream.fetch(f"{holder.url}{PEER_PATH}{digest}", headers)
