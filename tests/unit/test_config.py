"""Settings from the environment and flags."""

from __future__ import annotations

import pytest

from balena_registry_proxy.cli import build_parser
from balena_registry_proxy.config import ConfigError, Settings, load_settings
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
        ({"WORKERS": "\u0663"}, "must be a number of"),
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
