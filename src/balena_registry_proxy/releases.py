"""An app's releases as the balena API describes them, and which one a version means.

Pure functions, no I/O. ``parse_app`` reads the API's answer to ``api_query.app_query``
(untrusted JSON: anything of the wrong shape is left out, never a crash); ``select`` picks
the release a version means, ``image_of`` the image a service means, ``listed_tags`` what
``tags/list`` shows, and ``candidates`` where a digest asked for under a tag-chosen name may be.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .release_names import KEYWORDS, is_keyword
from .routes import TAG_RE, is_digest, is_valid_name


@dataclass(frozen=True, slots=True)
class Image:
    """One service's image in a release."""

    service: str
    repository: str
    """The upstream repository, ``v2/<hash>``."""
    content_hash: str | None
    """The manifest digest devices pull; None for images built before the API kept it."""


@dataclass(frozen=True, slots=True)
class Release:
    """A successful release of an app."""

    id: int
    commit: str
    semver: str
    raw_version: str
    revision: int | None
    is_final: bool
    is_invalidated: bool
    images: tuple[Image, ...]

    @property
    def services(self) -> tuple[str, ...]:
        """The release's service names, sorted."""
        return tuple(sorted(image.service for image in self.images))


@dataclass(frozen=True, slots=True)
class App:
    """An app's successful releases, newest first, and the one it is pinned to."""

    slug: str
    pinned: int | None
    """The id of the app's target release (``should_be_running__release``)."""
    releases: tuple[Release, ...]

    @property
    def pinned_release(self) -> Release | None:
        """The release the keywords mean, if the app has one the caller may pull."""
        return next((r for r in self.releases if r.id == self.pinned), None)


class NoRelease(Exception):
    """The version names no successful release of the app."""


class NoImage(Exception):
    """The release has no image for the service asked for (or needs one named)."""

    def __init__(self, release: Release, service: str | None) -> None:
        """``service`` is None when the release has several and the name gave none."""
        super().__init__(release.commit, service)
        self.release = release
        self.service = service


def parse_app(document: object) -> App | None:
    """The app in an API answer ``{"d": [app]}``; None when the answer has none (the app is
    unknown, or private to a caller who may not read it: the API does not tell them apart)."""
    rows = _rows(document)
    app = rows[0] if rows else None
    if app is None or not isinstance(app.get("slug"), str):
        return None
    pinned_rows = app.get("should_be_running__release")
    pinned_row = _rows({"d": pinned_rows})
    pinned = pinned_row[0].get("id") if pinned_row else None
    releases = tuple(r for r in (_release(row) for row in _list(app.get("owns__release"))) if r)
    return App(
        slug=app["slug"],
        pinned=pinned if isinstance(pinned, int) else None,
        releases=releases,
    )


def select(app: App, version: str | None) -> Release:
    """The release ``version`` means: keywords (and no version) the pinned one; else a commit,
    a final version (its newest revision that is not invalidated, or, when all are, its newest)
    or a draft's full version. ``NoRelease`` if none."""
    if is_keyword(version):
        release = app.pinned_release
        if release is None:
            raise NoRelease(version)
        return release
    by_commit = [r for r in app.releases if r.commit == version]
    if by_commit:
        return by_commit[0]
    finals = [r for r in app.releases if r.is_final and r.semver == version]
    if finals:
        # An invalidated revision is kept out of what a version means, as balena keeps it out
        # of automatic selection; it is still pulled when nothing else has that version.
        return max(finals, key=lambda r: (not r.is_invalidated, r.revision or 0, r.id))
    drafts = [r for r in app.releases if not r.is_final and r.raw_version == version]
    if drafts:
        return drafts[0]
    raise NoRelease(version)


def image_of(release: Release, service: str | None) -> Image:
    """The image of ``service`` in ``release``, or its only image when ``service`` is None;
    ``NoImage`` otherwise."""
    if service is None:
        if len(release.images) == 1:
            return release.images[0]
        raise NoImage(release, None)
    for image in release.images:
        if image.service == service:
            return image
    raise NoImage(release, service)


def listed_tags(app: App, service: str | None) -> list[str]:
    """What ``tags/list`` shows for the app (or one of its services), in lexical order.

    Every final version that is not invalidated (a tag pulls its newest revision), and the
    keywords when the app has a pinned release. Drafts, failed and invalidated releases are
    left out: they stay pullable by their full version or commit. Commits are left out too:
    a list of 32-digit hashes, one per release, would bury the versions people look for.
    """
    tags = {
        release.semver
        for release in app.releases
        if release.is_final
        and not release.is_invalidated
        and _pullable(release, service)
        and TAG_RE.fullmatch(release.semver)
    }
    pinned = app.pinned_release
    if pinned is not None and _pullable(pinned, service):
        tags.update(KEYWORDS)
    return sorted(tags)


def candidates(app: App, service: str | None, first: Iterable[str] = ()) -> list[Image]:
    """The images a name with a tag-chosen version may mean, most likely first.

    ``first``: repositories to try before the rest (the one this caller's last tag chose);
    then the pinned release's image, then the others, newest first. A name without a service
    means only the images of single-image releases.
    """
    images = []
    ordered = list(app.releases)
    pinned = app.pinned_release
    if pinned is not None:
        ordered.remove(pinned)
        ordered.insert(0, pinned)
    for release in ordered:
        try:
            images.append(image_of(release, service))
        except NoImage:
            continue
    preferred = frozenset(first)
    images.sort(key=lambda image: image.repository not in preferred)
    return images


def page(tags: list[str], count: int | None, last: str | None) -> tuple[list[str], bool]:
    """The ``n``/``last`` page of lexically ordered ``tags``, and whether more follow."""
    if last is not None:
        tags = [tag for tag in tags if tag > last]
    if count is None:
        return tags, False
    return tags[:count], len(tags) > count


def _pullable(release: Release, service: str | None) -> bool:
    try:
        image_of(release, service)
    except NoImage:
        return False
    return True


def _rows(document: object) -> list[Mapping[str, Any]]:
    if not isinstance(document, dict):
        return []
    return [row for row in _list(document.get("d")) if isinstance(row, dict)]


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _release(row: object) -> Release | None:
    if not isinstance(row, dict):
        return None
    release_id, commit, semver, raw_version = (
        row.get(key) for key in ("id", "commit", "semver", "raw_version")
    )
    revision = row.get("revision")
    if (
        not isinstance(release_id, int)
        or not isinstance(commit, str)
        or not isinstance(semver, str)
        or not isinstance(raw_version, str)
        or not (revision is None or isinstance(revision, int))
    ):
        return None
    images = tuple(
        image
        for release_image in _list(row.get("release_image"))
        if isinstance(release_image, dict)
        for image in (_image(i) for i in _list(release_image.get("image")))
        if image is not None
    )
    return Release(
        id=release_id,
        commit=commit,
        semver=semver,
        raw_version=raw_version,
        revision=revision,
        is_final=row.get("is_final") is True,
        is_invalidated=row.get("is_invalidated") is True,
        images=images,
    )


def _image(row: object) -> Image | None:
    if not isinstance(row, dict):
        return None
    location = row.get("is_stored_at__image_location")
    content_hash = row.get("content_hash")
    services = _list(row.get("is_a_build_of__service"))
    service = (
        services[0].get("service_name") if services and isinstance(services[0], dict) else None
    )
    if not isinstance(location, str) or not isinstance(service, str):
        return None
    # A location is <registry host>/<repository>: the host is the API's name for the
    # registry, which need not be how the proxy reaches it.
    _, _, repository = location.partition("/")
    if not is_valid_name(repository):
        return None
    return Image(
        service=service,
        repository=repository,
        content_hash=content_hash
        if isinstance(content_hash, str) and is_digest(content_hash)
        else None,
    )
