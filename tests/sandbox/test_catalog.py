"""Catalog loading/validation and balena's scope resolution rules."""

from __future__ import annotations

import dataclasses
import json
import string
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from balena_registry_proxy.sandbox.catalog import (
    AccessEntry,
    Catalog,
    CatalogError,
    Platform,
    ReleaseStatus,
    ScopeRequest,
    User,
    access_for_scopes,
    catalog_from_data,
    derive_repository_hash,
    load_catalog,
    parse_scope,
    resolve_release,
    resolve_scope,
)

WEB_123 = "e92ac1ab19ea54ec0528b659edc88952"
WEB_123_REV1 = "173fde6195e3907bc9fa80315fd862a4"
WEB_123_REV2 = "e8b6a13ac1443a731f1ad8fe7b6573f6"
WEB_130 = "8603676b4b8c6695ca8408eee38775d3"
WEB_DRAFT = "af34a77a2f6fa8d466e5af21f102047e"
WEB_FAILED = "6148afa5e5a269b8262f0be330c81663"
SECRET_020 = "63ba1da10a1cd217cd1d0db8b51db6b8"
TOOLS_100 = "c6e2e586eb6e4544c6dbfc74e1e77cde"


def repo(catalog: Catalog, commit: str) -> str:
    image = catalog.release(commit)[1].single_image
    assert image is not None
    return image.repository


def alice(catalog: Catalog) -> User:
    user = catalog.user("alice")
    assert user is not None
    return user


def mallory(catalog: Catalog) -> User:
    user = catalog.user("mallory")
    assert user is not None
    return user


def resolve(catalog: Catalog, scope: str, user: User | None = None) -> dict[str, Any] | None:
    request = parse_scope(scope)
    assert request is not None
    entry = resolve_scope(catalog, request, user)
    return None if entry is None else entry.to_claim()


# --------------------------------------------------------------------------- scope parsing


@pytest.mark.parametrize(
    ("scope", "expected"),
    [
        ("repository:gh_acme/web:pull", ScopeRequest("gh_acme/web", ("pull",))),
        ("repository:gh_acme/web:pull,push", ScopeRequest("gh_acme/web", ("pull", "push"))),
        ("repository:gh_acme/web/1.2.3:pull", ScopeRequest("gh_acme/web/1.2.3", ("pull",))),
        ("repository:gh_acme/web:latest:pull", ScopeRequest("gh_acme/web", ("pull",))),
        ("repository:gh_acme/web@sha256:abcd:pull", ScopeRequest("gh_acme/web", ("pull",))),
        ("repository:gh_acme/web:", ScopeRequest("gh_acme/web", ())),
        ("repository:gh_acme/web:*", ScopeRequest("gh_acme/web", ("*",))),
    ],
)
def test_parse_scope(scope: str, expected: ScopeRequest) -> None:
    assert parse_scope(scope) == expected


@pytest.mark.parametrize(
    "scope",
    [
        "",
        "registry:catalog:*",
        "repository",
        "repository:",
        "repository:gh_acme/web",
        "repository::pull",
    ],
)
def test_parse_scope_rejects_non_repository_scopes(scope: str) -> None:
    assert parse_scope(scope) is None


# --------------------------------------------------------------------------- selectors


@pytest.mark.parametrize("suffix", ["", "/latest", "/current", "/default", "/pinned"])
def test_default_selectors_give_the_pinned_release_not_the_newest(
    default_catalog: Catalog, suffix: str
) -> None:
    name = f"gh_acme/web{suffix}"
    assert resolve(default_catalog, f"repository:{name}:pull") == {
        "type": "repository",
        "name": repo(default_catalog, WEB_123_REV1),
        "alias": name,
        "actions": ["pull"],
    }


@pytest.mark.parametrize(
    ("selector", "commit"),
    [
        ("1.2.3", WEB_123_REV2),  # highest revision of 1.2.3 wins
        ("1.3.0", WEB_130),
        ("1.4.0-1700000000000", WEB_DRAFT),  # a draft by raw version
        (WEB_123, WEB_123),  # a commit
        (WEB_DRAFT, WEB_DRAFT),
    ],
)
def test_selector_resolution(default_catalog: Catalog, selector: str, commit: str) -> None:
    name = f"gh_acme/web/{selector}"
    entry = resolve(default_catalog, f"repository:{name}:pull")
    assert entry == {
        "type": "repository",
        "name": repo(default_catalog, commit),
        "alias": name,
        "actions": ["pull"],
    }


@pytest.mark.parametrize(
    "selector",
    [
        "1.5.0",  # failed release
        WEB_FAILED,  # failed release by commit
        "1.4.0",  # only a draft carries this semver
        "9.9.9",
        SECRET_020,  # a commit of another app
        "1.4.0-1",
        "newest",
    ],
)
def test_unresolvable_selector_grants_nothing(default_catalog: Catalog, selector: str) -> None:
    name = f"gh_acme/web/{selector}"
    assert resolve(default_catalog, f"repository:{name}:pull") == {
        "type": "repository",
        "name": name,
        "actions": [],
    }


def test_plus_revision_selector_is_not_a_valid_name(default_catalog: Catalog) -> None:
    assert resolve(default_catalog, "repository:gh_acme/web/1.2.3+rev1:pull") is None


def test_bare_app_without_release_gets_legacy_fallback(default_catalog: Catalog) -> None:
    expected = {"type": "repository", "name": "gh_acme/empty", "actions": ["pull"]}
    assert resolve(default_catalog, "repository:gh_acme/empty:pull") == expected
    assert resolve(default_catalog, "repository:gh_acme/empty/latest:pull") == {
        "type": "repository",
        "name": "gh_acme/empty/latest",
        "actions": [],
    }


def test_unknown_app_bare_name_gets_legacy_fallback(default_catalog: Catalog) -> None:
    assert resolve(default_catalog, "repository:nobody/nothing:pull,push") == {
        "type": "repository",
        "name": "nobody/nothing",
        "actions": ["pull"],
    }


def test_service_component_grants_nothing(default_catalog: Catalog) -> None:
    name = "gh_acme/web/1.2.3/main"
    assert resolve(default_catalog, f"repository:{name}:pull") == {
        "type": "repository",
        "name": name,
        "actions": [],
    }


@pytest.mark.parametrize(
    ("requested", "granted"), [("pull,push", ["pull"]), ("push", []), ("*", [])]
)
def test_push_is_never_granted(
    default_catalog: Catalog, requested: str, granted: list[str]
) -> None:
    entry = resolve(default_catalog, f"repository:gh_acme/web/1.3.0:{requested}")
    assert entry is not None
    assert entry["actions"] == granted
    assert entry["name"] == repo(default_catalog, WEB_130)


@pytest.mark.parametrize(
    "name",
    ["GH_ACME/web", "gh_acme", "gh_acme/web/1.2.3/main/extra", "a/b/c/d.e", "library/ubuntu!"],
)
def test_other_names_are_ignored(default_catalog: Catalog, name: str) -> None:
    assert resolve(default_catalog, f"repository:{name}:pull") is None


def test_default_selector_without_pinned_release_resolves_nothing() -> None:
    catalog = catalog_from_data(
        {
            "orgs": ["o"],
            "apps": [
                {
                    "slug": "o/a",
                    "public": True,
                    "pinned_release": "a" * 32,
                    "releases": [{"commit": "a" * 32, "semver": "1.0.0"}],
                }
            ],
        }
    )
    app = catalog.apps[0]
    assert resolve_release(app, None) == app.releases[0]
    assert resolve_release(dataclasses.replace(app, pinned_commit=None), "latest") is None


# --------------------------------------------------------------------------- visibility


def test_private_app_anonymous(default_catalog: Catalog) -> None:
    assert resolve(default_catalog, "repository:gh_acme/secret/0.2.0:pull") == {
        "type": "repository",
        "name": "gh_acme/secret/0.2.0",
        "actions": [],
    }
    # The bare name falls back to the literal, non-existent repository.
    assert resolve(default_catalog, "repository:gh_acme/secret:pull") == {
        "type": "repository",
        "name": "gh_acme/secret",
        "actions": ["pull"],
    }


def test_private_app_member(default_catalog: Catalog) -> None:
    for name in ("gh_acme/secret", "gh_acme/secret/0.2.0", f"gh_acme/secret/{SECRET_020}"):
        assert resolve(default_catalog, f"repository:{name}:pull", alice(default_catalog)) == {
            "type": "repository",
            "name": repo(default_catalog, SECRET_020),
            "alias": name,
            "actions": ["pull"],
        }


def test_private_app_non_member(default_catalog: Catalog) -> None:
    entry = resolve(
        default_catalog, "repository:gh_acme/secret/0.2.0:pull", mallory(default_catalog)
    )
    assert entry == {"type": "repository", "name": "gh_acme/secret/0.2.0", "actions": []}
    entry = resolve(default_catalog, "repository:gh_evil/tools/1.0.0:pull", alice(default_catalog))
    assert entry == {"type": "repository", "name": "gh_evil/tools/1.0.0", "actions": []}


def test_public_app_for_any_user(default_catalog: Catalog) -> None:
    for user in (None, alice(default_catalog), mallory(default_catalog)):
        entry = resolve(default_catalog, "repository:gh_acme/web/1.3.0:pull", user)
        assert entry is not None
        assert entry["actions"] == ["pull"]


@pytest.mark.parametrize(
    ("commit", "user", "granted"),
    [
        (WEB_130, None, ["pull"]),
        (WEB_FAILED, None, ["pull"]),  # direct access is by permission, not by status
        (SECRET_020, None, []),
        (SECRET_020, "alice", ["pull"]),
        (SECRET_020, "mallory", []),
        (TOOLS_100, "mallory", ["pull"]),
        (TOOLS_100, "alice", []),
    ],
)
def test_direct_repository_scope(
    default_catalog: Catalog, commit: str, user: str | None, granted: list[str]
) -> None:
    name = repo(default_catalog, commit)
    who = None if user is None else default_catalog.user(user)
    assert resolve(default_catalog, f"repository:{name}:pull,push", who) == {
        "type": "repository",
        "name": name,
        "actions": granted,
    }


def test_unknown_direct_repository_grants_nothing(default_catalog: Catalog) -> None:
    name = "v2/" + "f" * 32
    expected = {"type": "repository", "name": name, "actions": []}
    assert resolve(default_catalog, f"repository:{name}:pull", alice(default_catalog)) == expected


def test_access_for_scopes_resolves_each_and_drops_ignored(default_catalog: Catalog) -> None:
    entries = access_for_scopes(
        default_catalog,
        [
            "repository:gh_acme/web:pull",
            "registry:catalog:*",
            "repository:gh_acme/multi/2.0.0:pull",
        ],
        None,
    )
    assert [e.alias for e in entries] == ["gh_acme/web", "gh_acme/multi/2.0.0"]


# --------------------------------------------------------------------------- properties

_NAME_ALPHABET = string.ascii_lowercase + string.digits + "_-./:@,+ ABC"


@given(st.text())
def test_arbitrary_scope_strings_never_raise(scope: str) -> None:
    request = parse_scope(scope)
    if request is not None:
        resolve_scope(Catalog((), (), ()), request, None)


@given(
    name=st.text(alphabet=_NAME_ALPHABET, max_size=60),
    actions=st.lists(st.sampled_from(["pull", "push", "*", "delete", ""]), max_size=3),
    user=st.sampled_from([None, "alice", "mallory"]),
)
def test_resolution_never_grants_more_than_pull(
    default_catalog: Catalog, name: str, actions: list[str], user: str | None
) -> None:
    who = None if user is None else default_catalog.user(user)
    for entry in access_for_scopes(
        default_catalog, [f"repository:{name}:{','.join(actions)}"], who
    ):
        assert set(entry.actions) <= {"pull"}
        if entry.alias is not None:
            # An alias only ever accompanies a resolved v2/<hash> repository.
            found = default_catalog.image_by_hash(entry.name.removeprefix("v2/"))
            assert found is not None
            assert found[1].status is ReleaseStatus.SUCCESS
            assert found[1].single_image is found[2]


@given(
    selector=st.one_of(
        st.sampled_from(["1.2.3", "1.3.0", "latest", WEB_DRAFT, WEB_FAILED, "1.5.0"]),
        st.from_regex(r"[a-z0-9_.-]{1,40}", fullmatch=True),
    ),
    user=st.sampled_from([None, "alice", "mallory"]),
)
def test_resolved_release_belongs_to_requested_app(
    default_catalog: Catalog, selector: str, user: str | None
) -> None:
    who = None if user is None else default_catalog.user(user)
    for slug in ("gh_acme/web", "gh_acme/secret"):
        app = default_catalog.app(slug)
        assert app is not None
        request = ScopeRequest(f"{slug}/{selector}", ("pull",))
        entry = resolve_scope(default_catalog, request, who)
        assert entry is not None
        if entry.alias is not None:
            assert entry.name in {i.repository for r in app.releases for i in r.images}


# --------------------------------------------------------------------------- model


def test_release_versions(default_catalog: Catalog) -> None:
    versions = {r.commit: r.version for r in default_catalog.apps[0].releases}
    assert versions[WEB_123] == "1.2.3"
    assert versions[WEB_123_REV2] == "1.2.3+rev2"
    assert versions[WEB_DRAFT] == "1.4.0-1700000000000"


def test_repository_hash_given_or_derived(default_catalog: Catalog) -> None:
    assert repo(default_catalog, WEB_123) == "v2/0123456789abcdef0123456789abcdef"
    assert repo(default_catalog, WEB_130) == "v2/" + derive_repository_hash("gh_acme/web", WEB_130)
    assert len(derive_repository_hash("a/b", "c")) == 32


def test_platforms_and_big_layer(default_catalog: Catalog) -> None:
    _, multi = default_catalog.release("df536a8c7e7306f41113f698a6a97911")
    assert multi.single_image is not None
    assert [str(p) for p in multi.single_image.platforms] == ["linux/amd64", "linux/arm64"]
    assert any(image.big_layer_mib == 64 for _, _, image in default_catalog.all_images())
    assert Platform.parse("linux/arm/v7") == Platform("linux", "arm", "v7")


def test_user_lookup_by_api_key(default_catalog: Catalog) -> None:
    user = default_catalog.user_by_api_key("alice-sandbox-api-key-0001")
    assert user is not None
    assert user.username == "alice"
    assert default_catalog.user_by_api_key("alice") is None
    assert "alice-sandbox-api-key" not in repr(user)


def test_unknown_commit_raises_key_error(default_catalog: Catalog) -> None:
    with pytest.raises(KeyError):
        default_catalog.release("0" * 32)


def test_access_entry_claim_shape() -> None:
    assert AccessEntry("v2/x", ("pull",), alias="o/a").to_claim() == {
        "type": "repository",
        "name": "v2/x",
        "alias": "o/a",
        "actions": ["pull"],
    }


# --------------------------------------------------------------------------- validation


def world(**release: object) -> dict[str, Any]:
    """A one-release catalog document, with ``release`` overriding release fields."""
    base: dict[str, object] = {"commit": "a" * 32, "semver": "1.0.0"}
    base.update(release)
    return {
        "orgs": ["o"],
        "users": [{"username": "u", "api_key": "k" * 10, "orgs": ["o"]}],
        "apps": [{"slug": "o/a", "public": True, "releases": [base]}],
    }


@pytest.mark.parametrize(
    ("release", "message"),
    [
        ({"commit": "A" * 32}, "releases[0].commit: 'AAAA"),
        ({"commit": 12345}, "releases[0].commit: must be a string (quote it in YAML)"),
        ({"semver": 1.2}, "semver: must be a string (quote it in YAML)"),
        ({"semver": "1.2"}, "semver: '1.2' is not a semver like 1.2.3"),
        ({"revision": -1}, "revision: must be a non-negative integer"),
        ({"revision": True}, "revision: must be a non-negative integer"),
        ({"final": "yes"}, "final: must be true or false"),
        ({"raw_version": "1.0.0-1"}, "only drafts (final: false) have a raw_version"),
        ({"final": False}, "raw_version: is required"),
        ({"final": False, "raw_version": "2.0.0-1"}, "is not '1.0.0-<timestamp>'"),
        (
            {"final": False, "raw_version": "1.0.0-1", "revision": 1},
            "drafts (final: false) have no",
        ),
        ({"status": "done"}, "'done' is not one of success, failed, running"),
        ({"hash": "xyz"}, "hash: 'xyz' is not 32 lowercase hex characters"),
        ({"platforms": ["linux"]}, "platforms[0]: 'linux' is not a platform os/arch[/variant]"),
        ({"platforms": [3]}, "platforms[0]: must be a string (quote it in YAML), got 3"),
        ({"platforms": "linux/amd64"}, "platforms: must be a list"),
        ({"platforms": ["linux/amd64", "linux/amd64"]}, "lists a platform twice"),
        ({"big_layer_mib": "64"}, "big_layer_mib: must be a non-negative integer"),
        ({"big_layer_mib": 8, "big_layers": 0}, "big_layers: must be an integer >= 1, got 0"),
        ({"big_layers": 2}, "big_layers: needs big_layer_mib"),
        ({"tag": "x"}, "releases[0]: unknown key(s) tag"),
    ],
)
def test_release_validation(release: dict[str, object], message: str) -> None:
    with pytest.raises(CatalogError) as excinfo:
        catalog_from_data(world(**release))
    assert message in str(excinfo.value)
    assert "catalog.apps[0].releases[0]" in str(excinfo.value)


def mutate(doc: dict[str, Any], path: tuple[str | int, ...], value: object) -> dict[str, Any]:
    target: Any = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return doc


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("orgs",), ["o", "o"], "catalog.orgs: lists an organization twice"),
        (("orgs",), ["O"], "catalog.orgs[0]: 'O' is not a lowercase org handle"),
        (("apps", 0, "slug"), "x/a", "organization 'x' is not declared in orgs"),
        (("apps", 0, "slug"), "o/a/b", "is not an 'org/app' slug"),
        (("apps", 0, "public"), "yes", "catalog.apps[0].public: must be true or false"),
        (("apps", 0, "pinned_release"), "b" * 32, "is not a release of o/a"),
        (("users", 0, "orgs"), ["p"], "catalog.users[0].orgs: organization 'p' is not declared"),
        (("users", 0, "api_key"), "short", "catalog.users[0].api_key: 'short' is not 8+"),
        (("users", 0, "password"), "x", "catalog.users[0]: unknown key(s) password"),
        (("users",), {"u": 1}, "catalog.users: must be a list"),
        (("extra",), 1, "catalog: unknown key(s) extra"),
    ],
)
def test_world_validation(path: tuple[str | int, ...], value: object, message: str) -> None:
    with pytest.raises(CatalogError) as excinfo:
        catalog_from_data(mutate(world(), path, value))
    assert message in str(excinfo.value)


def test_pinned_release_must_have_succeeded() -> None:
    doc = mutate(world(status="failed"), ("apps", 0, "pinned_release"), "a" * 32)
    with pytest.raises(CatalogError, match="did not succeed"):
        catalog_from_data(doc)


def test_duplicates_are_rejected() -> None:
    doc = world()
    release = doc["apps"][0]["releases"][0]
    doc["apps"][0]["releases"].append(dict(release, commit="b" * 32))
    with pytest.raises(CatalogError, match="two final releases share a semver and revision"):
        catalog_from_data(doc)
    doc["apps"][0]["releases"][1] = dict(release, commit="b" * 32, revision=1, hash="c" * 32)
    doc["apps"][0]["releases"][0]["hash"] = "c" * 32
    with pytest.raises(CatalogError, match="two images share a repository hash"):
        catalog_from_data(doc)
    doc["apps"].append({"slug": "o/b", "releases": [dict(release)]})
    del doc["apps"][0]["releases"][0]["hash"]
    with pytest.raises(CatalogError, match="two releases share a commit"):
        catalog_from_data(doc)
    doc = world()
    doc["users"].append({"username": "v", "api_key": "k" * 10})
    with pytest.raises(CatalogError, match="two users share an api_key"):
        catalog_from_data(doc)


def test_catalog_must_be_a_mapping() -> None:
    with pytest.raises(CatalogError, match="catalog: expected a mapping, got list"):
        catalog_from_data([])


def test_load_json_and_yaml(tmp_path: Path) -> None:
    json_path = tmp_path / "world.json"
    json_path.write_text(json.dumps(world()))
    yaml_path = tmp_path / "world.yaml"
    yaml_path.write_text("orgs: [o]\napps:\n  - slug: o/a\n")
    assert load_catalog(json_path).apps[0].releases[0].semver == "1.0.0"
    assert load_catalog(yaml_path).apps[0].public is False


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="cannot read catalog"):
        load_catalog(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("orgs: [\n")
    with pytest.raises(CatalogError, match=r"broken\.yaml: not valid YAML"):
        load_catalog(broken)
    invalid = tmp_path / "invalid.yaml"
    invalid.write_text("orgs: [o]\napps: [{slug: o/a, releases: [{commit: x, semver: 1.0.0}]}]\n")
    with pytest.raises(CatalogError, match=r"invalid.yaml: catalog.apps\[0\].releases\[0\].commit"):
        load_catalog(invalid)


# --------------------------------------------------------------------------- services, device types

STACK = "gh_acme/stack"
STACK_100 = "b9998890955e1a80e7d30b4cbb1c414f"
STACK_110 = "46b872d1f31c14c156a484fe0e51183d"
BACKOFFICE = "85cb7cd25c1f7287d83d99d49cc1a47d"


def test_a_release_of_several_services_has_an_image_each(default_catalog: Catalog) -> None:
    _, release = default_catalog.release(STACK_100)
    assert [image.service for image in release.images] == ["frontend", "api", "db"]
    assert len({image.repository for image in release.images}) == 3
    assert release.single_image is None
    assert default_catalog.release(WEB_123)[1].images[0].service == "main"


@pytest.mark.parametrize("suffix", ["", "/latest", "/1.0.0", f"/{STACK_100}"])
def test_releases_of_several_services_never_resolve_by_name(
    default_catalog: Catalog, suffix: str
) -> None:
    entry = resolve(default_catalog, f"repository:{STACK}{suffix}:pull")
    assert entry is not None
    assert "alias" not in entry
    # Only the bare name keeps the legacy grant of a repository that does not exist.
    assert entry == {
        "type": "repository",
        "name": f"{STACK}{suffix}",
        "actions": ["pull"] if suffix == "" else [],
    }


def test_each_service_image_is_pullable_by_repository(default_catalog: Catalog) -> None:
    for image in default_catalog.release(STACK_100)[1].images:
        assert resolve(default_catalog, f"repository:{image.repository}:pull") == {
            "type": "repository",
            "name": image.repository,
            "actions": ["pull"],
        }
    for image in default_catalog.release(BACKOFFICE)[1].images:
        scope = f"repository:{image.repository}:pull"
        assert resolve(default_catalog, scope)["actions"] == []  # type: ignore[index]
        assert resolve(default_catalog, scope, alice(default_catalog))["actions"] == ["pull"]  # type: ignore[index]


def test_invalidated_releases_still_resolve_explicitly(default_catalog: Catalog) -> None:
    # The API's registry resolution does not look at is_invalidated (registry.ts).
    entry = resolve(default_catalog, "repository:gh_acme/browser-aarch64/2.3.9:pull")
    assert entry is not None
    assert entry["alias"] == "gh_acme/browser-aarch64/2.3.9"


def test_resolution_without_the_one_image_rule(default_catalog: Catalog) -> None:
    app = default_catalog.app(STACK)
    assert app is not None
    assert resolve_release(app, None) is None
    pinned = resolve_release(app, None, single_image=False)
    assert pinned is not None
    assert pinned.commit == STACK_100
    assert resolve_release(app, "1.2.0", single_image=False) is None  # failed


def test_the_newest_single_image_revision_wins() -> None:
    releases = [
        {"commit": "a" * 32, "semver": "1.0.0"},
        {
            "commit": "b" * 32,
            "semver": "1.0.0",
            "revision": 1,
            "services": [{"name": "x"}, {"name": "y"}],
        },
    ]
    catalog = catalog_from_data({"orgs": ["o"], "apps": [{"slug": "o/a", "releases": releases}]})
    app = catalog.apps[0]
    assert resolve_release(app, "1.0.0") == app.releases[0]
    assert resolve_release(app, "1.0.0", single_image=False) == app.releases[1]


def test_device_types(default_catalog: Catalog) -> None:
    web = default_catalog.app("gh_acme/web")
    browser = default_catalog.app("gh_acme/browser-armv7hf")
    assert web is not None
    assert browser is not None
    assert web.device_type == default_catalog.device_types[0]
    assert (browser.device_type.cpu_architecture, str(browser.device_type.platform)) == (
        "armv7hf",
        "linux/arm/v7",
    )
    bare = catalog_from_data({"orgs": ["o"], "apps": [{"slug": "o/a"}]})
    assert bare.apps[0].device_type.slug == "generic-amd64"


def test_a_release_of_several_services_in_yaml(tmp_path: Path) -> None:
    path = tmp_path / "world.yaml"
    path.write_text(
        "orgs: [o]\n"
        "device_types: [{slug: rpi3, name: Pi, cpu_architecture: armv7hf}]\n"
        "apps:\n"
        "  - slug: o/a\n"
        "    device_type: rpi3\n"
        "    releases:\n"
        "      - commit: " + "a" * 32 + "\n"
        "        semver: 1.0.0\n"
        "        invalidated: true\n"
        "        status: cancelled\n"
        "        services: [{name: web, hash: "
        + "b" * 32
        + "}, {name: db, platforms: [linux/arm/v7]}]\n"
    )
    (release,) = load_catalog(path).apps[0].releases
    assert (release.invalidated, release.status) == (True, ReleaseStatus.CANCELLED)
    web, db = release.images
    assert (web.service, web.repository_hash) == ("web", "b" * 32)
    assert db.repository_hash == derive_repository_hash("o/a", f"{'a' * 32}/db")
    assert db.platforms == (Platform("linux", "arm", "v7"),)


@pytest.mark.parametrize(
    ("release", "message"),
    [
        ({"services": []}, "services: [] should be non-empty"),
        ({"services": [{"name": "Web"}]}, "services[0].name: 'Web' is not a service name"),
        ({"services": [{"name": "x"}, {"name": "x"}]}, "services: lists a service twice"),
        ({"services": [{"name": "x"}], "hash": "c" * 32}, "hash belong to each service"),
        (
            {"services": [{"name": "x", "big_layer_mib": 1}]},
            "services[0]: unknown key(s) big_layer_mib",
        ),
        ({"invalidated": "yes"}, "invalidated: must be true or false"),
        ({"status": "done"}, "error, cancelled, interrupted"),
    ],
)
def test_service_validation(release: dict[str, object], message: str) -> None:
    with pytest.raises(CatalogError) as excinfo:
        catalog_from_data(world(**release))
    assert message in str(excinfo.value)


@pytest.mark.parametrize(
    ("device_types", "app_type", "message"),
    [
        ([], "nope", "catalog.apps[0].device_type: 'nope' is not declared in device_types"),
        (
            [{"slug": "a", "name": "A", "cpu_architecture": "arm"}],
            None,
            "cpu_architecture: 'arm' is not one of rpi, armv7hf",
        ),
        (
            [{"slug": "a", "name": "A", "cpu_architecture": "rpi"}] * 2,
            None,
            "two device types share a slug",
        ),
        (
            [{"slug": "A", "name": "A", "cpu_architecture": "rpi"}],
            None,
            "is not a device type slug",
        ),
    ],
)
def test_device_type_validation(
    device_types: list[dict[str, str]], app_type: str | None, message: str
) -> None:
    doc = world()
    doc["device_types"] = device_types
    if app_type is not None:
        doc["apps"][0]["device_type"] = app_type
    with pytest.raises(CatalogError) as excinfo:
        catalog_from_data(doc)
    assert message in str(excinfo.value)
