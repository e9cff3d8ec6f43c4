"""Settings from the environment and flags."""

from __future__ import annotations

import pytest

from balena_registry_proxy.cli import build_parser
from balena_registry_proxy.config import (
    OPTIONS,
    ConfigError,
    Option,
    Settings,
    load_settings,
    parse_size,
    worker_count,
)
from balena_registry_proxy.forwarded import TrustProxy
from balena_registry_proxy.runtime import wants_fast_loop


def settings(env: dict[str, str], *argv: str) -> Settings:
    return load_settings(env, vars(build_parser().parse_args(list(argv))))


def test_defaults_match_the_original() -> None:
    loaded = settings({})
    assert loaded == Settings()
    assert loaded.port == 80
    assert loaded.registry_url == "https://registry2.balena-cloud.com"
    assert loaded.trust_proxy == TrustProxy()


def test_upstream_precedence() -> None:
    assert settings({"REGISTRY2_HOST": "reg.example.com"}).registry_url == "https://reg.example.com"
    env = {"REGISTRY2_HOST": "reg.example.com", "DNS_TLD": "balena.local"}
    assert settings(env).registry_url == "https://registry2.balena.local"
    env["REGISTRY_URL"] = "http://127.0.0.1:5000/"
    assert settings(env).registry_url == "http://127.0.0.1:5000"


def test_flags_win_over_environment() -> None:
    env = {"PROXY_PORT": "8080", "REGISTRY_URL": "http://a:1", "TRUST_PROXY": "true"}
    loaded = settings(env, "--port", "9090", "--registry-url", "http://b:2", "--trust-proxy", "2")
    assert loaded.port == 9090
    assert loaded.registry_url == "http://b:2"
    assert loaded.trust_proxy == TrustProxy(hops=2)


def test_a_cache_needs_a_single_worker() -> None:
    with pytest.raises(ConfigError, match="one worker"):
        settings({"CACHE_DIR": "/tmp/cache", "WORKERS": "2"})


def test_credentials_in_the_upstream_url_are_refused_and_never_shown() -> None:
    with pytest.raises(ConfigError) as caught:
        settings({"REGISTRY_URL": "https://operator:hunter2@registry.example.com"})
    assert "must not carry credentials" in str(caught.value)
    assert "hunter2" not in str(caught.value)
    assert "operator" not in str(caught.value)


def test_timeouts_and_log_level() -> None:
    env = {"UPSTREAM_CONNECT_TIMEOUT": "2.5", "UPSTREAM_READ_TIMEOUT": "60", "LOG_LEVEL": "debug"}
    loaded = settings(env, "--shutdown-timeout", "5", "--first-byte-timeout", "7")
    assert (loaded.connect_timeout, loaded.read_timeout, loaded.shutdown_timeout) == (2.5, 60, 5)
    assert loaded.first_byte_timeout == 7
    assert loaded.log_level == "DEBUG"


@pytest.mark.parametrize(
    ("env", "argv", "names"),
    [
        ({"PROXY_PORT": "http"}, [], "PROXY_PORT (--port)"),
        ({}, ["--port", "70000"], "PROXY_PORT (--port)"),
        ({"REGISTRY_URL": "registry2.balena-cloud.com"}, [], "REGISTRY_URL (--registry-url)"),
        ({"REGISTRY_URL": "https://r.example.com/v2"}, [], "REGISTRY_URL (--registry-url)"),
        ({"REGISTRY2_HOST": "https://r.example.com"}, [], "REGISTRY2_HOST (--registry2-host)"),
        ({"DNS_TLD": "a b"}, [], "DNS_TLD (--dns-tld)"),
        ({"REGISTRY2_HOST": "exa\tmple:x"}, [], "REGISTRY2_HOST (--registry2-host)"),
        ({"REGISTRY2_HOST": "example.com:99999"}, [], "REGISTRY2_HOST (--registry2-host)"),
        ({"REGISTRY_URL": "https://h.example:99999"}, [], "REGISTRY_URL (--registry-url)"),
        ({"TRUST_PROXY": "perhaps"}, [], "TRUST_PROXY (--trust-proxy)"),
        ({"UPSTREAM_READ_TIMEOUT": "-1"}, [], "UPSTREAM_READ_TIMEOUT (--read-timeout)"),
        ({}, ["--connect-timeout", "soon"], "UPSTREAM_CONNECT_TIMEOUT (--connect-timeout)"),
        ({"LOG_LEVEL": "loud"}, [], "LOG_LEVEL (--log-level)"),
    ],
)
def test_bad_values_name_the_setting(env: dict[str, str], argv: list[str], names: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings(env, *argv)
    message = str(caught.value)
    assert message.startswith(names)
    assert "\n" not in message


@pytest.mark.parametrize(
    ("env", "explained"),
    [
        ({"PROXY_PORT": "\u00b2"}, "must be a port number from 1 to 65535"),
        ({"WORKERS": "\u0663"}, "must be auto or a number of processes"),
    ],
)
def test_digits_of_other_scripts_are_no_number(env: dict[str, str], explained: str) -> None:
    # str.isdigit() accepts them, int() does not: the message must still say what is wanted.
    with pytest.raises(ConfigError, match=explained):
        settings(env)


def test_a_cache_keeps_the_event_loop_that_has_sendfile() -> None:
    assert wants_fast_loop(settings({}))
    assert not wants_fast_loop(settings({"CACHE_DIR": "/tmp/cache"}))


def test_redirects_are_followed_when_asked_or_needed() -> None:
    assert not settings({}).follows_redirects
    assert settings({"FOLLOW_REDIRECTS": "true"}).follows_redirects
    assert settings({"CACHE_DIR": "/tmp/cache"}).follows_redirects
    assert settings({"PROXY_AUTH": "yes"}).follows_redirects


@pytest.mark.parametrize("field", ["proxy_auth", "follow_redirects"])
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--{}"], True),
        (["--{}=true"], True),
        (["--{}", "yes"], True),
        (["--{}=false"], False),
        (["--{}", "off"], False),
        (["--no-{}"], False),
    ],
)
def test_switches_work_bare_and_with_a_value(field: str, argv: list[str], expected: bool) -> None:
    flag = field.replace("_", "-")
    env = {field.upper(): "false" if expected else "true"}  # the flag wins either way
    assert getattr(settings(env, *(a.format(flag) for a in argv)), field) is expected


def test_switches_from_the_environment_keep_their_values() -> None:
    assert settings({"PROXY_AUTH": "true"}).proxy_auth is True
    assert settings({"FOLLOW_REDIRECTS": "0"}).follow_redirects is False
    with pytest.raises(ConfigError, match=r"PROXY_AUTH \(--proxy-auth\) 'maybe': must be true"):
        settings({"PROXY_AUTH": "maybe"})


def test_connection_settings() -> None:
    loaded = settings(
        {"MAX_CONNECTIONS": "50", "KEEPALIVE_TIMEOUT": "5"}, "--request-head-timeout", "2.5"
    )
    assert (loaded.max_connections, loaded.keepalive_timeout) == (50, 5)
    assert loaded.request_head_timeout == 2.5
    defaults = Settings()
    assert (defaults.max_connections, defaults.request_head_timeout) == (1024, 10)
    assert defaults.keepalive_timeout == 60
    with pytest.raises(ConfigError, match="MAX_CONNECTIONS"):
        settings({"MAX_CONNECTIONS": "0"})


S3 = {"CACHE_S3_URL": "http://seaweedfs:8333", "CACHE_S3_BUCKET": "layers"}
REDIS = {"CACHE_REDIS_URL": "redis://:hunter2@redis:6379/0", "CACHE_PEER_SECRET": "x" * 16}


def test_a_shared_cache_follows_redirects_and_keeps_the_sendfile_loop() -> None:
    shared = settings({**S3, **REDIS, "CACHE_S3_PREFIX": "proxy"})
    assert shared.caching
    assert shared.follows_redirects
    assert not wants_fast_loop(shared)
    assert shared.cache_s3_prefix == "proxy/"


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"CACHE_S3_URL": "http://s3:8333"}, "CACHE_S3_BUCKET"),
        ({"CACHE_REDIS_URL": "redis://redis:6379"}, "CACHE_S3_URL"),
        ({"CACHE_S3_REDIRECT": "true"}, "CACHE_S3_URL"),
        ({**S3, "CACHE_REDIS_URL": "redis://redis:6379"}, "CACHE_PEER_SECRET"),
        ({**S3, "WORKERS": "2"}, "WORKERS=1"),
        ({**S3, **REDIS, "CACHE_PEER_SECRET": "short"}, "CACHE_PEER_SECRET"),
        ({**S3, "CACHE_S3_BUCKET": "Not_A_Bucket"}, "CACHE_S3_BUCKET"),
        ({**S3, "CACHE_S3_PREFIX": "../up"}, "CACHE_S3_PREFIX"),
        ({**S3, **REDIS, "CACHE_REDIS_URL": "http://redis:6379"}, "CACHE_REDIS_URL"),
        ({**S3, **REDIS, "CACHE_REDIS_URL": "redis://redis:6379/zero"}, "CACHE_REDIS_URL"),
        ({**S3, **REDIS, "CACHE_REDIS_URL": "redis://redis:6379/\u00b2"}, "CACHE_REDIS_URL"),
    ],
)
def test_shared_cache_settings_that_do_not_go_together(env: dict[str, str], names: str) -> None:
    with pytest.raises(ConfigError, match=names):
        settings(env)


def test_a_redis_password_is_never_shown() -> None:
    with pytest.raises(ConfigError) as refused:
        settings({**S3, **REDIS, "CACHE_REDIS_URL": "redis://:hunter2@redis:port"})
    assert "hunter2" not in str(refused.value)


def refusal(env: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(env, {})
    return str(caught.value)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PROXY_PORT": "0"}, "PROXY_PORT (--port) '0': must be a port number from 1 to 65535"),
        (
            {"PROXY_PORT": "65536"},
            "PROXY_PORT (--port) '65536': must be a port number from 1 to 65535",
        ),
        ({"PROXY_PORT": "-1"}, "PROXY_PORT (--port) '-1': must be a port number from 1 to 65535"),
        ({"PROXY_HOST": "a b"}, "PROXY_HOST (--host) 'a b': must be an address or host name"),
        (
            {"REGISTRY_URL": "ftp://registry.example"},
            "REGISTRY_URL (--registry-url) 'ftp://registry.example': must be an http:// or "
            "https:// URL with a host",
        ),
        (
            {"REGISTRY_URL": "https://"},
            "REGISTRY_URL (--registry-url) 'https://': must be an http:// or https:// URL "
            "with a host",
        ),
        (
            {"REGISTRY_URL": "https://user@r.example"},
            "REGISTRY_URL (--registry-url) 'https://***@r.example': must not carry credentials: "
            "clients bring their own",
        ),
        (
            {"REGISTRY_URL": "https://r.example/?x=1"},
            "REGISTRY_URL (--registry-url) 'https://r.example/?x=1': must be a root URL "
            "(scheme and host), without a path",
        ),
        (
            {"REGISTRY_URL": "https://r.example#top"},
            "REGISTRY_URL (--registry-url) 'https://r.example#top': must be a root URL "
            "(scheme and host), without a path",
        ),
        (
            {"REGISTRY_URL": "https://r.example:port"},
            "REGISTRY_URL (--registry-url) 'https://r.example:port': has an invalid port",
        ),
        (
            {"DNS_TLD": "https://x"},
            "DNS_TLD (--dns-tld) 'https://x': must be a host name (with an optional :port), "
            "not a URL",
        ),
        (
            {"UPSTREAM_CONNECT_TIMEOUT": "0"},
            "UPSTREAM_CONNECT_TIMEOUT (--connect-timeout) '0': must be a positive number of "
            "seconds",
        ),
        (
            {"KEEPALIVE_TIMEOUT": "604800"},
            "KEEPALIVE_TIMEOUT (--keepalive-timeout) '604800': must be a positive number of "
            "seconds",
        ),
        (
            {"UPSTREAM_FIRST_BYTE_TIMEOUT": "700000"},
            "UPSTREAM_FIRST_BYTE_TIMEOUT (--first-byte-timeout) '700000': must be a positive "
            "number of seconds",
        ),
        (
            {"SHUTDOWN_TIMEOUT": "soon"},
            "SHUTDOWN_TIMEOUT (--shutdown-timeout) 'soon': must be a number of seconds",
        ),
        (
            {"LOG_LEVEL": "trace"},
            "LOG_LEVEL (--log-level) 'trace': must be debug, info, warning or error",
        ),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT (--log-format) 'xml': must be text or json"),
        ({"TLS_CERT": " ", "TLS_KEY": "k"}, "TLS_CERT (--tls-cert) ' ': must be a file path"),
        (
            {"WORKERS": "257"},
            "WORKERS (--workers) '257': must be auto or a number of processes from 1 to 256",
        ),
        (
            {"MAX_CONNECTIONS": "1000001"},
            "MAX_CONNECTIONS (--max-connections) '1000001': must be a number of connections from 1 "
            "to 1000000",
        ),
        (
            {"MAX_REQUEST_LINE": "255"},
            "MAX_REQUEST_LINE (--max-request-line) '255': must be a number of bytes from 256 to "
            "1048576",
        ),
        (
            {"MAX_HEADER_SIZE": "1048577"},
            "MAX_HEADER_SIZE (--max-header-size) '1048577': must be a number of bytes from 256 to "
            "1048576",
        ),
        (
            {"CACHE_MAX_SIZE": "lots"},
            "CACHE_MAX_SIZE (--cache-max-size) 'lots': must be a size such as 20GiB, 500MB or a "
            "number of bytes",
        ),
        (
            {"CACHE_MAX_SIZE": "0.1"},
            "CACHE_MAX_SIZE (--cache-max-size) '0.1': must be a size of more than 0 bytes",
        ),
        (
            {"FOLLOW_REDIRECTS": "2"},
            "FOLLOW_REDIRECTS (--follow-redirects) '2': must be true or false",
        ),
        (
            {"TRUST_PROXY": "1, 2"},
            "TRUST_PROXY (--trust-proxy) '1, 2': '1' is not true, false, a hop count, an address "
            "or a CIDR range",
        ),
        (
            {"CACHE_DIR": "/c", "WORKERS": "2"},
            "CACHE_DIR (--cache-dir) works with one worker: set WORKERS=1",
        ),
        ({"TLS_CERT": "c"}, "TLS_CERT (--tls-cert) and TLS_KEY (--tls-key) go together: set both"),
        ({"TLS_KEY": "k"}, "TLS_CERT (--tls-cert) and TLS_KEY (--tls-key) go together: set both"),
    ],
)
def test_each_refusal_names_the_setting_and_what_is_wrong(
    env: dict[str, str], message: str
) -> None:
    assert refusal(env) == message


@pytest.mark.parametrize(
    ("env", "field", "value"),
    [
        ({"PROXY_PORT": "1"}, "port", 1),
        ({"PROXY_PORT": "65535"}, "port", 65535),
        ({"PROXY_HOST": "127.0.0.1"}, "host", "127.0.0.1"),
        ({"PROXY_HOST": "::"}, "host", "::"),
        ({"UPSTREAM_READ_TIMEOUT": "0.5"}, "read_timeout", 0.5),
        ({"UPSTREAM_READ_TIMEOUT": "604799"}, "read_timeout", 604799.0),
        ({"LOG_LEVEL": "Warning"}, "log_level", "WARNING"),
        ({"LOG_LEVEL": "error"}, "log_level", "ERROR"),
        ({"LOG_LEVEL": "INFO"}, "log_level", "INFO"),
        ({"LOG_FORMAT": "JSON"}, "log_format", "json"),
        ({"LOG_FORMAT": "text"}, "log_format", "text"),
        ({"TOKEN_PUBLIC_KEY": "/keys/registry.pem"}, "token_public_key", "/keys/registry.pem"),
        ({"TOKEN_AUDIENCE": "registry2.example"}, "token_audience", "registry2.example"),
        ({"WORKERS": "256"}, "workers", 256),
        ({"WORKERS": "1"}, "workers", 1),
        ({"MAX_CONNECTIONS": "1000000"}, "max_connections", 1_000_000),
        ({"MAX_REQUEST_LINE": "256"}, "max_request_line", 256),
        ({"MAX_HEADER_SIZE": "1048576"}, "max_header_size", 1_048_576),
        ({"CACHE_DIR": "/var/cache/p"}, "cache_dir", "/var/cache/p"),
        ({"CACHE_MAX_SIZE": "500MB"}, "cache_max_size", 500_000_000),
        ({"FOLLOW_REDIRECTS": "on"}, "follow_redirects", True),
        ({"FOLLOW_REDIRECTS": "No"}, "follow_redirects", False),
        ({"PROXY_AUTH": "OFF"}, "proxy_auth", False),
        ({"PROXY_AUTH": "1"}, "proxy_auth", True),
        ({"REGISTRY_URL": "https://r.example:5000/"}, "registry_url", "https://r.example:5000"),
        ({"REGISTRY_URL": "http://r.example"}, "registry_url", "http://r.example"),
        ({"DNS_TLD": "balena.local:8443"}, "registry_url", "https://registry2.balena.local:8443"),
    ],
)
def test_each_setting_is_read_from_its_variable(
    env: dict[str, str], field: str, value: object
) -> None:
    assert getattr(load_settings(env, {}), field) == value


def test_tls_needs_its_certificate_and_key() -> None:
    loaded = load_settings({"TLS_CERT": "/tls/cert.pem", "TLS_KEY": "/tls/key.pem"}, {})
    assert (loaded.tls_cert, loaded.tls_key) == ("/tls/cert.pem", "/tls/key.pem")


def test_a_cache_with_one_worker_is_fine() -> None:
    loaded = load_settings({"CACHE_DIR": "/c", "WORKERS": "1"}, {})
    assert (loaded.cache_dir, loaded.workers) == ("/c", 1)
    assert load_settings({"WORKERS": "4"}, {}).workers == 4


@pytest.mark.parametrize(
    ("env", "cores", "workers"),
    [
        # No core to count (a platform that says nothing) is still one process.
        ({}, 0, 1),
        ({}, 1, 1),
        ({}, 2, 2),
        ({}, 4, 4),
        ({}, 64, 4),
        ({"WORKERS": "auto"}, 3, 3),
        ({"WORKERS": "1"}, 64, 1),
        ({"WORKERS": "8"}, 2, 8),
        # One process owns a cache folder; a shared cache is one replica per address.
        ({"CACHE_DIR": "/c"}, 8, 1),
        ({"CACHE_S3_URL": "http://s3", "CACHE_S3_BUCKET": "layers"}, 8, 1),
    ],
)
def test_workers_are_one_per_core_by_default(env: dict[str, str], cores: int, workers: int) -> None:
    assert worker_count(settings(env), cores) == workers


def test_workers_auto_and_zero() -> None:
    assert settings({"WORKERS": "auto"}) == settings({})
    # auto goes with a cache (it means one worker there); only an explicit count is refused.
    assert settings({"WORKERS": "auto", "CACHE_DIR": "/c"}).cache_dir == "/c"
    with pytest.raises(ConfigError, match="must be auto or a number of processes from 1 to 256"):
        settings({"WORKERS": "0"})


def test_empty_variables_count_as_unset() -> None:
    env = {option.env: "" for option in OPTIONS}
    assert load_settings(env, {}) == Settings()


def test_an_empty_trust_proxy_flag_trusts_no_one_over_the_environment() -> None:
    loaded = load_settings({"TRUST_PROXY": "true"}, {"trust_proxy": ""})
    assert loaded.trust_proxy == TrustProxy()


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1", 1),
        ("1b", 1),
        ("1k", 1000),
        ("1KB", 1000),
        ("1kib", 1024),
        ("1m", 1000**2),
        ("1mb", 1000**2),
        ("1MiB", 1024**2),
        ("1g", 1000**3),
        ("1gb", 1000**3),
        ("1gib", 1024**3),
        ("1t", 1000**4),
        ("1tb", 1000**4),
        ("1TiB", 1024**4),
        (" 1.5 GiB ", 1536 * 1024**2),
        ("20GiB", 20 * 1024**3),
    ],
)
def test_sizes_and_their_units(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GiB", "1 PB", "-1", "1e3", "0", "0.4"])
def test_what_is_no_size(text: str) -> None:
    with pytest.raises(ValueError, match="must be a size"):
        parse_size(text)


def test_the_default_cache_size_is_20_gib() -> None:
    assert Settings().cache_max_size == parse_size("20GiB")


@pytest.mark.parametrize(("option", "flag"), [(o, o.flag) for o in OPTIONS if o.switch])
def test_a_switch_is_turned_off_by_its_negative_flag(option: Option, flag: str) -> None:
    assert option.negative_flag == "--no-" + flag.removeprefix("--")
    assert getattr(settings({option.env: "true"}, option.negative_flag), option.field) is False


def test_every_default_is_the_one_the_readme_and_help_show() -> None:
    defaults = Settings()
    for option in OPTIONS:
        if not option.shown_default:
            if option.field == "cache_s3_prefix":
                # Shown empty as it is: no prefix, the bucket's root.
                assert defaults.cache_s3_prefix == ""
                continue
            assert getattr(defaults, option.field) is None or option.field == "registry_url"
        elif option.field == "registry2_host":
            # Shown as the host it stands for: the upstream when nothing else is set.
            assert defaults.registry_url == f"https://{option.shown_default}"
        elif option.field == "token_seal_key":
            # Shown as what stands in for it: each start makes a random key.
            assert (option.shown_default, defaults.token_seal_key) == ("random", None)
        else:
            assert getattr(defaults, option.field) == option.parse(option.shown_default), option


def test_resolver_and_shared_cache_settings_the_mutation_run_found_unchecked() -> None:
    # The API follows DNS_TLD as the registry does, unless set itself.
    assert settings({"DNS_TLD": "balena.local"}).api_url == "https://api.balena.local"
    assert settings({"DNS_TLD": "x.local", "BALENA_API_URL": "https://a.example"}).api_url == (
        "https://a.example"
    )
    # A secret longer than the least is welcome.
    assert settings({"TOKEN_SEAL_KEY": "k" * 40}).token_seal_key == "k" * 40
    # A request's line and headers may take the line plus twice the header limit.
    assert settings({"MAX_REQUEST_LINE": "1000", "MAX_HEADER_SIZE": "500"}).max_head == 2000


@pytest.mark.parametrize(
    "env",
    [
        {"CACHE_REDIS_URL": "redis://:hunter2-hunter2@redis:99999/0"},
        {"CACHE_PEER_SECRET": "hunter2-short"},
    ],
)
def test_the_shared_caches_secrets_are_never_shown(env: dict[str, str]) -> None:
    base = {
        "CACHE_S3_URL": "http://seaweedfs:8333",
        "CACHE_S3_BUCKET": "layers",
        "CACHE_REDIS_URL": "redis://redis:6379/0",
        "CACHE_PEER_SECRET": "x" * 16,
    }
    with pytest.raises(ConfigError) as refused:
        settings({**base, **env})
    name = next(iter(env))
    assert str(refused.value).startswith(name)
    assert "hunter2" not in str(refused.value)
