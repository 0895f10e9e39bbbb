"""An aiohttp application on a listening socket whose connections are bounded in number and in time.

aiohttp alone accepts any number of connections and, by default, lets one sit for an hour. Here:
- at most `max_connections` are open at once; one more is answered 503 and closed at once, so a
  flood of slow connections costs a fixed amount of memory and never a thread;
- a connection that has not sent a complete request head within `idle_timeout_s` of opening (or of
  its previous answer) is closed: aiohttp's keep-alive timer, which also runs from the moment a
  connection opens, is that timeout (slowloris on the headers, and idle keep-alive connections);
- a request body that does not arrive within `body_timeout_s` is the handlers' business
  (`HttpApi` reads bodies under that timeout);
- a client that hangs up cancels its request's handler, and with it the request's work.

Only aiohttp's public runner API is used: the runner's `server` is the protocol factory that its own
TCPSite would hand to `loop.create_server`.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from aiohttp import web

BUSY = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\nRetry-After: 1\r\n\r\n"


class _Busy(asyncio.Protocol):
    """The answer to a connection beyond the limit."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(BUSY)
        transport.close()


def runner(app: web.Application, idle_timeout_s: float) -> web.AppRunner:
    """An AppRunner whose connections time out as described above (no access log, no signal handling:
    the server wires those itself)."""
    # handler_cancellation: a client that hangs up cancels its handler, so its work stops (decoding
    # between images, its batch rows dropped) as it does for a cancelled gRPC call.
    return web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0,
                         keepalive_timeout=idle_timeout_s, auto_decompress=False, handler_cancellation=True)


async def listen(app_runner: web.AppRunner, host: str, port: int, *, max_connections: int,
                 ssl_context: ssl.SSLContext | None = None, reuse_port: bool = False,
                 handshake_timeout_s: float = 10.0) -> asyncio.Server:
    """Listen on host:port for `app_runner` (already set up); returns the asyncio server (close it to
    stop listening). Raises OSError when it cannot bind."""
    handlers = app_runner.server
    assert handlers is not None, "call app_runner.setup() first"

    def protocol() -> Any:
        if len(handlers.connections) >= max_connections:
            return _Busy()
        return handlers()

    loop = asyncio.get_running_loop()
    # A TLS client that connects and never finishes its handshake is dropped after the same time as one
    # that never finishes its request head (the handshake runs on the loop, never blocking it).
    return await loop.create_server(protocol, host, port, ssl=ssl_context, reuse_address=True,
                                    reuse_port=reuse_port or None, backlog=128,
                                    ssl_handshake_timeout=handshake_timeout_s if ssl_context else None)


def bound_port(server: asyncio.Server) -> int:
    """The port the server listens on (for port 0)."""
    return int(server.sockets[0].getsockname()[1])
