"""Turn upstream's terse refusal of an unresolved name into a message a person can act on.

The balena API answers a name it cannot resolve (unknown app or release, or a private app for a
caller without access) with an access entry that grants nothing; the registry then says only
"authentication required" or "repository name not known". Users read that as a server fault.
"""

from __future__ import annotations

from .errors import error_body


def explain(name: str, upstream_code: str | None, proxy_host: str) -> bytes:
    """An OCI error body that says what went wrong with ``name`` and how to fix it."""
    parts = name.split("/")
    release = parts[2] if len(parts) >= 3 else None
    what = f"release '{release}' of app '{'/'.join(parts[:2])}'" if release else f"app '{name}'"
    hints = [
        f"{what} was not found, or you are not allowed to pull it.",
        "Use <org>/<app>[/<version|commit>] with the app slug as shown in the dashboard.",
        "Write versions without a leading 'v' and without '+rev' (1.2.3 pulls its newest "
        "revision); drafts need the full version (1.2.3-1700000000000).",
        f"Private apps need 'docker login {proxy_host}' with your balena username and an "
        "API key as the password.",
    ]
    detail = {"name": name, "upstream_code": upstream_code}
    return error_body(upstream_code or "DENIED", " ".join(hints), detail)
