"""A stand-in for the balena API's registry token endpoint, ``GET /auth/v1/token``.

The claims and the scope resolution follow what the balena API issues, so a registry configured
for balenaCloud-style token auth accepts these tokens unchanged. Tokens and API keys are never
logged; only the requested scopes and the authenticated username are recorded.
"""

from __future__ import annotations

import base64
import binascii
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import hdrs, web

from .catalog import AccessEntry, Catalog, User, access_for_scopes
from .keys import SigningKey

__all__ = [
    "DEFAULT_EXPIRY_SECONDS",
    "TOKEN_ISSUER",
    "TOKEN_PATH",
    "TOKEN_REQUESTS",
    "InvalidCredentialsError",
    "TokenIssuer",
    "TokenRequestRecord",
    "authenticate",
    "create_token_app",
    "parse_basic_credentials",
    "requested_scopes",
    "unauthorized_body",
]

TOKEN_PATH = "/auth/v1/token"  # noqa: S105 -- a URL path, not a credential
# The balena API's default REGISTRY_TOKEN_EXPIRY_SECONDS (4 h): clients that refresh too often
# show up as they would against balenaCloud; tests of expiry ask for a short one.
DEFAULT_EXPIRY_SECONDS = 4 * 3600
# Covers clock skew between the token service and the registry.
_NOT_BEFORE_LEEWAY_SECONDS = 10


class InvalidCredentialsError(Exception):
    """The request carried credentials that do not identify a user."""


@dataclass(frozen=True)
class TokenRequestRecord:
    """What a token request asked for, kept so tests can count and inspect token fetches."""

    username: str | None
    scopes: tuple[str, ...]
    service: str | None
    status: int


class TokenIssuer:
    """Builds and signs registry tokens for a catalog."""

    def __init__(
        self,
        catalog: Catalog,
        signing_key: SigningKey,
        *,
        issuer: str,
        service: str,
        expiry_seconds: int = DEFAULT_EXPIRY_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.catalog = catalog
        self.signing_key = signing_key
        self.issuer = issuer
        self.service = service
        self.expiry_seconds = expiry_seconds
        self._clock = clock

    def claims(
        self, *, subject: str, audience: str, access: Sequence[AccessEntry], now: int
    ) -> dict[str, Any]:
        """Return the JWT claim set (pure given ``now``)."""
        return {
            "iss": self.issuer,
            "sub": subject,
            # distribution 2.8 rejects a list here; it must be a single string.
            "aud": audience,
            "exp": now + self.expiry_seconds,
            "nbf": now - _NOT_BEFORE_LEEWAY_SECONDS,
            "iat": now,
            "jti": str(uuid.uuid4()),
            "access": [entry.to_claim() for entry in access],
        }

    def issue(self, *, user: User | None, scopes: Iterable[str]) -> str:
        """Resolve ``scopes`` for ``user`` (``None`` = anonymous) and sign a token.

        Its audience is the configured service whatever the client asked for: the balena API
        ignores ``service`` (its audience is always REGISTRY_TOKEN_AUDIENCE).
        """
        access = access_for_scopes(self.catalog, scopes, user)
        return self.sign_access(access, subject="" if user is None else user.username)

    def sign_access(
        self, access: Sequence[AccessEntry], *, subject: str = "", audience: str | None = None
    ) -> str:
        """Sign a token granting exactly ``access``, bypassing resolution.

        Only reachable from Python: this is how seeding gets push rights and how tests forge
        tokens with arbitrary grants.
        """
        claims = self.claims(
            subject=subject,
            audience=self.service if audience is None else audience,
            access=access,
            now=int(self._clock()),
        )
        return self.signing_key.sign(claims)

    def push_token(self, repositories: Iterable[str]) -> str:
        """Sign a token granting pull and push on every repository in ``repositories``."""
        access = [AccessEntry(name=name, actions=("pull", "push")) for name in repositories]
        return self.sign_access(access, subject="sandbox-seeder")


def requested_scopes(values: Iterable[str]) -> list[str]:
    """Flatten ``scope`` query values; one value may hold several space-separated scopes."""
    return [scope for value in values for scope in value.split()]


def parse_basic_credentials(authorization: str) -> tuple[str, str]:
    """Split a ``Basic`` ``Authorization`` header value into ``(username, password)``.

    Raises :class:`InvalidCredentialsError` for any other scheme or a malformed value.
    """
    scheme, _, encoded = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        raise InvalidCredentialsError("unsupported authorization scheme")
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise InvalidCredentialsError("malformed Basic credentials") from None
    username, colon, password = decoded.partition(":")
    if not colon:
        raise InvalidCredentialsError("malformed Basic credentials")
    return username, password


def authenticate(catalog: Catalog, authorization: str | None) -> User | None:
    """Map an ``Authorization`` header to a user; no header means anonymous (``None``).

    Raises :class:`InvalidCredentialsError` for anything but Basic credentials whose password
    is a known API key and whose username is non-empty.
    """
    if authorization is None:
        return None
    username, api_key = parse_basic_credentials(authorization)
    user = catalog.user_by_api_key(api_key) if username else None
    if user is None:
        raise InvalidCredentialsError("invalid username or API key")
    return user


def unauthorized_body(message: str) -> dict[str, Any]:
    """The JSON error document the balena API sends with a 401."""
    return {"errors": [{"code": "UNAUTHORIZED", "message": message, "detail": None}]}


TOKEN_ISSUER = web.AppKey("token_issuer", TokenIssuer)
TOKEN_REQUESTS = web.AppKey("token_requests", list[TokenRequestRecord])


async def _token_handler(request: web.Request) -> web.Response:
    issuer = request.app[TOKEN_ISSUER]
    scopes = requested_scopes(request.query.getall("scope", []))
    service = request.query.get("service") or None
    try:
        user = authenticate(issuer.catalog, request.headers.get(hdrs.AUTHORIZATION))
    except InvalidCredentialsError as exc:
        request.app[TOKEN_REQUESTS].append(TokenRequestRecord(None, tuple(scopes), service, 401))
        return web.json_response(unauthorized_body(str(exc)), status=401)
    token = issuer.issue(user=user, scopes=scopes)
    username = None if user is None else user.username
    request.app[TOKEN_REQUESTS].append(TokenRequestRecord(username, tuple(scopes), service, 200))
    return web.json_response({"token": token})


def create_token_app(issuer: TokenIssuer) -> web.Application:
    """Build the aiohttp application serving ``GET /auth/v1/token``.

    Every request is appended to ``app[TOKEN_REQUESTS]``.
    """
    app = web.Application()
    app[TOKEN_ISSUER] = issuer
    app[TOKEN_REQUESTS] = []
    app.router.add_get(TOKEN_PATH, _token_handler)
    return app
