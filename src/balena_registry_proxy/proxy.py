"""The ``/v2/`` handler: parse, decide, forward, relay.

The decisions are made by the pure modules (``routes``, ``access``, ``rewrite``, ``headers``);
this module only moves bytes between the client and the upstream registry, streaming both ways
with backpressure, so a multi-GiB layer never sits in memory.
"""

from __future__ import annotations

import logging
import time
from contextlib import AsyncExitStack
from urllib.parse import urlsplit

from aiohttp import web
from multidict import CIMultiDict

from .access import bearer_token, find_access, grants_pull, token_entries
from .accesslog import redact_target
from .denial import explain
from .disk_store import MAX_MANIFEST_BYTES, cacheable
from .edge_cache import EdgeCache, Uncached
from .errors import (
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
    redirect_request_headers,
    upstream_request_headers,
    without_body_headers,
)
from .metrics import Metrics
from .realm import challenge_realm, challenge_service, own_realm, replace_realm, token_request_url
from .request_state import BODY_BYTES, REQUEST_ID, ROUTE, UPSTREAM_TARGET
from .rewrite import Plan, map_response_headers, map_tags_body, plan_request
from .routes import Kind, Route, parse_target
from .upstream import Response, Upstream
from .upstream_errors import UpstreamError
from .verification import TokenVerifier

log = logging.getLogger("balena_registry_proxy")

# Route kinds as metric labels: few values, so few series.
_ROUTE_LABELS = {Kind.MANIFEST: "manifest", Kind.BLOB: "blob", Kind.TAGS: "tags"}
READ_METHODS = frozenset({"GET", "HEAD"})
# Bodies the proxy rewrites are small JSON documents; a bigger one is relayed untouched.
MAX_REWRITTEN_BODY = 1 << 20
# Bodies up to this size are read whole and sent with their headers in one write.
SMALL_BODY = 64 * 1024
_NO_BODY_STATUSES = frozenset({204, 304})


class Proxy:
    """Forwards registry API requests to one upstream registry."""

    def __init__(
        self,
        upstream: Upstream,
        metrics: Metrics,
        *,
        verifier: TokenVerifier | None = None,
        blobs: EdgeCache | None = None,
        follow_redirects: bool = False,
        proxy_auth: bool = False,
        trust: TrustProxy | None = None,
    ) -> None:
        """Serve requests through ``upstream``, counting in ``metrics``.

        With a ``verifier``, a token that fails verification is neither used for aliases nor
        sent upstream. With ``blobs``, blobs come from the cache; with ``follow_redirects``, the
        proxy follows blob redirects to storage itself instead of passing them on.
        """
        self.upstream = upstream
        self.metrics = metrics
        self.verifier = verifier
        self.blobs = blobs
        self.follow_redirects = follow_redirects
        self.proxy_auth = proxy_auth
        self.trust = trust or TrustProxy()
        self.realm: str | None = None
        """The upstream's token realm, learned from its challenges (edge mode)."""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Answer one request under ``/v2``."""
        if request.method not in READ_METHODS:
            raise unsupported_method(request.method)
        route = parse_target(request.raw_path)
        label = _ROUTE_LABELS.get(route.kind, "other")
        request[ROUTE] = label
        token = _bearer(request)
        if token is not None and self.verifier is not None and self.verifier.audience is None:
            await self._learn_audience(request)
        refused = token is not None and not self._accepts(token)
        match = None
        if token is not None and not refused and route.repository is not None:
            match = find_access(token_entries(token), route.repository)
        plan = plan_request(route, match)
        self.metrics.rewrites.labels("refused" if refused else _outcome(plan)).inc()
        if plan.names is not None:
            request[UPSTREAM_TARGET] = plan.target
        scheme, host = self._origin(request)
        forwarding = forwarding_headers(
            request.remote, request.headers.getall("X-Forwarded-For", []), scheme, host, self.trust
        )
        headers = upstream_request_headers(
            request.headers.items(), request[REQUEST_ID], forwarding, drop_authorization=refused
        )
        try:
            if self.blobs is not None and _cacheable(route):
                answer = await self._from_cache(request, route, plan, token, refused, headers)
                if isinstance(answer, Uncached):
                    async with answer.stack:
                        return await self._relay(
                            request, route, plan, answer.response, headers, host
                        )
                if answer is not None:
                    return answer
            follow = self.follow_redirects and route.kind is Kind.BLOB and request.method == "GET"
            started = time.perf_counter()
            async with AsyncExitStack() as stack:
                if follow:
                    upstream = await self.upstream.get_following(stack, plan.target, headers)
                else:
                    upstream = await stack.enter_async_context(
                        self.upstream.request(request.method, plan.target, headers)
                    )
                self.metrics.upstream_latency.labels(label).observe(time.perf_counter() - started)
                return await self._relay(request, route, plan, upstream, headers, host)
        except UpstreamError as error:
            cached = self.blobs is not None and _cacheable(route)
            raise self._failed(request, error, "upstream registry", cached=cached) from None

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

    async def _from_cache(
        self,
        request: web.Request,
        route: Route,
        plan: Plan,
        token: str | None,
        refused: bool,
        headers: list[tuple[str, str]],
    ) -> web.StreamResponse | Uncached | None:
        """The cache's answer to a blob or manifest request by digest, None to relay it, or
        the upstream's answer the cache did not keep."""
        assert self.blobs is not None
        assert route.reference is not None
        repository = _real_repository(route, plan)
        # Offline, a token this proxy verified itself stands in for the upstream's word.
        verified = (
            self.verifier is not None
            and token is not None
            and not refused
            and grants_pull(token_entries(token), route.repository or "")
        )
        if route.kind is Kind.MANIFEST:
            return await self.blobs.serve_manifest(
                request, repository, route.reference, headers, verified_pull=verified
            )
        return await self.blobs.serve(
            request, repository, route.reference, headers, verified_pull=verified
        )

    def _own_realm(
        self, request: web.Request, headers: list[tuple[str, str]]
    ) -> list[tuple[str, str]]:
        """Name the proxy as the token realm, remembering the real one to pass requests to.

        Only for the registry's own answers: a storage host a redirect led to is no authority
        on where clients get their tokens.
        """
        scheme, host = self._origin(request)
        mapped = []
        for name, value in headers:
            if name.lower() == "www-authenticate" and (real := challenge_realm(value)):
                self.realm = real
                value = replace_realm(value, own_realm(scheme, host))
            mapped.append((name, value))
        return mapped

    async def token(self, request: web.Request) -> web.StreamResponse:
        """Edge mode: pass a token request on to the real realm; credentials pass through."""
        if self.realm is None:
            await self._learn_realm(request)
        if self.realm is None:
            raise RegistryError(503, "UNAVAILABLE", "the upstream registry names no token realm")
        headers = redirect_request_headers(request.headers.items())
        authorization = request.headers.get("Authorization")
        if authorization is not None:
            headers.append(("Authorization", authorization))
        url = token_request_url(self.realm, request.rel_url.raw_query_string)
        try:
            async with self.upstream.fetch(url, headers) as answer:
                body, complete = await _read_small(answer)
                if not complete:
                    raise RegistryError(
                        502, "UNAVAILABLE", "the token server's answer is too large"
                    )
                content_type = answer.headers.get("Content-Type", "application/json")
                return web.Response(
                    status=answer.status, body=body, headers={"Content-Type": content_type}
                )
        except UpstreamError as error:
            raise self._failed(request, error, "token server") from None

    async def _learn_realm(self, request: web.Request) -> None:
        try:
            async with self.upstream.request(
                "GET", "/v2/", [("X-Request-Id", request[REQUEST_ID])]
            ) as probe:
                self.realm = challenge_realm(probe.headers.get("WWW-Authenticate", ""))
        except UpstreamError as error:
            raise self._failed(request, error, "upstream registry") from None

    async def _learn_audience(self, request: web.Request) -> None:
        """Take the tokens' audience from the registry's challenge: the ``service`` it names.

        Its tokens are issued for that name (balenaCloud's API uses its REGISTRY2_HOST), which
        need not be the host the proxy reaches the registry under.
        """
        assert self.verifier is not None
        try:
            async with self.upstream.request(
                "GET", "/v2/", [("X-Request-Id", request[REQUEST_ID])]
            ) as probe:
                service = challenge_service(probe.headers.get("WWW-Authenticate", ""))
        except UpstreamError as error:
            raise self._failed(request, error, "upstream registry") from None
        self.verifier.audience = service or urlsplit(self.upstream.base_url).hostname or ""
        log.info("verifying tokens issued for %s", self.verifier.audience)

    def _accepts(self, token: str) -> bool:
        return self.verifier is None or self.verifier.is_valid(token)

    async def _relay(
        self,
        request: web.Request,
        route: Route,
        plan: Plan,
        upstream: Response,
        sent: list[tuple[str, str]],
        host: str,
    ) -> web.StreamResponse:
        """Answer the client from ``upstream``, the answer to a request with ``sent`` headers;
        ``host`` is the proxy's name as the client used it."""
        headers = map_response_headers(
            client_response_headers(upstream.headers.items()), plan, self.upstream.base_url
        )
        if self.proxy_auth and upstream.from_registry:
            headers = self._own_realm(request, headers)
        has_body = request.method != "HEAD" and upstream.status not in _NO_BODY_STATUSES
        if upstream.status == 416:
            # Distribution 2.8 announces the blob's length and sends a short text instead: a
            # client framing by that length would wait for ever. The client needs the status
            # and Content-Range (the size); its body is ours, and that connection is dropped
            # unread, never reused.
            body = error_body("RANGE_INVALID", "the requested range is not within the blob")
            return _buffered(416, without_body_headers(headers, keep=("content-range",)), body)
        if plan.unresolved is not None and upstream.status in plan.explain_on:
            if plan.challenge:
                challenged = await self._challenge(request, plan, sent)
                if challenged is not None:
                    status, headers = challenged
                    body = explain(plan.unresolved, "UNAUTHORIZED", host)
                    return _buffered(status, without_body_headers(headers), body)
            # A HEAD answer announces a body it does not carry: waiting for it would hang.
            denial, _ = await _read_small(upstream) if has_body else (b"", True)
            body = explain(plan.unresolved, first_error_code(denial), host)
            return _buffered(upstream.status, without_body_headers(headers), body)
        if (
            plan.names is not None
            and route.kind is Kind.TAGS
            and upstream.status == 200
            and has_body
            and "Content-Encoding" not in upstream.headers
        ):
            original, complete = await _read_small(upstream)
            if not complete:
                return await self._stream(request, upstream, headers, prefix=original)
            mapped = map_tags_body(original, plan.names.real, plan.names.alias)
            if mapped is None:
                return _buffered(upstream.status, headers, original)
            return _buffered(upstream.status, without_body_headers(headers), mapped)
        if (
            self.blobs is not None
            and route.kind is Kind.MANIFEST
            and _cacheable(route)
            and upstream.status == 200
            and has_body
            and "Content-Encoding" not in upstream.headers
        ):
            body, complete = await _read_small(upstream, MAX_MANIFEST_BYTES)
            if not complete:
                return await self._stream(request, upstream, headers, prefix=body)
            content_type = upstream.headers.get("Content-Type", "")
            assert route.reference is not None
            await self.blobs.keep_manifest(
                sent, _real_repository(route, plan), route.reference, content_type, body
            )
            return _buffered(upstream.status, headers, body)
        return await self._stream(request, upstream, headers)

    async def _challenge(
        self, request: web.Request, plan: Plan, sent: list[tuple[str, str]]
    ) -> tuple[int, list[tuple[str, str]]] | None:
        """The registry's 401 and its challenge for the request, asked for without credentials.

        None if the registry does not challenge an anonymous request for it.
        """
        anonymous = [(name, value) for name, value in sent if name.lower() != "authorization"]
        async with self.upstream.request("GET", plan.target, anonymous) as answer:
            if answer.status != 401 or "WWW-Authenticate" not in answer.headers:
                return None
            headers = client_response_headers(answer.headers.items())
        return 401, self._own_realm(request, headers) if self.proxy_auth else headers

    async def _stream(
        self,
        request: web.Request,
        upstream: Response,
        headers: list[tuple[str, str]],
        prefix: bytes = b"",
    ) -> web.StreamResponse:
        """Relay the rest of the upstream body (after ``prefix``, already read) to the client."""
        length = upstream.content_length
        has_body = request.method != "HEAD" and upstream.status not in _NO_BODY_STATUSES
        if not prefix and has_body and length is not None and length <= SMALL_BODY:
            # Mostly there already: one write of headers and body instead of two, and an
            # upstream failure can still be answered with an error instead of a cut.
            body = await upstream.content.readexactly(length)
            request[BODY_BYTES] = length
            return _buffered(upstream.status, headers, body, upstream.reason)
        response = web.StreamResponse(
            status=upstream.status, reason=upstream.reason, headers=CIMultiDict(headers)
        )
        # Without a length aiohttp frames the body itself: chunked for HTTP/1.1, close for 1.0.
        if length is not None:
            response.content_length = length
        await response.prepare(request)
        if not has_body:
            return response
        sent = 0
        try:
            if prefix:
                await response.write(prefix)
                sent += len(prefix)
            transport = request.transport
            if transport is None:
                return response

            def send(chunk: bytes) -> bool:
                # Headers are out, and the body needs no framing of its own (a length, or
                # HTTP/1.0's end at close): straight into the client's connection.
                nonlocal sent
                if transport.is_closing():
                    return False
                transport.write(chunk)
                sent += len(chunk)
                return not transport.get_write_buffer_size()

            async def drained() -> None:
                if transport.is_closing():
                    raise ConnectionResetError("the client left")
                await request.writer.drain()

            if length is not None or request.version < (1, 1):
                await upstream.content.pipe(send, drained)
            else:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                    sent += len(chunk)
        except ConnectionResetError:
            # The client went away; leaving the upstream context closes that connection too.
            return response
        except UpstreamError as error:
            # Headers are out, so no error response is possible: cut the connection so the
            # client sees a short body (and retries with Range) instead of waiting or trusting.
            self.metrics.upstream_errors.labels("cut").inc()
            log.warning(
                "upstream failed mid-response for %s: %s rid=%s",
                redact_target(request.get(UPSTREAM_TARGET, request.raw_path)),
                error.cause,
                request[REQUEST_ID],
            )
            if request.transport is not None:
                request.transport.close()
        finally:
            request[BODY_BYTES] = sent
        return response


def _cacheable(route: Route) -> bool:
    """A blob or manifest request by a digest the cache can verify."""
    return (
        route.kind in (Kind.BLOB, Kind.MANIFEST)
        and route.repository is not None
        and route.reference is not None
        and cacheable(route.reference)
    )


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


def _buffered(
    status: int, headers: list[tuple[str, str]], body: bytes, reason: str | None = None
) -> web.Response:
    return web.Response(status=status, reason=reason, body=body, headers=CIMultiDict(headers))


async def _read_small(upstream: Response, limit: int = MAX_REWRITTEN_BODY) -> tuple[bytes, bool]:
    """Up to ``limit`` bytes of the body, and whether that is all of it."""
    length = upstream.content_length
    if length is not None and length > limit:
        return b"", False
    if length is not None:
        return await upstream.content.readexactly(length), True
    body = bytearray()
    while len(body) <= limit:
        chunk = await upstream.content.readany()
        if not chunk:
            return bytes(body), True
        body += chunk
    return bytes(body), False
