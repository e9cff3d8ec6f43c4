"""What the sandbox shows a person: the banner with ready-to-paste commands, and a table of
which release each selector resolves to, pulled for real through the proxy with skopeo.

The texts and the list of names to try are pure functions of the catalog; only ``pull_table``
runs anything.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from .catalog import App, Catalog, Release, ReleaseStatus, User
from .environment import Sandbox


@dataclass(frozen=True)
class Probe:
    """One name to pull, optionally as a user, to show what it resolves to."""

    name: str
    user: User | None = None


def member_of(catalog: Catalog, app: App) -> User | None:
    """A user who may pull ``app`` (None for public apps: they need no login)."""
    if app.public:
        return None
    return next((user for user in catalog.users if app.org in user.orgs), None)


def probes(catalog: Catalog, *, resolving: bool = True) -> list[Probe]:
    """Names worth trying for every app: each selector form of the README, and two mistakes;
    in resolver mode also versions as tags and the services of multi-container releases."""
    found: list[Probe] = []
    for app in catalog.apps:
        user = member_of(catalog, app)
        good = [r for r in app.releases if r.status is ReleaseStatus.SUCCESS]
        if not good:
            continue
        selectors = ["", "/latest"]
        selectors += sorted({f"/{r.semver}" for r in good if r.is_final})
        selectors += [f"/{r.raw_version}" for r in good if not r.is_final]
        selectors.append(f"/{good[0].commit}")
        services = sorted({image.service for image in good[0].images})
        if len(services) > 1:
            # Several services: each is named, by the pinned release and by a version tag.
            if resolving:
                found += [Probe(f"{app.slug}/{service}", user) for service in services]
                found.append(Probe(f"{app.slug}/{services[0]}:{good[0].semver}", user))
                found.append(Probe(f"{app.slug}/nope", user))
            continue
        found += [Probe(app.slug + selector, user) for selector in selectors]
        if resolving:
            finals = sorted({r.semver for r in good if r.is_final})
            found += [Probe(f"{app.slug}:{version}", user) for version in finals]
        if user is not None:
            found.append(Probe(f"{app.slug}/{good[-1].semver}"))
    first = next((a for a in catalog.apps if a.public and a.releases), None)
    if first is not None:
        found.append(Probe(f"{first.slug}/v{first.releases[0].semver}"))
        found.append(Probe(f"{first.slug}/9.9.9"))
    return found


def release_label(app: App, release: Release) -> str:
    """A release as the banner lists it: its version, marked when it is the app's pinned
    release, a draft, or a build that did not succeed (which no name ever resolves to)."""
    marks = []
    if release.commit == app.pinned_commit:
        marks.append("pinned")
    if not release.is_final:
        marks.append("draft")
    if release.status is not ReleaseStatus.SUCCESS:
        marks.append(release.status.value)
    return f"{release.version} ({', '.join(marks)})" if marks else release.version


def apps_listing(catalog: Catalog) -> str:
    """The banner's list of apps: visibility and every release, marked as release_label says."""
    width = max((len(app.slug) for app in catalog.apps), default=0)
    return "\n".join(
        f"    {app.slug:<{width}} {'public ' if app.public else 'private'}  "
        f"releases: {', '.join(release_label(app, r) for r in app.releases) or '-'}"
        for app in catalog.apps
    )


def banner(sandbox: Sandbox, proxy_host: str, *, resolving: bool = True) -> str:
    """Addresses, demo credentials and commands to paste, printed once the sandbox is up."""
    mode = (
        f"resolver (names resolved through the balena API stand-in at {sandbox.api_url})"
        if resolving
        else "alias (names resolved by the token service's aliases)"
    )
    resolver_commands = (
        f"""
    skopeo list-tags --tls-verify=false docker://{proxy_host}/gh_acme/web
    skopeo inspect --tls-verify=false docker://{proxy_host}/gh_acme/web:1.3.0
    skopeo copy --src-tls-verify=false docker://{proxy_host}/gh_acme/stack/api dir:/tmp/api"""
        if resolving
        else ""
    )
    users = "\n".join(
        f"    {u.username:<10} API key {u.api_key}  (member of {', '.join(sorted(u.orgs))})"
        for u in sandbox.catalog.users
    )
    private = next((a for a in sandbox.catalog.apps if not a.public and a.releases), None)
    member = member_of(sandbox.catalog, private) if private is not None else None
    creds = f"{member.username}:{member.api_key}" if member is not None else "user:key"
    private_slug = private.slug if private is not None else "org/app"
    return f"""\
balena-registry-proxy sandbox is running
  proxy (pull through this):  http://{proxy_host}
  registry (upstream):        {sandbox.registry_url}  (token auth on)
  token service (balena API): {sandbox.token_url}
  proxy mode:                 {mode}

  users:
{users}

  apps (<org>/<app> alone pulls the pinned release; failed or running builds never resolve):
{apps_listing(sandbox.catalog)}

  try:
    skopeo inspect --tls-verify=false docker://{proxy_host}/gh_acme/web/1.2.3{resolver_commands}
    skopeo copy --src-tls-verify=false docker://{proxy_host}/gh_acme/web dir:/tmp/web
    skopeo inspect --tls-verify=false --creds {creds} docker://{proxy_host}/{private_slug}
    podman pull --tls-verify=false {proxy_host}/gh_acme/multi --arch arm64
    docker pull {proxy_host}/gh_acme/web/1.2.3
      (docker needs "insecure-registries": ["{proxy_host}"] in /etc/docker/daemon.json)

  Ctrl-C stops everything and removes the sandbox's temporary data.
"""


def describe_digest(sandbox: Sandbox, digest: str) -> str:
    """Which seeded release (and service, of a multi-container one) a manifest digest is."""
    for seeded in sandbox.seed.images.values():
        children = {m.digest for m in seeded.platform_manifests.values()}
        if digest == seeded.digest or digest in children:
            app, release = sandbox.catalog.release(seeded.commit)
            service = f" service {seeded.service}" if len(release.images) > 1 else ""
            return f"{app.slug} {release.version}{service} (commit {seeded.commit[:7]})"
    return f"unknown digest {digest}"


def format_table(rows: list[tuple[str, str, str]]) -> str:
    """A plain-text table of (name, user, outcome) rows with a header."""
    header = ("pulled through the proxy", "as", "resolved to")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(2)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}" for r in [header, *rows]]
    lines.insert(1, "-" * (widths[0] + widths[1] + 4 + len(header[2])))
    return "\n".join(lines)


async def listings(sandbox: Sandbox, proxy_host: str, skopeo: str = "skopeo") -> str:
    """``skopeo list-tags`` through the proxy (resolver mode) for each public app, or each
    service of a multi-container one: the versions a person can pull as tags."""
    names = []
    for app in sandbox.catalog.apps:
        good = [r for r in app.releases if r.status is ReleaseStatus.SUCCESS]
        if not app.public or not good:
            continue
        services = sorted({image.service for image in good[0].images})
        names += [f"{app.slug}/{s}" for s in services] if len(services) > 1 else [app.slug]
    outcomes = await asyncio.gather(*(_list_tags(proxy_host, name, skopeo) for name in names))
    width = max(len(name) for name in names)
    return "\n".join(
        f"  {name:<{width}}  {tags}" for name, tags in zip(names, outcomes, strict=True)
    )


async def _list_tags(proxy_host: str, name: str, skopeo: str) -> str:
    command = [skopeo, "list-tags", "--tls-verify=false", f"docker://{proxy_host}/{name}"]
    stdout, stderr, code = await _run(command)
    if code != 0:
        return "failed: " + stderr.strip().splitlines()[-1][-120:]
    return ", ".join(json.loads(stdout)["Tags"]) or "(none)"


async def _run(command: list[str]) -> tuple[str, str, int | None]:
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await process.communicate()
    return stdout.decode(errors="replace"), stderr.decode(errors="replace"), process.returncode


async def pull_table(
    sandbox: Sandbox, proxy_host: str, skopeo: str = "skopeo", *, resolving: bool = True
) -> str:
    """Pull every probe through the proxy with skopeo and tabulate what each resolved to."""
    found = probes(sandbox.catalog, resolving=resolving)
    outcomes = await asyncio.gather(
        *(_inspect(sandbox, proxy_host, probe, skopeo) for probe in found)
    )
    rows = [
        (probe.name, probe.user.username if probe.user else "anonymous", outcome)
        for probe, outcome in zip(found, outcomes, strict=True)
    ]
    return format_table(rows)


async def _inspect(sandbox: Sandbox, proxy_host: str, probe: Probe, skopeo: str) -> str:
    command = [skopeo, "inspect", "--tls-verify=false", "--no-tags"]
    if probe.user is not None:
        command.append(f"--creds={probe.user.username}:{probe.user.api_key}")
    command.append(f"docker://{proxy_host}/{probe.name}")
    stdout, message, code = await _run(command)
    if code == 0:
        return describe_digest(sandbox, json.loads(stdout)["Digest"])
    if "was not found" in message:
        return "refused: not found or not allowed (see the proxy's message)"
    for marker in ("name unknown: ", "manifest unknown: ", "unauthorized: "):
        if marker in message:
            explained = message.rsplit(marker, 1)[1].split("\\n")[0].strip().rstrip('"')
            return "refused: " + explained
    return "failed: " + message.strip().splitlines()[-1][-120:]
