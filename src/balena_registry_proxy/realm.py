"""The token realm, as edge and resolver modes see it: challenges, token requests, answers.

Pure functions, no I/O. Clients fetch registry tokens from the realm named in the registry's
``WWW-Authenticate`` challenge (the balena API). Where clients can reach only the proxy (edge
mode) or the proxy must see their login (resolver mode), it names itself as the realm and asks
the real one.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

# Clients ask again this long before a token expires, so that none is used as it runs out.
EXPIRY_MARGIN = 60
TOKEN_PATH = "/auth/v1/token"  # noqa: S105 - a path, the balena API's, not a secret
_REALM_RE = re.compile(r'(\brealm=")([^"]*)(")', re.IGNORECASE)
_SERVICE_RE = re.compile(r'\bservice="([^"]*)"', re.IGNORECASE)


def challenge_realm(challenge: str) -> str | None:
    """The ``realm`` of a Bearer challenge, if it names an http(s) URL."""
    match = _REALM_RE.search(challenge)
    if match is None or not match.group(2).startswith(("https://", "http://")):
        return None
    return match.group(2)


def challenge_service(challenge: str) -> str | None:
    """The ``service`` of a Bearer challenge: what the registry's tokens are issued for."""
    match = _SERVICE_RE.search(challenge)
    return match.group(1) if match is not None and match.group(1) else None


def replace_realm(challenge: str, realm: str) -> str:
    """The challenge with its realm replaced by ``realm``."""
    return _REALM_RE.sub(lambda m: f"{m.group(1)}{realm}{m.group(3)}", challenge, count=1)


def own_realm(scheme: str, host: str) -> str:
    """The proxy's token endpoint as the client addressed the proxy."""
    return f"{scheme}://{host}{TOKEN_PATH}"


def token_request_url(realm: str, query: str) -> str:
    """The real realm with the client's query (service, scope, account) appended verbatim."""
    if not query:
        return realm
    return f"{realm}{'&' if '?' in realm else '?'}{query}"


def basic_credentials(authorization: str | None) -> tuple[str, str] | None:
    """The username and password of an ``Authorization: Basic`` value; None for anything else
    (no header, another scheme, or a value that does not decode to ``user:password``)."""
    if authorization is None:
        return None
    scheme, _, encoded = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    username, colon, password = decoded.partition(":")
    return (username, password) if colon else None


def login_query(query: str) -> str:
    """What of a client's token request the realm is asked in resolver mode.

    Scopes for balena names are left out: the proxy resolves those itself, and the realm
    would only resolve them again. Scopes for real repositories (``v2/...``) and everything
    else (``service``, ``account``) pass on.
    """
    kept = [
        (key, value)
        for key, value in parse_qsl(query, keep_blank_values=True)
        if key != "scope" or _scope_repository(value).startswith("v2/")
    ]
    return urlencode(kept, quote_via=quote, safe=":/")


def scope_query(service: str | None, repositories: list[str]) -> str:
    """The realm query for pull tokens of ``repositories`` (real ``v2/...`` names)."""
    pairs = [("service", service)] if service else []
    pairs += [("scope", f"repository:{name}:pull") for name in repositories]
    return urlencode(pairs, quote_via=quote, safe=":/")


def bearer_challenge(
    realm: str, service: str | None, repository: str | None, error: str | None
) -> str:
    """A ``WWW-Authenticate`` value that sends clients to ``realm`` for ``repository`` (for
    no repository: a login)."""
    parts = [f'realm="{realm}"']
    if service:
        parts.append(f'service="{service}"')
    if repository is not None:
        parts.append(f'scope="repository:{repository}:pull"')
    if error:
        parts.append(f'error="{error}"')
    return "Bearer " + ",".join(parts)


def _scope_repository(scope: str) -> str:
    """The name in a ``repository:<name>:<actions>`` scope (names may hold a port's ':')."""
    kind, _, rest = scope.partition(":")
    name, _, _ = rest.rpartition(":")
    return name if kind == "repository" else ""


def token_of(body: bytes) -> str | None:
    """The token of a realm's JSON answer (``token``, or OAuth's ``access_token``)."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(document, dict):
        return None
    token = document.get("token") or document.get("access_token")
    return token if isinstance(token, str) and token else None


def lifetime_fields(issued_at: int, expires_at: int) -> dict[str, object]:
    """``expires_in`` and ``issued_at`` for a token answer, from the token's own ``iat`` and
    ``exp``: without them clients assume 60 seconds and ask again every minute.

    The margin makes clients ask again before the token runs out rather than as it does.
    """
    lifetime = max(expires_at - issued_at - EXPIRY_MARGIN, 60)
    moment = datetime.datetime.fromtimestamp(issued_at, datetime.UTC)
    return {"expires_in": lifetime, "issued_at": moment.strftime("%Y-%m-%dT%H:%M:%SZ")}


def with_lifetime(body: bytes, claims: Mapping[str, Any] | None, now: int) -> bytes:
    """A realm's token answer with ``expires_in`` and ``issued_at`` added from the token's
    ``claims`` (``iat``, else ``now``; ``exp``), unless it has them or says no expiry."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return body
    if not isinstance(document, dict) or "expires_in" in document or claims is None:
        return body
    expires, issued = claims.get("exp"), claims.get("iat")
    if not isinstance(expires, int):
        return body
    document.update(lifetime_fields(issued if isinstance(issued, int) else now, expires))
    return json.dumps(document, separators=(",", ":")).encode()
