"""Map between the names clients use and the repositories upstream, in both directions.

Pure functions, no I/O. Requests: decide the upstream target from the parsed route and the
token's verdict. Responses: put the client's name back where upstream mentions the real one
(``tags/list`` bodies, pagination links, auth challenges), so the alias never leaks as a
repository a client would then try to use under its own name.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from .access import Match, Verdict
from .headers import rewrite_location
from .routes import Kind, Route

# Upstream stores one image per release and tags it `latest`; the client's tag is ignored.
UPSTREAM_TAG = "latest"
REFUSED = frozenset({401, 403, 404})
NOT_FOUND = frozenset({404})


@dataclass(frozen=True, slots=True)
class Names:
    """The client's name for a repository and the upstream's."""

    alias: str
    real: str


@dataclass(frozen=True, slots=True)
class Plan:
    """Where to send a request, and what the answer needs mapped back."""

    target: str
    """Upstream path and query."""
    names: Names | None = None
    """Set when the request was rewritten to another repository."""
    unresolved: str | None = None
    """The client's name, when the token server may have resolved it to nothing pullable."""
    explain_on: frozenset[int] = frozenset()
    """Upstream statuses that mean ``unresolved`` really was not found or not allowed."""
    challenge: bool = False
    """Answer an explained 404 with the registry's 401 challenge instead, so that clients
    (skopeo, for one, listing tags) log in rather than give up: the name may be a private app's."""


def plan_request(route: Route, match: Match | None, *, with_token: bool = False) -> Plan:
    """Decide the upstream target for ``route`` given what the token says about its name.

    Only an ALIASED verdict rewrites: manifests by tag go to the ``latest`` tag, everything
    addressed by digest keeps its digest (multi-platform children and digest pins depend on it).
    ``with_token``: the client sent a token; one that says nothing of a balena name means the
    token server ignored the scope (it does for an org alone), which is explained too.
    """
    if route.repository is None:
        return Plan(route.target())
    if match is None:
        if with_token and not route.repository.startswith("v2/"):
            return Plan(route.target(), unresolved=route.repository, explain_on=REFUSED)
        return Plan(route.target())
    if match.verdict is Verdict.UNRESOLVED:
        return Plan(route.target(), unresolved=route.repository, explain_on=REFUSED)
    if match.verdict is Verdict.GRANTED:
        if _is_legacy_grant(route):
            return Plan(
                route.target(),
                unresolved=route.repository,
                explain_on=NOT_FOUND,
                challenge=route.kind is Kind.TAGS,
            )
        return Plan(route.target())
    reference = route.reference
    if route.kind is Kind.MANIFEST and not route.by_digest and not is_referrers_tag(reference):
        reference = UPSTREAM_TAG
    target = route.target(repository=match.repository, reference=reference)
    return Plan(target, names=Names(alias=route.repository, real=match.repository))


# OCI 1.1's referrers tag schema: <alg>-<hex of a digest>, a suffix such as .sig or .att after
# it by the habit of cosign and others. Clients without a referrers API ask for it to find the
# signatures and SBOMs of an image; it is no name of the release's.
_REFERRERS_TAG_RE = re.compile(r"sha256-[0-9a-f]{64}(?:\.[A-Za-z0-9_-]+)*")


def is_referrers_tag(reference: str | None) -> bool:
    """Whether a manifest ``reference`` is a referrers fallback tag, kept as it is upstream."""
    return reference is not None and _REFERRERS_TAG_RE.fullmatch(reference) is not None


def _is_legacy_grant(route: Route) -> bool:
    """Whether a direct grant is the API's fallback for an app name it could not resolve
    (asked for by tag or for its tags).

    For a bare ``<org>/<app>`` that resolves to no release (unknown app, or a private one the
    caller may not see), the balena API grants pull on the name itself, which no repository
    has; the registry then answers 404. Real repositories are opaque ``v2/<hash>`` names (an
    org whose slug is ``v2`` would miss the friendlier message, nothing else).
    """
    by_name = route.kind is Kind.TAGS or (route.kind is Kind.MANIFEST and not route.by_digest)
    return by_name and route.repository is not None and not route.repository.startswith("v2/")


def map_tags_body(body: bytes, real: str, alias: str) -> bytes | None:
    """Rewrite a ``tags/list`` JSON body's ``name`` from ``real`` to ``alias``.

    Returns None when the body is not the expected JSON object, so it is relayed untouched.
    """
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(document, dict) or document.get("name") != real:
        return None
    document["name"] = alias
    return json.dumps(document, separators=(",", ":")).encode()


def map_link(value: str, real: str, alias: str) -> str:
    """Point a pagination ``Link`` header at the client's name instead of the real one."""
    return value.replace(f"/v2/{real}/", f"/v2/{alias}/")


def map_challenge(value: str, real: str, alias: str) -> str:
    """Make a ``WWW-Authenticate`` scope ask for the client's name.

    Clients fetch their next token with the scope the challenge names. Asking the token server
    for the real repository would return a token without the alias entry, and the client's next
    request under its own name could not be mapped any more.
    """
    pattern = re.compile(rf"(repository:){re.escape(real)}(:)")
    return pattern.sub(lambda m: f"{m.group(1)}{alias}{m.group(2)}", value)


def map_response_headers(
    headers: list[tuple[str, str]], plan: Plan, upstream_origin: str
) -> list[tuple[str, str]]:
    """Point redirects back at the proxy and, for rewritten requests, names back at the alias."""
    mapped = []
    for name, value in headers:
        lower = name.lower()
        names = plan.names
        if lower == "location":
            value = rewrite_location(value, upstream_origin)
            if names is not None and value.startswith("/"):
                value = map_link(value, names.real, names.alias)
        elif names is not None:
            if lower == "www-authenticate":
                value = map_challenge(value, names.real, names.alias)
            elif lower == "link":
                value = map_link(value, names.real, names.alias)
        mapped.append((name, value))
    return mapped
