"""The API query the resolver sends: its shape, and that no slug can change it.

The stand-in's OData parser (the grammar the sandbox holds the real API's parser to) reads
the query back: whatever text a slug holds, the filter compares ``slug`` with exactly it.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from hypothesis import example, given
from hypothesis import strategies as st

from balena_registry_proxy.api_query import MAX_RELEASES, app_query, literal
from balena_registry_proxy.sandbox.odata import Compare, Literal, Member, parse_query


def parsed_filter_literal(slug: str) -> object:
    target = urlsplit(app_query(slug))
    assert target.path == "/v7/application"
    query = parse_query(target.query)
    assert query.parameters == {}
    expression = query.options.filter
    assert isinstance(expression, Compare)
    assert expression.operator == "eq"
    assert expression.left == Member(("slug",))
    assert isinstance(expression.right, Literal)
    return expression.right.value


@given(st.text())
@example("o/a' or 1 eq 1 or slug eq 'x")
@example("o/a&$top=1")
@example("o/a#frag")
@example("o/a%27")
@example("o/a+b c")
@example("o/a)&$expand=owner")
def test_no_slug_changes_the_query(slug: str) -> None:
    assert parsed_filter_literal(slug) == slug


def test_the_query_asks_for_what_a_pull_needs() -> None:
    query = parse_query(urlsplit(app_query("gh_acme/stack")).query).options
    assert query.select == ("id", "slug")
    expanded = {e.name: e.options for e in query.expand}
    assert set(expanded) == {"should_be_running__release", "owns__release"}
    releases = expanded["owns__release"]
    assert releases.top == MAX_RELEASES
    assert releases.filter == Compare("eq", Member(("status",)), Literal("success"))
    assert [o.path for o in releases.orderby] == [("created_at",)]
    assert releases.orderby[0].descending
    assert {"commit", "semver", "raw_version", "revision", "is_final", "is_invalidated"} <= set(
        releases.select or ()
    )
    (release_image,) = releases.expand
    (image,) = release_image.options.expand
    assert image.name == "image"
    assert set(image.options.select or ()) == {"is_stored_at__image_location", "content_hash"}
    assert image.options.expand[0].name == "is_a_build_of__service"


def test_literals() -> None:
    assert literal("gh_acme/web") == "'gh_acme/web'"
    assert literal("it's") == "'it''s'"
    assert literal("a&b c#") == "'a%26b%20c%23'"


def test_the_newest_thousand_successful_releases_are_asked_for() -> None:
    # A thousand keep an answer to a few hundred KiB, even for an app built on every commit.
    assert parse_query(urlsplit(app_query("o/a")).query).options.expand[1].options.top == 1000


def test_the_query_is_a_request_target_without_a_space() -> None:
    target = app_query("o/a b")
    assert " " not in target
    assert "$filter=status%20eq%20'success';$orderby=created_at%20desc;" in target
