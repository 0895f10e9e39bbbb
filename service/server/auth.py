"""Optional bearer-token authentication (--auth-token-file), on every protocol the server speaks.

The token file holds the accepted tokens, one per line (blank lines and `#` comments are ignored), so a
rotation is: add the new token, move the clients, remove the old one. The file is re-read on SIGHUP and
whenever it changes (polled like the model file with --watch, so Kubernetes Secret updates, which swap a
symlink, are seen), and a file that cannot be used is refused with one log line while the tokens already
loaded stay in force.

What needs a token: everything but what probes and scrapers use. Open are gRPC health, server reflection,
the Open Inference Protocol's liveness and readiness calls (gRPC ServerLive, ServerReady, ModelReady; REST
/v2/health/live, /v2/health/ready, /v2/models/{name}[/versions/{v}]/ready), the page's HTML (it asks for
the token itself) and /metrics (its own port). Everything else, inference and metadata, must carry
`authorization: Bearer <token>`: gRPC metadata on both gRPC APIs, the HTTP header on REST. A missing,
malformed or wrong token gets UNAUTHENTICATED (gRPC) or 401 with `WWW-Authenticate: Bearer` (HTTP),
counted in `digits_auth_refusals_total{protocol, reason}`. This mirrors Triton's restricted protocols
(`--grpc-restricted-protocol`, `--http-restricted-api`), with the header fixed to `authorization`.

Tokens are kept only as SHA-256 digests and every presented token is compared with every accepted one
with `hmac.compare_digest`: the time taken depends on neither the token's content, its length, nor which
one matched. No token ever reaches a log line, an error message or a metric.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from aiohttp.typedefs import Middleware

from service.api import http as http_api
from service.api.tracking import FAILURE_LINES_PER_SECOND
from service.telemetry.logs import RateLimitedLog, cut, fields
from service.telemetry.metrics import Metrics

log = logging.getLogger(__name__)

# RFC 6750's b64token: what a bearer token may consist of (so a token file line is one or it is an error).
TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
BEARER = re.compile(r"Bearer +([A-Za-z0-9\-._~+/]+=*) *", re.IGNORECASE)
# The label values of digits_auth_refusals_total{protocol, reason} (its series exist from the first scrape).
REASONS = ("missing", "malformed", "wrong")
MESSAGES = {
    "missing": "this server requires a bearer token: send 'authorization: Bearer <token>'",
    "malformed": "the authorization header must be 'Bearer <token>'",
    "wrong": "the bearer token is not accepted",
}
# gRPC methods that stay open: health checking and reflection (probes, grpcurl), and the Open Inference
# Protocol's liveness and readiness calls.
OPEN_GRPC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                      "/grpc.reflection.v1.ServerReflection/")
OPEN_GRPC_METHODS = frozenset(f"/inference.GRPCInferenceService/{m}" for m in ("ServerLive", "ServerReady",
                                                                                "ModelReady"))
# HTTP routes that stay open (GET/HEAD only): the page's HTML, v2 liveness and readiness.
OPEN_HTTP_PATHS = re.compile(r"/|/v2/health/(?:live|ready)|/v2/models/[^/]+(?:/versions/[^/]+)?/ready")


class TokenFileError(ValueError):
    """The token file cannot be used; the message names the file (and a line number), never a token."""


def read_token_digests(path: Path) -> frozenset[bytes]:
    """The SHA-256 digests of the tokens in `path`. Raises TokenFileError when it has none or a bad line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise TokenFileError(f"--auth-token-file {path}: cannot read it ({why})") from exc
    digests = set()
    for number, line in enumerate(text.splitlines(), 1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if not TOKEN.fullmatch(token):
            raise TokenFileError(f"--auth-token-file {path}: line {number} is not a bearer token (letters, digits "
                                 "and -._~+/ then optional '=' padding; one token per line)")
        digests.add(_digest(token))
    if not digests:
        raise TokenFileError(f"--auth-token-file {path} holds no token: every call would be refused")
    return frozenset(digests)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("ascii")).digest()


class Tokens:
    """The accepted tokens, reloadable; `check()` says why a presented authorization value is refused."""

    def __init__(self, path: Path, metrics: Metrics) -> None:
        """Read `path` (TokenFileError when it cannot be used: the server must not start without tokens)."""
        self.path = path
        self._metrics = metrics
        self._refusals = RateLimitedLog(log, FAILURE_LINES_PER_SECOND)
        self._digests = read_token_digests(path)
        metrics.auth_tokens.set(len(self._digests))

    def __len__(self) -> int:
        return len(self._digests)

    def reload(self) -> bool:
        """Re-read the file; a file that cannot be used is refused and the current tokens stay."""
        try:
            digests = read_token_digests(self.path)
        except TokenFileError as exc:
            self._metrics.auth_token_reloads.labels(result="failed").inc()
            log.error("token file reload refused, keeping the %d tokens in force: %s", len(self._digests), exc)
            return False
        self._digests = digests
        self._metrics.auth_token_reloads.labels(result="success").inc()
        self._metrics.auth_tokens.set(len(digests))
        log.info("token file reloaded", extra=fields(path=str(self.path), tokens=len(digests)))
        return True

    def check(self, authorization: str | None) -> str | None:
        """None when `authorization` (the header's value) carries an accepted token, else the reason."""
        if not authorization:
            return "missing"
        match = BEARER.fullmatch(authorization)
        if match is None:
            return "malformed"
        presented = _digest(match[1])
        accepted = False
        for digest in self._digests:  # all of them, always: no early exit to time
            accepted |= hmac.compare_digest(digest, presented)
        return None if accepted else "wrong"

    def refused(self, protocol: str, reason: str, call: str, peer: str = "") -> None:
        """Count and log one refusal (the call and the peer, never what was presented)."""
        self._metrics.auth_refusals.labels(protocol=protocol, reason=reason).inc()
        extra = {"protocol": protocol, "call": call, "reason": reason, **({"peer": peer} if peer else {})}
        # Like failed requests: at most a few lines a second per reason, the rest counted in the next line.
        self._refusals.warning((protocol, reason), "request refused: unauthenticated", **extra)


# --- gRPC ------------------------------------------------------------------------------------------------


def _authorization(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            return value if isinstance(value, str) else None
    return None


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED without reading the request
    (no deserializer: the bytes are not even parsed)."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse)
    return grpc.stream_stream_rpc_method_handler(refuse)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every gRPC call but health, reflection and v2 liveness/readiness without an accepted token."""

    def __init__(self, tokens: Tokens) -> None:
        self._tokens = tokens

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
            handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_GRPC_PREFIXES) or method in OPEN_GRPC_METHODS:
            return handler  # unknown methods get gRPC's own UNIMPLEMENTED
        reason = self._tokens.check(_authorization(handler_call_details.invocation_metadata))
        if reason is None:
            return handler
        self._tokens.refused("grpc", reason, method)
        return _refusal(handler, MESSAGES[reason])


# --- HTTP ------------------------------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def http_middleware(tokens: Tokens) -> Middleware:
    """An aiohttp middleware refusing every route but the page and v2 liveness/readiness without a token
    (401, JSON like every other error, and `WWW-Authenticate: Bearer`, as RFC 6750 asks). Paths that are
    no route at all get their 404 (or 405) as without authentication."""

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        open_route = request.method in ("GET", "HEAD") and OPEN_HTTP_PATHS.fullmatch(request.path)
        # No such route (404, 405): aiohttp's own answer, token or not. The routes are no secret, and a
        # browser's /favicon.ico probe is not an authentication failure.
        if open_route or request.match_info.http_exception is not None:
            return await handler(request)
        reason = tokens.check(request.headers.get("Authorization"))
        if reason is None:
            return await handler(request)
        tokens.refused("http", reason, f"{request.method} {cut(request.path)}", request.remote or "")
        response = http_api.error_response(http_api.HttpError(401, "UNAUTHENTICATED", MESSAGES[reason]))
        challenge = 'Bearer realm="digits"'
        if reason != "missing":
            challenge += ', error="invalid_token"'
        response.headers["WWW-Authenticate"] = challenge
        return response

    return authenticate
