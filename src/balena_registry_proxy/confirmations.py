"""Which clients the upstream said may read which content, and when: the cache's memory of it.

Pure, no I/O; the time is passed in. A confirmation is remembered per credentials, repository
AND digest; never per credentials and repository alone, because the registry serves content
only under a repository that links it. Credentials are kept as a hash, never as they came.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

CONFIRMATION_SECONDS = 60.0
_REMEMBERED = 10_000
Key = tuple[str, str, str]
"""(credentials, repository, digest)."""


def key(credentials: str, repository: str, digest: str) -> Key:
    """The key of a confirmation; ``credentials`` (an Authorization value) only as a hash."""
    hashed = hashlib.sha256(credentials.encode("utf-8", "surrogateescape")).hexdigest()
    return hashed, repository, digest


class Confirmations:
    """Confirmations of (credentials, repository, digest), the most recent 10,000."""

    def __init__(self) -> None:
        """An empty memory."""
        self._seen: OrderedDict[Key, float] = OrderedDict()
        self._linked: OrderedDict[tuple[str, str], None] = OrderedDict()

    def fresh(self, confirmation: Key, now: float) -> bool:
        """Whether it was confirmed within the last ``CONFIRMATION_SECONDS``."""
        when = self._seen.get(confirmation)
        return when is not None and now - when <= CONFIRMATION_SECONDS

    def ever(self, confirmation: Key) -> bool:
        """Whether it was ever confirmed (what offline serving relies on)."""
        return confirmation in self._seen

    def linked(self, repository: str, digest: str) -> bool:
        """Whether the upstream ever confirmed ``digest`` under ``repository``, for anyone."""
        return (repository, digest) in self._linked

    def remember(self, confirmation: Key, now: float) -> None:
        """Note a confirmation at ``now``."""
        self._seen[confirmation] = now
        self._seen.move_to_end(confirmation)
        self._linked[confirmation[1:]] = None
        self._linked.move_to_end(confirmation[1:])
        if len(self._seen) > _REMEMBERED:
            self._seen.popitem(last=False)
        if len(self._linked) > _REMEMBERED:
            self._linked.popitem(last=False)
