"""What can go wrong talking to the upstream, as one family of errors the client raises.

Pure, no I/O. Each error says what kind of failure it was (the metric label and the status a
client gets follow from it) and its cause in words fit for a log line: never a credential,
only host names, addresses and the system's own messages.
"""

from __future__ import annotations

import errno
import socket
import ssl


class UpstreamError(Exception):
    """The upstream (or a host it redirected to) did not give a usable answer."""

    kind = "unreachable"
    """The ``upstream_errors_total`` label: unreachable, timeout or broken."""

    def __init__(self, cause: str) -> None:
        """An error whose cause is ``cause``, in a few words."""
        super().__init__(cause)
        self.cause = cause


class Unreachable(UpstreamError):
    """No connection: the name did not resolve, the host refused, TLS failed, or it timed out."""


class UpstreamTimeout(UpstreamError):
    """Connected, but the answer (or the next bytes of its body) did not come in time."""

    kind = "timeout"


class BrokenAnswer(UpstreamError):
    """The answer was malformed, too large, or cut off."""

    kind = "broken"


def connect_failure(error: OSError) -> Unreachable:
    """The ``Unreachable`` for an error of opening a connection, naming its cause."""
    if isinstance(error, ssl.SSLCertVerificationError):
        detail = getattr(error, "verify_message", None) or error.strerror or error
        return Unreachable(f"TLS verification failed: {detail}")
    if isinstance(error, ssl.SSLError):
        return Unreachable(f"TLS failed: {getattr(error, 'reason', None) or error}")
    if isinstance(error, socket.gaierror):
        return Unreachable(f"name resolution failed: {error.strerror or error}")
    if isinstance(error, ConnectionRefusedError):
        return Unreachable("connection refused")
    if isinstance(error, ConnectionResetError):
        return Unreachable("connection reset")
    if error.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return Unreachable("no route to the host")
    return Unreachable(f"cannot connect: {error.strerror or error}")
