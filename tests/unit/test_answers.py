"""What the proxy does with a request and the upstream's answer, decided without I/O."""

from __future__ import annotations

import itertools

import pytest

from balena_registry_proxy.access import Match, Verdict
from balena_registry_proxy.answers import (
    READ_METHODS,
    Action,
    Fetch,
    cache_serves,
    decide,
    fetch_mode,
    has_body,
)
from balena_registry_proxy.rewrite import Plan, plan_request
from balena_registry_proxy.routes import parse_target

DIGEST = "sha256:" + "a" * 64
ALIASED = Match(Verdict.ALIASED, "v2/abc")


@pytest.mark.parametrize(
    ("target", "method", "caching", "following", "expected"),
    [
        (f"/v2/o/a/blobs/{DIGEST}", "GET", True, True, Fetch.CACHE),
        (f"/v2/o/a/blobs/{DIGEST}", "HEAD", True, False, Fetch.CACHE),
        (f"/v2/o/a/manifests/{DIGEST}", "GET", True, True, Fetch.CACHE),
        ("/v2/o/a/manifests/latest", "GET", True, True, Fetch.UPSTREAM),
        ("/v2/o/a/blobs/sha512:" + "b" * 128, "GET", True, True, Fetch.FOLLOWING),
        ("/v2/o/a/blobs/sha512:" + "b" * 128, "HEAD", True, True, Fetch.UPSTREAM),
        (f"/v2/o/a/blobs/{DIGEST}", "GET", False, True, Fetch.FOLLOWING),
        (f"/v2/o/a/blobs/{DIGEST}", "HEAD", False, True, Fetch.UPSTREAM),
        (f"/v2/o/a/blobs/{DIGEST}", "GET", False, False, Fetch.UPSTREAM),
        (f"/v2/o/a/manifests/{DIGEST}", "GET", False, True, Fetch.UPSTREAM),
        ("/v2/o/a/tags/list", "GET", True, True, Fetch.UPSTREAM),
        (f"/v2/o/a/referrers/{DIGEST}", "GET", True, True, Fetch.UPSTREAM),
        ("/v2/", "GET", True, True, Fetch.UPSTREAM),
        # Only a GET is followed (methods sorting before it too).
        ("/v2/o/a/blobs/sha512:" + "b" * 128, "DELETE", True, True, Fetch.UPSTREAM),
    ],
)
def test_fetch_mode(
    target: str, method: str, caching: bool, following: bool, expected: Fetch
) -> None:
    route = parse_target(target)
    assert fetch_mode(route, method, caching=caching, following=following) is expected


def test_only_sha256_digests_are_the_caches() -> None:
    assert cache_serves(parse_target(f"/v2/o/a/blobs/{DIGEST}"))
    assert not cache_serves(parse_target("/v2/o/a/blobs/sha256:" + "A" * 64))
    assert not cache_serves(parse_target("/v2/o/a/manifests/latest"))


@pytest.mark.parametrize(
    ("method", "status", "expected"),
    [
        ("GET", 200, True),
        ("GET", 404, True),
        ("HEAD", 200, False),
        ("GET", 204, False),
        ("GET", 304, False),
        ("GET", 416, True),
        # Only HEAD goes without, whatever sorts after it.
        ("OPTIONS", 200, True),
        ("POST", 201, True),
    ],
)
def test_has_body(method: str, status: int, expected: bool) -> None:
    assert has_body(method, status) is expected


UNRESOLVED = Match(Verdict.UNRESOLVED, "o/a/9.9.9")
LEGACY = Match(Verdict.GRANTED, "o/secret")

# (target, token's verdict, method, status, encoded, caching, action)
DECISIONS = [
    # A 416 is always the proxy's own, whatever the rest.
    (f"/v2/o/a/blobs/{DIGEST}", ALIASED, "GET", 416, False, True, Action.RANGE_NOT_SATISFIABLE),
    (f"/v2/o/a/blobs/{DIGEST}", None, "HEAD", 416, True, False, Action.RANGE_NOT_SATISFIABLE),
    # Names the API did not resolve: explained on the statuses that mean so.
    ("/v2/o/a/9.9.9/manifests/latest", UNRESOLVED, "GET", 401, False, False, Action.EXPLAIN),
    ("/v2/o/a/9.9.9/manifests/latest", UNRESOLVED, "HEAD", 404, False, False, Action.EXPLAIN),
    ("/v2/o/a/9.9.9/manifests/latest", UNRESOLVED, "GET", 200, False, False, Action.STREAM),
    ("/v2/o/a/9.9.9/manifests/latest", UNRESOLVED, "GET", 500, False, False, Action.STREAM),
    ("/v2/o/secret/manifests/latest", LEGACY, "GET", 404, False, False, Action.EXPLAIN),
    ("/v2/o/secret/manifests/latest", LEGACY, "GET", 401, False, False, Action.STREAM),
    # ... and a legacy grant's tags answer with the registry's challenge, to get a login.
    ("/v2/o/secret/tags/list", LEGACY, "GET", 404, False, False, Action.CHALLENGE),
    ("/v2/o/secret/tags/list", LEGACY, "GET", 401, False, False, Action.STREAM),
    # Tags of an aliased name are mapped back, when there is a JSON body to read.
    ("/v2/o/a/1.2.3/tags/list", ALIASED, "GET", 200, False, False, Action.MAP_TAGS),
    ("/v2/o/a/1.2.3/tags/list", ALIASED, "GET", 200, True, False, Action.STREAM),
    ("/v2/o/a/1.2.3/tags/list", ALIASED, "HEAD", 200, False, False, Action.STREAM),
    ("/v2/o/a/1.2.3/tags/list", ALIASED, "GET", 401, False, False, Action.STREAM),
    ("/v2/v2/abc/tags/list", None, "GET", 200, False, False, Action.STREAM),
    # Manifests by digest are kept by a cache.
    (f"/v2/o/a/manifests/{DIGEST}", ALIASED, "GET", 200, False, True, Action.KEEP_MANIFEST),
    (f"/v2/o/a/manifests/{DIGEST}", None, "GET", 200, False, True, Action.KEEP_MANIFEST),
    (f"/v2/o/a/manifests/{DIGEST}", ALIASED, "GET", 200, False, False, Action.STREAM),
    (f"/v2/o/a/manifests/{DIGEST}", ALIASED, "GET", 200, True, True, Action.STREAM),
    (f"/v2/o/a/manifests/{DIGEST}", ALIASED, "HEAD", 200, False, True, Action.STREAM),
    (f"/v2/o/a/manifests/{DIGEST}", ALIASED, "GET", 404, False, True, Action.STREAM),
    ("/v2/o/a/manifests/latest", ALIASED, "GET", 200, False, True, Action.STREAM),
    (f"/v2/o/a/blobs/{DIGEST}", ALIASED, "GET", 200, False, True, Action.STREAM),
]


@pytest.mark.parametrize(
    ("target", "match", "method", "status", "encoded", "caching", "action"), DECISIONS
)
def test_decide(
    target: str,
    match: Match | None,
    method: str,
    status: int,
    encoded: bool,
    caching: bool,
    action: Action,
) -> None:
    route = parse_target(target)
    chosen = decide(
        route, plan_request(route, match), method, status, encoded=encoded, caching=caching
    )
    assert chosen is action


TARGETS = [
    "/v2/",
    "/v2/o/a/manifests/latest",
    f"/v2/o/a/manifests/{DIGEST}",
    f"/v2/o/a/blobs/{DIGEST}",
    "/v2/o/a/tags/list",
    f"/v2/o/a/referrers/{DIGEST}",
]
MATCHES = [None, ALIASED, UNRESOLVED, LEGACY, Match(Verdict.GRANTED, "v2/abc")]


@pytest.mark.parametrize(
    ("target", "match", "method", "status", "encoded", "caching"),
    list(
        itertools.product(
            TARGETS,
            MATCHES,
            ["GET", "HEAD"],
            [200, 206, 304, 401, 404, 416, 500],
            [False, True],
            [False, True],
        )
    ),
)
def test_every_combination_has_one_sound_action(
    target: str,
    match: Match | None,
    method: str,
    status: int,
    encoded: bool,
    caching: bool,
) -> None:
    route = parse_target(target)
    planned = plan_request(route, match)
    action = decide(route, planned, method, status, encoded=encoded, caching=caching)
    # Nothing read whole from an answer that has no readable body, or is not a success...
    if action in (Action.MAP_TAGS, Action.KEEP_MANIFEST):
        assert (status, method, encoded) == (200, "GET", False)
    # ... only a cache keeps manifests, only names resolved to something else are mapped...
    if action is Action.KEEP_MANIFEST:
        assert caching
    if action is Action.MAP_TAGS:
        assert planned.names is not None
    # ... and only what the API did not resolve is explained.
    if action in (Action.EXPLAIN, Action.CHALLENGE):
        assert planned.unresolved is not None
        assert status in planned.explain_on
    if status == 416:
        assert action is Action.RANGE_NOT_SATISFIABLE


def test_the_proxy_serves_reads_only() -> None:
    # RFC 9110's methods that read a resource; writes (and OPTIONS, TRACE) are refused.
    assert frozenset({"GET", "HEAD"}) == READ_METHODS


@pytest.mark.parametrize(
    ("status", "action"),
    [(401, Action.EXPLAIN), (403, Action.EXPLAIN), (404, Action.CHALLENGE), (410, Action.EXPLAIN)],
)
def test_only_an_explained_404_becomes_the_challenge(status: int, action: Action) -> None:
    route = parse_target("/v2/o/secret/tags/list")
    plan = Plan(route.target(), unresolved="o/secret", explain_on=frozenset({401, 403, 404, 410}))
    assert decide(route, plan, "GET", status, encoded=False, caching=False) is Action.EXPLAIN
    challenging = Plan(
        plan.target, unresolved=plan.unresolved, explain_on=plan.explain_on, challenge=True
    )
    assert decide(route, challenging, "GET", status, encoded=False, caching=False) is action
