"""Edge mode's token realm: the proxy stands in for the token server's address.

Pure functions, no I/O. Clients fetch registry tokens from the realm named in the registry's
``WWW-Authenticate`` challenge (the balena API). Where clients can reach only the proxy, it
names itself as the realm and passes token requests on to the real one.
"""

from __future__ import annotations

import re

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
