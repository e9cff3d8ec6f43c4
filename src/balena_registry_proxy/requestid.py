"""Request ids: one per request, on every log line, passed upstream and back to the client.

Pure functions, no I/O. A client's (or a front proxy's) ``X-Request-Id`` is kept when it is a
plain token, so one id follows a request through every hop; anything else is replaced rather
than echoed into logs and headers.
"""

from __future__ import annotations

import random
import re

HEADER = "X-Request-Id"
_VALID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id(sent: str | None) -> str:
    """The id to use: ``sent`` when it is a plain token, else a new random one."""
    if sent is not None and _VALID.fullmatch(sent):
        return sent
    # An id only has to be unique, not unguessable: no system call per request for it (the
    # random module reseeds itself in every forked worker).
    return f"{random.getrandbits(128):032x}"
