"""Image names read as app, version and service (resolver mode), with the precedence rules."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from balena_registry_proxy.release_names import (
    KEYWORDS,
    ReleaseName,
    is_keyword,
    is_semver,
    is_version,
    parse_name,
)
from balena_registry_proxy.routes import NAME_RE

COMMIT = "b9998890955e1a80e7d30b4cbb1c414f"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("gh_acme/web", ReleaseName("gh_acme/web", None, None)),
        ("gh_acme/web/1.2.3", ReleaseName("gh_acme/web", "1.2.3", None)),
        ("gh_acme/web/latest", ReleaseName("gh_acme/web", "latest", None)),
        ("gh_acme/web/pinned", ReleaseName("gh_acme/web", "pinned", None)),
        (f"gh_acme/web/{COMMIT}", ReleaseName("gh_acme/web", COMMIT, None)),
        ("gh_acme/web/" + "a" * 40, ReleaseName("gh_acme/web", "a" * 40, None)),
        (
            "gh_acme/web/1.4.0-1700000000000",
            ReleaseName("gh_acme/web", "1.4.0-1700000000000", None),
        ),
        ("gh_acme/stack/api", ReleaseName("gh_acme/stack", None, "api")),
        ("gh_acme/stack/1.0.0/api", ReleaseName("gh_acme/stack", "1.0.0", "api")),
        ("gh_acme/stack/latest/db", ReleaseName("gh_acme/stack", "latest", "db")),
        # Not versions by the rules, so services: a short commit, a 'v' prefix, two numbers.
        ("gh_acme/stack/b999889", ReleaseName("gh_acme/stack", None, "b999889")),
        ("gh_acme/stack/v1.2.3", ReleaseName("gh_acme/stack", None, "v1.2.3")),
        ("gh_acme/stack/1.2", ReleaseName("gh_acme/stack", None, "1.2")),
        ("gh_acme/stack/01.2.3", ReleaseName("gh_acme/stack", None, "01.2.3")),
    ],
)
def test_forms(name: str, expected: ReleaseName) -> None:
    assert parse_name(name) == expected


@pytest.mark.parametrize("name", ["gh_acme", "a/b/c/d/e", "a/b/c/d/e/f"])
def test_other_shapes_are_no_app_names(name: str) -> None:
    assert parse_name(name) is None


def test_the_tag_chooses_the_version_only_when_the_name_gives_none() -> None:
    assert ReleaseName("o/a", None, None).version_from_tag
    assert ReleaseName("o/a", None, "api").version_from_tag
    assert not ReleaseName("o/a", "1.0.0", None).version_from_tag


def test_keywords() -> None:
    assert {"latest", "current", "default", "pinned"} == KEYWORDS
    assert all(is_keyword(k) for k in KEYWORDS)
    assert is_keyword(None)
    assert not is_keyword("1.0.0")
    assert not is_keyword("Latest")


@given(
    st.integers(0, 10**6),
    st.integers(0, 10**6),
    st.integers(0, 10**6),
    st.one_of(st.none(), st.from_regex(r"[0-9a-z][0-9a-z.-]{0,20}", fullmatch=True)),
)
def test_every_semver_is_a_version(major: int, minor: int, patch: int, pre: str | None) -> None:
    text = f"{major}.{minor}.{patch}" + (f"-{pre}" if pre else "")
    assert is_semver(text)
    assert is_version(text)
    if NAME_RE.fullmatch(f"o/a/{text}"):
        assert parse_name(f"o/a/{text}") == ReleaseName("o/a", text, None)


@given(st.from_regex(r"[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*", fullmatch=True))
def test_service_names_that_start_with_a_letter_are_services(service: str) -> None:
    if service in KEYWORDS or is_version(service):
        return
    assert parse_name(f"o/a/{service}") == ReleaseName("o/a", None, service)


@given(st.from_regex(r"[0-9a-f]{32}|[0-9a-f]{40}", fullmatch=True))
def test_full_commits_are_versions(commit: str) -> None:
    assert parse_name(f"o/a/{commit}") == ReleaseName("o/a", commit, None)
