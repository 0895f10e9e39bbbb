"""`GET /metrics` on its own port, served from the server's event loop by aiohttp.

Not prometheus_client's own HTTP server: that one starts a thread per connection and never times a
connection out, so slow clients could pile up threads. Here connections are bounded in number and
time like the REST port's (`service.api.listener`). Generating the text for a scrape takes about a
millisecond.
"""

from __future__ import annotations

import asyncio
import ssl

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from service.api import listener


class MetricsEndpoint:
    """The Prometheus scrape endpoint for one registry."""

    def __init__(self, registry: CollectorRegistry, max_connections: int, idle_timeout_s: float) -> None:
        self._registry = registry
        self._max_connections = max_connections
        self._idle_timeout = idle_timeout_s
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self._registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> int:
        """Listen on host:port; returns the bound port. Raises OSError when it cannot bind."""
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/", self._metrics)
        runner = listener.runner(app, self._idle_timeout)
        await runner.setup()
        try:
            self._server = await listener.listen(runner, host, port, max_connections=self._max_connections,
                                                 ssl_context=ssl_context, handshake_timeout_s=self._idle_timeout)
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        return listener.bound_port(self._server)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
