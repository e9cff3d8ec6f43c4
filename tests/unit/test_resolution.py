"""Resolver mode's decisions: which image and reference a request means, or why none."""

from __future__ import annotations

import dataclasses
import json

import pytest

from balena_registry_proxy.errors import RegistryError
from balena_registry_proxy.release_names import parse_name
from balena_registry_proxy.releases import App, Image
from balena_registry_proxy.resolution import (
    MAX_PAGE,
    Listing,
    Search,
    Target,
    listing_body,
    next_link,
    not_found,
    resolve,
    unknown_app,
)
from balena_registry_proxy.routes import parse_target

from .test_releases import DIGEST, STACK, WEB

OTHER = "sha256:" + "2" * 64
KEYWORDS = ["current", "default", "latest", "pinned"]


def outcome(target: str, app: App = WEB, look_first: tuple[str, ...] = ()) -> object:
    route = parse_target(target)
    assert route.repository is not None
    name = parse_name(route.repository)
    assert name is not None
    return resolve(route, name, app, look_first=look_first)


def refusal(target: str, app: App = WEB) -> RegistryError:
    with pytest.raises(RegistryError) as refused:
        outcome(target, app)
    return refused.value


def repo(n: int) -> str:
    return f"v2/{n:032x}"


@pytest.mark.parametrize(
    ("target", "repository", "by_tag"),
    [
        ("/v2/gh_acme/web/manifests/latest", repo(2), True),
        ("/v2/gh_acme/web/manifests/pinned", repo(2), True),
        ("/v2/gh_acme/web/manifests/1.2.3", repo(3), True),
        ("/v2/gh_acme/web/manifests/1.3.0", repo(5), True),
        ("/v2/gh_acme/web/manifests/1.4.0-1700000000000", repo(6), True),
        ("/v2/gh_acme/web/1.3.0/manifests/latest", repo(5), False),
        # The name's version wins: the tag is ignored, as in alias mode.
        ("/v2/gh_acme/web/1.3.0/manifests/1.2.3", repo(5), False),
        ("/v2/gh_acme/stack/api/manifests/latest", repo(101), True),
        ("/v2/gh_acme/stack/api/manifests/1.1.0", repo(111), True),
        ("/v2/gh_acme/stack/1.1.0/db/manifests/whatever", repo(112), False),
    ],
)
def test_manifests_by_tag_go_to_the_release_by_its_content_hash(
    target: str, repository: str, by_tag: bool
) -> None:
    result = outcome(target, STACK if "stack" in target else WEB)
    assert result == Target(
        next(
            i
            for r in (STACK.releases + WEB.releases)
            for i in r.images
            if i.repository == repository
        ),
        DIGEST,
        chosen_by_tag=by_tag,
    )


def test_without_a_content_hash_the_tag_latest_upstream() -> None:
    release = dataclasses.replace(WEB.releases[-1], images=(Image("main", repo(1), None),))
    app = App(WEB.slug, release.id, (release,))
    result = outcome("/v2/gh_acme/web/manifests/1.2.3", app)
    assert isinstance(result, Target)
    assert result.reference == "latest"


@pytest.mark.parametrize("kind", ["blobs", "manifests", "referrers"])
def test_digests_under_a_named_version_go_to_its_image(kind: str) -> None:
    result = outcome(f"/v2/gh_acme/stack/1.1.0/api/{kind}/{OTHER}", STACK)
    assert isinstance(result, Target)
    assert (result.image.repository, result.reference) == (repo(111), OTHER)
    assert not result.chosen_by_tag


def test_digests_under_a_tag_chosen_name_are_searched_for() -> None:
    result = outcome(f"/v2/gh_acme/web/blobs/{OTHER}")
    assert isinstance(result, Search)
    assert result.digest == OTHER
    assert [i.repository for i in result.images] == [repo(n) for n in (2, 6, 5, 4, 3, 1)]
    hinted = outcome(f"/v2/gh_acme/web/blobs/{OTHER}", look_first=(repo(3),))
    assert isinstance(hinted, Search)
    assert hinted.images[0].repository == repo(3)


def test_a_manifest_digest_the_api_knows_needs_no_search() -> None:
    release = dataclasses.replace(WEB.releases[1], images=(Image("main", repo(5), OTHER),))
    app = dataclasses.replace(WEB, releases=(WEB.releases[0], release, *WEB.releases[2:]))
    result = outcome(f"/v2/gh_acme/web/manifests/{OTHER}", app)
    assert isinstance(result, Target)
    assert (result.image.repository, result.reference) == (repo(5), OTHER)


def test_referrers_tags_are_searched_for_their_digest() -> None:
    result = outcome("/v2/gh_acme/web/manifests/sha256-" + "2" * 64 + ".sig")
    assert isinstance(result, Search)
    assert result.digest == OTHER
    named = outcome("/v2/gh_acme/web/1.3.0/manifests/sha256-" + "2" * 64)
    assert isinstance(named, Target)
    assert named.reference == "sha256-" + "2" * 64


def test_tags_are_listed_for_app_and_service_names() -> None:
    assert outcome("/v2/gh_acme/web/tags/list") == Listing(("1.2.3", "1.3.0", *KEYWORDS), False)
    assert outcome("/v2/gh_acme/stack/db/tags/list", STACK) == Listing(
        ("1.0.0", "1.1.0", *KEYWORDS), False
    )
    # With a version in the name, the registry lists the one image's tags.
    named = outcome("/v2/gh_acme/web/1.3.0/tags/list")
    assert isinstance(named, Target)
    assert (named.image.repository, named.reference) == (repo(5), None)


def test_pages() -> None:
    first = outcome("/v2/gh_acme/web/tags/list?n=2")
    assert first == Listing(("1.2.3", "1.3.0"), True)
    route = parse_target("/v2/gh_acme/web/tags/list?n=2")
    assert isinstance(first, Listing)
    assert next_link(route, first) == '</v2/gh_acme/web/tags/list?last=1.3.0&n=2>; rel="next"'
    second = outcome("/v2/gh_acme/web/tags/list?n=2&last=1.3.0")
    assert second == Listing(("current", "default"), True)
    last = outcome("/v2/gh_acme/web/tags/list?last=default")
    assert last == Listing(("latest", "pinned"), False)
    assert isinstance(last, Listing)
    assert next_link(parse_target("/v2/gh_acme/web/tags/list?last=default"), last) is None


@pytest.mark.parametrize("n", ["-1", "x", "1.5", str(MAX_PAGE + 1), "9" * 40, "%C2%B2", "%D9%A3"])
def test_a_count_that_is_no_count_is_refused(n: str) -> None:
    error = refusal(f"/v2/gh_acme/web/tags/list?n={n}")
    assert (error.status, error.code) == (400, "PAGINATION_NUMBER_INVALID")


def test_listing_body() -> None:
    body = listing_body("gh_acme/web", Listing(("1.0.0", "latest"), False))
    assert json.loads(body) == {"name": "gh_acme/web", "tags": ["1.0.0", "latest"]}


@pytest.mark.parametrize(
    ("target", "status", "code", "words"),
    [
        ("/v2/gh_acme/web/manifests/9.9.9", 404, "MANIFEST_UNKNOWN", "no successful release 9.9.9"),
        ("/v2/gh_acme/web/9.9.9/manifests/latest", 404, "NAME_UNKNOWN", "tags/list"),
        ("/v2/gh_acme/stack/manifests/latest", 404, "NAME_UNKNOWN", "as in gh_acme/stack/api"),
        ("/v2/gh_acme/stack/manifests/1.1.0", 404, "NAME_UNKNOWN", "gh_acme/stack/api:1.1.0"),
        (
            "/v2/gh_acme/stack/1.0.0/manifests/latest",
            404,
            "NAME_UNKNOWN",
            "gh_acme/stack/1.0.0/api",
        ),
        ("/v2/gh_acme/stack/nope/manifests/latest", 404, "NAME_UNKNOWN", "no service nope"),
        (
            "/v2/gh_acme/web/v1.3.0/manifests/latest",
            404,
            "NAME_UNKNOWN",
            "without 'v', as 1.2.3",
        ),
        ("/v2/gh_acme/web/1.3/manifests/latest", 404, "NAME_UNKNOWN", "written in full"),
        (
            "/v2/gh_acme/stack/nope/tags/list",
            404,
            "NAME_UNKNOWN",
            "no release of gh_acme/stack has",
        ),
        ("/v2/gh_acme/stack/tags/list", 404, "NAME_UNKNOWN", "list the tags of one"),
        (f"/v2/gh_acme/stack/nope/blobs/{OTHER}", 404, "NAME_UNKNOWN", "has a service nope"),
        (f"/v2/gh_acme/stack/blobs/{OTHER}", 404, "NAME_UNKNOWN", "no release that"),
    ],
)
def test_refusals_say_what_to_write(target: str, status: int, code: str, words: str) -> None:
    error = refusal(target, STACK if "stack" in target else WEB)
    assert (error.status, error.code) == (status, code)
    assert words in error.message


def test_the_services_are_listed_in_the_detail() -> None:
    error = refusal("/v2/gh_acme/stack/nope/manifests/latest", STACK)
    assert error.detail == {"name": "gh_acme/stack/nope", "services": ["api", "db", "web"]}
    assert "its services are api, db, web" in error.message


def test_an_app_without_a_pinned_release() -> None:
    error = refusal("/v2/gh_acme/web/manifests/latest", dataclasses.replace(WEB, pinned=None))
    assert error.code == "MANIFEST_UNKNOWN"
    assert "no pinned release" in error.message


def test_unknown_apps() -> None:
    anonymous = unknown_app("o/a/1.0.0", "o/a", anonymous=True, host="proxy.example")
    assert (anonymous.status, anonymous.code) == (401, "UNAUTHORIZED")
    assert "docker login proxy.example" in anonymous.message
    known = unknown_app("o/a", "o/a", anonymous=False, host="proxy.example")
    assert (known.status, known.code) == (404, "NAME_UNKNOWN")


def test_not_found_after_a_search() -> None:
    route = parse_target(f"/v2/gh_acme/web/blobs/{OTHER}")
    search = Search((), OTHER)
    assert not_found(route, search).code == "BLOB_UNKNOWN"
    manifest = parse_target(f"/v2/gh_acme/web/manifests/{OTHER}")
    assert not_found(manifest, search).code == "MANIFEST_UNKNOWN"


NO_9_9_9 = (
    "gh_acme/web has no successful release 9.9.9 (its versions: GET /v2/gh_acme/web/tags/list; "
    "a final version pulls its newest revision, drafts need their full version, any release "
    "its commit)"
)
NOT_WRITTEN_IN_FULL = (
    "gh_acme/web has no service {}; a version is written in full and without 'v', as 1.2.3 "
    "(its versions: GET /v2/gh_acme/web/tags/list)"
)
STACK_SERVICES = ["api", "db", "web"]


@pytest.mark.parametrize(
    ("target", "code", "message", "detail"),
    [
        (
            "/v2/gh_acme/web/manifests/9.9.9",
            "MANIFEST_UNKNOWN",
            NO_9_9_9,
            {"name": "gh_acme/web", "tag": "9.9.9"},
        ),
        ("/v2/gh_acme/web/9.9.9/manifests/latest", "NAME_UNKNOWN", NO_9_9_9, None),
        (f"/v2/gh_acme/web/9.9.9/blobs/{OTHER}", "NAME_UNKNOWN", NO_9_9_9, None),
        (
            "/v2/gh_acme/stack/manifests/latest",
            "NAME_UNKNOWN",
            "gh_acme/stack's pinned release has several services (api, db, web): name one, as "
            "in gh_acme/stack/api",
            STACK_SERVICES,
        ),
        (
            "/v2/gh_acme/stack/manifests/1.1.0",
            "NAME_UNKNOWN",
            "release 1.1.0 of gh_acme/stack has several services (api, db): name one, as in "
            "gh_acme/stack/api:1.1.0",
            ["api", "db"],
        ),
        (
            "/v2/gh_acme/stack/1.0.0/manifests/latest",
            "NAME_UNKNOWN",
            "release 1.0.0 of gh_acme/stack has several services (api, db, web): name one, as "
            "in gh_acme/stack/1.0.0/api",
            STACK_SERVICES,
        ),
        (
            "/v2/gh_acme/stack/nope/manifests/latest",
            "NAME_UNKNOWN",
            "gh_acme/stack's pinned release has no service nope; its services are api, db, web "
            "(as in gh_acme/stack/api)",
            STACK_SERVICES,
        ),
        (
            "/v2/gh_acme/stack/latest/nope/manifests/latest",
            "NAME_UNKNOWN",
            "gh_acme/stack's pinned release has no service nope; its services are api, db, web "
            "(as in gh_acme/stack/latest/api)",
            STACK_SERVICES,
        ),
        (
            "/v2/gh_acme/web/v1.3.0/manifests/latest",
            "NAME_UNKNOWN",
            NOT_WRITTEN_IN_FULL.format("v1.3.0"),
            ["main"],
        ),
        (
            "/v2/gh_acme/web/1.3/manifests/latest",
            "NAME_UNKNOWN",
            NOT_WRITTEN_IN_FULL.format("1.3"),
            ["main"],
        ),
        (
            "/v2/gh_acme/stack/nope/tags/list",
            "NAME_UNKNOWN",
            "no release of gh_acme/stack has a service nope",
            None,
        ),
        (
            "/v2/gh_acme/stack/tags/list",
            "NAME_UNKNOWN",
            "the releases of gh_acme/stack have several services (api, db, web): list the tags "
            "of one, as gh_acme/stack/api",
            None,
        ),
        (
            f"/v2/gh_acme/stack/nope/blobs/{OTHER}",
            "NAME_UNKNOWN",
            "no release of gh_acme/stack has a service nope",
            None,
        ),
        (
            f"/v2/gh_acme/stack/blobs/{OTHER}",
            "NAME_UNKNOWN",
            "gh_acme/stack has no release that gh_acme/stack can pull",
            None,
        ),
    ],
)
def test_each_refusal_says_exactly_what_and_for_which_name(
    target: str, code: str, message: str, detail: dict[str, str] | list[str] | None
) -> None:
    error = refusal(target, STACK if "stack" in target else WEB)
    assert (error.status, error.code, error.message) == (404, code, message)
    name = parse_target(target).repository
    assert name is not None
    if isinstance(detail, list):
        assert error.detail == {"name": name, "services": detail}
    else:
        assert error.detail == (detail or {"name": name})


def test_without_a_pinned_release_the_keywords_are_refused() -> None:
    unpinned = dataclasses.replace(WEB, pinned=None)
    message = "gh_acme/web has no pinned release that can be pulled"
    by_tag = refusal("/v2/gh_acme/web/manifests/latest", unpinned)
    assert (by_tag.code, by_tag.message) == ("MANIFEST_UNKNOWN", message)
    assert by_tag.detail == {"name": "gh_acme/web", "tag": "latest"}
    by_name = refusal("/v2/gh_acme/web/latest/manifests/x", unpinned)
    assert (by_name.code, by_name.message) == ("NAME_UNKNOWN", message)
    assert by_name.detail == {"name": "gh_acme/web/latest"}


def test_unknown_apps_say_exactly_what_to_do() -> None:
    anonymous = unknown_app("o/a/1.0.0", "o/a", anonymous=True, host="proxy.example")
    assert anonymous.message == (
        "o/a is no public app: if it is private, log in with 'docker login proxy.example' "
        "(a balena username and API key)"
    )
    known = unknown_app("o/a/1.0.0", "o/a", anonymous=False, host="proxy.example")
    assert known.message == "o/a is no app that these credentials can read"
    assert anonymous.detail == known.detail == {"name": "o/a/1.0.0"}


def test_not_found_after_a_search_names_the_digest() -> None:
    error = not_found(parse_target(f"/v2/gh_acme/web/blobs/{OTHER}"), Search((), OTHER))
    assert (error.status, error.message) == (
        404,
        f"no release of gh_acme/web that the proxy looked in holds {OTHER}",
    )
    assert error.detail == {"name": "gh_acme/web", "digest": OTHER}


@pytest.mark.parametrize(
    ("n", "shown"),
    [
        ("10000", 6),
        ("010000", 6),
        ("0", 0),
        ("10001", None),
        ("0010000", None),
        ("9" * 40, None),
        ("", None),
    ],
)
def test_pages_of_up_to_ten_thousand_tags(n: str, shown: int | None) -> None:
    # The count's text is bounded (six characters) before it is read as a number.
    target = f"/v2/gh_acme/web/tags/list?n={n}"
    if shown is not None:
        listing = outcome(target)
        assert isinstance(listing, Listing)
        assert len(listing.tags) == shown
        return
    error = refusal(target)
    assert error.message == "n must be a whole number from 0 to 10000"
    # A long one is cut in the detail.
    assert error.detail == {"n": n if len(n) < 40 else "9" * 32}


def test_a_digest_is_matched_exactly_not_by_order() -> None:
    # Every content hash of WEB sorts after this digest: none of them is it.
    lowest = "sha256:" + "0" * 64
    result = outcome(f"/v2/gh_acme/web/manifests/{lowest}")
    assert isinstance(result, Search)
    assert result.digest == lowest


def test_the_next_link_continues_after_the_last_tag_of_the_page() -> None:
    route = parse_target("/v2/gh_acme/web/tags/list?n=3")
    first = outcome(route.target())
    assert first == Listing(("1.2.3", "1.3.0", "current"), True)
    assert isinstance(first, Listing)
    assert next_link(route, first) == '</v2/gh_acme/web/tags/list?last=current&n=3>; rel="next"'


@pytest.mark.parametrize(
    ("images", "tags"),
    [
        # Single-image releases without a final version list nothing, and that is no mistake;
        # nor is a release whose images were all left out.
        ((Image("main", repo(1), DIGEST),), ()),
        ((), ()),
    ],
)
def test_an_app_with_nothing_to_list_lists_nothing(
    images: tuple[Image, ...], tags: tuple[str, ...]
) -> None:
    draft = dataclasses.replace(WEB.releases[0], images=images)
    app = App(WEB.slug, None, (draft,))
    assert outcome("/v2/gh_acme/web/tags/list", app) == Listing(tags, False)


def test_releases_of_two_services_are_listed_by_service() -> None:
    app = dataclasses.replace(STACK, releases=STACK.releases[:1], pinned=None)
    assert refusal("/v2/gh_acme/stack/tags/list", app).message == (
        "the releases of gh_acme/stack have several services (api, db): list the tags of one, "
        "as gh_acme/stack/api"
    )


def test_a_release_without_a_usable_image_says_so() -> None:
    pinned = next(r for r in WEB.releases if r.id == WEB.pinned)
    bare = dataclasses.replace(
        WEB,
        releases=tuple(
            dataclasses.replace(r, images=()) if r is pinned else r for r in WEB.releases
        ),
    )
    error = refusal("/v2/gh_acme/web/manifests/latest", bare)
    assert (error.status, error.code) == (404, "NAME_UNKNOWN")
    assert error.message == "gh_acme/web's pinned release has no image that can be pulled"
    assert error.detail == {"name": "gh_acme/web", "services": []}
