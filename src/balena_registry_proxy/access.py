"""Read a registry token's ``access`` claim and find the entry for a repository.

Pure functions, no I/O. The token is decoded *without* verifying its signature: the upstream
registry verifies every token it receives, so the proxy only needs the claims to decide where to
send a request. That makes the claims untrusted input: entries of the wrong shape are skipped,
never trusted and never a crash.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from typing import Any

import jwt

from .errors import RegistryError, bad_request
from .routes import is_valid_name


@dataclass(frozen=True, slots=True)
class AccessEntry:
    """One ``{"type": "repository", "name", "alias", "actions"}`` entry of a token."""

    name: str
    alias: str | None
    actions: tuple[str, ...]


class Verdict(Enum):
    """What the token says about the requested repository."""

    ALIASED = "aliased"
    """An entry maps the requested name (its alias) to a real repository."""
    GRANTED = "granted"
    """An entry grants actions on the requested name itself; nothing to rewrite."""
    UNRESOLVED = "unresolved"
    """The token server knew the name but resolved it to nothing the caller may pull."""


@dataclass(frozen=True, slots=True)
class Match:
    """The outcome of looking a repository up in a token's access list."""

    verdict: Verdict
    repository: str
    """The repository to send upstream: the real name for ALIASED, else the requested one."""


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value, else None."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


@lru_cache(maxsize=4096)
def token_entries(token: str) -> tuple[AccessEntry, ...]:
    """The well-formed repository entries of a JWT's ``access`` claim.

    Returns an empty tuple for anything that is not a decodable JWT. Cached because clients send
    the same token on every request of a pull, and decoding is pure.
    """
    claims = unverified_claims(token)
    if claims is None:
        return ()
    return tuple(_entries(claims.get("access")))


def find_access(entries: tuple[AccessEntry, ...], repository: str) -> Match | None:
    """Decide what the token's entries mean for ``repository``.

    An entry whose ``alias`` is the requested name wins; its ``name`` must be a valid repository
    name, or the request is refused (a 400 ``RegistryError``) rather than forwarded anywhere odd.
    An alias-less entry naming the repository itself is UNRESOLVED when it grants nothing (the
    balena API's answer for unknown releases and for private apps without login), else GRANTED.
    """
    entry = _entry_for(entries, repository)
    if entry is None:
        return None
    if entry.alias == repository:
        if not is_valid_name(entry.name):
            raise _invalid_alias_target(repository)
        return Match(Verdict.ALIASED, entry.name)
    verdict = Verdict.GRANTED if entry.actions else Verdict.UNRESOLVED
    return Match(verdict, repository)


def grants_pull(entries: tuple[AccessEntry, ...], repository: str) -> bool:
    """Whether the entry ``find_access`` goes by for ``repository`` grants pull."""
    entry = _entry_for(entries, repository)
    return entry is not None and "pull" in entry.actions


def _entry_for(entries: tuple[AccessEntry, ...], repository: str) -> AccessEntry | None:
    """The first entry aliasing ``repository``, else the first alias-less one naming it."""
    direct: AccessEntry | None = None
    for entry in entries:
        if entry.alias == repository:
            return entry
        if entry.alias is None and entry.name == repository and direct is None:
            direct = entry
    return direct


def _invalid_alias_target(repository: str) -> RegistryError:
    return bad_request(
        "NAME_INVALID",
        "the registry token maps this name to an invalid repository name",
        {"name": repository},
    )


def unverified_claims(token: str) -> Mapping[str, Any] | None:
    """A JWT's claims, decoded without checking the signature (the registry checks it)."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except (jwt.PyJWTError, ValueError, RecursionError):
        return None
    return claims if isinstance(claims, dict) else None


def _entries(access: object) -> list[AccessEntry]:
    if not isinstance(access, list):
        return []
    entries = []
    for item in access:
        if not isinstance(item, dict) or item.get("type") != "repository":
            continue
        name, alias, actions = item.get("name"), item.get("alias"), item.get("actions")
        if not isinstance(name, str) or not (alias is None or isinstance(alias, str)):
            continue
        if not isinstance(actions, list):
            actions = []
        entries.append(AccessEntry(name, alias, tuple(a for a in actions if isinstance(a, str))))
    return entries
