"""Settings: environment variables and command-line flags, validated before anything starts.

Pure functions, no I/O. Every setting has an environment variable (the names the original proxy
uses where it had one) and a flag; a flag wins over the environment. A bad value stops start-up
with one line that names the setting, instead of a traceback at the first request.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .forwarded import TrustProxy, parse_trust_proxy

DEFAULT_REGISTRY2_HOST = "registry2.balena-cloud.com"


class ConfigError(Exception):
    """A setting has a value the proxy cannot run with."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the proxy needs to know to run."""

    port: int = 80
    host: str = "0.0.0.0"  # noqa: S104 - a registry proxy serves the network by design
    registry_url: str = f"https://{DEFAULT_REGISTRY2_HOST}"
    trust_proxy: TrustProxy = field(default_factory=TrustProxy)
    connect_timeout: float = 10.0
    first_byte_timeout: float = 60.0
    read_timeout: float = 300.0
    shutdown_timeout: float = 30.0
    log_level: str = "INFO"
    log_format: str = "text"
    token_public_key: str | None = None
    token_audience: str | None = None
    workers: int = 1
    max_request_line: int = 8190
    max_header_size: int = 8190
    tls_cert: str | None = None
    tls_key: str | None = None
    cache_dir: str | None = None
    cache_max_size: int = 20 * 1024**3
    follow_redirects: bool = False
    proxy_auth: bool = False

    @property
    def follows_redirects(self) -> bool:
        """Whether the proxy follows blob redirects itself: asked for, or needed by a cache or
        by clients that reach only the proxy."""
        return self.follow_redirects or self.cache_dir is not None or self.proxy_auth

    @property
    def upstream_host(self) -> str:
        """The upstream's host name: the default audience of its tokens."""
        return urlsplit(self.registry_url).hostname or ""


@dataclass(frozen=True, slots=True)
class Option:
    """One setting as the environment and the command line spell it."""

    field: str
    env: str
    flag: str
    help: str


OPTIONS = (
    Option("port", "PROXY_PORT", "--port", "port to listen on (default 80)"),
    Option("host", "PROXY_HOST", "--host", "address to listen on (default 0.0.0.0)"),
    Option("registry_url", "REGISTRY_URL", "--registry-url", "upstream registry URL"),
    Option("dns_tld", "DNS_TLD", "--dns-tld", "upstream is https://registry2.<DNS_TLD>"),
    Option(
        "registry2_host",
        "REGISTRY2_HOST",
        "--registry2-host",
        f"upstream is https://<REGISTRY2_HOST> (default {DEFAULT_REGISTRY2_HOST})",
    ),
    Option(
        "trust_proxy",
        "TRUST_PROXY",
        "--trust-proxy",
        "trust X-Forwarded-For: true, false, a hop count, or addresses/CIDRs (default false)",
    ),
    Option(
        "connect_timeout",
        "UPSTREAM_CONNECT_TIMEOUT",
        "--connect-timeout",
        "seconds to connect to upstream (default 10)",
    ),
    Option(
        "first_byte_timeout",
        "UPSTREAM_FIRST_BYTE_TIMEOUT",
        "--first-byte-timeout",
        "seconds to wait for upstream's response headers (default 60)",
    ),
    Option(
        "read_timeout",
        "UPSTREAM_READ_TIMEOUT",
        "--read-timeout",
        "seconds upstream may stay silent at any point of an answer (default 300)",
    ),
    Option(
        "shutdown_timeout",
        "SHUTDOWN_TIMEOUT",
        "--shutdown-timeout",
        "seconds to let in-flight requests finish on SIGTERM (default 30)",
    ),
    Option("log_level", "LOG_LEVEL", "--log-level", "debug, info, warning or error"),
    Option("log_format", "LOG_FORMAT", "--log-format", "text or json (default text)"),
    Option(
        "token_public_key",
        "TOKEN_PUBLIC_KEY",
        "--token-public-key",
        "PEM certificate or public key the registry trusts: verify tokens before using aliases",
    ),
    Option(
        "token_audience",
        "TOKEN_AUDIENCE",
        "--token-audience",
        "the tokens' aud when verifying (default: the upstream's host name)",
    ),
    Option(
        "workers",
        "WORKERS",
        "--workers",
        "proxy processes sharing the port, one per core (default 1)",
    ),
    Option(
        "max_request_line",
        "MAX_REQUEST_LINE",
        "--max-request-line",
        "longest request line accepted, in bytes (default 8190; longer: 414)",
    ),
    Option(
        "max_header_size",
        "MAX_HEADER_SIZE",
        "--max-header-size",
        "largest request header accepted, in bytes (default 8190; larger: 431)",
    ),
    Option("tls_cert", "TLS_CERT", "--tls-cert", "PEM certificate chain: serve HTTPS"),
    Option("tls_key", "TLS_KEY", "--tls-key", "PEM private key of --tls-cert"),
    Option("cache_dir", "CACHE_DIR", "--cache-dir", "cache blobs in this folder (default off)"),
    Option(
        "cache_max_size",
        "CACHE_MAX_SIZE",
        "--cache-max-size",
        "cache size limit, e.g. 20GiB or 500MB (default 20GiB)",
    ),
    Option(
        "follow_redirects",
        "FOLLOW_REDIRECTS",
        "--follow-redirects",
        "follow blob redirects to storage instead of passing them on: true or false (default "
        "false; always on with a cache)",
    ),
    Option(
        "proxy_auth",
        "PROXY_AUTH",
        "--proxy-auth",
        "edge mode: name the proxy as the token realm and pass token requests on, and follow "
        "blob redirects, so clients need to reach only the proxy: true or false (default false)",
    ),
)


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError("must be a port number from 1 to 65535")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("must be a number of seconds") from None
    if not 0 < value < 86400 * 7:
        raise ValueError("must be a positive number of seconds")
    return value


def _url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        # Credentials here would be sent upstream for every client, anonymous ones included.
        raise ValueError("must not carry credentials: clients bring their own")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("must be the registry's root URL, without a path")
    try:
        parts.port  # noqa: B018 - urlsplit checks the port only when asked for it
    except ValueError:
        raise ValueError("has an invalid port") from None
    return f"{parts.scheme}://{parts.netloc}"


_HOSTNAME_RE = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}"
    r"[A-Za-z0-9])?(?::[0-9]{1,5})?"
)


def _hostname(text: str) -> str:
    if not _HOSTNAME_RE.fullmatch(text):
        raise ValueError("must be a host name (with an optional :port), not a URL")
    _url(f"https://{text}")
    return text


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("must be debug, info, warning or error")
    return level


def _workers(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 256:
        raise ValueError("must be a number of processes from 1 to 256")
    return int(text)


_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}


def parse_size(text: str) -> int:
    """Bytes in a size like ``20GiB``, ``500MB`` or ``1073741824``; ValueError otherwise."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError("must be a size such as 20GiB, 500MB or a number of bytes")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ValueError("must be a size of more than 0 bytes")
    return size


def _boolean(text: str) -> bool:
    if text.lower() in ("true", "yes", "1", "on"):
        return True
    if text.lower() in ("false", "no", "0", "off"):
        return False
    raise ValueError("must be true or false")


def _size(text: str) -> int:
    if not text.isdigit() or not 256 <= int(text) <= 1 << 20:
        raise ValueError("must be a number of bytes from 256 to 1048576")
    return int(text)


def _path(text: str) -> str:
    if not text.strip():
        raise ValueError("must be a file path")
    return text


def _log_format(text: str) -> str:
    if text.lower() not in ("text", "json"):
        raise ValueError("must be text or json")
    return text.lower()


def _host(text: str) -> str:
    if not text or any(c.isspace() for c in text):
        raise ValueError("must be an address or host name")
    return text


_PARSERS: dict[str, Callable[[str], Any]] = {
    "port": _port,
    "host": _host,
    "registry_url": _url,
    "dns_tld": _hostname,
    "registry2_host": _hostname,
    "trust_proxy": parse_trust_proxy,
    "connect_timeout": _seconds,
    "first_byte_timeout": _seconds,
    "read_timeout": _seconds,
    "shutdown_timeout": _seconds,
    "log_level": _log_level,
    "log_format": _log_format,
    "token_public_key": _path,
    "token_audience": _host,
    "workers": _workers,
    "max_request_line": _size,
    "max_header_size": _size,
    "tls_cert": _path,
    "tls_key": _path,
    "cache_dir": _path,
    "cache_max_size": parse_size,
    "follow_redirects": _boolean,
    "proxy_auth": _boolean,
}


def _shown(raw: str) -> str:
    """A setting's value as an error line may show it: any user:password@ part masked."""
    return re.sub(r"(?<=://)[^/@]*@", "***@", raw)


def load_settings(env: Mapping[str, str], flags: Mapping[str, str | None]) -> Settings:
    """Build settings from the environment and parsed flags (keyed by field name).

    Raises ConfigError naming the setting, its variable and flag, and what is wrong.
    """
    values: dict[str, Any] = {}
    for option in OPTIONS:
        raw = flags.get(option.field)
        if raw is None:
            raw = env.get(option.env)
        if raw is None or (raw == "" and option.field != "trust_proxy"):
            continue
        try:
            values[option.field] = _PARSERS[option.field](raw)
        except ValueError as error:
            raise ConfigError(f"{option.env} ({option.flag}) {_shown(raw)!r}: {error}") from None
    dns_tld = values.pop("dns_tld", None)
    registry2_host = values.pop("registry2_host", DEFAULT_REGISTRY2_HOST)
    if "registry_url" not in values:
        upstream_host = f"registry2.{dns_tld}" if dns_tld else registry2_host
        values["registry_url"] = f"https://{upstream_host}"
    if values.get("workers", 1) > 1 and values.get("cache_dir"):
        # Each worker would index, clean and fill the same folder on its own.
        raise ConfigError("CACHE_DIR (--cache-dir) works with one worker: set WORKERS=1")
    if ("tls_cert" in values) != ("tls_key" in values):
        raise ConfigError("TLS_CERT (--tls-cert) and TLS_KEY (--tls-key) go together: set both")
    return Settings(**values)
