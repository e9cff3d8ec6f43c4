"""What a client's image name asks for in resolver mode: an app, a version, a service.

Pure functions, no I/O. The forms, and how the third path component is read:

- ``<org>/<app>``: the app; the version comes from the tag (``:latest``, ``:1.2.3``, ...).
- ``<org>/<app>/<version>``: that version; the tag is ignored, as in alias mode.
- ``<org>/<app>/<service>``: that service; the version comes from the tag.
- ``<org>/<app>/<version>/<service>``: that service of that version; the tag is ignored.

A third component is a version when it is a keyword (``latest``, ``current``, ``default``,
``pinned``), a release commit (32 or 40 hexadecimal digits) or starts like a semantic version
(``1.2.3``, ``1.2.3-1700000000000``); anything else names a service. A service whose name
looks like a version can be pulled with the version written out: ``<org>/<app>/latest/<svc>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

KEYWORDS = frozenset({"latest", "current", "default", "pinned"})
"""Versions that mean the app's pinned release (its target, which tracks the newest final
release unless the app is pinned)."""

_COMMIT_RE = re.compile(r"[0-9a-f]{32}|[0-9a-f]{40}")
# A version as an image name or tag can spell it: no '+' (so no '+rev2'), a prerelease after
# '-' (drafts are 1.2.3-<milliseconds>).
_VERSION_RE = re.compile(r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)(-[0-9A-Za-z.-]+)?")


@dataclass(frozen=True, slots=True)
class ReleaseName:
    """An image name read as a balena app, a version and a service."""

    app: str
    """The app's slug, ``<org>/<app>``."""
    version: str | None
    """The version the name itself gives; None when it comes from the tag (or is unknown, for
    requests by digest)."""
    service: str | None
    """The service the name gives; None for the release's only image."""

    @property
    def version_from_tag(self) -> bool:
        """Whether a manifest's tag chooses the release (the name names no version)."""
        return self.version is None


def is_version(text: str) -> bool:
    """Whether ``text``, as a third path component, is read as a version (else a service)."""
    return text in KEYWORDS or _COMMIT_RE.fullmatch(text) is not None or is_semver(text)


def is_semver(text: str) -> bool:
    """Whether ``text`` is a semantic version as image names and tags can write it."""
    return _VERSION_RE.fullmatch(text) is not None


def is_keyword(version: str | None) -> bool:
    """Whether ``version`` means the pinned release (no version at all does too)."""
    return version is None or version in KEYWORDS


def parse_name(repository: str) -> ReleaseName | None:
    """Read a repository name (already valid by the OCI grammar) as an app, version and
    service; None for names of another shape (one component, or more than four)."""
    parts = repository.split("/")
    if len(parts) < 2 or len(parts) > 4:
        return None
    app = f"{parts[0]}/{parts[1]}"
    if len(parts) == 2:
        return ReleaseName(app, None, None)
    if len(parts) == 3:
        third = parts[2]
        if is_version(third):
            return ReleaseName(app, third, None)
        return ReleaseName(app, None, third)
    return ReleaseName(app, parts[2], parts[3])
