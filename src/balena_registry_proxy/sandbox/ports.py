"""Finding a TCP port to listen on, for the sandbox's services and the tests."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1", preferred: int | None = None) -> int:
    """``preferred`` if nothing listens there on ``host``, else any free port.

    Racy by nature: the port is released before the caller binds it, so callers that can retry
    do (the registry start does), and the rest accept a rare clash.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, preferred or 0))
        except OSError:
            probe.bind((host, 0))
        return int(probe.getsockname()[1])
