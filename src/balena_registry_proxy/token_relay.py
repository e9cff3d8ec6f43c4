"""Edge mode's token relay: the proxy names itself as the token realm and passes requests on.

Clients fetch registry tokens from the realm the registry's ``WWW-Authenticate`` challenge
names (the balena API). Where clients can reach only the proxy (``--proxy-auth``), the proxy
puts its own token endpoint in the registry's challenges and passes token requests on to the
real realm, which it learns from the registry itself, never from a host a redirect led to.
Credentials pass through to the realm; they are neither logged nor kept.
"""

from __future__ import annotations

from aiohttp import web

from .errors import RegistryError
from .headers import redirect_request_headers
from .realm import challenge_realm, own_realm, replace_realm, token_request_url
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
                value = replace_realm(value, own_realm(scheme, host))
            mapped.append((name, value))
        return mapped

    async def token(self, request: web.Request) -> web.StreamResponse:
        """Pass a token request on to the real realm; its credentials pass through.

        Raises ``upstream_errors.UpstreamError`` when the registry or the token server
        cannot be reached.
        """
        if self.realm is None:
            self.realm = challenge_realm(await self.upstream.challenge(request[REQUEST_ID]))
        if self.realm is None:
            raise RegistryError(503, "UNAVAILABLE", "the upstream registry names no token realm")
        headers = redirect_request_headers(request.headers.items())
        authorization = request.headers.get("Authorization")
        if authorization is not None:
            headers.append(("Authorization", authorization))
        url = token_request_url(self.realm, request.rel_url.raw_query_string)
        async with self.upstream.fetch(url, headers) as answer:
            body, complete = await answer.read_up_to(MAX_TOKEN_ANSWER)
            if not complete:
                raise RegistryError(502, "UNAVAILABLE", "the token server's answer is too large")
            content_type = answer.headers.get("Content-Type", "application/json")
            return web.Response(
                status=answer.status, body=body, headers={"Content-Type": content_type}
            )
