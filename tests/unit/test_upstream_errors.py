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


def tls_error(reason: str | None) -> ssl.SSLError:
    error = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    error.reason = reason  # type: ignore[assignment]  # what an SSLError of no library has
    return error


@pytest.mark.parametrize(
    ("error", "cause"),
    [
        (
            socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
            "name resolution failed: Name or service not known",
        ),
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), "connection refused"),
        (ConnectionResetError(errno.ECONNRESET, "reset"), "connection reset"),
        (OSError(errno.EHOSTUNREACH, "No route"), "no route to the host"),
        (OSError(errno.ENETUNREACH, "Network is unreachable"), "no route to the host"),
        (
            verification_error(),
            "TLS verification failed: unable to get local issuer certificate",
        ),
        (tls_error("WRONG_VERSION_NUMBER"), "TLS failed: WRONG_VERSION_NUMBER"),
        (OSError(errno.EACCES, "Permission denied"), "cannot connect: Permission denied"),
    ],
)
def test_connect_failures_name_their_cause(error: OSError, cause: str) -> None:
    failure = connect_failure(error)
    assert isinstance(failure, Unreachable)
    assert failure.kind == "unreachable"
    assert failure.cause == cause
    assert str(failure) == cause


def test_a_cause_without_words_of_its_own_is_named_by_the_error() -> None:
    # No verify message, no reason, no strerror: the next best words stand in.
    unverified = ssl.SSLCertVerificationError(1, "certificate verify failed")
    assert connect_failure(unverified).cause == "TLS verification failed: certificate verify failed"
    bare = ssl.SSLCertVerificationError("bare")
    assert connect_failure(bare).cause == "TLS verification failed: ('bare',)"
    assert connect_failure(tls_error(None)).cause == (
        "TLS failed: [SSL: WRONG_VERSION_NUMBER] wrong version number"
    )
    unnamed = socket.gaierror("no such name")
    assert connect_failure(unnamed).cause == "name resolution failed: no such name"
    assert connect_failure(OSError("odd")).cause == "cannot connect: odd"


def test_each_kind_gets_its_status() -> None:
    timeout = upstream_failure(UpstreamTimeout("no answer within 60 s"), "upstream registry")
    assert (timeout.status, timeout.code) == (504, "UNAVAILABLE")
    assert timeout.message == "the upstream registry did not answer in time"
    refused = upstream_failure(Unreachable("connection refused"), "token server")
    assert refused.status == 502
    assert refused.message == "the token server failed: connection refused"
    broken = upstream_failure(BrokenAnswer("malformed answer"), "upstream registry", cached=True)
    assert broken.status == 502
    uncached = upstream_failure(Unreachable("connection refused"), "upstream registry", cached=True)
    assert (uncached.status, uncached.code) == (503, "UNAVAILABLE")
    assert uncached.message == (
        "the upstream registry cannot be reached (connection refused), "
        "and the cache does not hold this"
    )
    assert (refused.code, broken.code) == ("UNAVAILABLE", "UNAVAILABLE")
    assert (UpstreamTimeout("x").kind, BrokenAnswer("x").kind) == ("timeout", "broken")
