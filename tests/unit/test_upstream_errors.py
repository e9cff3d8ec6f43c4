"""The upstream error family: causes in words, and what clients get for each."""

from __future__ import annotations

import errno
import socket
import ssl

import pytest

from balena_registry_proxy.errors import upstream_failure
from balena_registry_proxy.upstream_errors import (
    BrokenAnswer,
    Unreachable,
    UpstreamTimeout,
    connect_failure,
)


def verification_error() -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(1, "certificate verify failed")
    error.verify_message = "unable to get local issuer certificate"
    return error


@pytest.mark.parametrize(
    ("error", "cause"),
    [
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), "name resolution"),
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), "connection refused"),
        (ConnectionResetError(errno.ECONNRESET, "reset"), "connection reset"),
        (OSError(errno.EHOSTUNREACH, "No route"), "no route to the host"),
        (verification_error(), "TLS verification failed: unable to get local issuer"),
        (ssl.SSLError(1, "wrong version number"), "TLS failed"),
        (OSError(errno.EACCES, "Permission denied"), "cannot connect: Permission denied"),
    ],
)
def test_connect_failures_name_their_cause(error: OSError, cause: str) -> None:
    failure = connect_failure(error)
    assert isinstance(failure, Unreachable)
    assert failure.kind == "unreachable"
    assert cause in failure.cause


def test_each_kind_gets_its_status() -> None:
    timeout = upstream_failure(UpstreamTimeout("no answer within 60 s"), "upstream registry")
    assert (timeout.status, timeout.code) == (504, "UNAVAILABLE")
    refused = upstream_failure(Unreachable("connection refused"), "token server")
    assert refused.status == 502
    assert refused.message == "the token server failed: connection refused"
    broken = upstream_failure(BrokenAnswer("malformed answer"), "upstream registry", cached=True)
    assert broken.status == 502
    uncached = upstream_failure(Unreachable("connection refused"), "upstream registry", cached=True)
    assert uncached.status == 503
    assert "the cache does not hold this" in uncached.message
    assert (UpstreamTimeout("x").kind, BrokenAnswer("x").kind) == ("timeout", "broken")
