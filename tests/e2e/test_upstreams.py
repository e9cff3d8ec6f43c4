"""Where registry 2.8 and distribution 3 answer differently, and the proxy must follow both."""

from __future__ import annotations

import aiohttp
import pytest

from .conftest import Upstream
from .test_protocol import token_for

pytestmark = pytest.mark.e2e

NAME = "gh_acme/web/1.2.3"
NEXT_PAGE = f"/v2/{NAME}/tags/list?last=latest&n=1"


async def test_tag_pages_are_linked_under_the_name_the_client_used(go_upstream: Upstream) -> None:
    # Distribution 3 pages tag lists: asked for one tag of a repository that has exactly one, it
    # links a next page, which the proxy maps from the real repository back to the slug, and
    # that page is empty. Registry 2.8 ignores n and last: no link, every tag on every page.
    paged = go_upstream.key == "registry3"
    token = await token_for(go_upstream.sandbox, NAME)
    headers = {"Authorization": f"Bearer {token}"}
    base = f"http://{go_upstream.proxy.host}"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/v2/{NAME}/tags/list?n=1", headers=headers) as response:
            assert response.status == 200
            assert await response.json() == {"name": NAME, "tags": ["latest"]}
            link = response.headers.get("Link")
        assert link == (f'<{NEXT_PAGE}>; rel="next"' if paged else None)
        async with session.get(f"{base}{NEXT_PAGE}", headers=headers) as response:
            assert response.status == 200
            assert await response.json() == {"name": NAME, "tags": [] if paged else ["latest"]}
            assert "Link" not in response.headers
