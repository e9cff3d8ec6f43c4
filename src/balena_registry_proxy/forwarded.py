"""Who the client is behind reverse proxies: the ``TRUST_PROXY`` setting.

Pure functions, no I/O. The setting works as in the original proxy (Express's "trust proxy"):
``false`` trusts no one (the socket peer is the client), ``true`` trusts every hop (the leftmost
``X-Forwarded-For`` address is the client), a number trusts that many hops in front of the proxy,
and a comma-separated list of addresses or CIDR ranges trusts exactly those peers.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_NAMED_RANGES = {
    "loopback": ("127.0.0.0/8", "::1/128"),
    "linklocal": ("169.254.0.0/16", "fe80::/10"),
    "uniquelocal": ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"),
}


@dataclass(frozen=True, slots=True)
class TrustProxy:
    """A parsed ``TRUST_PROXY`` value."""

    trust_all: bool = False
    hops: int = 0
    networks: tuple[Network, ...] = ()

    def trusts(self, address: str, hop: int) -> bool:
        """Whether the peer ``address``, ``hop`` steps from the proxy, may forward for others."""
        if self.trust_all:
            return True
        if hop < self.hops:
            return True
        if not self.networks:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.networks)


def parse_trust_proxy(value: str) -> TrustProxy:
    """Parse ``true``/``false``, a hop count, or a list of addresses, CIDRs and range names.

    Raises ValueError with a message naming what could not be read.
    """
    text = value.strip().lower()
    if text in ("true", "yes"):
        return TrustProxy(trust_all=True)
    if text in ("false", "no", ""):
        return TrustProxy()
    if text.isascii() and text.isdigit():
        return TrustProxy(hops=int(text))
    networks: list[Network] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if item.isdigit():
            # "1, 2" is neither a hop count nor a list of addresses ("1" would mean 0.0.0.1).
            raise ValueError(
                f"{item!r} is not true, false, a hop count, an address or a CIDR range"
            )
        if item in _NAMED_RANGES:
            networks.extend(ipaddress.ip_network(cidr) for cidr in _NAMED_RANGES[item])
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(
                f"{item!r} is not true, false, a hop count, an address or a CIDR range"
            ) from None
    return TrustProxy(networks=tuple(networks))


def client_address(peer: str | None, forwarded_for: Sequence[str], trust: TrustProxy) -> str:
    """The client's address, walking ``X-Forwarded-For`` back only through trusted hops.

    ``forwarded_for`` holds every ``X-Forwarded-For`` header line, in order. The walk stops at
    anything that is not an IP address: a hop that claims such a thing is not believed, and
    nothing but an address ever reaches a log line from here.
    """
    return forwarded_chain(peer, forwarded_for, trust)[0]


def forwarded_chain(peer: str | None, forwarded_for: Sequence[str], trust: TrustProxy) -> list[str]:
    """The believed addresses from the client to the peer, as ``X-Forwarded-For`` lists them.

    What an untrusted hop claims is not part of it: the proxy passes on only what it believes.
    """
    chain = [peer or "-"]
    addresses = [a.strip() for line in forwarded_for for a in line.split(",") if a.strip()]
    for hop, address in enumerate(reversed(addresses)):
        if not _is_ip(address) or not trust.trusts(chain[-1], hop):
            break
        chain.append(address)
    return chain[::-1]


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def effective_origin(
    peer: str | None,
    own_scheme: str,
    own_host: str,
    forwarded_proto: str | None,
    forwarded_host: str | None,
    trust: TrustProxy,
) -> tuple[str, str]:
    """The scheme and host the client used, believing ``X-Forwarded-*`` only from a trusted peer.

    Behind a TLS terminator (a balena device's Public Device URL, say) the proxy itself sees
    plain HTTP while clients speak HTTPS to another name.
    """
    if peer is None or not trust.trusts(peer, 0):
        return own_scheme, own_host if is_host(own_host) else "-"
    scheme = (forwarded_proto or "").split(",")[0].strip().lower()
    host = (forwarded_host or "").split(",")[0].strip()
    if not is_host(host):
        host = own_host if is_host(own_host) else "-"
    return scheme if scheme in ("http", "https") else own_scheme, host


HOST_RE = re.compile(r"[A-Za-z0-9.-]+(?::[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](?::[0-9]{1,5})?")


def is_host(text: str) -> bool:
    """Whether ``text`` is a host (name, IPv4 or bracketed IPv6) with an optional port."""
    return HOST_RE.fullmatch(text) is not None


def forwarding_headers(
    peer: str | None,
    forwarded_for: Sequence[str],
    scheme: str,
    host: str,
    trust: TrustProxy,
) -> list[tuple[str, str]]:
    """The ``X-Forwarded-*`` headers the proxy sends upstream: only what it believes.

    ``scheme`` and ``host`` are the ones ``effective_origin`` found. Whatever an untrusted
    client claimed in its own ``X-Forwarded-*`` or ``Forwarded`` headers is not passed on.
    """
    return [
        ("X-Forwarded-For", ", ".join(forwarded_chain(peer, forwarded_for, trust))),
        ("X-Forwarded-Proto", scheme),
        ("X-Forwarded-Host", host),
    ]
