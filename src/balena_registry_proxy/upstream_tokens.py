"""Resolver mode's registry tokens: pull rights on real repositories, asked with the caller's
credentials and kept until shortly before they expire.

The realm grants ``repository:v2/<hash>:pull`` to whoever may read a release with that image,
so the proxy asks for exactly the repositories it resolved a name to. Tokens are kept per
caller (a hash of the credentials) and repository; several repositories needed at once are
asked for in one request.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Sequence

from .access import token_entries, unverified_claims
from .envelope import Envelope
from .errors import CredentialsRefused, RegistryError
from .metrics import Metrics
from .realm import EXPIRY_MARGIN, scope_query, token_of
from .token_relay import TokenRelay
from .ttl_cache import TtlCache

# Scopes in one token request: the realm's URL stays a few KiB.
MAX_SCOPES = 16
# Tokens kept across callers and repositories: each about a KiB.
MAX_TOKENS = 4096


class UpstreamTokens:
    """Registry tokens for real repositories, per caller."""

    def __init__(self, relay: TokenRelay, metrics: Metrics) -> None:
        """Ask the realm that ``relay`` knows, counting in ``metrics``."""
        self._relay = relay
        self._metrics = metrics
        self._tokens: TtlCache[tuple[str, str], str] = TtlCache(0, MAX_TOKENS)

    async def for_repositories(
        self, envelope: Envelope, repositories: Sequence[str], request_id: str
    ) -> dict[str, str]:
        """A token for each of ``repositories`` (at most ``MAX_SCOPES``), asked together for
        those not kept. A repository the caller may not pull gets a token that says so: the
        registry's answer to it tells the client."""
        found = {}
        missing = []
        for repository in repositories:
            kept = self._tokens.peek((envelope.caller, repository))
            if kept is not None:
                found[repository] = kept
            elif repository not in missing:
                missing.append(repository)
        asked = missing[:MAX_SCOPES]
        if asked:
            token = await self._tokens.get(
                (envelope.caller, "\0".join(asked)),
                lambda: self._ask(envelope, asked, request_id),
            )
            for repository in asked:
                found[repository] = token
        return found

    async def for_repository(self, envelope: Envelope, repository: str, request_id: str) -> str:
        """A token for ``repository``."""
        return (await self.for_repositories(envelope, [repository], request_id))[repository]

    async def _ask(self, envelope: Envelope, repositories: list[str], request_id: str) -> str:
        headers = [("Accept", "application/json"), ("X-Request-Id", request_id)]
        if envelope.password is not None:
            credentials = f"{envelope.username or ''}:{envelope.password}".encode()
            headers.append(("Authorization", "Basic " + base64.b64encode(credentials).decode()))
        self._metrics.realm_requests.labels("repositories").inc()
        await self._relay.learn(request_id)
        answer = await self._relay.ask(
            scope_query(self._relay.service, repositories), headers, request_id
        )
        if answer.status == 401:
            raise CredentialsRefused
        if answer.status == 429:
            raise RegistryError(
                429,
                "TOOMANYREQUESTS",
                "the balena API's token endpoint asks for fewer requests; try again later",
                headers={"Retry-After": answer.retry_after} if answer.retry_after else {},
            )
        token = token_of(answer.body) if answer.status == 200 else None
        if token is None:
            raise RegistryError(502, "UNAVAILABLE", f"the token server answered {answer.status}")
        claims = unverified_claims(token) or {}
        expires = claims.get("exp")
        lifetime = expires - time.time() - EXPIRY_MARGIN if isinstance(expires, int) else 0.0
        if lifetime > 0:
            granted = {e.name for e in token_entries(token) if "pull" in e.actions}
            for repository in repositories:
                # Only a grant is kept: a refusal may be a release published a moment ago.
                if repository in granted:
                    self._tokens.put((envelope.caller, repository), token, lifetime)
        return token
