"""What a manifest refers to: the digests a client fetches after it, under the same name.

Pure functions, no I/O. Resolver mode reads this to find which release's repository holds a
digest that a client asks for under a name whose release only a tag chose (the tag is not
repeated on the requests that follow it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .routes import is_digest

# Children of an index followed at most: a multi-platform image has one per platform, and a
# few more for attestations.
MAX_CHILDREN = 32


@dataclass(frozen=True, slots=True)
class References:
    """The digests a manifest names."""

    blobs: frozenset[str]
    """Config and layers (and, for old schema 1 manifests, their ``blobSum``)."""
    children: tuple[str, ...]
    """Manifests an index names (one per platform), in its order."""


def references(body: bytes) -> References:
    """The digests ``body`` (an image manifest or index, any of the usual media types) names;
    nothing for a body that is not one."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return References(frozenset(), ())
    if not isinstance(document, dict):
        return References(frozenset(), ())
    blobs = set()
    config = document.get("config")
    if isinstance(config, dict):
        blobs.add(config.get("digest"))
    blobs.update(_digests(document.get("layers"), "digest"))
    blobs.update(_digests(document.get("blobs"), "digest"))
    blobs.update(_digests(document.get("fsLayers"), "blobSum"))
    children = tuple(_digests(document.get("manifests"), "digest"))[:MAX_CHILDREN]
    return References(frozenset(b for b in blobs if isinstance(b, str) and is_digest(b)), children)


def _digests(entries: object, key: str) -> list[str]:
    if not isinstance(entries, list):
        return []
    found = []
    for entry in entries:
        value = entry.get(key) if isinstance(entry, dict) else None
        if isinstance(value, str) and is_digest(value):
            found.append(value)
    return found
