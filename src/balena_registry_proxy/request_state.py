"""What the proxy notes on a request while answering it, for its access line and metrics.

A leaf module: the handlers write these keys, the access log and the metrics read them.
"""

from __future__ import annotations

from aiohttp import web

REQUEST_ID = web.RequestKey("request_id", str)
ROUTE = web.RequestKey("route", str)
"""The route kind as a metric label: ``manifest``, ``blob``, ``tags``, ``ping``, ..."""
UPSTREAM_TARGET = web.RequestKey("upstream_target", str)
"""Where the request went upstream, when that differs from what the client asked for."""
BODY_BYTES = web.RequestKey("body_bytes", int)
"""Body bytes sent, for answers whose body the proxy streamed itself."""
STARTED = web.RequestKey("started", float)
"""``time.perf_counter()`` when the application received the request."""
