"""Parsing request targets under /v2/."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from balena_registry_proxy.errors import RegistryError
from balena_registry_proxy.routes import NAME_RE, Kind, Route, is_valid_name, parse_target

from .strategies import digests, names, tags

DIGEST = "sha256:" + "ab" * 32
COMMIT = "b1678e01687d42ae9b2fe254543c7d18"


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/v2/", Route(Kind.BASE)),
        ("/v2", Route(Kind.BASE)),
        ("/v2/_catalog?n=10", Route(Kind.CATALOG, query="n=10")),
        ("/v2/org/app/manifests/latest", Route(Kind.MANIFEST, "org/app", "latest")),
        (f"/v2/org/app/manifests/{DIGEST}", Route(Kind.MANIFEST, "org/app", DIGEST)),
        (f"/v2/org/app/1.2.3/blobs/{DIGEST}", Route(Kind.BLOB, "org/app/1.2.3", DIGEST)),
        ("/v2/org/app/tags/list?n=1&last=a", Route(Kind.TAGS, "org/app", query="n=1&last=a")),
        (f"/v2/org/app/referrers/{DIGEST}", Route(Kind.REFERRERS, "org/app", DIGEST)),
        ("http://proxy.example:8080/v2/org/app/tags/list", Route(Kind.TAGS, "org/app")),
        ("HTTPS://proxy.example/v2/", Route(Kind.BASE)),
        (
            "/v2/org/blobs/uploadsx/manifests/latest",
            Route(Kind.MANIFEST, "org/blobs/uploadsx", "latest"),
        ),
    ],
)
def test_parses_every_endpoint(target: str, expected: Route | None) -> None:
    if expected is None:
        with pytest.raises(RegistryError):
            parse_target(target)
        return
    assert parse_target(target) == expected


@pytest.mark.parametrize(
    ("name", "tag"),
    [
        ("gh_acme/web", "latest"),
        ("gh_acme/web/latest", "latest"),
        ("gh_acme/web/current", "anything"),
        ("gh_acme/web/default", "v1"),
        ("gh_acme/web/pinned", "latest"),
        ("gh_acme/web/1.2.3", "latest"),
        ("gh_acme/web/1.2.3-1700000000000", "latest"),
        (f"gh_acme/web/{COMMIT}", "ignored-tag"),
        ("balena_os/raspberrypi4-64/2.108.1", "x"),
    ],
)
def test_every_reference_form_of_the_readme_parses(name: str, tag: str) -> None:
    route = parse_target(f"/v2/{name}/manifests/{tag}")
    assert route == Route(Kind.MANIFEST, name, tag)
    assert not route.by_digest


@pytest.mark.parametrize(
    ("target", "status", "code"),
    [
        ("/v2/org/../app/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/org/./app/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/org%2Fapp/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/org/%2e%2e/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/org//app/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/org/app/manifests/latest/", 400, "NAME_INVALID"),
        ("/v2/Org/app/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/org/app-/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/org/app\\x/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/org/app/1.2.3+rev2/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/org/app/manifests/.hidden", 400, "MANIFEST_INVALID"),
        ("/v2/org/app/manifests/" + "t" * 129, 400, "MANIFEST_INVALID"),
        ("/v2/org/app/blobs/latest", 400, "DIGEST_INVALID"),
        ("/v2/org/app/referrers/latest", 400, "DIGEST_INVALID"),
        ("/v2/org/app/manifests/a b", 400, "NAME_INVALID"),
        ("/v2/org/app/manifests/latest?x=\x00", 400, "UNSUPPORTED"),
        ("/v2/" + "a/" * 130 + "manifests/latest", 400, "NAME_INVALID"),
        ("/v2/org/app/whatever", 404, "UNSUPPORTED"),
        ("/v2/org/app/blobs/uploads/", 405, "UNSUPPORTED"),
        ("/v2/org/app/blobs/uploads", 405, "UNSUPPORTED"),
        ("/v2/org/app/blobs/uploads/abc-123?_state=x", 405, "UNSUPPORTED"),
        ("/v2/manifests/latest", 404, "UNSUPPORTED"),
        ("/v3/org/app/manifests/latest", 404, "UNSUPPORTED"),
        ("/v2/" + "a" * 5000, 414, "NAME_INVALID"),
    ],
)
def test_rejections(target: str, status: int, code: str) -> None:
    with pytest.raises(RegistryError) as caught:
        parse_target(target)
    assert caught.value.status == status
    assert caught.value.code == code


def test_name_length_limit() -> None:
    assert is_valid_name("a" * 255)
    assert not is_valid_name("a" * 256)


@given(names, st.one_of(tags, digests))
def test_canonical_manifest_targets_round_trip(name: str, reference: str) -> None:
    target = f"/v2/{name}/manifests/{reference}"
    route = parse_target(target)
    assert route.repository == name
    assert route.reference == reference
    assert route.target() == target


@given(names, digests)
def test_blob_targets_round_trip(name: str, digest: str) -> None:
    route = parse_target(f"/v2/{name}/blobs/{digest}")
    assert route.kind is Kind.BLOB
    assert route.by_digest
    assert route.target() == f"/v2/{name}/blobs/{digest}"


queries = st.one_of(
    st.just(""),
    st.from_regex(r"\?[a-z_]{1,5}=[A-Za-z0-9.%:-]{0,12}(&n=[0-9]{1,3})?", fullmatch=True),
)
targets = st.builds(
    lambda name, endpoint, query: f"/v2/{name}/{endpoint}{query}",
    names,
    st.one_of(
        st.one_of(tags, digests).map(lambda ref: f"manifests/{ref}"),
        digests.map(lambda digest: f"blobs/{digest}"),
        digests.map(lambda digest: f"referrers/{digest}"),
        st.just("tags/list"),
    ),
    queries,
)
MUTATIONS = ["%2F", "%2e%2e", "/..", "/.", "//", "A", "\x00", " ", "#", "\\", "\r\n", "%", "é"]


@given(targets)
def test_valid_targets_are_forwarded_exactly_as_sent(target: str) -> None:
    route = parse_target(target)
    assert route.target() == target
    assert route.repository is not None
    assert NAME_RE.fullmatch(route.repository)


@given(targets, st.sampled_from(MUTATIONS), st.data())
def test_mutated_targets_are_refused_or_still_canonical(
    target: str, mutation: str, data: st.DataObject
) -> None:
    position = data.draw(st.integers(min_value=len("/v2/"), max_value=len(target)))
    mutated = target[:position] + mutation + target[position:]
    try:
        route = parse_target(mutated)
    except RegistryError as error:
        status = error.status
        assert 400 <= status < 500, status
        return
    # Still parseable (an uppercase letter in a tag, say): then it is forwarded byte for byte.
    assert route.target() == mutated
    assert "%" not in route.path()
    assert ".." not in route.path().split("/")
    if route.repository is not None:
        assert NAME_RE.fullmatch(route.repository)


@given(st.text(max_size=300).map(lambda t: "/v2/" + t))
def test_any_target_is_refused_cleanly_or_forwarded_exactly(target: str) -> None:
    try:
        route = parse_target(target)
    except RegistryError as error:
        status = error.status
        assert 400 <= status < 500, status
        return
    # A lone '?' with nothing after it carries no query and is not forwarded.
    assert route.target() == (target.removesuffix("?") if target.endswith("?") else target)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "gh_acme/web/1.2.3+rev1",
            "'+rev' cannot be written in an image name; 1.2.3 pulls its newest revision",
        ),
        ("gh_acme/Web", "image names are lower case"),
        ("a/" * 200 + "b", "longer than 255 characters"),
        ("gh_acme/web-", "invalid repository name"),
    ],
)
def test_invalid_names_say_what_to_write_instead(name: str, message: str) -> None:
    with pytest.raises(RegistryError) as caught:
        parse_target(f"/v2/{name}/manifests/latest")
    assert caught.value.code == "NAME_INVALID"
    assert message in caught.value.message


def test_the_target_length_limit_is_4096_characters() -> None:
    stem = "/v2/org/app/manifests/latest?n="
    longest = stem + "1" * (4096 - len(stem))
    assert parse_target(longest).query == "n=" + "1" * (4096 - len(stem))
    with pytest.raises(RegistryError) as caught:
        parse_target(longest + "1")
    assert (caught.value.status, caught.value.code) == (414, "NAME_INVALID")
    assert caught.value.message == "request target too long"


@pytest.mark.parametrize(
    ("target", "message", "detail"),
    [
        (
            "/v2/o/a/manifests/x?q=\x00",
            "query string contains characters that are not allowed",
            None,
        ),
        (
            "/v2/o%2Fa/manifests/x",
            "request path is not canonical (escaped or unexpected characters)",
            None,
        ),
        (
            "/v2/o a/manifests/x",
            "request path is not canonical (escaped or unexpected characters)",
            None,
        ),
        ("/v2/o//a/manifests/x", "request path has empty, '.' or '..' segments", None),
        ("/v2/o/../a/manifests/x", "request path has empty, '.' or '..' segments", None),
        ("/v2/o/./a/manifests/x", "request path has empty, '.' or '..' segments", None),
        ("/v2/o/a/manifests/.", "request path has empty, '.' or '..' segments", None),
        ("/v3/", "not a registry API path", None),
        ("/v2/o/a/whatever/x", "not a registry API endpoint", None),
        (
            "/v2/o/a/blobs/uploads/",
            "uploading is not supported: this registry proxy is read-only (pull only)",
            None,
        ),
        ("/v2/o/a-/manifests/x", "invalid repository name", {"name": "o/a-"}),
        ("/v2/o/a/manifests/-x", "invalid tag or digest", {"reference": "-x"}),
        ("/v2/o/a/blobs/x", "invalid digest", {"digest": "x"}),
        ("/v2/o/a/referrers/sha256:", "invalid digest", {"digest": "sha256:"}),
    ],
)
def test_each_refusal_says_what_is_wrong(target: str, message: str, detail: object) -> None:
    with pytest.raises(RegistryError) as caught:
        parse_target(target)
    assert (caught.value.message, caught.value.detail) == (message, detail)


def test_a_long_invalid_name_is_shown_cut_to_the_longest_valid_length() -> None:
    name = "a/" * 200 + "b"
    with pytest.raises(RegistryError) as caught:
        parse_target(f"/v2/{name}/manifests/latest")
    assert caught.value.message == "invalid repository name: longer than 255 characters"
    assert caught.value.detail == {"name": name[:255]}


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "o/app/2.10.3+rev12",
            "invalid repository name: '+rev' cannot be written in an image name; 2.10.3 pulls "
            "its newest revision, a release's commit pulls that one",
        ),
        ("o/App/1.2.3", "invalid repository name: image names are lower case"),
        ("o/app/1.2.3+Rev1", "invalid repository name: image names are lower case"),
        ("o/app/1.2+rev1", "invalid repository name"),
        ("o/app/x1.2.3+rev1", "invalid repository name"),
        ("o/app/1.2.3+rev", "invalid repository name"),
    ],
)
def test_the_problem_with_a_name_is_named_exactly(name: str, message: str) -> None:
    with pytest.raises(RegistryError) as caught:
        parse_target(f"/v2/{name}/manifests/latest")
    assert caught.value.message == message


@pytest.mark.parametrize(
    ("target", "status"),
    [
        ("http://proxy.example", 404),
        ("http://proxy.example?n=1", 404),
        ("https://proxy.example:443/v2/o/a/tags/list?n=1", None),
        ("ftp://proxy.example/v2/", 404),
        ("/v2/http://x/manifests/latest", 400),
    ],
)
def test_the_absolute_form_is_read_as_its_path(target: str, status: int | None) -> None:
    if status is None:
        assert parse_target(target) == Route(Kind.TAGS, "o/a", query="n=1")
        return
    with pytest.raises(RegistryError) as caught:
        parse_target(target)
    assert caught.value.status == status


@pytest.mark.parametrize(
    "target",
    [
        "/v2/o/a/manifests/x?last=a%2Fb",
        "/v2/o/a/manifests/x?scope=repository:o/a:pull&n=1",
        "/v2/o/a/manifests/x?a=~!$'()*+,;@",
    ],
)
def test_a_query_may_hold_escapes_and_reserved_characters(target: str) -> None:
    assert parse_target(target).target() == target


@pytest.mark.parametrize(
    "target", ["/v2/o/a/blobs/uploads", "/v2/o/a/blobs/uploads/", "/v2/o/a/blobs/uploads/u-1"]
)
def test_uploads_are_writes(target: str) -> None:
    with pytest.raises(RegistryError) as caught:
        parse_target(target)
    assert (caught.value.status, caught.value.headers) == (405, {"Allow": "GET, HEAD"})


def test_only_the_upload_endpoint_itself_is_a_write() -> None:
    # Deeper than an upload's id: no endpoint at all, not a write.
    with pytest.raises(RegistryError) as caught:
        parse_target("/v2/o/a/blobs/uploads/u/x")
    assert caught.value.status == 404
    route = parse_target("/v2/o/uploads/manifests/x")
    assert route == Route(Kind.MANIFEST, "o/uploads", "x")


@pytest.mark.parametrize(
    ("route", "path"),
    [
        (Route(Kind.BASE, query="x=1"), "/v2/"),
        (Route(Kind.CATALOG), "/v2/_catalog"),
        (Route(Kind.TAGS, "o/a"), "/v2/o/a/tags/list"),
        (Route(Kind.MANIFEST, "o/a", "t"), "/v2/o/a/manifests/t"),
        (Route(Kind.BLOB, "o/a", DIGEST), f"/v2/o/a/blobs/{DIGEST}"),
        (Route(Kind.REFERRERS, "o/a", DIGEST), f"/v2/o/a/referrers/{DIGEST}"),
    ],
)
def test_each_route_has_its_path(route: Route, path: str) -> None:
    assert route.path() == path
    assert route.target() == (f"{path}?{route.query}" if route.query else path)


def test_a_route_is_sent_to_another_repository_and_reference_on_request() -> None:
    route = Route(Kind.MANIFEST, "o/a", "t", "n=1")
    assert route.target(repository="v2/x") == "/v2/v2/x/manifests/t?n=1"
    assert route.target(reference="latest") == "/v2/o/a/manifests/latest?n=1"
    assert route.path("v2/x", DIGEST) == f"/v2/v2/x/manifests/{DIGEST}"
    assert Route(Kind.TAGS, "o/a").path(repository="v2/x") == "/v2/v2/x/tags/list"


@pytest.mark.parametrize(
    ("reference", "by_digest"),
    [(DIGEST, True), ("latest", False), (None, False), ("sha256:", False), ("a:b", True)],
)
def test_by_digest(reference: str | None, by_digest: bool) -> None:
    assert Route(Kind.MANIFEST, "o/a", reference).by_digest is by_digest


@pytest.mark.parametrize(
    "reference", ["t" * 128, "_x", "X.y-z", DIGEST, "sha512:" + "0" * 128, "a+b.c:x=Y_z-"]
)
def test_manifest_references_of_the_grammar_are_accepted(reference: str) -> None:
    assert parse_target(f"/v2/o/a/manifests/{reference}").reference == reference


@pytest.mark.parametrize("reference", ["t" * 129, ".x", "-x", "a:", "a+:b", "A:b"])
def test_manifest_references_outside_the_grammar_are_refused(reference: str) -> None:
    with pytest.raises(RegistryError) as caught:
        parse_target(f"/v2/o/a/manifests/{reference}")
    assert caught.value.code == "MANIFEST_INVALID"


@pytest.mark.parametrize(
    "name", ["a", "a/b", "a.b", "a_b", "a__b", "a-b", "a---b", "0/9", "a.b-c_d/e__f"]
)
def test_names_of_the_oci_grammar_are_valid(name: str) -> None:
    assert is_valid_name(name)


@pytest.mark.parametrize("name", ["", "A", "a/", "/a", "a..b", "a___b", "a.-b", "_a", "a-", "a b"])
def test_names_outside_the_oci_grammar_are_not(name: str) -> None:
    assert not is_valid_name(name)


@pytest.mark.parametrize("target", ["/v2/tags/list", "/v2/o/a/tags/x", "/v2/o/a/tags/lists"])
def test_only_a_name_then_tags_list_lists_tags(target: str) -> None:
    with pytest.raises(RegistryError) as caught:
        parse_target(target)
    assert (caught.value.status, caught.value.message) == (404, "not a registry API endpoint")


def test_a_name_of_the_longest_length_is_refused_for_what_else_is_wrong() -> None:
    name = "o/" + "A" * 253
    with pytest.raises(RegistryError) as caught:
        parse_target(f"/v2/{name}/manifests/latest")
    assert caught.value.message == "invalid repository name: image names are lower case"


def test_a_parsed_route_is_shared_and_cannot_be_changed() -> None:
    # parse_target keeps its answers: a route changed by one caller would be another's too.
    route = parse_target("/v2/o/a/manifests/latest")
    assert parse_target("/v2/o/a/manifests/latest") is route
    with pytest.raises(dataclasses.FrozenInstanceError):
        route.reference = "other"  # type: ignore[misc]
    assert {route: 1}[Route(Kind.MANIFEST, "o/a", "latest")] == 1
