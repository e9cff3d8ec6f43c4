"""Deciding the upstream target, and mapping answers back to the client's name."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from balena_registry_proxy.access import Match, Verdict
from balena_registry_proxy.rewrite import (
    Names,
    Plan,
    is_referrers_tag,
    map_challenge,
    map_link,
    map_response_headers,
    map_tags_body,
    plan_request,
)
from balena_registry_proxy.routes import Kind, parse_target

from .strategies import digests, names, tags

REAL = "v2/0123456789abcdef0123456789abcdef"
DIGEST = "sha256:" + "cd" * 32
COMMIT = "b1678e01687d42ae9b2fe254543c7d18"
SELECTORS = ["", "/latest", "/current", "/default", "/pinned", "/1.2.3", "/1.2.3-1700000000000"]


def aliased(real: str = REAL) -> Match:
    return Match(Verdict.ALIASED, real)


@pytest.mark.parametrize("selector", [*SELECTORS, f"/{COMMIT}"])
@pytest.mark.parametrize("tag", ["latest", "v1.0", "ignored_tag"])
def test_manifest_by_tag_goes_to_latest_for_every_selector(selector: str, tag: str) -> None:
    name = f"gh_acme/web{selector}"
    plan = plan_request(parse_target(f"/v2/{name}/manifests/{tag}"), aliased())
    assert plan == Plan(f"/v2/{REAL}/manifests/latest", names=Names(name, REAL))


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (f"/v2/org/app/1.2.3/manifests/{DIGEST}", f"/v2/{REAL}/manifests/{DIGEST}"),
        (f"/v2/org/app/1.2.3/blobs/{DIGEST}", f"/v2/{REAL}/blobs/{DIGEST}"),
        ("/v2/org/app/1.2.3/tags/list?n=5", f"/v2/{REAL}/tags/list?n=5"),
        (f"/v2/org/app/1.2.3/referrers/{DIGEST}", f"/v2/{REAL}/referrers/{DIGEST}"),
        ("/v2/org/app/1.2.3/manifests/x?ns=bh.cr", f"/v2/{REAL}/manifests/latest?ns=bh.cr"),
    ],
)
def test_digests_and_queries_are_kept(target: str, expected: str) -> None:
    assert plan_request(parse_target(target), aliased()).target == expected


@pytest.mark.parametrize("target", ["/v2/", "/v2/_catalog"])
def test_base_and_catalog_are_never_rewritten(target: str) -> None:
    assert plan_request(parse_target(target), aliased()) == Plan(target)


def test_no_match_forwards_unchanged() -> None:
    route = parse_target("/v2/org/app/manifests/v1")
    assert plan_request(route, None) == Plan("/v2/org/app/manifests/v1")


def test_unresolved_forwards_unchanged_and_remembers_the_name() -> None:
    route = parse_target("/v2/org/app/9.9.9/manifests/latest")
    plan = plan_request(route, Match(Verdict.UNRESOLVED, "org/app/9.9.9"))
    assert plan == Plan(
        route.target(), unresolved="org/app/9.9.9", explain_on=frozenset({401, 403, 404})
    )
    assert plan.names is None


def test_legacy_grant_on_an_app_name_is_explained_when_not_found() -> None:
    route = parse_target("/v2/org/nope/manifests/latest")
    plan = plan_request(route, Match(Verdict.GRANTED, "org/nope"))
    assert plan == Plan(route.target(), unresolved="org/nope", explain_on=frozenset({404}))


@pytest.mark.parametrize(
    "target",
    [
        "/v2/v2/abc/manifests/latest",
        f"/v2/org/app/manifests/{DIGEST}",
        f"/v2/org/app/blobs/{DIGEST}",
    ],
)
def test_real_repositories_and_digests_of_direct_grants_are_not_explained(target: str) -> None:
    route = parse_target(target)
    assert route.repository is not None
    plan = plan_request(route, Match(Verdict.GRANTED, route.repository))
    assert plan == Plan(route.target())


@given(names, names, st.one_of(tags, digests))
def test_rewritten_targets_parse_to_the_real_repository(alias: str, real: str, ref: str) -> None:
    route = parse_target(f"/v2/{alias}/manifests/{ref}")
    upstream = parse_target(plan_request(route, aliased(real)).target)
    assert upstream.kind is Kind.MANIFEST
    assert upstream.repository == real
    assert upstream.reference == (ref if route.by_digest else "latest")


def test_tags_body_name_is_mapped_back() -> None:
    body = b'{"name":"v2/abc","tags":["latest"]}'
    assert map_tags_body(body, "v2/abc", "org/app") == b'{"name":"org/app","tags":["latest"]}'


@pytest.mark.parametrize("body", [b"not json", b"[]", b'{"name":"other","tags":[]}', b"\xff"])
def test_unexpected_tags_bodies_are_left_alone(body: bytes) -> None:
    assert map_tags_body(body, "v2/abc", "org/app") is None


def test_link_is_mapped_back() -> None:
    link = '</v2/v2/abc/tags/list?n=1&last=a>; rel="next"'
    assert map_link(link, "v2/abc", "org/app") == '</v2/org/app/tags/list?n=1&last=a>; rel="next"'


def test_challenge_scope_is_mapped_back_exactly() -> None:
    challenge = (
        'Bearer realm="https://api/auth",service="reg",'
        'scope="repository:v2/abc:pull",error="invalid_token"'
    )
    mapped = map_challenge(challenge, "v2/abc", "org/app/1.2.3")
    assert 'scope="repository:org/app/1.2.3:pull"' in mapped
    assert 'realm="https://api/auth"' in mapped
    # A name that merely starts with the real one is not touched; dots are not wildcards.
    other = 'scope="repository:v2/abcd:pull repository:v2xabc:pull"'
    assert map_challenge(other, "v2/abc", "org/app") == other
    assert map_challenge('scope="repository:v2/a.c:pull"', "v2/a.c", "o/a").count("o/a") == 1


def test_response_headers_mapping() -> None:
    plan = Plan(f"/v2/{REAL}/blobs/{DIGEST}", names=Names("org/app", REAL))
    headers = [
        ("Location", f"https://registry.test/v2/{REAL}/blobs/{DIGEST}"),
        ("WWW-Authenticate", f'Bearer scope="repository:{REAL}:pull"'),
        ("Docker-Content-Digest", DIGEST),
    ]
    assert map_response_headers(headers, plan, "https://registry.test") == [
        ("Location", f"/v2/org/app/blobs/{DIGEST}"),
        ("WWW-Authenticate", 'Bearer scope="repository:org/app:pull"'),
        ("Docker-Content-Digest", DIGEST),
    ]


def test_response_headers_of_unrewritten_requests_keep_names() -> None:
    headers = [("WWW-Authenticate", 'Bearer scope="repository:org/app:pull"')]
    assert map_response_headers(headers, Plan("/v2/"), "https://registry.test") == headers


def test_a_legacy_grant_asked_for_its_tags_answers_with_the_challenge() -> None:
    route = parse_target("/v2/org/secret/tags/list")
    plan = plan_request(route, Match(Verdict.GRANTED, "org/secret"))
    assert plan == Plan(
        route.target(), unresolved="org/secret", explain_on=frozenset({404}), challenge=True
    )
    by_digest = parse_target(f"/v2/org/secret/manifests/sha256:{'a' * 64}")
    assert plan_request(by_digest, Match(Verdict.GRANTED, "org/secret")) == Plan(by_digest.target())
    real = parse_target("/v2/v2/abc/tags/list")
    assert plan_request(real, Match(Verdict.GRANTED, "v2/abc")) == Plan(real.target())


def test_link_headers_of_rewritten_requests_point_at_the_alias() -> None:
    plan = Plan(f"/v2/{REAL}/tags/list", names=Names("org/app", REAL))
    link = f'</v2/{REAL}/tags/list?n=2&last=b>; rel="next"'
    headers = [("link", link), ("LINK", link)]
    expected = '</v2/org/app/tags/list?n=2&last=b>; rel="next"'
    assert map_response_headers(headers, plan, "https://registry.test") == [
        ("link", expected),
        ("LINK", expected),
    ]
    assert map_response_headers(headers, Plan("/v2/x"), "https://registry.test") == headers


def test_a_location_of_an_unrewritten_request_is_pointed_back_but_keeps_its_name() -> None:
    headers = [("location", f"https://registry.test/v2/{REAL}/blobs/{DIGEST}")]
    assert map_response_headers(headers, Plan("/v2/x"), "https://registry.test") == [
        ("location", f"/v2/{REAL}/blobs/{DIGEST}")
    ]


def test_a_location_on_storage_is_left_alone_even_when_rewritten() -> None:
    plan = Plan(f"/v2/{REAL}/blobs/{DIGEST}", names=Names("org/app", REAL))
    storage = f"https://s3.example/bucket/v2/{REAL}/blobs/{DIGEST}?X-Amz-Signature=s"
    headers = [
        ("Location", storage),
        ("www-authenticate", f'Bearer scope="repository:{REAL}:pull"'),
    ]
    assert map_response_headers(headers, plan, "https://registry.test") == [
        ("Location", storage),
        ("www-authenticate", 'Bearer scope="repository:org/app:pull"'),
    ]


def test_a_challenge_scope_of_another_repository_is_left_alone() -> None:
    plan = Plan(f"/v2/{REAL}/blobs/{DIGEST}", names=Names("org/app", REAL))
    headers = [("WWW-Authenticate", 'Bearer scope="repository:v2/other:pull"')]
    assert map_response_headers(headers, plan, "https://registry.test") == headers


def test_every_scope_of_the_real_name_in_a_challenge_is_mapped() -> None:
    challenge = f'Bearer scope="repository:{REAL}:pull repository:{REAL}:push"'
    assert map_challenge(challenge, REAL, "org/app") == (
        'Bearer scope="repository:org/app:pull repository:org/app:push"'
    )


@pytest.mark.parametrize(
    "body",
    [
        b'{"tags":["latest"]}',
        b'{"name":"v2/abd","tags":[]}',
        b'{"name":"v2/ab","tags":[]}',
        b"[" * 100_000 + b"]" * 100_000,
        b'"v2/abc"',
    ],
)
def test_tags_bodies_without_the_real_name_are_left_alone(body: bytes) -> None:
    assert map_tags_body(body, "v2/abc", "org/app") is None


def test_a_tags_body_keeps_everything_but_its_name() -> None:
    body = b'{"tags": ["a", "b"], "name": "v2/abc", "extra": {"k": 1}}'
    assert map_tags_body(body, "v2/abc", "org/app") == (
        b'{"tags":["a","b"],"name":"org/app","extra":{"k":1}}'
    )


def test_links_of_other_repositories_are_left_alone() -> None:
    link = '</v2/v2/abcd/tags/list?n=1>; rel="next"'
    assert map_link(link, "v2/abc", "org/app") == link


@pytest.mark.parametrize("kind", ["blobs", "referrers"])
def test_legacy_grants_of_content_by_digest_are_not_explained(kind: str) -> None:
    route = parse_target(f"/v2/org/app/{kind}/{DIGEST}")
    assert plan_request(route, Match(Verdict.GRANTED, "org/app")) == Plan(route.target())


def test_an_unresolved_name_is_explained_whatever_it_asks_for() -> None:
    route = parse_target(f"/v2/v2/abc/blobs/{DIGEST}")
    plan = plan_request(route, Match(Verdict.UNRESOLVED, "v2/abc"))
    assert (plan.unresolved, plan.explain_on, plan.challenge) == (
        "v2/abc",
        frozenset({401, 403, 404}),
        False,
    )


def test_only_location_link_and_challenges_are_mapped() -> None:
    # Other headers that happen to hold the real name, sorting before and after those three.
    plan = Plan(f"/v2/{REAL}/tags/list", names=Names("org/app", REAL))
    headers = [
        ("Content-Location", f"/v2/{REAL}/tags/list"),
        ("Docker-Upload-UUID", f"repository:{REAL}:pull"),
        ("X-Link", f"</v2/{REAL}/tags/list>"),
        ("Zz-Scope", f'scope="repository:{REAL}:pull"'),
    ]
    assert map_response_headers(headers, plan, "https://registry.test") == headers


def test_a_token_that_says_nothing_of_a_balena_name_is_explained() -> None:
    route = parse_target("/v2/gh_acme/manifests/latest")
    assert plan_request(route, None, with_token=True) == Plan(
        route.target(), unresolved="gh_acme", explain_on=frozenset({401, 403, 404})
    )
    assert plan_request(route, None) == Plan(route.target())  # no token: the challenge
    real = parse_target("/v2/v2/abc/manifests/latest")
    assert plan_request(real, None, with_token=True) == Plan(real.target())
    base = parse_target("/v2/")
    assert plan_request(base, None, with_token=True) == Plan("/v2/")


@pytest.mark.parametrize(
    ("tag", "kept"),
    [
        ("sha256-" + "a" * 64, True),
        ("sha256-" + "a" * 64 + ".sig", True),
        ("sha256-" + "a" * 64 + ".att.v1", True),
        ("sha256-" + "a" * 63, False),
        ("sha256-" + "A" * 64, False),
        ("latest", False),
        ("v1", False),
    ],
)
def test_referrers_fallback_tags_are_not_the_release(tag: str, kept: bool) -> None:
    route = parse_target(f"/v2/org/app/1.0.0/manifests/{tag}")
    plan = plan_request(route, Match(Verdict.ALIASED, "v2/abc"))
    assert plan.target == f"/v2/v2/abc/manifests/{tag if kept else 'latest'}"
    assert is_referrers_tag(tag) is kept
