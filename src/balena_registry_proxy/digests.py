"""Which content the cache can verify: what its digest names, in what form.

Pure, no I/O.
"""

from __future__ import annotations

import re

SHA256_RE = re.compile(r"sha256:([0-9a-f]{64})")
# The registry's own limit on a manifest's size; anything bigger is relayed, not kept.
MAX_MANIFEST_BYTES = 4 << 20


def cacheable(digest: str) -> bool:
    """Whether content with this digest can be kept (sha256, the only algorithm verified)."""
    return SHA256_RE.fullmatch(digest) is not None
