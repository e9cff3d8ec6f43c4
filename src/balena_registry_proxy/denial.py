"""Turn upstream's terse refusal of an unresolved name into a message a person can act on.

The balena API answers a name it cannot resolve (unknown app or release, or a private app for a
caller without access) with an access entry that grants nothing; the registry then says only
"authentication required" or "repository name not known". Users read that as a server fault.
"""

from __future__ import annotations

import re

from .errors import error_body

_V_PREFIXED = re.compile(r"v(\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?)")


def explain(name: str, upstream_code: str | None, proxy_host: str) -> bytes:
    """An OCI error body that says what went wrong with ``name`` and how to fix it."""
    parts = name.split("/")
    app = "/".join(parts[:2])
    if len(parts) > 3:
        # The balena API never resolves a service component: only single-service releases.
        first = (
            f"'{name}' names a service: images of one service of a release cannot be pulled "
            f"by name, only releases of single-service apps ({app}[/<version|commit>])."
        )
    elif len(parts) == 3 and (unprefixed := _V_PREFIXED.fullmatch(parts[2])):
        first = (
            f"release '{parts[2]}' of app '{app}' was not found: versions are written "
            f"without the 'v', did you mean {app}/{unprefixed[1]}?"
        )
    elif len(parts) == 3:
        first = (
            f"release '{parts[2]}' of app '{app}' was not found, or you are not allowed to "
            "pull it, or it has several services (a release of several services cannot be "
            "pulled by version or commit this way)."
        )
    elif len(parts) == 1:
        first = f"'{name}' names no app: write the org and the app ({name}/<app>)."
    else:
        first = f"app '{name}' was not found, or you are not allowed to pull it."
    hints = [
        first,
        "Use <org>/<app>[/<version|commit>] with the app slug as shown in the dashboard.",
        "Write versions without a leading 'v' and without '+rev' (1.2.3 pulls its newest "
        "revision); drafts need the full version (1.2.3-1700000000000).",
        f"Private apps need 'docker login {proxy_host}' with your balena username and an "
        "API key as the password.",
    ]
    detail = {"name": name, "upstream_code": upstream_code}
    return error_body(upstream_code or "DENIED", " ".join(hints), detail)
