"""What the proxy does with a request, and with the upstream's answer to it.

Pure functions, no I/O: ``proxy.py`` asks, then carries out what they decide. Before asking
upstream, ``fetch_mode`` decides where the answer comes from (the cache, the registry with
its blob redirects followed, or the registry alone); with the answer's status in hand,
``decide`` says what the client gets (the answer streamed, a denial explained, tags mapped
back to the client's name, a manifest kept, a well-framed 416).
"""

from __future__ import annotations

from enum import Enum

from .digests import cacheable
from .rewrite import Plan
from .routes import Kind, Route

READ_METHODS = frozenset({"GET", "HEAD"})
NO_BODY_STATUSES = frozenset({204, 304})


class Fetch(Enum):
    """Where the answer to a request comes from."""

    CACHE = "cache"
    """The edge cache: a blob or a manifest by a digest it can verify."""
    FOLLOWING = "following"
    """The registry, its redirect to storage followed by the proxy (a blob GET)."""
    UPSTREAM = "upstream"
    """The registry, whatever it answers relayed."""


class Action(Enum):
    """What the client gets from an upstream answer."""

    STREAM = "stream"
    """The answer, relayed as it is (its names mapped back)."""
    RANGE_NOT_SATISFIABLE = "range-not-satisfiable"
    """A 416 with its Content-Range and a body of the proxy's own: distribution 2.8 announces
    the blob's length and sends a short text, which a client framing by length waits for."""
    EXPLAIN = "explain"
    """The answer's status with a message saying which name failed and how to write it."""
    CHALLENGE = "challenge"
    """The registry's 401 challenge for the name, asked for anonymously, with the message."""
    MAP_TAGS = "map-tags"
    """A tags/list of the real repository, its name given back as the client's."""
    KEEP_MANIFEST = "keep-manifest"
    """A manifest by digest, kept in the cache as it is relayed."""


def cache_serves(route: Route) -> bool:
    """Whether the cache answers ``route``: a blob or manifest by a digest it verifies."""
    return (
        route.kind in (Kind.BLOB, Kind.MANIFEST)
        and route.repository is not None
        and route.reference is not None
        and cacheable(route.reference)
    )


def fetch_mode(route: Route, method: str, *, caching: bool, following: bool) -> Fetch:
    """Where the answer to ``method route`` comes from, with or without a cache, and with or
    without blob redirects followed by the proxy."""
    if caching and cache_serves(route):
        return Fetch.CACHE
    if following and route.kind is Kind.BLOB and method == "GET":
        return Fetch.FOLLOWING
    return Fetch.UPSTREAM


def has_body(method: str, status: int) -> bool:
    """Whether an answer of ``status`` to ``method`` carries a body."""
    return method != "HEAD" and status not in NO_BODY_STATUSES


def decide(
    route: Route, plan: Plan, method: str, status: int, *, encoded: bool, caching: bool
) -> Action:
    """What the client gets from the upstream's ``status`` answer to ``method route``.

    ``encoded``: the answer has a Content-Encoding (its body cannot be read as JSON or hashed
    as a manifest); ``caching``: the proxy has a cache.
    """
    if status == 416:
        return Action.RANGE_NOT_SATISFIABLE
    if plan.unresolved is not None and status in plan.explain_on:
        return Action.CHALLENGE if plan.challenge and status == 404 else Action.EXPLAIN
    readable = status == 200 and has_body(method, status) and not encoded
    if readable and plan.names is not None and route.kind is Kind.TAGS:
        return Action.MAP_TAGS
    if readable and caching and route.kind is Kind.MANIFEST and cache_serves(route):
        return Action.KEEP_MANIFEST
    return Action.STREAM
