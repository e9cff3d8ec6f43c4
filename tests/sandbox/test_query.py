"""Evaluating /v7 queries on the default catalog's rows: values, permissions, SQL semantics."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balena_registry_proxy.sandbox.catalog import Catalog
from balena_registry_proxy.sandbox.model import RESOURCES, Database, build_database
from balena_registry_proxy.sandbox.odata import parse_query, quote_literal
from balena_registry_proxy.sandbox.query import (
    UnknownNameError,
    UnsupportedQueryError,
    run_query,
)
from balena_registry_proxy.sandbox.seed import manifest_digest

REGISTRY = "registry2.test"
STACK_100 = "b9998890955e1a80e7d30b4cbb1c414f"
WEB = "gh_acme/web"


@pytest.fixture(scope="module")
def database(default_catalog: Catalog) -> Database:
    return build_database(default_catalog, REGISTRY)


@pytest.fixture
def q(database: Database, default_catalog: Catalog) -> Any:
    def run(resource: str, raw: str, username: str | None = None) -> list[dict[str, Any]]:
        user = None if username is None else default_catalog.user(username)
        options = parse_query(raw).options
        return run_query(database, resource, options, database.visible(user))

    return run


def of_app(slug: str) -> str:
    return f"$filter=belongs_to__application/any(a:a/slug eq '{slug}')"


# --------------------------------------------------------------------------- values


def test_release_fields_follow_the_balena_model(q: Any) -> None:
    (draft,) = q("release", of_app(WEB) + " and is_final eq false")
    assert set(draft) == set(RESOURCES["release"].fields)
    assert (draft["raw_version"], draft["semver"], draft["revision"]) == (
        "1.4.0-1700000000000",
        "1.4.0",
        None,
    )
    # A draft's raw version ends in its creation time in milliseconds.
    assert draft["created_at"] == "2023-11-14T22:13:20.000Z"
    assert draft["version"]["prerelease"] == [1700000000000]
    assert draft["belongs_to__application"] == {"__id": 1}
    (rev2,) = q("release", of_app(WEB) + " and raw_version eq '1.2.3+rev2'")
    assert (rev2["semver"], rev2["revision"], rev2["is_final"]) == ("1.2.3", 2, True)
    assert rev2["version"]["build"] == ["rev2"]
    (rev0,) = q("release", of_app(WEB) + " and semver eq '1.2.3' and revision eq 0")
    assert rev0["raw_version"] == "1.2.3"


def test_images_carry_their_location_and_seeded_digest(q: Any, default_catalog: Catalog) -> None:
    app, release = default_catalog.release(STACK_100)
    rows = q(
        "image",
        "$select=is_stored_at__image_location,content_hash,status"
        f"&$filter=release_image/any(ri:ri/is_part_of__release/any(r:r/commit eq '{STACK_100}'))"
        "&$expand=is_a_build_of__service($select=service_name)",
    )
    expected = {
        image.service: {
            "is_stored_at__image_location": f"{REGISTRY}/{image.repository}",
            "content_hash": manifest_digest(app, release, image),
            "status": "success",
            "is_a_build_of__service": [{"service_name": image.service}],
        }
        for image in release.images
    }
    assert {r["is_a_build_of__service"][0]["service_name"]: r for r in rows} == expected
    assert set(expected) == {"frontend", "api", "db"}


def test_unexpanded_links_and_nulls(q: Any) -> None:
    (empty,) = q(
        "application",
        "$select=slug,should_be_running__release,organization&$filter=slug eq 'gh_acme/empty'",
    )
    assert empty == {
        "slug": "gh_acme/empty",
        "should_be_running__release": None,
        "organization": {"__id": 1},
    }
    (expanded,) = q(
        "application",
        "$select=id&$filter=slug eq 'gh_acme/empty'&$expand=should_be_running__release",
    )
    assert expanded == {"id": 5, "should_be_running__release": []}


def test_device_types_and_cpu_architectures(q: Any) -> None:
    rows = q(
        "application",
        "$select=slug&$filter=startswith(slug,'gh_acme/browser-')"
        "&$expand=is_for__device_type($select=slug;$expand=is_of__cpu_architecture($select=slug))",
    )
    arches = {
        r["slug"]: r["is_for__device_type"][0]["is_of__cpu_architecture"][0]["slug"] for r in rows
    }
    assert arches == {
        "gh_acme/browser-aarch64": "aarch64",
        "gh_acme/browser-amd64": "amd64",
        "gh_acme/browser-armv7hf": "armv7hf",
    }
    assert [r["slug"] for r in q("cpu_architecture", "$select=slug")] == [
        "rpi",
        "armv7hf",
        "aarch64",
        "i386-nlp",
        "i386",
        "amd64",
    ]
    (pi,) = q(
        "device_type", "$filter=supports__cpu_architecture/any(c:c/slug eq 'rpi')&$select=slug,name"
    )
    assert pi == {"slug": "raspberry-pi", "name": "Raspberry Pi (v1 / Zero / Zero W)"}


def test_synonyms_name_the_same_link(q: Any) -> None:
    by_release = q("release_image", "$select=release,is_part_of__release,contains__image&$top=1")
    assert by_release == [
        {"release": {"__id": 1}, "is_part_of__release": {"__id": 1}, "contains__image": {"__id": 1}}
    ]


# --------------------------------------------------------------------------- permissions


@pytest.mark.parametrize(
    ("username", "visible"),
    [
        (None, {"gh_acme/web", "gh_acme/stack", "gh_acme/multi"}),
        (
            "alice",
            {
                "gh_acme/web",
                "gh_acme/stack",
                "gh_acme/multi",
                "gh_acme/secret",
                "gh_acme/backoffice",
            },
        ),
        ("mallory", {"gh_acme/web", "gh_acme/stack", "gh_acme/multi", "gh_evil/tools"}),
    ],
)
def test_who_reads_which_app(q: Any, username: str | None, visible: set[str]) -> None:
    slugs = {r["slug"] for r in q("application", "$select=slug", username)}
    assert visible <= slugs
    private = {"gh_acme/secret", "gh_acme/backoffice", "gh_evil/tools"}
    assert slugs & private == visible & private


@pytest.mark.parametrize("resource", ["release", "service", "image", "release_image"])
def test_rows_of_private_apps_are_absent_for_guests(q: Any, resource: str) -> None:
    everything = {r["id"] for r in q(resource, "$select=id", "alice")}
    public = {r["id"] for r in q(resource, "$select=id")}
    assert public < everything


def test_private_app_read_anonymously_is_empty_not_refused(q: Any) -> None:
    assert q("release", of_app("gh_acme/secret")) == []
    assert len(q("release", of_app("gh_acme/secret"), "alice")) == 2


def test_navigations_reach_only_readable_rows(q: Any) -> None:
    # An image is readable by its own app's rules, wherever it is reached from.
    rows = q("release_image", "$select=id&$expand=image($select=id)", "alice")
    guest = q("release_image", "$select=id&$expand=image($select=id)")
    assert len(guest) < len(rows)
    assert all(r["image"] for r in guest)


# --------------------------------------------------------------------------- SQL semantics


def test_eq_and_ne_are_null_safe(q: Any) -> None:
    drafts = q("release", of_app(WEB) + " and revision eq null&$select=commit")
    finals = q("release", of_app(WEB) + " and revision ne null&$select=commit")
    assert len(drafts) == 1
    assert len(finals) == 5


def test_unknown_truth_is_not_true_even_negated(q: Any) -> None:
    # invalidation_reason is NULL: startswith() of it is unknown, and so is its negation.
    unset = q("release", of_app(WEB) + " and invalidation_reason eq null&$select=id")
    negated = q("release", of_app(WEB) + " and not startswith(invalidation_reason,'x')&$select=id")
    assert (len(unset), negated) == (6, [])


def test_and_or_group_from_the_left(q: Any) -> None:
    # (public or commit eq X) and slug eq 'gh_acme/multi' -- not public or (... and ...).
    rows = q(
        "application",
        "$select=slug&$filter=is_public eq true or id eq 2 and slug eq 'gh_acme/multi'",
        "alice",
    )
    assert [r["slug"] for r in rows] == ["gh_acme/multi"]


def test_all_and_any(q: Any) -> None:
    rows = q(
        "release",
        "$select=commit&$filter=release_image/all(ri:ri/image/any(i:i/status eq 'success'))"
        " and belongs_to__application/any(a:a/slug eq 'gh_acme/stack')",
    )
    assert len(rows) == 3  # the failed and the running release have images that did not succeed
    # all() over nothing is true, any() false.
    assert q(
        "application",
        "$select=slug&$filter=owns__release/all(r:r/status eq 'x') and slug eq 'gh_acme/empty'",
    )
    assert not q(
        "application", "$select=slug&$filter=owns__release/any(r:true) and slug eq 'gh_acme/empty'"
    )


def test_a_path_through_a_collection_joins_one_row_per_match(q: Any) -> None:
    rows = q(
        "release", f"$select=commit&$filter=release_image/id ne null and commit eq '{STACK_100}'"
    )
    assert len(rows) == 3  # one per release_image, as SQL's LEFT JOIN gives


def test_paths_through_single_links_join_in_filters_and_lambdas(q: Any) -> None:
    failed = q(
        "release",
        "$select=semver&$filter=belongs_to__application/slug eq 'gh_acme/stack'"
        " and release_image/any(ri:ri/image/status eq 'failed')",
    )
    assert failed == [{"semver": "1.2.0"}]


def test_the_old_proxys_image_query(q: Any, default_catalog: Catalog) -> None:
    # open-balena-registry-proxy b87948a resolved names with this shape; newest revision first.
    rows = q(
        "image",
        "$top=1&$select=is_stored_at__image_location,content_hash"
        "&$filter=release_image/any(ri:ri/is_part_of__release/any(ipor:ipor/status eq 'success'"
        f" and ipor/belongs_to__application/any(bta:bta/slug eq '{WEB}')"
        " and (ipor/semver eq '1.2.3' and ipor/is_final eq true)))"
        "&$orderby=release_image/is_part_of__release/revision desc,id asc",
    )
    image = default_catalog.release("e8b6a13ac1443a731f1ad8fe7b6573f6")[1].single_image
    assert image is not None
    assert rows[0]["is_stored_at__image_location"] == f"{REGISTRY}/{image.repository}"


def test_order_nulls_and_default_direction(q: Any) -> None:
    def order(orderby: str) -> list[object]:
        return [
            r["revision"]
            for r in q("release", of_app(WEB) + f"&$select=revision&$orderby={orderby}")
        ]

    assert order("revision asc") == [0, 0, 0, 1, 2, None]
    assert order("revision desc") == [None, 2, 1, 0, 0, 0]
    assert order("revision") == order("revision desc")


def test_paging(q: Any) -> None:
    ids = [r["id"] for r in q("release", "$select=id&$orderby=id asc")]
    assert [r["id"] for r in q("release", "$select=id&$orderby=id asc&$skip=2&$top=3")] == ids[2:5]
    assert q("release", "$top=0") == []


# --------------------------------------------------------------------------- unanswerable


@pytest.mark.parametrize(
    "raw",
    [
        "$select=nope",
        "$select=owns__release",  # a reverse navigation is no field
        "$filter=nope eq 1",
        "$filter=slug eq 1",
        "$filter=slug",
        "$filter=startswith(id,'1')",
        "$filter=nope/any(x:true)",
        "$expand=slug",
        "$orderby=nope",
    ],
)
def test_untranslatable_names_and_types(q: Any, raw: str) -> None:
    with pytest.raises(UnknownNameError):
        q("application", raw)


@pytest.mark.parametrize(
    "raw",
    ["$expand=organization", "$filter=owns__device/any(d:true)", "$select=application_tag"],
)
def test_real_but_unmodelled_navigations(q: Any, raw: str) -> None:
    with pytest.raises(UnsupportedQueryError, match="not modelled"):
        q("application", raw)


# --------------------------------------------------------------------------- properties

_SLUGS = st.sampled_from(["gh_acme/web", "gh_acme/secret", "gh_acme/stack", "x' or '1' eq '1"])


@settings(max_examples=60)
@given(st.one_of(_SLUGS, st.text(st.characters(exclude_categories=["Cs"]), max_size=30)))
def test_a_quoted_value_only_ever_matches_itself(
    database: Database, default_catalog: Catalog, text: str
) -> None:
    options = parse_query(f"$select=slug&$filter=slug eq {quote_literal(text)}").options
    rows = run_query(database, "application", options, database.visible(None))
    public = {app.slug for app in default_catalog.apps if app.public}
    assert [r["slug"] for r in rows] == ([text] if text in public else [])
