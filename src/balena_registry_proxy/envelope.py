"""Resolver mode's tokens: the proxy's own, sealed around what it must remember of a login.

No I/O: encryption and a random nonce are computation. A client logs in once and then sends only
the token it got; to query the balena API with the client's rights at every later request, on
any replica, the token carries the client's credentials and the registry token the realm
issued, sealed with AES-256-GCM under a key all replicas share. Sealed, not merely signed: the
API key inside must reach no log, proxy or balancer the token passes. A token that does not
open (another key, altered, truncated, expired) is no token of the proxy's.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

PREFIX = "brp1."
"""What the proxy's tokens start with; registry JWTs start with ``ey`` (a JSON header)."""
_NONCE_BYTES = 12
# Bound before decoding: a token is a few KiB, a larger one is refused unopened.
MAX_TOKEN_LENGTH = 8192


@dataclass(frozen=True, slots=True)
class Envelope:
    """What a proxy token carries."""

    username: str | None
    password: str | None
    """The API key (or password) the client logged in with; None for anonymous clients."""
    upstream: str
    """The registry token the realm issued at login (no repository in it)."""
    expires_at: int
    """Seconds since the epoch, from the registry token's ``exp``."""

    @property
    def caller(self) -> str:
        """A name for the client's credentials that reveals nothing of them: a cache key.

        The API key alone: the API reads with the key whatever the username, so one key under
        many usernames is one caller (and cannot crowd others out of the caches)."""
        if self.password is None:
            return "anonymous"
        material = self.password.encode()
        return hashlib.sha256(b"balena-registry-proxy caller\0" + material).hexdigest()


def derive_key(secret: str) -> bytes:
    """The 256-bit sealing key for a shared secret of any length (a passphrase, say).

    Tokens carry API keys, and one captured token is enough to test guesses of the secret
    offline: scrypt makes each guess cost memory and time (a few tens of milliseconds, once
    per start here)."""
    kdf = Scrypt(salt=b"balena-registry-proxy seal", length=32, n=1 << 14, r=8, p=1)
    return kdf.derive(secret.encode())


def is_sealed(token: str) -> bool:
    """Whether ``token`` has the shape of the proxy's own tokens (not whether it opens)."""
    return token.startswith(PREFIX)


class Sealer:
    """Seal and open proxy tokens with one key."""

    def __init__(self, key: bytes) -> None:
        """``key``: 32 bytes, the same on every replica (``derive_key``)."""
        self._aead = AESGCM(key)

    def seal(self, envelope: Envelope) -> str:
        """The token for ``envelope``."""
        payload = json.dumps(
            [
                envelope.username,
                envelope.password,
                envelope.upstream,
                envelope.expires_at,
            ],
            separators=(",", ":"),
        ).encode()
        nonce = os.urandom(_NONCE_BYTES)
        sealed = nonce + self._aead.encrypt(nonce, payload, PREFIX.encode())
        return PREFIX + base64.urlsafe_b64encode(sealed).rstrip(b"=").decode()

    def open(self, token: str, now: float) -> Envelope | None:
        """What ``token`` carries; None when it is not one of these proxies' tokens, was
        altered, or has expired at ``now`` (seconds since the epoch)."""
        if not is_sealed(token) or len(token) > MAX_TOKEN_LENGTH:
            return None
        text = token[len(PREFIX) :]
        try:
            sealed = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            nonce, ciphertext = sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:]
            payload = json.loads(self._aead.decrypt(nonce, ciphertext, PREFIX.encode()))
        except (binascii.Error, ValueError, InvalidTag):
            return None
        envelope = _envelope(payload)
        if envelope is None or envelope.expires_at <= now:
            return None
        return envelope


def _envelope(payload: object) -> Envelope | None:
    """The envelope in a decrypted payload; only the proxy writes these, but a key shared with
    an older version could have sealed another shape."""
    if not isinstance(payload, list) or len(payload) != 4:
        return None
    username, password, upstream, expires_at = payload
    strings = (username, password)
    if not all(s is None or isinstance(s, str) for s in strings) or not isinstance(upstream, str):
        return None
    if not isinstance(expires_at, int):
        return None
    return Envelope(username, password, upstream, expires_at)
