"""Resolver mode's request side: a balena name, for a client holding a proxy token, to the
real repository and reference, with a registry token for it.

The decisions are ``release_names``, ``releases`` and ``resolution``'s; this module asks the
API (``balena_api``) and the realm (``upstream_tokens``) what they need, and, for digests
asked for under a name whose release a tag chose, reads the candidate releases' manifests to
find the one that holds the digest. Everything it keeps is a cache any replica rebuilds: the
proxy token carries all a replica needs to serve any request of a pull.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from functools import partial

from .balena_api import BalenaApi
from .digests import MAX_MANIFEST_BYTES
from .envelope import Envelope
from .errors import RegistryError
from .manifests import MAX_CHILDREN, references
from .release_names import parse_name
from .releases import Image
from .resolution import Listing, Search, Target, not_found, resolve, unknown_app
from .rewrite import UPSTREAM_TAG, Names, Plan
from .routes import Route
from .ttl_cache import TtlCache
from .upstream import Upstream
from .upstream_tokens import MAX_SCOPES, UpstreamTokens

# Releases whose manifests a search reads at most, for one digest: a tag far older than
# this, pulled through a replica that did not resolve its tag, is not found.
MAX_SEARCH = 64
# Manifests whose contents are kept (a set of digests each), and for how long: an image's
# manifest never changes; one asked for by the tag `latest` may, so it is read again.
MAX_CONTENTS = 4096
CONTENTS_TTL = 600.0
# Which repository a caller's last tag of a name chose: searched first for its digests.
MAX_HINTS = 4096
HINT_TTL = 3600.0
MANIFEST_ACCEPT = ", ".join(
    (
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    )
)


@dataclass(frozen=True, slots=True)
class Resolved:
    """Where a request goes upstream, and the registry token that goes with it."""

    plan: Plan
    authorization: str


class Resolver:
    """Balena names to real repositories, with the caller's rights."""

    def __init__(self, api: BalenaApi, tokens: UpstreamTokens, upstream: Upstream) -> None:
        """Resolve through ``api``, with tokens from ``tokens``, reading manifests from
        ``upstream``."""
        self.api = api
        self.tokens = tokens
        self._upstream = upstream
        self._contents: TtlCache[tuple[str, str], frozenset[str]] = TtlCache(
            CONTENTS_TTL, MAX_CONTENTS
        )
        self._hints: TtlCache[tuple[str, str], str] = TtlCache(HINT_TTL, MAX_HINTS)

    async def resolve(
        self, route: Route, envelope: Envelope, host: str, request_id: str
    ) -> Resolved | Listing:
        """Where ``route`` goes for the client of ``envelope`` (which reached the proxy as
        ``host``), or the tags it lists. ``RegistryError`` for what it cannot pull."""
        repository = route.repository
        if repository is None:
            return Resolved(Plan(route.target()), envelope.upstream)
        if repository.startswith("v2/"):
            token = await self.tokens.for_repository(envelope, repository, request_id)
            return Resolved(Plan(route.target()), token)
        name = parse_name(repository)
        if name is None:
            raise RegistryError(
                404,
                "NAME_UNKNOWN",
                f"{repository} is no balena image name: write <org>/<app>[/<version>][/<service>]",
                {"name": repository},
            )
        app = await self.api.app(name.app, envelope, request_id)
        if app is None:
            anonymous = envelope.password is None
            raise unknown_app(repository, name.app, anonymous=anonymous, host=host)
        hint_key = (envelope.caller, repository)
        hint = self._hints.peek(hint_key)
        outcome = resolve(route, name, app, look_first=(hint,) if hint else ())
        if isinstance(outcome, Listing):
            return outcome
        if isinstance(outcome, Search):
            found = await self._search(outcome, envelope, request_id)
            if found is None:
                raise not_found(route, outcome)
            outcome = Target(found, route.reference)
        elif outcome.chosen_by_tag:
            self._hints.put(hint_key, outcome.image.repository)
        real = outcome.image.repository
        token = await self.tokens.for_repository(envelope, real, request_id)
        target = route.target(repository=real, reference=outcome.reference)
        return Resolved(Plan(target, names=Names(alias=repository, real=real)), token)

    async def _search(self, search: Search, envelope: Envelope, request_id: str) -> Image | None:
        """The first of the search's images whose manifest names its digest."""
        images = search.images[:MAX_SEARCH]
        tokens: dict[str, str] = {}
        for start, image in enumerate(images):
            if image.repository not in tokens:
                batch = [i.repository for i in images[start : start + MAX_SCOPES]]
                tokens.update(await self.tokens.for_repositories(envelope, batch, request_id))
            reference = image.content_hash or UPSTREAM_TAG
            read = partial(
                self._read, image.repository, reference, tokens[image.repository], request_id
            )
            try:
                contents = await self._contents.get((image.repository, reference), read)
            except _Unreadable:
                continue
            if search.digest in contents:
                return image
        return None

    async def _read(
        self, repository: str, reference: str, token: str, request_id: str
    ) -> frozenset[str]:
        """The digests a manifest holds: its own, those it names, and those an index's
        children name. Its own matters where the API gave no ``content_hash``: a client asks
        by tag, then again by the digest the tag answered with."""
        body = await self._manifest(repository, reference, token, request_id)
        named = references(body)
        children = await asyncio.gather(
            *(
                self._manifest(repository, child, token, request_id)
                for child in named.children[:MAX_CHILDREN]
            )
        )
        digests = {"sha256:" + hashlib.sha256(body).hexdigest(), *named.blobs, *named.children}
        for child in children:
            digests |= references(child).blobs
        return frozenset(digests)

    async def _manifest(
        self, repository: str, reference: str, token: str, request_id: str
    ) -> bytes:
        headers = [
            ("Accept", MANIFEST_ACCEPT),
            ("Authorization", f"Bearer {token}"),
            ("X-Request-Id", request_id),
        ]
        target = f"/v2/{repository}/manifests/{reference}"
        async with self._upstream.request("GET", target, headers) as answer:
            if answer.status != 200:
                raise _Unreadable
            body, complete = await answer.read_up_to(MAX_MANIFEST_BYTES)
            if not complete:
                raise _Unreadable
            return body


class _Unreadable(Exception):
    """A manifest the caller may not read, or that is gone: not known to hold anything, and
    not remembered (another caller may read it)."""
