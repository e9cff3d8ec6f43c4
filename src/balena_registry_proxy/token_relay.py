"""Edge mode's token relay: the proxy names itself as the token realm and passes requests on.

Clients fetch registry tokens from the realm the registry's ``WWW-Authenticate`` challenge
names (the balena API). Where clients can reach only the proxy (``--proxy-auth``), the proxy
puts its own token endpoint in the registry's challenges and passes token requests on to the
real realm, which it learns from the registry itself, never from a host a redirect led to.
Credentials pass through to the realm; they are neither logged nor kept. Resolver mode asks
the real realm through this relay too (``login``, ``upstream_tokens``).
"""

from __future__ import annotations

import time
from typing import NamedTuple

from aiohttp import web

from .access import unverified_claims
from .errors import RegistryError
from .headers import redirect_request_headers
from .realm import (
    challenge_realm,
    challenge_service,
    own_realm,
    replace_realm,
    token_of,
    token_request_url,
    with_lifetime,
)
from .request_state import REQUEST_ID
from .upstream import Upstream

# Token answers are small JSON documents.
MAX_TOKEN_ANSWER = 1 << 20


class TokenRelay:
    """The proxy's token endpoint, in front of the registry's real realm."""

    def __init__(self, upstream: Upstream) -> None:
        """Pass token requests on to the realm ``upstream`` (the registry) names."""
        self.upstream = upstream
        self.realm: str | None = None
        """The registry's token realm, learned from its challenges."""
        self.service: str | None = None
        """What the registry's tokens are issued for: the ``service`` its challenges name."""

    def own_challenges(
        self, headers: list[tuple[str, str]], scheme: str, host: str
    ) -> list[tuple[str, str]]:
        """The registry's answer ``headers`` with the proxy (``scheme://host``) as the realm.

        Only for the registry's own answers: a storage host a redirect led to is no authority
        on where clients get their tokens.
        """
        mapped = []
        for name, value in headers:
            if name.lower() == "www-authenticate" and (real := challenge_realm(value)):
                self.realm = real
                self.service = challenge_service(value) or self.service
                value = replace_realm(value, own_realm(scheme, host))
            mapped.append((name, value))
        return mapped

    async def learn(self, request_id: str) -> str:
        """The real realm, asked of the registry if its challenges did not tell it yet.

        Raises ``RegistryError`` when the registry names none, ``UpstreamError`` when it
        cannot be reached.
        """
        if self.realm is None:
            challenge = await self.upstream.challenge(request_id)
            self.realm = challenge_realm(challenge)
            self.service = challenge_service(challenge)
        if self.realm is None:
            raise RegistryError(503, "UNAVAILABLE", "the upstream registry names no token realm")
        return self.realm

    async def ask(self, query: str, headers: list[tuple[str, str]], request_id: str) -> RealmAnswer:
        """The real realm's answer to ``query`` sent with ``headers``. ``UpstreamError`` when
        it cannot be reached."""
        realm = await self.learn(request_id)
        async with self.upstream.fetch(token_request_url(realm, query), headers) as answer:
            body, complete = await answer.read_up_to(MAX_TOKEN_ANSWER)
            if not complete:
                raise RegistryError(502, "UNAVAILABLE", "the token server's answer is too large")
            return RealmAnswer(
                answer.status,
                body,
                answer.headers.get("Content-Type", "application/json"),
                answer.headers.get("Retry-After"),
            )

    async def token(self, request: web.Request) -> web.StreamResponse:
        """Pass a token request on to the real realm; its credentials pass through.

        Raises ``upstream_errors.UpstreamError`` when the registry or the token server
        cannot be reached.
        """
        answer = await self.ask(
            request.rel_url.raw_query_string, client_token_headers(request), request[REQUEST_ID]
        )
        body = answer.body
        if answer.status == 200 and (token := token_of(body)) is not None:
            body = with_lifetime(body, unverified_claims(token), int(time.time()))
        return answer.response(body)


class RealmAnswer(NamedTuple):
    """What the real realm answered."""

    status: int
    body: bytes
    content_type: str
    retry_after: str | None
    """A rate limit's ``Retry-After``, which the client should see."""

    def response(self, body: bytes | None = None) -> web.Response:
        """The answer for the client: this one, with ``body`` instead of its own if given."""
        headers = {"Content-Type": self.content_type}
        if self.retry_after is not None:
            headers["Retry-After"] = self.retry_after
        return web.Response(
            status=self.status, body=self.body if body is None else body, headers=headers
        )


def client_token_headers(request: web.Request) -> list[tuple[str, str]]:
    """What of a client's token request goes on to the realm: its credentials among them."""
    headers = redirect_request_headers(request.headers.items())
    authorization = request.headers.get("Authorization")
    if authorization is not None:
        headers.append(("Authorization", authorization))
    return headers
