"""The OData grammar of the /v7 stand-in: what it accepts, how it reads it, what it refuses."""

from __future__ import annotations

import contextlib
import urllib.parse

import pytest
from hypothesis import given
from hypothesis import strategies as st

from balena_registry_proxy.sandbox.odata import (
    Compare,
    Expand,
    Lambda,
    Literal,
    Logical,
    Member,
    Not,
    ODataEncodingError,
    ODataSyntaxError,
    OrderBy,
    QueryOptions,
    StartsWith,
    parse_query,
    quote_literal,
)


def filter_of(raw: str) -> object:
    return parse_query("$filter=" + raw).options.filter


def slug_eq(value: str) -> Compare:
    return Compare("eq", Member(("slug",)), Literal(value))


# --------------------------------------------------------------------------- what is read how


def test_the_research_notes_release_query() -> None:
    raw = (
        "$select=id,commit&$filter=belongs_to__application/any(a:a/slug eq 'org/app')"
        "&$expand=release_image($select=id;$expand=image($select=is_stored_at__image_location,"
        "content_hash;$expand=is_a_build_of__service($select=service_name)))"
    )
    options = parse_query(raw).options
    assert options.select == ("id", "commit")
    assert options.filter == Member(
        ("belongs_to__application",),
        Lambda("any", "a", Compare("eq", Member(("a", "slug")), Literal("org/app"))),
    )
    service = Expand("is_a_build_of__service", QueryOptions(select=("service_name",)))
    image = Expand(
        "image",
        QueryOptions(select=("is_stored_at__image_location", "content_hash"), expand=(service,)),
    )
    assert options.expand == (
        Expand("release_image", QueryOptions(select=("id",), expand=(image,))),
    )


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("$top=1&$skip=20", QueryOptions(top=1, skip=20)),
        ("$select=*", QueryOptions(select=None)),
        ("$orderby=created_at asc", QueryOptions(orderby=(OrderBy(("created_at",), False),))),
        (
            "$orderby=a/b desc,c",
            # An omitted direction is descending in the balena API's parser.
            QueryOptions(orderby=(OrderBy(("a", "b"), True), OrderBy(("c",), True))),
        ),
        (
            "$expand=a,b()",
            QueryOptions(expand=(Expand("a", QueryOptions()), Expand("b", QueryOptions()))),
        ),
        (
            "$expand=a($top=1&$skip=2)",
            QueryOptions(expand=(Expand("a", QueryOptions(top=1, skip=2)),)),
        ),
        ("$top=1&$top=2", QueryOptions(top=2)),  # the last of a repeated option wins
        ("%24top=3", QueryOptions(top=3)),
        ("", QueryOptions()),
    ],
)
def test_options(raw: str, expected: QueryOptions) -> None:
    assert parse_query(raw).options == expected


def test_parameters_are_kept_apart_and_decoded() -> None:
    query = parse_query("apikey=abc%2Fdef&$top=1&empty=&=x")
    assert query.parameters == {"apikey": "abc/def", "empty": "", "": "x"}
    assert query.options == QueryOptions(top=1)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("slug eq 'a'", slug_eq("a")),
        ("slug%20eq%20%27a%27", slug_eq("a")),
        ("slug+eq+'a+b'", slug_eq("a+b")),  # '+' is a space between tokens, a plus in text
        ("slug eq 'it''s'", slug_eq("it's")),
        ("slug eq 'it%27%27s'", slug_eq("it's")),
        ("slug eq '%2527'", slug_eq("%27")),
        ("slug eq 'caf%C3%A9'", slug_eq("café")),
        ("slug eq 'a&b=c'", slug_eq("a&b=c")),
        ("revision ne null", Compare("ne", Member(("revision",)), Literal(None))),
        ("id eq -2.5", Compare("eq", Member(("id",)), Literal(-2.5))),
        ("id eq %2B7", Compare("eq", Member(("id",)), Literal(7))),
        ("is_public eq true", Compare("eq", Member(("is_public",)), Literal(True))),
        ("is_public", Member(("is_public",))),
        ("not is_invalidated", Not(Member(("is_invalidated",)))),
        ("not(is_invalidated)", Not(Member(("is_invalidated",)))),
        ("startswith(slug, 'a/')", StartsWith(Member(("slug",)), Literal("a/"))),
        ("notable", Member(("notable",))),
        ("a/b/c eq 1", Compare("eq", Member(("a", "b", "c")), Literal(1))),
        (
            "r/all(x:x/y ne 'z')",
            Member(("r",), Lambda("all", "x", Compare("ne", Member(("x", "y")), Literal("z")))),
        ),
        ("( slug eq 'a' )", slug_eq("a")),
    ],
)
def test_filters(raw: str, expected: object) -> None:
    assert filter_of(raw) == expected


def test_and_or_share_one_precedence_and_group_from_the_left() -> None:
    a, b, c = (Compare("eq", Member((n,)), Literal(1)) for n in "abc")
    assert filter_of("a eq 1 or b eq 1 and c eq 1") == Logical("and", Logical("or", a, b), c)
    assert filter_of("a eq 1 and b eq 1 or c eq 1") == Logical("or", Logical("and", a, b), c)
    assert filter_of("a eq 1 or (b eq 1 and c eq 1)") == Logical("or", a, Logical("and", b, c))
    assert filter_of("(a eq 1)and(b eq 1)") == Logical("and", a, b)


def test_not_takes_only_the_operand_after_it() -> None:
    assert filter_of("not a eq true") == Compare("eq", Not(Member(("a",))), Literal(True))


# --------------------------------------------------------------------------- what is refused


@pytest.mark.parametrize(
    "raw",
    [
        "$filter=semver_major gt 0",  # valid OData, outside the subset
        "$filter=endswith(slug,'x')",
        "$filter=slug in ('a','b')",
        "$filter=a eq 1 eq 2",
        "$filter=a/$count eq 1",
        "$filter=created_at eq datetime'2023-11-01'",
        "$filter=slug eq 'unterminated",
        "$filter=slug eq'a'",  # an operator needs a blank or '(' after it
        "$filter=slug  eq 'a'x",
        "$filter=any(a:a/x)",
        "$filter=r/any(a: a/x eq 1)",  # no blank after the lambda's colon
        "$filter=",
        "$select=",
        "$select=id, commit",  # no blanks in lists
        "$select=a/b",
        "$expand=a/b",
        "$expand=a/$count",
        "$orderby=a asc, b",
        "$orderby=a ascending",
        "$top=-1",
        "$count=true",
        "$format=json",
        "$unknown=1",
        "@alias='x'",
        "$filter=belongs_to__application%2Fany%28a%3Aa%2Fslug+eq+%27x%27%29",
        "$top=1&",
        "&$top=1",
        "a=b:c",
    ],
)
def test_outside_the_subset(raw: str) -> None:
    with pytest.raises(ODataSyntaxError, match="column"):
        parse_query(raw)


@pytest.mark.parametrize("raw", ["$filter=slug eq '%zz'", "$filter=slug eq '%FF'", "key=%E2%28"])
def test_escapes_that_do_not_decode(raw: str) -> None:
    with pytest.raises(ODataEncodingError):
        parse_query(raw)


# --------------------------------------------------------------------------- properties

# Text a client might put in a literal, without lone surrogates (they cannot be sent at all).
_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)


@given(_TEXT)
def test_quoted_literals_round_trip(text: str) -> None:
    assert filter_of(f"slug eq {quote_literal(text)}") == slug_eq(text)


@given(_TEXT, _TEXT)
def test_hostile_text_cannot_change_the_structure(first: str, second: str) -> None:
    raw = (
        f"$filter=belongs_to__application/any(a:a/slug eq {quote_literal(first)})"
        f" and commit ne {quote_literal(second)}&$top=1"
    )
    options = parse_query(raw).options
    assert options.top == 1
    assert options.filter == Logical(
        "and",
        Member(
            ("belongs_to__application",),
            Lambda("any", "a", Compare("eq", Member(("a", "slug")), Literal(first))),
        ),
        Compare("ne", Member(("commit",)), Literal(second)),
    )


@given(_TEXT)
def test_percent_encoding_a_whole_literal_reads_the_same(text: str) -> None:
    # Clients may percent-encode quotes too: %27 is an apostrophe to the balena API's parser.
    literal = urllib.parse.quote("'" + text.replace("'", "''") + "'", safe="")
    assert filter_of(f"slug eq {literal}") == slug_eq(text)


@given(st.text(max_size=60))
def test_any_query_string_parses_or_is_refused_cleanly(raw: str) -> None:
    # Anything else escaping (a lark internal, a TypeError) would be a 500 of the wrong kind.
    with contextlib.suppress(ODataSyntaxError, ODataEncodingError):
        parse_query(raw)
