"""Settings: environment variables and command-line flags, validated before anything starts.

Pure functions, no I/O. ``Settings`` is the one table: each field carries its environment
variable (the names the original proxy uses where it had one), its flag, its parser, its help
and how its default reads; the command line, the environment, the README's settings table and
its check are all derived from it. A flag wins over the environment. A bad value stops start-up
with one line that names the setting, instead of a traceback at the first request.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .forwarded import TrustProxy, parse_trust_proxy
from .sharing import MIN_SECRET_LENGTH

DEFAULT_REGISTRY2_HOST = "registry2.balena-cloud.com"
DEFAULT_API_URL = "https://api.balena-cloud.com"


class ConfigError(Exception):
    """A setting has a value the proxy cannot run with."""


@dataclass(frozen=True, slots=True)
class Option:
    """One setting as the environment and the command line spell it."""

    field: str
    env: str
    flag: str
    help: str
    parse: Callable[[str], Any]
    shown_default: str
    """The default as the README and ``--help`` show it ("" for none)."""
    switch: bool = False
    """An on/off setting: the flag alone means on, ``--no-<flag>`` off."""
    secret: bool = False
    """A value no message may show."""

    @property
    def negative_flag(self) -> str:
        """``--no-<flag>``, for switches."""
        return "--no-" + self.flag.removeprefix("--")


def _port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 65536:
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


def _secret(text: str) -> str:
    if len(text) < MIN_SECRET_LENGTH:
        raise ValueError(
            f"must be at least {MIN_SECRET_LENGTH} characters "
            "(a random string; 32 or more is better)"
        )
    if not text.isprintable():
        raise ValueError("must be printable characters only")
    return text


def _url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        # Credentials here would be sent upstream for every client, anonymous ones included.
        raise ValueError("must not carry credentials: clients bring their own")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("must be a root URL (scheme and host), without a path")
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


AUTO_WORKERS = 0
# Each worker holds its own upstream connections, token caches and some 30 MiB: beyond a few,
# an operator should choose.
MAX_AUTO_WORKERS = 4


def _workers(text: str) -> int:
    if text == "auto":
        return AUTO_WORKERS
    try:
        return _count(1, 256, "processes")(text)
    except ValueError:
        raise ValueError("must be auto or a number of processes from 1 to 256") from None


def _count(low: int, high: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
            raise ValueError(f"must be a number of {what} from {low} to {high}")
        return int(text)

    return parse


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


def _path(text: str) -> str:
    if not text.strip():
        raise ValueError("must be a file path")
    return text


_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def _bucket(text: str) -> str:
    if not _BUCKET_RE.fullmatch(text):
        raise ValueError("must be a bucket name: 3 to 63 lowercase letters, digits, '.' or '-'")
    return text


def _prefix(text: str) -> str:
    if text.startswith("/") or "//" in text or ".." in text.split("/") or not text.isprintable():
        raise ValueError("must be a key prefix such as registry-proxy/")
    return text if not text or text.endswith("/") else text + "/"


def _redis_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ValueError("must be a redis:// or rediss:// URL with a host")
    try:
        parts.port  # noqa: B018 - urlsplit checks the port only when asked for it
    except ValueError:
        raise ValueError("has an invalid port") from None
    database = parts.path.strip("/")
    if database and not (database.isascii() and database.isdigit()):
        raise ValueError("must name a database by its number (redis://host:6379/0)")
    return text


def _log_format(text: str) -> str:
    if text.lower() not in ("text", "json"):
        raise ValueError("must be text or json")
    return text.lower()


def _host(text: str) -> str:
    if not text or any(c.isspace() for c in text):
        raise ValueError("must be an address or host name")
    return text


def _setting(
    default: Any,
    env: str,
    flag: str,
    parse: Callable[[str], Any],
    help: str,
    shown: str | None = None,
    *,
    switch: bool = False,
    secret: bool = False,
) -> Any:
    """A ``Settings`` field with its option's facts in the field's metadata."""
    option = {
        "env": env,
        "flag": flag,
        "parse": parse,
        "help": help,
        "switch": switch,
        "secret": secret,
    }
    option["shown_default"] = shown if shown is not None else _shown_default(default)
    if isinstance(default, TrustProxy):
        return field(default_factory=TrustProxy, metadata=option)
    return field(default=default, metadata=option)


def _shown_default(default: Any) -> str:
    if default is None:
        return ""
    if isinstance(default, bool):
        return "true" if default else "false"
    if isinstance(default, float) and default.is_integer():
        return str(int(default))
    return str(default)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the proxy needs to know to run, each field one setting."""

    port: int = _setting(80, "PROXY_PORT", "--port", _port, "port to listen on")
    host: str = _setting(
        "0.0.0.0",  # noqa: S104 - a registry proxy serves the network by design
        "PROXY_HOST",
        "--host",
        _host,
        "address to listen on",
    )
    registry_url: str = _setting(
        f"https://{DEFAULT_REGISTRY2_HOST}",
        "REGISTRY_URL",
        "--registry-url",
        _url,
        "upstream registry URL (`http(s)://host[:port]`, no path or credentials); wins over "
        "the next two",
        "",
    )
    dns_tld: str | None = _setting(
        None,
        "DNS_TLD",
        "--dns-tld",
        _hostname,
        "upstream is `https://registry2.<DNS_TLD>` (openBalena)",
    )
    registry2_host: str | None = _setting(
        None,
        "REGISTRY2_HOST",
        "--registry2-host",
        _hostname,
        "upstream is `https://<REGISTRY2_HOST>`",
        DEFAULT_REGISTRY2_HOST,
    )
    trust_proxy: TrustProxy = _setting(
        TrustProxy(),
        "TRUST_PROXY",
        "--trust-proxy",
        parse_trust_proxy,
        "whom to believe in `X-Forwarded-For`/`-Proto`/`-Host`: `true` (everyone), `false`, "
        "a hop count, or addresses/CIDRs (`loopback`, `uniquelocal`, `10.0.0.0/8, ::1`)",
        "false",
    )
    connect_timeout: float = _setting(
        10.0,
        "UPSTREAM_CONNECT_TIMEOUT",
        "--connect-timeout",
        _seconds,
        "seconds to connect upstream (then `502`)",
    )
    first_byte_timeout: float = _setting(
        60.0,
        "UPSTREAM_FIRST_BYTE_TIMEOUT",
        "--first-byte-timeout",
        _seconds,
        "seconds to wait for upstream's response headers (then `504`)",
    )
    read_timeout: float = _setting(
        300.0,
        "UPSTREAM_READ_TIMEOUT",
        "--read-timeout",
        _seconds,
        "seconds upstream may stay silent at any point (before the answer: `504`; mid-body: "
        "the client's connection is cut). There is no total timeout: multi-GiB layers take "
        "what they take",
    )
    shutdown_timeout: float = _setting(
        30.0,
        "SHUTDOWN_TIMEOUT",
        "--shutdown-timeout",
        _seconds,
        "on SIGTERM, seconds to let in-flight requests finish before exiting `0`",
    )
    request_head_timeout: float = _setting(
        10.0,
        "REQUEST_HEAD_TIMEOUT",
        "--request-head-timeout",
        _seconds,
        "seconds a client may take to send a request's line and headers once it started; "
        "then the connection is closed",
    )
    send_timeout: float = _setting(
        60.0,
        "SEND_TIMEOUT",
        "--send-timeout",
        _seconds,
        "seconds a client may take nothing of an answer the proxy is sending before its "
        "connection is closed",
    )
    keepalive_timeout: float = _setting(
        60.0,
        "KEEPALIVE_TIMEOUT",
        "--keepalive-timeout",
        _seconds,
        "seconds an idle client connection is kept open for its next request",
    )
    max_connections: int = _setting(
        1024,
        "MAX_CONNECTIONS",
        "--max-connections",
        _count(1, 1_000_000, "connections"),
        "client connections each worker serves at once; beyond it a new connection is "
        "answered `503` and closed. Each costs up to about 64 KiB of memory (see "
        "[Operation](#operation)), and three open files",
    )
    log_level: str = _setting(
        "INFO",
        "LOG_LEVEL",
        "--log-level",
        _log_level,
        "`debug`, `info`, `warning`, `error`",
        "info",
    )
    log_format: str = _setting(
        "text",
        "LOG_FORMAT",
        "--log-format",
        _log_format,
        "`text`, or `json` (one object per line) for log aggregators",
    )
    token_public_key: str | None = _setting(
        None,
        "TOKEN_PUBLIC_KEY",
        "--token-public-key",
        _path,
        "PEM certificate or public key the registry trusts: the proxy then verifies each "
        "token's signature, `exp`, `nbf` and `aud` before using its aliases, and a token that "
        "fails is not sent upstream (the client gets the registry's challenge and fetches a "
        "new one). Off by default: the registry verifies every token anyway",
    )
    token_audience: str | None = _setting(
        None,
        "TOKEN_AUDIENCE",
        "--token-audience",
        _host,
        "the `aud` a verified token must carry; by default `REGISTRY2_HOST` when set, else the "
        "`service` the registry names in its challenge (what its tokens are issued for)",
    )
    workers: int = _setting(
        AUTO_WORKERS,
        "WORKERS",
        "--workers",
        _workers,
        "proxy processes sharing the port (one core each); their `/metrics` add up all of "
        f"them. `auto`: one per usable core, at most {MAX_AUTO_WORKERS}, and one with "
        "`CACHE_DIR` or `CACHE_S3_URL` (which allow no more)",
        shown="auto",
    )
    max_request_line: int = _setting(
        8190,
        "MAX_REQUEST_LINE",
        "--max-request-line",
        _count(256, 1 << 20, "bytes"),
        "longest request line accepted, in bytes; beyond it `414` (`/v2/` request targets "
        "are limited to 4096 characters regardless)",
    )
    max_header_size: int = _setting(
        8190,
        "MAX_HEADER_SIZE",
        "--max-header-size",
        _count(256, 1 << 20, "bytes"),
        "largest request header accepted, in bytes; beyond it `431`",
    )
    tls_cert: str | None = _setting(
        None,
        "TLS_CERT",
        "--tls-cert",
        _path,
        "PEM certificate chain: serve HTTPS directly instead of plain HTTP (with `TLS_KEY`)",
    )
    tls_key: str | None = _setting(
        None, "TLS_KEY", "--tls-key", _path, "PEM private key of `TLS_CERT`"
    )
    cache_dir: str | None = _setting(
        None,
        "CACHE_DIR",
        "--cache-dir",
        _path,
        "keep blobs in this folder and serve repeat pulls from it (see "
        "[Edge mode](#edge-mode-a-blob-cache)); off by default",
    )
    cache_max_size: int = _setting(
        20 * 1024**3,
        "CACHE_MAX_SIZE",
        "--cache-max-size",
        parse_size,
        "the cache's size limit (`500MB`, `20GiB`, bytes); least recently used blobs go first",
        "20GiB",
    )
    follow_redirects: bool = _setting(
        False,
        "FOLLOW_REDIRECTS",
        "--follow-redirects",
        _boolean,
        "follow blob redirects to storage (S3, CloudFront) in the proxy, without the "
        "client's credentials, instead of passing them on; always on with a cache",
        switch=True,
    )
    proxy_auth: bool = _setting(
        False,
        "PROXY_AUTH",
        "--proxy-auth",
        _boolean,
        "edge mode for clients that can reach only the proxy: it names itself "
        "(`<scheme>://<host>/auth/v1/token`, from `X-Forwarded-Proto`/`-Host` of trusted "
        "peers) as the token realm, passes token requests on to the real one (credentials "
        "passed through, never logged or stored), and follows blob redirects",
        switch=True,
    )
    cache_s3_url: str | None = _setting(
        None,
        "CACHE_S3_URL",
        "--cache-s3-url",
        _url,
        "keep blobs in S3-compatible object storage at this endpoint (path-style: MinIO, "
        "SeaweedFS, Ceph, AWS) instead of `CACHE_DIR`, one cache for many replicas (see "
        "[Scaling out](#scaling-out)); credentials from the usual `AWS_ACCESS_KEY_ID`/"
        "`AWS_SECRET_ACCESS_KEY` or `AWS_SHARED_CREDENTIALS_FILE`. `CACHE_DIR`, if set, then "
        "holds only downloads in progress",
    )
    cache_s3_bucket: str | None = _setting(
        None,
        "CACHE_S3_BUCKET",
        "--cache-s3-bucket",
        _bucket,
        "the bucket of `CACHE_S3_URL` (it must exist)",
    )
    cache_s3_prefix: str = _setting(
        "",
        "CACHE_S3_PREFIX",
        "--cache-s3-prefix",
        _prefix,
        "where in the bucket the cache keeps its objects (`registry-proxy/`, say)",
    )
    cache_s3_region: str = _setting(
        "us-east-1",
        "CACHE_S3_REGION",
        "--cache-s3-region",
        _host,
        "the region requests to `CACHE_S3_URL` are signed for",
    )
    cache_s3_redirect: bool = _setting(
        False,
        "CACHE_S3_REDIRECT",
        "--cache-s3-redirect",
        _boolean,
        "answer blob hits with a redirect to a presigned URL (valid 5 minutes) instead of "
        "streaming them through the proxy: for clients that can reach the storage",
        switch=True,
    )
    cache_s3_public_url: str | None = _setting(
        None,
        "CACHE_S3_PUBLIC_URL",
        "--cache-s3-public-url",
        _url,
        "the storage's URL as clients reach it, for `CACHE_S3_REDIRECT`; by default `CACHE_S3_URL`",
    )
    cache_redis_url: str | None = _setting(
        None,
        "CACHE_REDIS_URL",
        "--cache-redis-url",
        _redis_url,
        "Redis (`redis://[:password@]host:port[/db]`, `rediss://` for TLS) that replicas "
        "sharing `CACHE_S3_URL` coordinate through: each layer downloaded by one of them, the "
        "others reading it as it arrives; with `CACHE_PEER_SECRET`",
        secret=True,
    )
    cache_peer_secret: str | None = _setting(
        None,
        "CACHE_PEER_SECRET",
        "--cache-peer-secret",
        _secret,
        "a secret shared by the replicas (16 characters or more): it signs their requests to "
        "each other's `/_cache/` endpoint, which nothing else opens",
        secret=True,
    )
    cache_peer_url: str | None = _setting(
        None,
        "CACHE_PEER_URL",
        "--cache-peer-url",
        _url,
        "where the other replicas reach this one (`http://$(POD_IP):8080`); by default "
        "`http://<this host's address>:<PROXY_PORT>`",
    )
    resolve: bool = _setting(
        False,
        "RESOLVE",
        "--resolve",
        _boolean,
        "resolver mode: the proxy resolves names through the balena API itself (versions "
        "listed, `<org>/<app>:<version>` tags, services of multi-container releases); it is "
        "the token realm and sees clients' API keys at login (see "
        "[Resolver mode](#resolver-mode-versions-tags-and-services))",
        switch=True,
    )
    api_url: str = _setting(
        DEFAULT_API_URL,
        "BALENA_API_URL",
        "--api-url",
        _url,
        "the balena API resolver mode asks; `https://api.<DNS_TLD>` when DNS_TLD is set",
    )
    api_timeout: float = _setting(
        10.0,
        "API_TIMEOUT",
        "--api-timeout",
        _seconds,
        "seconds resolver mode waits for the balena API before answering 503",
    )
    api_cache_ttl: float = _setting(
        60.0,
        "API_CACHE_TTL",
        "--api-cache-ttl",
        _seconds,
        "seconds resolver mode keeps an API answer, per app and caller",
    )
    token_seal_key: str | None = _setting(
        None,
        "TOKEN_SEAL_KEY",
        "--token-seal-key",
        _secret,
        "resolver mode's secret for sealing its tokens, the same on every replica (16+ "
        "characters); unset, each start makes one (its workers share it), and clients log "
        "in again after a restart",
        "random",
        secret=True,
    )

    @property
    def max_head(self) -> int:
        """The most a request's line and headers may take together: a line and two headers
        of the largest size (a token in Authorization, say); aiohttp alone would take 128."""
        return self.max_request_line + 2 * self.max_header_size

    @property
    def follows_redirects(self) -> bool:
        """Whether the proxy follows blob redirects itself: asked for, or needed by a cache or
        by clients that reach only the proxy."""
        return self.follow_redirects or self.caching or self.proxy_auth

    @property
    def caching(self) -> bool:
        """Whether the proxy has a cache: on disk, or shared in object storage."""
        return self.cache_dir is not None or self.cache_s3_url is not None


OPTIONS = tuple(
    Option(
        field=item.name,
        env=item.metadata["env"],
        flag=item.metadata["flag"],
        help=item.metadata["help"],
        parse=item.metadata["parse"],
        shown_default=item.metadata["shown_default"],
        switch=item.metadata["switch"],
        secret=item.metadata["secret"],
    )
    for item in dataclasses.fields(Settings)
)


def _shown(raw: str) -> str:
    """A setting's value as an error line may show it: any user:password@ part masked."""
    return re.sub(r"(?<=://)[^/@]*@", "***@", raw)


def _check_shared_cache(values: Mapping[str, Any]) -> None:
    """ConfigError for a shared cache's settings that do not go together."""
    if "cache_s3_url" not in values:
        for name, option in (
            ("cache_redis_url", "CACHE_REDIS_URL (--cache-redis-url)"),
            ("cache_s3_redirect", "CACHE_S3_REDIRECT (--cache-s3-redirect)"),
        ):
            if values.get(name):
                raise ConfigError(f"{option} needs CACHE_S3_URL (--cache-s3-url)")
        return
    if "cache_s3_bucket" not in values:
        raise ConfigError("CACHE_S3_URL (--cache-s3-url) needs CACHE_S3_BUCKET (--cache-s3-bucket)")
    if values.get("workers", 1) > 1:
        # Each worker would be a replica of its own behind one address: the others could not
        # reach the one that downloads.
        raise ConfigError("CACHE_S3_URL (--cache-s3-url) works with one worker: set WORKERS=1")
    if "cache_redis_url" in values and "cache_peer_secret" not in values:
        raise ConfigError(
            "CACHE_REDIS_URL (--cache-redis-url) needs CACHE_PEER_SECRET (--cache-peer-secret)"
        )


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
            values[option.field] = option.parse(raw)
        except ValueError as error:
            shown = "(hidden)" if option.secret else repr(_shown(raw))
            raise ConfigError(f"{option.env} ({option.flag}) {shown}: {error}") from None
    if "registry_url" not in values:
        dns_tld = values.get("dns_tld")
        upstream_host = (
            f"registry2.{dns_tld}"
            if dns_tld
            else values.get("registry2_host", DEFAULT_REGISTRY2_HOST)
        )
        values["registry_url"] = f"https://{upstream_host}"
    if "api_url" not in values:
        dns_tld = values.get("dns_tld")
        values["api_url"] = f"https://api.{dns_tld}" if dns_tld else DEFAULT_API_URL
    if values.get("workers", 1) > 1 and values.get("cache_dir"):
        # Each worker would index, clean and fill the same folder on its own.
        raise ConfigError("CACHE_DIR (--cache-dir) works with one worker: set WORKERS=1")
    _check_shared_cache(values)
    if ("tls_cert" in values) != ("tls_key" in values):
        raise ConfigError("TLS_CERT (--tls-cert) and TLS_KEY (--tls-key) go together: set both")
    return Settings(**values)


def worker_count(settings: Settings, cores: int) -> int:
    """How many processes serve ``settings`` on a machine with ``cores`` usable cores."""
    if settings.workers != AUTO_WORKERS:
        return settings.workers
    if settings.cache_dir is not None or settings.cache_s3_url is not None:
        return 1
    return max(1, min(cores, MAX_AUTO_WORKERS))
