"""Resolver mode's token endpoint: a client's login, checked by the real realm, answered with
a sealed proxy token.

The client's credentials go to the real realm exactly as the client sent them (a wrong API key
gets the realm's 401), with no scopes of balena names (the proxy resolves those at each
request). The registry token the realm answers with, and the credentials, go into the proxy
token (``envelope``), which only replicas holding the sealing key can open.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from aiohttp import web

from .access import unverified_claims
from .envelope import Envelope, Sealer
from .errors import RegistryError
from .metrics import Metrics
from .realm import basic_credentials, lifetime_fields, login_query, token_of
from .request_state import REQUEST_ID
from .token_relay import TokenRelay, client_token_headers

# A registry token without an expiry is kept this long (seconds).
DEFAULT_LIFETIME = 300


class Login:
    """The token endpoint of resolver mode."""

    def __init__(
        self,
        relay: TokenRelay,
        sealer: Sealer,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Ask the realm ``relay`` knows; seal with ``sealer``; count in ``metrics``."""
        self._relay = relay
        self._metrics = metrics
        self._sealer = sealer
        self._clock = clock

    async def token(self, request: web.Request) -> web.StreamResponse:
        """Answer a token request with a proxy token, or with the realm's refusal.

        Raises ``upstream_errors.UpstreamError`` when the realm cannot be reached.
        """
        if len(request.headers.getall("Authorization", [])) > 1:
            raise RegistryError(400, "UNSUPPORTED", "more than one Authorization header")
        self._metrics.realm_requests.labels("login").inc()
        answer = await self._relay.ask(
            login_query(request.rel_url.raw_query_string),
            client_token_headers(request),
            request[REQUEST_ID],
        )
        if answer.status != 200:
            return answer.response()
        upstream = token_of(answer.body)
        if upstream is None:
            raise RegistryError(502, "UNAVAILABLE", "the token server answered without a token")
        claims = unverified_claims(upstream) or {}
        now = int(self._clock())
        issued, expires = claims.get("iat"), claims.get("exp")
        issued = issued if isinstance(issued, int) else now
        expires = expires if isinstance(expires, int) else now + DEFAULT_LIFETIME
        username, password = basic_credentials(request.headers.get("Authorization")) or (
            None,
            None,
        )
        token = self._sealer.seal(Envelope(username, password, upstream, expires))
        document = {"token": token, "access_token": token, **lifetime_fields(issued, expires)}
        return web.Response(
            body=json.dumps(document, separators=(",", ":")).encode(),
            content_type="application/json",
            headers={"Cache-Control": "no-store"},
        )
