"""Error bodies, the helpful denial and access-log lines."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from balena_registry_proxy.accesslog import AccessRecord, printable, redact_target
from balena_registry_proxy.denial import explain
from balena_registry_proxy.errors import (
    RegistryError,
    bad_request,
    error_body,
    first_error_code,
    internal_error,
    not_an_endpoint,
    unsupported_method,
)
from balena_registry_proxy.requestid import request_id


def test_error_body_shape() -> None:
    body = json.loads(error_body("DENIED", "no", {"a": 1}))
    assert body == {"errors": [{"code": "DENIED", "message": "no", "detail": {"a": 1}}]}


def test_an_error_body_is_compact_json_on_the_wire() -> None:
    assert error_body("DENIED", "no") == (
        b'{"errors":[{"code":"DENIED","message":"no","detail":null}]}'
    )


def test_unsupported_method_is_405_with_allow() -> None:
    error = unsupported_method("PUT")
    assert (error.status, error.code, error.headers) == (405, "UNSUPPORTED", {"Allow": "GET, HEAD"})
    assert error.message == "PUT is not supported: this registry proxy is read-only (pull only)"
    assert error.detail is None


@pytest.mark.parametrize(
    ("error", "status", "code", "message"),
    [
        (not_an_endpoint("not a registry API path"), 404, "UNSUPPORTED", "not a registry API path"),
        (internal_error(), 500, "UNKNOWN", "internal error in the registry proxy"),
        (bad_request("NAME_INVALID", "bad name", {"name": "x"}), 400, "NAME_INVALID", "bad name"),
    ],
)
def test_answers_of_the_proxys_own(
    error: RegistryError, status: int, code: str, message: str
) -> None:
    assert (error.status, error.code, error.message, error.headers) == (status, code, message, {})
    assert error.body() == error_body(code, message, error.detail)
    assert message in str(error)


def test_a_registry_error_carries_its_detail_and_headers() -> None:
    error = RegistryError(401, "UNAUTHORIZED", "log in", {"name": "o/a"}, {"WWW-Authenticate": "x"})
    assert json.loads(error.body()) == {
        "errors": [{"code": "UNAUTHORIZED", "message": "log in", "detail": {"name": "o/a"}}]
    }
    assert error.headers == {"WWW-Authenticate": "x"}
    assert bad_request("NAME_INVALID", "bad").detail is None


def test_first_error_code() -> None:
    assert first_error_code(error_body("NAME_UNKNOWN", "x")) == "NAME_UNKNOWN"
    two = b'{"errors":[{"code":"DENIED"},{"code":"NAME_UNKNOWN"}]}'
    assert first_error_code(two) == "DENIED"
    assert first_error_code(b'{"errors":[{"code":"DENIED"},1]}') == "DENIED"
    for body in (b"", b"<html>", b"[]", b'{"errors":[]}', b'{"errors":[1]}', b'{"errors":"x"}'):
        assert first_error_code(body) is None
    for body in (b'{"errors":[{"code":5}]}', b'{"errors":[{}]}', b"{}", b"\xff\xfe\xfd"):
        assert first_error_code(body) is None


PROXY = "proxy.example:8080"
# What every helpful denial says after its first sentence.
HINTS = (
    " Use <org>/<app>[/<version|commit>] with the app slug as shown in the dashboard."
    " Write versions without a leading 'v' and without '+rev' (1.2.3 pulls its newest revision);"
    " drafts need the full version (1.2.3-1700000000000)."
    f" Private apps need 'docker login {PROXY}' with your balena username and an API key as the"
    " password."
)


@pytest.mark.parametrize(
    ("name", "first"),
    [
        ("gh_acme", "'gh_acme' names no app: write the org and the app (gh_acme/<app>)."),
        ("gh_acme/web", "app 'gh_acme/web' was not found, or you are not allowed to pull it."),
        (
            "gh_acme/web/1.2.3",
            "release '1.2.3' of app 'gh_acme/web' was not found, or you are not allowed to pull"
            " it, or it has several services (a release of several services cannot be pulled by"
            " version or commit this way).",
        ),
        (
            "gh_acme/web/v1.2.3",
            "release 'v1.2.3' of app 'gh_acme/web' was not found: versions are written without"
            " the 'v', did you mean gh_acme/web/1.2.3?",
        ),
        (
            "gh_acme/web/1.2.3/frontend",
            "'gh_acme/web/1.2.3/frontend' names a service: images of one service of a release"
            " cannot be pulled by name, only releases of single-service apps"
            " (gh_acme/web[/<version|commit>]).",
        ),
    ],
)
def test_each_denial_says_what_failed_and_how_to_write_it(name: str, first: str) -> None:
    (error,) = json.loads(explain(name, "NAME_UNKNOWN", PROXY))["errors"]
    assert error == {
        "code": "NAME_UNKNOWN",
        "message": first + HINTS,
        "detail": {"name": name, "upstream_code": "NAME_UNKNOWN"},
    }


@pytest.mark.parametrize("release", ["vx1.2.3", "v1.2", "v1.2.3+rev1", "1.2.3"])
def test_only_a_v_before_a_version_is_taken_for_one(release: str) -> None:
    message = json.loads(explain(f"o/a/{release}", None, "p"))["errors"][0]["message"]
    assert "did you mean" not in message
    assert message.startswith(f"release '{release}' of app 'o/a' was not found, or")


def test_explain_release() -> None:
    body = json.loads(explain("gh_acme/web/v1.2.3", "UNAUTHORIZED", "proxy.example:8080"))
    error = body["errors"][0]
    assert error["code"] == "UNAUTHORIZED"
    assert "release 'v1.2.3' of app 'gh_acme/web' was not found" in error["message"]
    assert "without a leading 'v' and without '+rev'" in error["message"]
    assert "docker login proxy.example:8080" in error["message"]
    assert error["detail"] == {"name": "gh_acme/web/v1.2.3", "upstream_code": "UNAUTHORIZED"}


def test_explain_service_names() -> None:
    error = json.loads(explain("gh_acme/web/1.2.3/frontend", None, "p"))["errors"][0]
    assert error["message"].startswith("'gh_acme/web/1.2.3/frontend' names a service")
    assert "single-service apps (gh_acme/web[/<version|commit>])" in error["message"]


def test_explain_app_without_upstream_code() -> None:
    error = json.loads(explain("gh_acme/nope", None, "p"))["errors"][0]
    assert error["code"] == "DENIED"
    assert error["message"].startswith("app 'gh_acme/nope' was not found")


def test_redact_target() -> None:
    target = "/v2/x?n=10&token=abc&X-Amz-Signature=s&password=p&api_key=k&last=b"
    assert redact_target(target) == (
        "/v2/x?n=10&token=***&X-Amz-Signature=***&password=***&api_key=***&last=b"
    )
    assert redact_target("/v2/x") == "/v2/x"


@pytest.mark.parametrize(
    "name", ["jwt", "bearer", "pw", "Policy", "hdnts", "hmac", "st", "Expires", "anything"]
)
def test_every_query_value_is_masked_unless_known_harmless(name: str) -> None:
    assert redact_target(f"/v2/x?{name}=s3cr3t&n=5") == f"/v2/x?{name}=***&n=5"


def test_harmless_query_values_are_shown() -> None:
    target = "/auth/v1/token?service=reg&scope=repository:o/a:pull&account=bob&ns=docker.io"
    assert redact_target(target) == target
    assert redact_target("/v2/x?N=5&LAST=a") == "/v2/x?N=5&LAST=a"


@given(st.text(max_size=50), st.text(max_size=50))
def test_log_lines_are_single_printable_lines(method: str, target: str) -> None:
    line = AccessRecord.of(
        client="1.2.3.4",
        method=method,
        target=target,
        upstream_target=target,
        status=200,
        size=1,
        elapsed_ms=1.0,
        request_id="r1",
    ).line()
    assert line.isprintable()
    assert "\n" not in line
    assert "\r" not in line


def test_printable_keeps_plain_text() -> None:
    assert printable("GET /v2/") == "GET /v2/"
    assert printable("a\nb") == "a\\nb"


REWRITTEN = {
    "client": "203.0.113.9",
    "method": "GET",
    "target": "/v2/o/a/manifests/latest?token=secret",
    "upstream_target": "/v2/v2/abc/manifests/latest?token=secret",
    "status": 200,
    "size": 529,
    "elapsed_ms": 3.14159,
    "request_id": "abc123",
}
UNREWRITTEN = {
    "client": "::1",
    "method": "HEAD",
    "target": "/v2/",
    "upstream_target": None,
    "status": 401,
    "size": 0,
    "elapsed_ms": 0.04,
}


@pytest.mark.parametrize(
    ("facts", "line"),
    [
        (
            REWRITTEN,
            '203.0.113.9 "GET /v2/o/a/manifests/latest?token=*** -> '
            '/v2/v2/abc/manifests/latest?token=***" 200 529 3.1ms rid=abc123',
        ),
        (UNREWRITTEN, '::1 "HEAD /v2/" 401 0 0.0ms'),
        (
            {
                **REWRITTEN,
                "client": "a\nb",
                "method": "G\x00T",
                "target": "/v2/\x7f",
                "upstream_target": "/v2/é",
                "elapsed_ms": 12.345,
                "request_id": "r",
            },
            'a\\nb "G\\x00T /v2/\\x7f -> /v2/\\xe9" 200 529 12.3ms rid=r',
        ),
    ],
)
def test_access_lines(facts: dict[str, Any], line: str) -> None:
    assert AccessRecord.of(**facts).line() == line


@pytest.mark.parametrize(
    ("facts", "fields"),
    [
        (
            REWRITTEN,
            {
                "client": "203.0.113.9",
                "method": "GET",
                "path": "/v2/o/a/manifests/latest?token=***",
                "upstream_path": "/v2/v2/abc/manifests/latest?token=***",
                "status": 200,
                "bytes": 529,
                "ms": 3.1,
                "request_id": "abc123",
            },
        ),
        (
            UNREWRITTEN,
            {
                "client": "::1",
                "method": "HEAD",
                "path": "/v2/",
                "upstream_path": None,
                "status": 401,
                "bytes": 0,
                "ms": 0.0,
                "request_id": None,
            },
        ),
    ],
)
def test_access_fields(facts: dict[str, Any], fields: dict[str, object]) -> None:
    assert AccessRecord.of(**facts).fields() == fields


def test_request_id_keeps_plain_tokens_and_replaces_the_rest() -> None:
    assert request_id("abc-123_x.y:z") == "abc-123_x.y:z"
    for sent in (None, "", "a b", "x\r\nInjected: 1", "é", "a" * 129):
        generated = request_id(sent)
        assert generated != sent
        assert re.fullmatch(r"[0-9a-f]{32}", generated)


def test_new_request_ids_are_unique_and_use_all_128_bits() -> None:
    ids = [request_id(None) for _ in range(256)]
    assert len(set(ids)) == len(ids)
    # Each of the 32 hex digits is random: the first one too (128 bits, not fewer). The chance
    # that 256 ids all start below 8 by luck is 2**-256.
    assert {generated[0] for generated in ids} & set("89abcdef")


def test_a_v_prefixed_version_suggests_the_plain_one() -> None:
    message = json.loads(explain("gh_acme/web/v1.2.3", None, "p"))["errors"][0]["message"]
    assert "did you mean gh_acme/web/1.2.3?" in message
    draft = json.loads(explain("o/a/v1.2.3-1700000000000", None, "p"))["errors"][0]["message"]
    assert "did you mean o/a/1.2.3-1700000000000?" in draft


def test_a_release_that_did_not_resolve_may_have_several_services() -> None:
    message = json.loads(explain("gh_acme/stack/1.0.0", None, "p"))["errors"][0]["message"]
    assert "a release of several services cannot be pulled by version" in message


def test_an_org_alone_is_told_an_app_is_missing() -> None:
    message = json.loads(explain("gh_acme", None, "p"))["errors"][0]["message"]
    assert message.startswith("'gh_acme' names no app: write the org and the app (gh_acme/<app>)")


# The query names the README says are shown: pagination, token requests, containerd's ns, mounts.
HARMLESS = ["n", "last", "service", "scope", "account", "ns", "digest", "mount", "from"]


@pytest.mark.parametrize("name", [*HARMLESS, "artifactType", "N", "Scope"])
def test_each_harmless_query_value_is_shown(name: str) -> None:
    assert redact_target(f"/v2/x?{name}=v&token=t") == f"/v2/x?{name}=v&token=***"


@pytest.mark.parametrize(
    ("target", "logged"),
    [
        ("/v2/x?", "/v2/x?"),
        ("/v2/x?a=&n=", "/v2/x?a=***&n="),
        ("/v2/x?a%20b=1", "/v2/x?a%20b=***"),
        # A plain value is kept as sent; an odd one (a space, a '*') is masked even when its
        # name is harmless, so no value can break the line or smuggle a secret.
        ("/v2/x?scope=repository:o/a:pull,push", "/v2/x?scope=repository:o/a:pull,push"),
        ("/v2/x?last=a*b c", "/v2/x?last=***"),
    ],
)
def test_redacted_targets_are_still_well_formed(target: str, logged: str) -> None:
    assert redact_target(target) == logged


@pytest.mark.parametrize(
    ("text", "shown"),
    [("tab\there", "tab\\there"), ("é", "\\xe9"), ("\x1b[31m", "\\x1b[31m"), ("a\rb", "a\\rb")],
)
def test_printable_escapes_what_is_not_printable_ascii(text: str, shown: str) -> None:
    assert printable(text) == shown


@pytest.mark.parametrize(
    ("target", "shown"),
    [
        ("/v2/x?eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2ln", "/v2/x?***"),
        ("/v2/x?eyJh.eyJz.c2ln=", "/v2/x?eyJh.eyJz.c2ln=***"),
        ("/v2/x?n=10%3Baccess_token%3DSECRET1", "/v2/x?n=***"),
        ("/v2/x?n=10;access_token=SECRET1", "/v2/x?n=10&access_token=***"),
        ("/v2/x?last=a&&token=t", "/v2/x?last=a&&token=***"),
        ("/v2/x?%6E=5", "/v2/x?%6E=5"),
        (
            "/auth/v1/token?scope=repository%3Ao%2Fa%3Apull",
            "/auth/v1/token?scope=repository%3Ao%2Fa%3Apull",
        ),
    ],
)
def test_bare_parameters_and_semicolons_are_masked_too(target: str, shown: str) -> None:
    assert redact_target(target) == shown
