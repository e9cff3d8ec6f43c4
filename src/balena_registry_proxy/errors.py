"""Error bodies in the OCI distribution format: ``{"errors": [{"code", "message", "detail"}]}``.

Every answer the proxy makes up itself goes through here, so that no client ever has to parse an
HTML page or a bare string (Docker fails on those with an unhelpful JSON parse error).
"""

from __future__ import annotations

import json
from typing import Any

from .upstream_errors import Unreachable, UpstreamError, UpstreamTimeout

CONTENT_TYPE = "application/json"


class RegistryError(Exception):
    """An answer the proxy gives on its own, without asking upstream."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        detail: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """An error answer: HTTP ``status``, OCI ``code``, ``message`` and ``detail``."""
        super().__init__(status, code, message)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        self.headers = headers or {}

    def body(self) -> bytes:
        """The JSON body for this error."""
        return error_body(self.code, self.message, self.detail)


class CredentialsRefused(RegistryError):
    """The balena API or the realm refused the credentials a client logged in with (a
    revoked API key): a 401, so that the client logs in again."""

    def __init__(self) -> None:
        """The 401; its challenge is the handler's to add."""
        super().__init__(
            401, "UNAUTHORIZED", "the balena API no longer accepts the credentials of this login"
        )


def error_body(code: str, message: str, detail: Any = None) -> bytes:
    """Serialise one OCI error as the registry API's JSON envelope."""
    errors = [{"code": code, "message": message, "detail": detail}]
    return json.dumps({"errors": errors}, separators=(",", ":")).encode()


def first_error_code(body: bytes) -> str | None:
    """The ``code`` of the first error in an upstream error body, or None if it has none."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(document, dict):
        return None
    errors = document.get("errors")
    if not isinstance(errors, list) or not errors or not isinstance(errors[0], dict):
        return None
    code = errors[0].get("code")
    return code if isinstance(code, str) else None


def bad_request(code: str, message: str, detail: Any = None) -> RegistryError:
    """A 400 for input the proxy refuses to forward."""
    return RegistryError(400, code, message, detail)


def unsupported_method(what: str) -> RegistryError:
    """The 405 every write gets (``what``: a method, or "uploading"): this proxy serves pulls."""
    return RegistryError(
        405,
        "UNSUPPORTED",
        f"{what} is not supported: this registry proxy is read-only (pull only)",
        headers={"Allow": "GET, HEAD"},
    )


def not_an_endpoint(message: str) -> RegistryError:
    """A 404 for paths that are not part of the registry API."""
    return RegistryError(404, "UNSUPPORTED", message)


def internal_error() -> RegistryError:
    """The 500 for a fault of the proxy's own; details go to the log, not to the client."""
    return RegistryError(500, "UNKNOWN", "internal error in the registry proxy")


def upstream_failure(error: UpstreamError, what: str, *, cached: bool = False) -> RegistryError:
    """The answer when the upstream (``what``: "upstream registry", "token server") failed.

    504 for a timeout, 502 otherwise; 503 where a cache stands in front of the upstream and
    could not serve this request without it (``cached``): the proxy itself is unavailable for
    it, not merely a gateway to a broken host.
    """
    if isinstance(error, UpstreamTimeout):
        return RegistryError(504, "UNAVAILABLE", f"the {what} did not answer in time")
    if cached and isinstance(error, Unreachable):
        return RegistryError(
            503,
            "UNAVAILABLE",
            f"the {what} cannot be reached ({error.cause}), and the cache does not hold this",
        )
    return RegistryError(502, "UNAVAILABLE", f"the {what} failed: {error.cause}")
