"""Resolver mode: what a request under a balena name means, given the app the API described.

Pure functions, no I/O. ``resolve`` turns a route and the app into one of three outcomes:
``Target`` (this image's repository, with this reference), ``Search`` (a digest asked for
under a name whose version only a tag told: which release holds it is found by reading their
manifests), or ``Listing`` (the tags the proxy answers itself). What cannot be pulled is a
``RegistryError`` that says why and how to write the name instead.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote

from .errors import RegistryError, bad_request
from .release_names import ReleaseName, is_keyword
from .releases import (
    App,
    Image,
    NoImage,
    NoRelease,
    candidates,
    image_of,
    listed_tags,
    page,
    select,
)
from .rewrite import UPSTREAM_TAG, is_referrers_tag
from .routes import Kind, Route

# Tags a page may hold at most, as distribution bounds its own.
MAX_PAGE = 10_000
# A name part meant as a version but written as none is (v1.2.3, 1.3, 1.2.3_beta).
_VERSION_LIKE_RE = re.compile(r"v?\d+(?:\.\d+)*(?:[-_.].*)?")


@dataclass(frozen=True, slots=True)
class Target:
    """The request goes to ``image``'s repository, asking for ``reference``."""

    image: Image
    reference: str | None
    chosen_by_tag: bool = False
    """The client's tag chose the release: later requests by digest under the same name
    should look in this image first."""


@dataclass(frozen=True, slots=True)
class Search:
    """``digest`` is in one of ``images`` (most likely first), or in none of them."""

    images: tuple[Image, ...]
    digest: str


@dataclass(frozen=True, slots=True)
class Listing:
    """The tags of the name, answered by the proxy."""

    tags: tuple[str, ...]
    more: bool
    """More tags follow the page: the answer links to the next one."""


def resolve(
    route: Route, name: ReleaseName, app: App, *, look_first: tuple[str, ...] = ()
) -> Target | Search | Listing:
    """What ``route`` (under ``name``, of ``app``) means.

    ``look_first``: repositories to search first for a digest (where this caller's last tag
    of this name led). Raises ``RegistryError`` for versions, services and digests the app
    does not have.
    """
    assert route.repository is not None
    if route.kind is Kind.TAGS and name.version_from_tag:
        return _listing(route, name, app)
    reference = route.reference
    if route.kind is Kind.MANIFEST and not route.by_digest and not is_referrers_tag(reference):
        version = name.version if name.version is not None else reference
        image = _image(route, name, app, version, by_tag=name.version is None)
        return Target(image, image.content_hash or UPSTREAM_TAG, chosen_by_tag=name.version is None)
    if name.version is not None or route.kind is Kind.TAGS:
        return Target(_image(route, name, app, name.version, by_tag=False), reference)
    assert reference is not None
    digest = (
        f"sha256:{reference[len('sha256-') :][:64]}" if is_referrers_tag(reference) else reference
    )
    images = tuple(candidates(app, name.service, look_first))
    for image in images:
        if image.content_hash == digest:
            return Target(image, reference)
    if not images:
        raise _no_candidates(route.repository, name, app)
    return Search(images, digest)


def not_found(route: Route, search: Search) -> RegistryError:
    """The answer when no release of the name holds the digest a search looked for."""
    assert route.repository is not None
    code = "BLOB_UNKNOWN" if route.kind is Kind.BLOB else "MANIFEST_UNKNOWN"
    return RegistryError(
        404,
        code,
        f"no release of {route.repository} that the proxy looked in holds {search.digest}",
        {"name": route.repository, "digest": search.digest},
    )


def unknown_app(repository: str, app_slug: str, *, anonymous: bool, host: str) -> RegistryError:
    """The answer for an app the API did not describe: unknown, or private to this caller.

    Anonymous callers get a 401 (the name may be a private app's: log in and try again),
    others a 404.
    """
    if anonymous:
        return RegistryError(
            401,
            "UNAUTHORIZED",
            f"{app_slug} is no public app: if it is private, log in with "
            f"'docker login {host}' (a balena username and API key)",
            {"name": repository},
        )
    return RegistryError(
        404,
        "NAME_UNKNOWN",
        f"{app_slug} is no app that these credentials can read",
        {"name": repository},
    )


def listing_body(repository: str, listing: Listing) -> bytes:
    """The JSON of a ``tags/list`` answer."""
    document = {"name": repository, "tags": list(listing.tags)}
    return json.dumps(document, separators=(",", ":")).encode()


def next_link(route: Route, listing: Listing) -> str | None:
    """The ``Link`` header to the page after ``listing``, if one follows."""
    if not listing.more or not listing.tags:
        return None
    count, _ = _page_parameters(route.query)
    last = quote(listing.tags[-1], safe="")
    query = f"last={last}" + (f"&n={count}" if count is not None else "")
    return f'<{route.path()}?{query}>; rel="next"'


def _listing(route: Route, name: ReleaseName, app: App) -> Listing:
    assert route.repository is not None
    tags = listed_tags(app, name.service)
    if not tags and (problem := _unlisted(app, name.service)) is not None:
        raise RegistryError(404, "NAME_UNKNOWN", problem, {"name": route.repository})
    count, last = _page_parameters(route.query)
    shown, more = page(tags, count, last)
    return Listing(tuple(shown), more)


def _unlisted(app: App, service: str | None) -> str | None:
    """Why a name lists no tags, when that is a mistake in the name rather than an app with
    no final release."""
    if service is not None and not _has_service(app, service):
        return f"no release of {app.slug} has a service {service}"
    services = sorted({s for release in app.releases for s in release.services})
    if service is None and any(len(release.images) > 1 for release in app.releases):
        return (
            f"the releases of {app.slug} have several services ({', '.join(services)}): "
            f"list the tags of one, as {app.slug}/{services[0]}"
        )
    return None


def _page_parameters(query: str) -> tuple[int | None, str | None]:
    """``n`` and ``last`` of a ``tags/list`` query; a 400 for an ``n`` that is no count."""
    parameters = dict(parse_qsl(query, keep_blank_values=True))
    count = None
    if "n" in parameters:
        text = parameters["n"]
        if not (text.isascii() and text.isdigit()) or len(text) > 6 or int(text) > MAX_PAGE:
            raise bad_request(
                "PAGINATION_NUMBER_INVALID",
                f"n must be a whole number from 0 to {MAX_PAGE}",
                {"n": text[:32]},
            )
        count = int(text)
    return count, parameters.get("last")


def _image(
    route: Route, name: ReleaseName, app: App, version: str | None, *, by_tag: bool
) -> Image:
    assert route.repository is not None
    try:
        release = select(app, version)
    except NoRelease:
        raise _no_release(route.repository, app, version, by_tag=by_tag) from None
    try:
        return image_of(release, name.service)
    except NoImage as missing:
        raise _no_image(route.repository, name, version, missing) from None


def _no_release(repository: str, app: App, version: str | None, *, by_tag: bool) -> RegistryError:
    if is_keyword(version):
        message = f"{app.slug} has no pinned release that can be pulled"
    else:
        message = (
            f"{app.slug} has no successful release {version} (its versions: "
            f"GET /v2/{app.slug}/tags/list; a final version pulls its newest revision, "
            "drafts need their full version, any release its commit)"
        )
    if by_tag:
        return RegistryError(404, "MANIFEST_UNKNOWN", message, {"name": repository, "tag": version})
    return RegistryError(404, "NAME_UNKNOWN", message, {"name": repository})


def _no_image(
    repository: str, name: ReleaseName, version: str | None, missing: NoImage
) -> RegistryError:
    services = missing.release.services
    if is_keyword(version):
        what = f"{name.app}'s pinned release"
    else:
        what = f"release {version} of {name.app}"
    if not services:
        # A release whose images the API described none of usably: nothing to name.
        message = f"{what} has no image that can be pulled"
        return RegistryError(404, "NAME_UNKNOWN", message, {"name": repository, "services": []})
    first = services[0]
    if name.version is not None:
        example = f"{name.app}/{name.version}/{first}"
    else:
        example = f"{name.app}/{first}" + ("" if is_keyword(version) else f":{version}")
    if missing.service is None:
        message = f"{what} has several services ({', '.join(services)}): name one, as in {example}"
    elif name.version is None and _looks_like_version(missing.service):
        # The third part of the name was meant as a version, written as no version is.
        message = (
            f"{name.app} has no service {missing.service}; a version is written in full and "
            f"without 'v', as 1.2.3 (its versions: GET /v2/{name.app}/tags/list)"
        )
    else:
        message = (
            f"{what} has no service {missing.service}; its services are "
            f"{', '.join(services)} (as in {example})"
        )
    return RegistryError(
        404, "NAME_UNKNOWN", message, {"name": repository, "services": list(services)}
    )


def _no_candidates(repository: str, name: ReleaseName, app: App) -> RegistryError:
    if name.service is not None and not _has_service(app, name.service):
        message = f"no release of {app.slug} has a service {name.service}"
    else:
        message = f"{app.slug} has no release that {repository} can pull"
    return RegistryError(404, "NAME_UNKNOWN", message, {"name": repository})


def _looks_like_version(text: str) -> bool:
    """Whether a name part that is no version by the rules was meant as one (``v1.2.3``)."""
    return _VERSION_LIKE_RE.fullmatch(text) is not None


def _has_service(app: App, service: str) -> bool:
    return any(service in release.services for release in app.releases)
