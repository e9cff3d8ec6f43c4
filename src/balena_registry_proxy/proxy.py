"""The ``/v2/`` handler: carries out what the pure modules decide.

A request meets, in order: ``routes.parse_target`` (what it asks for), ``access`` (what its
token says of the name), ``rewrite.plan_request`` (where it goes upstream),
``answers.fetch_mode`` (from the cache, the registry with its redirects followed, or the
registry), then ``answers.decide`` (what the client gets from the answer), and ``relay`` writes
it. This module holds the sequence and the I/O between the steps, nothing that decides.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web

from .access import bearer_token, find_access, grants_pull, token_entries
from .accesslog import redact_target
from .answers import READ_METHODS, Action, Fetch, decide, fetch_mode, has_body
from .denial import explain
from .digests import MAX_MANIFEST_BYTES
from .edge_cache import EdgeCache, Uncached
from .envelope import Sealer, is_sealed
from .errors import (
    CredentialsRefused,
    RegistryError,
    bad_request,
    error_body,
    first_error_code,
    unsupported_method,
    upstream_failure,
)
from .forwarded import TrustProxy, effective_origin, forwarding_headers
from .headers import (
    client_response_headers,
    storage_response_headers,
    upstream_request_headers,
    without_body_headers,
)
from .login import Login
from .metrics import Metrics
from .realm import bearer_challenge, challenge_service, own_realm
from .relay import buffered, stream
from .request_state import REQUEST_ID, ROUTE, UPSTREAM_TARGET
from .resolution import Listing, listing_body, next_link
from .resolver import Resolver
from .rewrite import Plan, map_response_headers, map_tags_body, plan_request
from .routes import Kind, Route, parse_target
from .token_relay import TokenRelay
from .upstream import Response, Upstream
from .upstream_errors import UpstreamError
from .verification import TokenVerifier

log = logging.getLogger("balena_registry_proxy")

# Route kinds as metric labels: few values, so few series.
_ROUTE_LABELS = {Kind.MANIFEST: "manifest", Kind.BLOB: "blob", Kind.TAGS: "tags"}
# Bodies the proxy rewrites are small JSON documents; a bigger one is relayed untouched.
MAX_REWRITTEN_BODY = 1 << 20


@dataclass(frozen=True, slots=True)
class Resolving:
    """What resolver mode adds: its token endpoint, the key its tokens open with, and the
    resolver."""

    login: Login
    sealer: Sealer
    resolver: Resolver


@dataclass(frozen=True, slots=True)
class _Exchange:
    """One request on its way: what the pure steps made of it."""

    request: web.Request
    route: Route
    plan: Plan
    sent: list[tuple[str, str]]
    """The headers sent upstream."""
    scheme: str
    host: str
    """How the client addressed the proxy."""


class Proxy:
    """Forwards registry API requests to one upstream registry."""

    def __init__(
        self,
        upstream: Upstream,
        metrics: Metrics,
        *,
        verifier: TokenVerifier | None = None,
        cache: EdgeCache | None = None,
        follow_redirects: bool = False,
        token_relay: TokenRelay | None = None,
        trust: TrustProxy | None = None,
        send_timeout: float = 60.0,
        resolving: Resolving | None = None,
    ) -> None:
        """Serve requests through ``upstream``, counting in ``metrics``.

        With a ``verifier``, a token that fails verification is neither used for aliases nor
        sent upstream. With a ``cache``, blobs and manifests by digest come from it; with
        ``follow_redirects``, the proxy follows blob redirects to storage itself instead of
        passing them on; with a ``token_relay`` (edge mode), the registry's challenges name
        the proxy as the token realm. A client taking nothing of an answer for
        ``send_timeout`` seconds is disconnected. With ``resolving`` (resolver mode, which
        needs a ``token_relay``), the proxy's own tokens are resolved through the balena API.
        """
        self.upstream = upstream
        self.metrics = metrics
        self.verifier = verifier
        self.cache = cache
        self.follow_redirects = follow_redirects
        self.token_relay = token_relay
        self.trust = trust or TrustProxy()
        self.send_timeout = send_timeout
        self.resolving = resolving

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Answer one request under ``/v2``."""
        if request.method not in READ_METHODS:
            raise unsupported_method(request.method)
        route = parse_target(request.raw_path)
        request[ROUTE] = _ROUTE_LABELS.get(route.kind, "other")
        token = _bearer(request)
        if self.resolving is not None and token is not None and is_sealed(token):
            return await self._resolved(request, route, token, self.resolving)
        if token is not None and self.verifier is not None and self.verifier.audience is None:
            await self._learn_audience(request)
        refused = (
            token is not None and self.verifier is not None and not self.verifier.is_valid(token)
        )
        match = None
        if token is not None and not refused and route.repository is not None:
            match = find_access(token_entries(token), route.repository)
        plan = plan_request(route, match, with_token=token is not None and not refused)
        self.metrics.rewrites.labels("refused" if refused else _outcome(plan)).inc()
        # Offline, a token this proxy verified itself stands in for the upstream's word.
        verified = (
            self.verifier is not None
            and token is not None
            and not refused
            and grants_pull(token_entries(token), route.repository or "")
        )
        # In resolver mode credentials go to the API and the realm only: a client's Basic
        # credentials sent to the registry itself stay here.
        basic = self.resolving is not None and token is None
        sent = self._sent(request, drop_authorization=refused or basic)
        return await self._forward(
            _Exchange(request, route, plan, sent, *self._origin(request)), verified
        )

    async def _resolved(
        self, request: web.Request, route: Route, token: str, resolving: Resolving
    ) -> web.StreamResponse:
        """Resolver mode: a request with one of the proxy's own tokens."""
        scheme, host = self._origin(request)
        envelope = resolving.sealer.open(token, time.time())
        try:
            if envelope is None:
                raise RegistryError(
                    401,
                    "UNAUTHORIZED",
                    "the token has expired or is not this proxy's: log in again",
                )
            outcome = await resolving.resolver.resolve(route, envelope, host, request[REQUEST_ID])
        except RegistryError as error:
            if error.status == 401:
                # A login that no longer opens or no longer counts is logged in again; a
                # valid one that cannot read the name may log in as someone who can.
                relogin = envelope is None or isinstance(error, CredentialsRefused)
                error.headers["WWW-Authenticate"] = self._challenge_for(
                    route.repository,
                    scheme,
                    host,
                    "invalid_token" if relogin else "insufficient_scope",
                )
            raise
        except UpstreamError as error:
            raise self._failed(request, error, "upstream registry or token server") from None
        if isinstance(outcome, Listing):
            self.metrics.rewrites.labels("listed").inc()
            assert route.repository is not None
            headers = [("Content-Type", "application/json")]
            link = next_link(route, outcome)
            if link is not None:
                headers.append(("Link", link))
            body = listing_body(route.repository, outcome)
            return buffered(200, headers, b"" if request.method == "HEAD" else body)
        self.metrics.rewrites.labels("resolved").inc()
        plan = outcome.plan
        request[UPSTREAM_TARGET] = plan.target
        sent = self._sent(request, drop_authorization=True)
        sent.append(("Authorization", f"Bearer {outcome.authorization}"))
        verified = (
            self.verifier is not None
            and plan.names is not None
            and grants_pull(token_entries(outcome.authorization), plan.names.real)
        )
        return await self._forward(_Exchange(request, route, plan, sent, scheme, host), verified)

    def _sent(self, request: web.Request, *, drop_authorization: bool) -> list[tuple[str, str]]:
        """The headers a request goes upstream with."""
        scheme, host = self._origin(request)
        forwarding = forwarding_headers(
            request.remote, request.headers.getall("X-Forwarded-For", []), scheme, host, self.trust
        )
        return upstream_request_headers(
            request.headers.items(),
            request[REQUEST_ID],
            forwarding,
            drop_authorization=drop_authorization,
        )

    def _challenge_for(self, repository: str | None, scheme: str, host: str, error: str) -> str:
        """A challenge that sends the client to the proxy's token endpoint for ``repository``."""
        service = self.token_relay.service if self.token_relay is not None else None
        return bearer_challenge(own_realm(scheme, host), service, repository, error)

    async def _forward(self, exchange: _Exchange, verified: bool) -> web.StreamResponse:
        """Answer ``exchange`` from the cache or the upstream, as its plan says.

        ``verified``: the request's token was verified here and grants pull on the name.
        """
        request, route, plan = exchange.request, exchange.route, exchange.plan
        if plan.names is not None:
            request[UPSTREAM_TARGET] = plan.target
        mode = fetch_mode(
            route,
            request.method,
            caching=self.cache is not None,
            following=self.follow_redirects,
        )
        label = request[ROUTE]
        try:
            if mode is Fetch.CACHE:
                answer = await self._from_cache(exchange, verified)
                if isinstance(answer, Uncached):
                    async with answer.stack:
                        return await self._answer(exchange, answer.response)
                if answer is not None:
                    return answer
            started = time.perf_counter()
            async with AsyncExitStack() as stack:
                if mode is Fetch.FOLLOWING:
                    upstream = await self.upstream.get_following(stack, plan.target, exchange.sent)
                else:
                    upstream = await stack.enter_async_context(
                        self.upstream.request(request.method, plan.target, exchange.sent)
                    )
                self.metrics.upstream_latency.labels(label).observe(time.perf_counter() - started)
                return await self._answer(exchange, upstream)
        except UpstreamError as error:
            cached = mode is Fetch.CACHE
            raise self._failed(request, error, "upstream registry", cached=cached) from None

    async def token(self, request: web.Request) -> web.StreamResponse:
        """The proxy's token endpoint: a login sealed into a proxy token (resolver mode), or
        the request passed on to the registry's real realm (edge mode)."""
        try:
            if self.resolving is not None:
                return await self.resolving.login.token(request)
            assert self.token_relay is not None
            return await self.token_relay.token(request)
        except UpstreamError as error:
            raise self._failed(request, error, "token server") from None

    async def _answer(self, exchange: _Exchange, upstream: Response) -> web.StreamResponse:
        """Answer the client from ``upstream`` as ``answers.decide`` says."""
        request, route, plan = exchange.request, exchange.route, exchange.plan
        headers = map_response_headers(
            client_response_headers(upstream.headers.items()), plan, self.upstream.base_url
        )
        if not upstream.from_registry:
            headers = storage_response_headers(headers)
        elif self.token_relay is not None:
            headers = self.token_relay.own_challenges(headers, exchange.scheme, exchange.host)
        action = decide(
            route,
            plan,
            request.method,
            upstream.status,
            encoded="Content-Encoding" in upstream.headers,
            caching=self.cache is not None,
        )
        return await _ACTIONS[action](self, exchange, upstream, headers)

    async def _stream(
        self, exchange: _Exchange, upstream: Response, headers: list[tuple[str, str]]
    ) -> web.StreamResponse:
        return await stream(exchange.request, upstream, headers, self.metrics, self.send_timeout)

    async def _range_not_satisfiable(
        self, exchange: _Exchange, upstream: Response, headers: list[tuple[str, str]]
    ) -> web.StreamResponse:
        # The answer's body is not read: that connection is dropped, never reused.
        body = error_body("RANGE_INVALID", "the requested range is not within the blob")
        return buffered(416, without_body_headers(headers, keep=("content-range",)), body)

    async def _explain(
        self, exchange: _Exchange, upstream: Response, headers: list[tuple[str, str]]
    ) -> web.StreamResponse:
        assert exchange.plan.unresolved is not None
        # A HEAD answer announces a body it does not carry: waiting for it would hang.
        if has_body(exchange.request.method, upstream.status):
            denial, _ = await upstream.read_up_to(MAX_REWRITTEN_BODY)
        else:
            denial = b""
        body = explain(exchange.plan.unresolved, first_error_code(denial), exchange.host)
        return buffered(upstream.status, without_body_headers(headers), body)

    async def _challenge(
        self, exchange: _Exchange, upstream: Response, headers: list[tuple[str, str]]
    ) -> web.StreamResponse:
        """The registry's own 401 for the name, asked for without credentials, explained.

        Explained as it is when the registry does not challenge an anonymous request for it.
        """
        anonymous = [(k, v) for k, v in exchange.sent if k.lower() != "authorization"]
        async with self.upstream.request("GET", exchange.plan.target, anonymous) as answer:
            challenged = answer.status == 401 and "WWW-Authenticate" in answer.headers
            if challenged:
                headers = client_response_headers(answer.headers.items())
        if not challenged:
            return await self._explain(exchange, upstream, headers)
        if self.token_relay is not None:
            headers = self.token_relay.own_challenges(headers, exchange.scheme, exchange.host)
        assert exchange.plan.unresolved is not None
        body = explain(exchange.plan.unresolved, "UNAUTHORIZED", exchange.host)
        return buffered(401, without_body_headers(headers), body)

    async def _map_tags(
        self, exchange: _Exchange, upstream: Response, headers: list[tuple[str, str]]
    ) -> web.StreamResponse:
        names = exchange.plan.names
        assert names is not None
        original, complete = await upstream.read_up_to(MAX_REWRITTEN_BODY)
        if not complete:
            return await stream(
                exchange.request, upstream, headers, self.metrics, self.send_timeout, original
            )
        mapped = map_tags_body(original, names.real, names.alias)
        if mapped is None:
            return buffered(upstream.status, headers, original)
        return buffered(upstream.status, without_body_headers(headers), mapped)

    async def _keep_manifest(
        self, exchange: _Exchange, upstream: Response, headers: list[tuple[str, str]]
    ) -> web.StreamResponse:
        assert self.cache is not None
        body, complete = await upstream.read_up_to(MAX_MANIFEST_BYTES)
        if not complete:
            return await stream(
                exchange.request, upstream, headers, self.metrics, self.send_timeout, body
            )
        content_type = upstream.headers.get("Content-Type", "")
        assert exchange.route.reference is not None
        await self.cache.keep_manifest(
            exchange.sent,
            _real_repository(exchange.route, exchange.plan),
            exchange.route.reference,
            content_type,
            body,
        )
        return buffered(upstream.status, headers, body)

    async def _from_cache(
        self, exchange: _Exchange, verified: bool
    ) -> web.StreamResponse | Uncached | None:
        """The cache's answer to a blob or manifest request by digest, None to relay it, or
        the upstream's answer the cache did not keep."""
        assert self.cache is not None
        request, route = exchange.request, exchange.route
        assert route.reference is not None
        repository = _real_repository(route, exchange.plan)
        if route.kind is Kind.MANIFEST:
            return await self.cache.serve_manifest(
                request, repository, route.reference, exchange.sent, verified_pull=verified
            )
        return await self.cache.serve(
            request, repository, route.reference, exchange.sent, verified_pull=verified
        )

    def _failed(
        self, request: web.Request, error: UpstreamError, what: str, *, cached: bool = False
    ) -> RegistryError:
        """Count and log an upstream failure; the answer the client gets for it."""
        self.metrics.upstream_errors.labels(error.kind).inc()
        log.warning(
            "%s failed for %s %s: %s rid=%s",
            what,
            request.method,
            redact_target(request.get(UPSTREAM_TARGET, request.raw_path)),
            error.cause,
            request[REQUEST_ID],
        )
        return upstream_failure(error, what, cached=cached)

    def _origin(self, request: web.Request) -> tuple[str, str]:
        """The scheme and host the client used to reach the proxy."""
        return effective_origin(
            request.remote,
            request.scheme,
            request.headers.get("Host", ""),
            request.headers.get("X-Forwarded-Proto"),
            request.headers.get("X-Forwarded-Host"),
            self.trust,
        )

    async def _learn_audience(self, request: web.Request) -> None:
        """Take the tokens' audience from the registry's challenge: the ``service`` it names.

        Its tokens are issued for that name (balenaCloud's API uses its REGISTRY2_HOST), which
        need not be the host the proxy reaches the registry under.
        """
        assert self.verifier is not None
        try:
            service = challenge_service(await self.upstream.challenge(request[REQUEST_ID]))
        except UpstreamError as error:
            raise self._failed(request, error, "upstream registry") from None
        self.verifier.audience = service or urlsplit(self.upstream.base_url).hostname or ""
        log.info("verifying tokens issued for %s", self.verifier.audience)


_Carry = Callable[
    [Proxy, _Exchange, Response, list[tuple[str, str]]], Awaitable[web.StreamResponse]
]
_ACTIONS: dict[Action, _Carry] = {
    Action.STREAM: Proxy._stream,
    Action.RANGE_NOT_SATISFIABLE: Proxy._range_not_satisfiable,
    Action.EXPLAIN: Proxy._explain,
    Action.CHALLENGE: Proxy._challenge,
    Action.MAP_TAGS: Proxy._map_tags,
    Action.KEEP_MANIFEST: Proxy._keep_manifest,
}


def _real_repository(route: Route, plan: Plan) -> str:
    """The upstream repository a request is for: the real name behind an alias."""
    if plan.names is not None:
        return plan.names.real
    assert route.repository is not None
    return route.repository


def _outcome(plan: Plan) -> str:
    if plan.names is not None:
        return "aliased"
    return "unresolved" if plan.unresolved is not None else "passthrough"


def _bearer(request: web.Request) -> str | None:
    """The request's bearer token; two Authorization headers are refused as ambiguous."""
    authorizations = request.headers.getall("Authorization", [])
    if len(authorizations) > 1:
        raise bad_request("UNSUPPORTED", "more than one Authorization header")
    return bearer_token(authorizations[0] if authorizations else None)
