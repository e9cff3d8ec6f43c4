"""Registry tokens for tests: the proxy never checks signatures, so any key signs them."""

from __future__ import annotations

from typing import Any

import jwt

_KEY = "test-signing-key-that-is-long-enough-for-hs256"


def make_token(*entries: dict[str, Any], extra: dict[str, Any] | None = None) -> str:
    """A JWT whose ``access`` claim holds ``entries``."""
    claims: dict[str, Any] = {"access": list(entries), "iss": "test", "aud": "registry"}
    claims.update(extra or {})
    return jwt.encode(claims, _KEY, algorithm="HS256")


def alias_entry(alias: str, name: str, actions: tuple[str, ...] = ("pull",)) -> dict[str, Any]:
    """An access entry as the balena API issues it for a resolved release."""
    return {"type": "repository", "name": name, "alias": alias, "actions": list(actions)}


def bearer(token: str) -> dict[str, str]:
    """An Authorization header carrying ``token``."""
    return {"Authorization": f"Bearer {token}"}
