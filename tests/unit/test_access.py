"""Reading a token's access entries and matching them to a repository."""

from __future__ import annotations

import base64
import dataclasses
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from balena_registry_proxy.access import (
    AccessEntry,
    Match,
    Verdict,
    bearer_token,
    find_access,
    grants_pull,
    token_entries,
)
from balena_registry_proxy.errors import RegistryError

from ..tokens import alias_entry, make_token


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Bearer abc.def.ghi", "abc.def.ghi"),
        ("bearer   abc", "abc"),
        ("BEARER abc ", "abc"),
        ("Basic dXNlcjpwYXNz", None),
        ("Digest username=x", None),
        ("Negotiate abc", None),
        ("Bearerx abc", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("", None),
        (None, None),
    ],
)
def test_bearer_token(header: str | None, expected: str | None) -> None:
    assert bearer_token(header) == expected


def test_entries_of_a_balena_token() -> None:
    token = make_token(
        alias_entry("org/app/1.2.3", "v2/abc"),
        {"type": "repository", "name": "org/app/9.9.9", "actions": []},
    )
    assert token_entries(token) == (
        AccessEntry("v2/abc", "org/app/1.2.3", ("pull",)),
        AccessEntry("org/app/9.9.9", None, ()),
    )


@pytest.mark.parametrize(
    "access",
    [
        None,
        "repository",
        {"type": "repository", "name": "x"},
        [1, "two", None, []],
        [{"type": "registry", "name": "catalog", "actions": ["*"]}],
        [{"type": "repository", "name": 5, "actions": ["pull"]}],
        [{"type": "repository", "name": "x", "alias": 5, "actions": ["pull"]}],
    ],
)
def test_malformed_access_claims_yield_no_entries(access: Any) -> None:
    assert token_entries(make_token(extra={"access": access})) == ()


def test_actions_of_the_wrong_shape_grant_nothing() -> None:
    token = make_token({"type": "repository", "name": "a/b", "actions": "pull"})
    assert token_entries(token) == (AccessEntry("a/b", None, ()),)
    token = make_token({"type": "repository", "name": "a/b", "actions": ["pull", 7]})
    assert token_entries(token) == (AccessEntry("a/b", None, ("pull",)),)


@pytest.mark.parametrize("token", ["", "x", "a.b", "a.b.c", "a.b.c.d", "..", "eyJ.eyJ.x"])
def test_undecodable_tokens_yield_no_entries(token: str) -> None:
    assert token_entries(token) == ()


def test_a_payload_that_is_not_an_object_yields_no_entries() -> None:
    payload = base64.urlsafe_b64encode(json.dumps([1, 2]).encode()).decode().rstrip("=")
    header = base64.urlsafe_b64encode(b'{"alg":"none"}').decode().rstrip("=")
    assert token_entries(f"{header}.{payload}.") == ()


ALIASED = AccessEntry("v2/abc", "org/app/1.2.3", ("pull",))


def test_alias_maps_to_real_repository() -> None:
    assert find_access((ALIASED,), "org/app/1.2.3") == Match(Verdict.ALIASED, "v2/abc")


def test_alias_wins_over_a_direct_entry() -> None:
    direct = AccessEntry("org/app/1.2.3", None, ())
    assert find_access((direct, ALIASED), "org/app/1.2.3") == Match(Verdict.ALIASED, "v2/abc")


def test_entry_without_actions_is_unresolved() -> None:
    entries = (AccessEntry("org/app/9.9.9", None, ()),)
    assert find_access(entries, "org/app/9.9.9") == Match(Verdict.UNRESOLVED, "org/app/9.9.9")


def test_direct_grant_is_left_alone() -> None:
    entries = (AccessEntry("v2/abc", None, ("pull",)),)
    assert find_access(entries, "v2/abc") == Match(Verdict.GRANTED, "v2/abc")


def test_real_name_of_an_aliased_entry_is_not_a_match() -> None:
    assert find_access((ALIASED,), "v2/abc") is None


def test_no_entry_for_the_name() -> None:
    assert find_access((ALIASED,), "org/other") is None
    assert find_access((), "org/app") is None


@pytest.mark.parametrize(
    "name", ["", "../admin", "v2/ABC", "a//b", "a/b?x=1", "a/b\r\nX-Injected: 1", "a" * 256]
)
def test_alias_to_an_invalid_name_is_refused(name: str) -> None:
    entries = (AccessEntry(name, "org/app", ("pull",)),)
    with pytest.raises(RegistryError) as caught:
        find_access(entries, "org/app")
    assert caught.value.status == 400
    assert caught.value.code == "NAME_INVALID"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["type", "name", "alias", "actions", "x"]), children, max_size=5
        )
    ),
    max_leaves=30,
)


@given(json_values)
def test_any_access_claim_is_read_without_crashing(access: Any) -> None:
    entries = token_entries(make_token(extra={"access": access}))
    for entry in entries:
        assert isinstance(entry.name, str)
        assert entry.alias is None or isinstance(entry.alias, str)
        assert all(isinstance(action, str) for action in entry.actions)


@given(st.text(max_size=200))
def test_any_token_string_is_read_without_crashing(token: str) -> None:
    assert isinstance(token_entries(token), tuple)


def test_grants_pull_by_alias_or_by_name_without_alias() -> None:
    entries = (
        AccessEntry("v2/abc", "org/app/1.2.3", ("pull",)),
        AccessEntry("org/app/9.9.9", None, ()),
        AccessEntry("v2/def", None, ("pull", "push")),
    )
    assert grants_pull(entries, "org/app/1.2.3")
    assert grants_pull(entries, "v2/def")
    assert not grants_pull(entries, "org/app/9.9.9")
    assert not grants_pull(entries, "v2/abc")  # only under its alias
    assert not grants_pull((), "org/app")


def test_grants_pull_goes_by_the_entry_the_alias_lookup_uses() -> None:
    # A pull grant on the name itself does not count when an alias entry for it grants nothing:
    # the request would go to the alias's repository, which was not granted.
    entries = (
        AccessEntry("org/app/1.2.3", None, ("pull",)),
        AccessEntry("v2/abc", "org/app/1.2.3", ()),
    )
    assert not grants_pull(entries, "org/app/1.2.3")
    match = find_access(entries, "org/app/1.2.3")
    assert match is not None
    assert match.repository == "v2/abc"


GOOD = {"type": "repository", "name": "v2/abc", "alias": "org/app", "actions": ["pull"]}


@pytest.mark.parametrize(
    "malformed",
    [
        7,
        {"type": "registry", "name": "catalog", "actions": ["*"]},
        {"name": "v2/abc", "actions": ["pull"]},
        {"type": "repository", "name": None, "actions": ["pull"]},
        {"type": "repository", "name": "x", "alias": ["org/app"], "actions": ["pull"]},
    ],
)
def test_a_malformed_entry_does_not_hide_the_good_ones_after_it(malformed: Any) -> None:
    token = make_token(malformed, GOOD)
    assert token_entries(token) == (AccessEntry("v2/abc", "org/app", ("pull",)),)


def test_an_alias_naming_another_repository_does_not_grant_this_one() -> None:
    # An entry aliasing some other name, whose real name is the requested one, is no grant.
    entries = (AccessEntry("org/app", "org/other", ("pull",)),)
    assert find_access(entries, "org/app") is None
    assert not grants_pull(entries, "org/app")


def test_the_first_direct_entry_for_a_name_decides() -> None:
    entries = (AccessEntry("org/app", None, ()), AccessEntry("org/app", None, ("pull",)))
    assert find_access(entries, "org/app") == Match(Verdict.UNRESOLVED, "org/app")
    assert not grants_pull(entries, "org/app")
    reversed_entries = entries[::-1]
    assert find_access(reversed_entries, "org/app") == Match(Verdict.GRANTED, "org/app")
    assert grants_pull(reversed_entries, "org/app")


def test_the_first_alias_for_a_name_decides() -> None:
    entries = (
        AccessEntry("v2/first", "org/app", ("pull",)),
        AccessEntry("v2/second", "org/app", ("pull",)),
    )
    assert find_access(entries, "org/app") == Match(Verdict.ALIASED, "v2/first")


def test_a_grant_of_other_actions_is_no_pull() -> None:
    entries = (AccessEntry("v2/abc", None, ("push", "delete")),)
    assert find_access(entries, "v2/abc") == Match(Verdict.GRANTED, "v2/abc")
    assert not grants_pull(entries, "v2/abc")


def test_an_invalid_alias_target_is_refused_naming_the_alias() -> None:
    with pytest.raises(RegistryError) as caught:
        find_access((AccessEntry("../admin", "org/app", ("pull",)),), "org/app")
    assert caught.value.message == "the registry token maps this name to an invalid repository name"
    assert caught.value.detail == {"name": "org/app"}


def test_an_alias_to_a_valid_name_of_any_shape_is_followed() -> None:
    entries = (AccessEntry("a" * 255, "org/app", ("pull",)),)
    assert find_access(entries, "org/app") == Match(Verdict.ALIASED, "a" * 255)


def test_the_entries_of_a_token_are_shared_and_cannot_be_changed() -> None:
    # token_entries keeps its answers: an entry changed by one request would be the next one's.
    token = make_token(alias_entry("org/app", "v2/abc"))
    (entry,) = token_entries(token)
    assert token_entries(token)[0] is entry
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.name = "v2/other"  # type: ignore[misc]
    assert {entry: 1}[AccessEntry("v2/abc", "org/app", ("pull",))] == 1
