"""An app's releases as the API describes them: reading the answer, choosing a release."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from balena_registry_proxy.releases import (
    App,
    Image,
    NoImage,
    NoRelease,
    Release,
    candidates,
    image_of,
    listed_tags,
    page,
    parse_app,
    select,
)

DIGEST = "sha256:" + "1" * 64


def image(service: str, n: int, digest: str | None = DIGEST) -> Image:
    return Image(service, f"v2/{n:032x}", digest)


def release(
    release_id: int,
    semver: str,
    *,
    revision: int | None = 0,
    images: tuple[Image, ...] | None = None,
    invalidated: bool = False,
    raw: str | None = None,
) -> Release:
    final = revision is not None
    return Release(
        id=release_id,
        commit=f"{release_id:032x}",
        semver=semver,
        raw_version=raw or (semver if not revision else f"{semver}+rev{revision}"),
        revision=revision,
        is_final=final,
        is_invalidated=invalidated,
        images=images if images is not None else (image("main", release_id),),
    )


# Newest first, as the API is asked to order them.
WEB = App(
    "gh_acme/web",
    pinned=2,
    releases=(
        release(6, "1.4.0", revision=None, raw="1.4.0-1700000000000"),
        release(5, "1.3.0"),
        release(4, "1.2.4", invalidated=True),
        release(3, "1.2.3", revision=2),
        release(2, "1.2.3", revision=1),
        release(1, "1.2.3", revision=0),
    ),
)
STACK = App(
    "gh_acme/stack",
    pinned=10,
    releases=(
        release(11, "1.1.0", images=(image("api", 111), image("db", 112))),
        release(10, "1.0.0", images=(image("api", 101), image("db", 102), image("web", 103))),
    ),
)


def row(release: Release) -> dict[str, Any]:
    return {
        "id": release.id,
        "commit": release.commit,
        "semver": release.semver,
        "raw_version": release.raw_version,
        "revision": release.revision,
        "is_final": release.is_final,
        "is_invalidated": release.is_invalidated,
        "release_image": [
            {
                "id": n,
                "image": [
                    {
                        "is_stored_at__image_location": f"registry2.example/{i.repository}",
                        "content_hash": i.content_hash,
                        "is_a_build_of__service": [{"service_name": i.service}],
                    }
                ],
            }
            for n, i in enumerate(release.images)
        ],
    }


def answer(app: App) -> dict[str, Any]:
    return {
        "d": [
            {
                "id": 1,
                "slug": app.slug,
                "should_be_running__release": [{"id": app.pinned}] if app.pinned else [],
                "owns__release": [row(r) for r in app.releases],
            }
        ]
    }


def test_the_answer_is_read_back_whole() -> None:
    assert parse_app(answer(WEB)) == WEB
    assert parse_app(answer(STACK)) == STACK


def test_an_empty_answer_is_no_app() -> None:
    assert parse_app({"d": []}) is None


def test_the_location_host_is_dropped_and_bad_entries_are_skipped() -> None:
    document = answer(STACK)
    rows = document["d"][0]["owns__release"]
    rows[0]["release_image"][0]["image"][0]["is_stored_at__image_location"] = "host/Not Valid"
    rows[0]["release_image"][1]["image"][0]["content_hash"] = "not a digest"
    rows.append({"id": "x"})
    parsed = parse_app(document)
    assert parsed is not None
    assert parsed.releases[0].images == (Image("db", "v2/" + f"{112:032x}", None),)
    assert len(parsed.releases) == 2


def test_no_pinned_release() -> None:
    document = answer(WEB)
    document["d"][0]["should_be_running__release"] = []
    parsed = parse_app(document)
    assert parsed is not None
    assert parsed.pinned is None
    with pytest.raises(NoRelease):
        select(parsed, "latest")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=30,
)


@given(json_values)
def test_any_json_is_read_without_a_crash(document: object) -> None:
    parsed = parse_app(document)
    assert parsed is None or isinstance(parsed, App)


@given(st.lists(st.sampled_from(["id", "slug", "owns__release", "d"]), max_size=5), json_values)
def test_any_shape_under_the_known_keys_is_read_without_a_crash(
    keys: list[str], value: object
) -> None:
    document: object = value
    for key in keys:
        document = {key: [document]}
    parse_app({"d": [{"slug": "o/a", "owns__release": [document]}]})


@pytest.mark.parametrize(
    ("version", "release_id"),
    [
        (None, 2),
        ("latest", 2),
        ("current", 2),
        ("default", 2),
        ("pinned", 2),
        ("1.2.3", 3),  # the newest revision
        ("1.3.0", 5),
        ("1.2.4", 4),  # invalidated: still pullable when asked for
        ("1.4.0-1700000000000", 6),  # a draft by its full version
        (f"{1:032x}", 1),  # any release by its commit
    ],
)
def test_select(version: str | None, release_id: int) -> None:
    assert select(WEB, version).id == release_id


REVOKED_REVISION = App(
    "gh_acme/revoked",
    pinned=1,
    releases=(
        release(2, "1.2.3", revision=1, invalidated=True),
        release(1, "1.2.3", revision=0),
    ),
)


def test_a_version_means_its_newest_revision_that_is_not_invalidated() -> None:
    assert select(REVOKED_REVISION, "1.2.3").id == 1
    assert select(REVOKED_REVISION, f"{2:032x}").id == 2  # still pulled by its commit


@pytest.mark.parametrize("app", [WEB, REVOKED_REVISION])
def test_every_listed_version_pulls_a_release_that_is_not_invalidated(app: App) -> None:
    for tag in listed_tags(app, None):
        assert not select(app, tag).is_invalidated, tag


@pytest.mark.parametrize("version", ["1.4.0", "9.9.9", "1.2.3+rev1", "v1.2.3", f"{99:032x}"])
def test_select_refuses(version: str) -> None:
    with pytest.raises(NoRelease):
        select(WEB, version)


def test_image_of() -> None:
    pinned = select(STACK, None)
    assert image_of(pinned, "db").service == "db"
    with pytest.raises(NoImage) as several:
        image_of(pinned, None)
    assert several.value.service is None
    with pytest.raises(NoImage) as unknown:
        image_of(pinned, "nope")
    assert unknown.value.service == "nope"
    assert unknown.value.release.services == ("api", "db", "web")
    assert image_of(select(WEB, None), None).service == "main"


def test_listed_tags() -> None:
    keywords = ["current", "default", "latest", "pinned"]
    # No draft, no invalidated release, each final version once; lexical order.
    assert listed_tags(WEB, None) == ["1.2.3", "1.3.0", *keywords]
    assert listed_tags(WEB, "main") == ["1.2.3", "1.3.0", *keywords]
    assert listed_tags(STACK, None) == []
    assert listed_tags(STACK, "api") == ["1.0.0", "1.1.0", *keywords]
    # The keywords only where the pinned release has the service.
    assert listed_tags(STACK, "web") == ["1.0.0", *keywords]
    unpinned = App("o/a", None, WEB.releases)
    assert listed_tags(unpinned, None) == ["1.2.3", "1.3.0"]


def test_candidates_pinned_first_then_newest_then_as_hinted() -> None:
    order = [i.repository for i in candidates(WEB, None)]
    assert order == [f"v2/{n:032x}" for n in (2, 6, 5, 4, 3, 1)]
    hinted = [i.repository for i in candidates(WEB, None, [f"v2/{5:032x}"])]
    assert hinted == [f"v2/{n:032x}" for n in (5, 2, 6, 4, 3, 1)]
    # Without a service, only single-image releases; with one, its image of each release.
    assert candidates(STACK, None) == []
    assert [i.service for i in candidates(STACK, "db")] == ["db", "db"]
    assert [i.repository for i in candidates(STACK, "web")] == [f"v2/{103:032x}"]


@given(
    st.lists(st.text("abc", min_size=1, max_size=3), unique=True).map(sorted),
    st.one_of(st.none(), st.integers(0, 10)),
    st.one_of(st.none(), st.text("abc", max_size=3)),
)
def test_pages_cover_the_list_in_order(
    tags: list[str], count: int | None, last: str | None
) -> None:
    shown, more = page(tags, count, last)
    after = [t for t in tags if last is None or t > last]
    assert shown == after[: len(shown)]
    assert more == (len(after) > len(shown))
    if count is not None:
        assert len(shown) == min(count, len(after))
    else:
        assert shown == after


def test_a_release_without_images_has_no_only_image() -> None:
    empty = release(7, "2.0.0", images=())
    with pytest.raises(NoImage) as missing:
        image_of(empty, None)
    assert (missing.value.release, missing.value.service) == (empty, None)


def test_the_app_read_from_the_api_is_immutable() -> None:
    # It is cached and shared by every request of its callers for a while.
    app = parse_app(answer(STACK))
    assert app is not None
    with pytest.raises(dataclasses.FrozenInstanceError):
        app.pinned = 11  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        app.releases[0].is_invalidated = True  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        app.releases[0].images[0].content_hash = None  # type: ignore[misc]


@pytest.mark.parametrize(
    ("key", "value"),
    [("id", "7"), ("commit", 7), ("semver", None), ("raw_version", 1.0), ("revision", "2")],
)
def test_a_release_with_one_field_of_the_wrong_type_is_left_out(key: str, value: object) -> None:
    document = answer(WEB)
    document["d"][0]["owns__release"][1][key] = value
    parsed = parse_app(document)
    assert parsed is not None
    assert [r.id for r in parsed.releases] == [6, 4, 3, 2, 1]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("is_stored_at__image_location", None),
        ("is_a_build_of__service", []),
        ("is_a_build_of__service", ["api"]),
        ("is_a_build_of__service", [{"service_name": 3}]),
    ],
)
def test_an_image_with_one_field_of_the_wrong_shape_is_left_out(key: str, value: object) -> None:
    document = answer(STACK)
    document["d"][0]["owns__release"][0]["release_image"][0]["image"][0][key] = value
    parsed = parse_app(document)
    assert parsed is not None
    assert parsed.releases[0].images == (image("db", 112),)


def test_the_newest_revision_is_the_highest_whatever_the_ids() -> None:
    app = App(
        "o/a",
        None,
        (
            release(9, "1.0.0", revision=0),
            release(3, "1.0.0", revision=2),
            release(5, "1.0.0", revision=1),
        ),
    )
    assert select(app, "1.0.0").id == 3
    first_two = App("o/a", None, (release(9, "1.0.0", revision=0), release(2, "1.0.0", revision=1)))
    assert select(first_two, "1.0.0").id == 2


def test_of_two_drafts_of_one_version_the_newest_is_pulled() -> None:
    drafts = (
        release(8, "2.0.0", revision=None, raw="2.0.0-1"),
        release(7, "2.0.0", revision=None, raw="2.0.0-1"),
    )
    assert select(App("o/a", None, drafts), "2.0.0-1").id == 8


def test_candidates_skip_releases_without_the_service_wherever_they_stand() -> None:
    # Pinned to the newest release, which has no web service: the older one still counts.
    app = dataclasses.replace(STACK, pinned=11)
    assert candidates(app, "web") == [image("web", 103)]
