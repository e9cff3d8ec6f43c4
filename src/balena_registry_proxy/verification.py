"""Optional verification of registry tokens before their aliases are used.

Off by default: the upstream registry verifies every token it receives, so a forged alias gains
nothing there. Operators who want the proxy itself to refuse bad tokens (or who will serve bytes
without asking upstream, as a cache does) give it the key the registry trusts.

Pure apart from the clock: the key comes in as PEM bytes, results are cached per token.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.serialization import load_pem_public_key

ALGORITHMS = ["RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512"]
_CACHE_SIZE = 4096


def load_public_key(pem: bytes) -> PublicKeyTypes:
    """The public key of a PEM certificate or PEM public key; ValueError for anything else."""
    if b"-----BEGIN CERTIFICATE-----" in pem:
        return x509.load_pem_x509_certificate(pem).public_key()
    try:
        return load_pem_public_key(pem)
    except (ValueError, TypeError) as error:
        raise ValueError("not a PEM certificate or public key") from error


class TokenVerifier:
    """Checks signature, ``exp``, ``nbf`` and ``aud`` of registry tokens."""

    def __init__(
        self,
        key: PublicKeyTypes,
        audience: str,
        *,
        leeway: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Verify against ``key``, accepting only tokens issued for ``audience``."""
        self._key = key
        self._audience = audience
        self._leeway = leeway
        self._clock = clock
        # token -> expiry of a verified token, or None for one that failed; clients send the
        # same token on every request of a pull, and RSA verification is the costly part.
        self._seen: OrderedDict[str, float | None] = OrderedDict()

    def is_valid(self, token: str) -> bool:
        """Whether ``token`` is signed by the key, for the audience, and valid now."""
        now = self._clock()
        if token in self._seen:
            self._seen.move_to_end(token)
            known = self._seen[token]
            return known is not None and now <= known + self._leeway
        try:
            expiry: float | None = self._verify(token)
        except jwt.ImmatureSignatureError:
            return False  # not valid yet, but it may be soon: no verdict to remember
        except (jwt.PyJWTError, ValueError, TypeError):
            expiry = None
        self._seen[token] = expiry
        if len(self._seen) > _CACHE_SIZE:
            self._seen.popitem(last=False)
        return expiry is not None

    def _verify(self, token: str) -> float:
        claims = jwt.decode(
            token,
            self._key,  # type: ignore[arg-type]
            algorithms=ALGORITHMS,
            audience=self._audience,
            leeway=self._leeway,
            options={"require": ["exp", "aud"]},
        )
        return float(claims["exp"])
