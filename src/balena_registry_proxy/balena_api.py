"""Resolver mode's balena API client: one query per app and caller, kept about a minute.

The caller's API key goes to the API as ``Authorization: Bearer`` (the API reads a bearer
that is no session token as an API key); anonymous callers send none and see public apps
only. Answers are kept per caller (a hash of the credentials, never the credentials) and app,
briefly: a pull asks for several things at once, and a release resolved a minute ago is still
the release. The API down, slow or refusing becomes a clear error, never a hang.
"""

from __future__ import annotations

import asyncio
import json
import logging
from urllib.parse import urlsplit

from .api_query import app_query
from .envelope import Envelope
from .errors import CredentialsRefused, RegistryError
from .metrics import Metrics
from .releases import App, parse_app
from .ttl_cache import TtlCache
from .upstream import Upstream
from .upstream_errors import UpstreamError

log = logging.getLogger("balena_registry_proxy")
# An app's answer lists up to api_query.MAX_RELEASES releases with their images: a few MiB
# at the very most.
MAX_ANSWER_BYTES = 16 << 20
# Apps kept across callers: each a few KiB to a few hundred.
MAX_APPS = 512


class BalenaApi:
    """The balena API's read side, as the resolver asks it."""

    def __init__(
        self, upstream: Upstream, base_url: str, metrics: Metrics, *, timeout: float, ttl: float
    ) -> None:
        """Ask the API at ``base_url`` (``https://api.balena-cloud.com``) through the
        ``upstream`` connection pools, counting in ``metrics``, waiting at most ``timeout``
        seconds for an answer, and keep answers ``ttl`` seconds."""
        self._metrics = metrics
        self._upstream = upstream
        self.base_url = base_url.rstrip("/")
        self._host = urlsplit(self.base_url).hostname or self.base_url
        self._timeout = timeout
        self._apps: TtlCache[tuple[str, str], App | None] = TtlCache(ttl, MAX_APPS)

    async def app(self, slug: str, envelope: Envelope, request_id: str) -> App | None:
        """The app ``slug`` as the client of ``envelope`` may read it; None when the API
        shows it nothing of that name (unknown, or private to others)."""
        return await self._apps.get(
            (envelope.caller, slug), lambda: self._ask(slug, envelope, request_id)
        )

    async def _ask(self, slug: str, envelope: Envelope, request_id: str) -> App | None:
        headers = [("Accept", "application/json"), ("X-Request-Id", request_id)]
        if envelope.password is not None:
            headers.append(("Authorization", f"Bearer {envelope.password}"))
        try:
            async with asyncio.timeout(self._timeout):
                async with self._upstream.fetch(self.base_url + app_query(slug), headers) as answer:
                    status = answer.status
                    retry_after = answer.headers.get("Retry-After")
                    body, complete = await answer.read_up_to(MAX_ANSWER_BYTES)
        except TimeoutError:
            raise self._unavailable("did not answer in time") from None
        except UpstreamError as error:
            raise self._unavailable(f"cannot be reached ({error.cause})") from None
        if status == 429:
            self._metrics.api_requests.labels("ratelimited").inc()
            headers_out = {"Retry-After": retry_after} if retry_after else {}
            raise RegistryError(
                429,
                "TOOMANYREQUESTS",
                f"the balena API ({self._host}) asks for fewer requests; try again later",
                headers=headers_out,
            )
        if status == 401 and envelope.password is not None:
            # The key the client logged in with was revoked since: it logs in again.
            raise CredentialsRefused
        if status != 200:
            raise self._unavailable(f"answered {status}")
        if not complete:
            raise self._unavailable("answered with more than the proxy reads")
        try:
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise self._unavailable("answered with something that is not JSON") from None
        self._metrics.api_requests.labels("ok").inc()
        return parse_app(document)

    def _unavailable(self, what: str) -> RegistryError:
        self._metrics.api_requests.labels("unavailable").inc()
        log.warning("the balena API (%s) %s", self._host, what)
        return RegistryError(
            503, "UNAVAILABLE", f"the balena API ({self._host}) {what}: releases cannot be resolved"
        )
