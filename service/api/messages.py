"""Undecodable protobuf requests get INVALID_ARGUMENT, like every other bad input.

grpc calls a method's request deserializer before our handler runs; when it raises (garbage, a
truncated message, groups nested thousands deep), grpc answers UNKNOWN "Unexpected DecodeError" and logs
an ERROR traceback, and no counter sees the request. So every method is registered with a deserializer
that never raises: a message that does not parse becomes an `Undecodable` in its place, which the
handler refuses like any other bad input, counted and logged in one line.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError

from service.api.tracking import RequestTracker, abort
from service.telemetry.metrics import Metrics


@dataclass(frozen=True)
class Undecodable:
    """What a request message was, when it did not parse."""

    size: int
    reason: str

    @property
    def message(self) -> str:
        return f"request message of {self.size} bytes is not a valid protobuf message of this method: {self.reason}"


def tolerant(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """`parse`, or an Undecodable where it fails."""

    def parse_or_mark(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            return Undecodable(len(data), str(exc).split(":")[0][:80] or "DecodeError")
        except RecursionError:
            return Undecodable(len(data), "nested too deeply")

    return parse_or_mark


class _Recorder:
    """Catches what a generated ``add_XServicer_to_server`` registers."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, Any] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.service, self.handlers = service, handlers


def add_tolerant(add_to_server: Callable[[Any, Any], None], servicer: Any, server: Any, metrics: Metrics) -> None:
    """Register `servicer` as the generated `add_to_server` would, with tolerant deserializers; a unary
    call whose request did not parse is refused here (INVALID_ARGUMENT, counted under its method's name).
    Streaming methods get the Undecodable in their request iterator and refuse the stream themselves."""
    import grpc

    recorder = _Recorder()
    add_to_server(servicer, recorder)
    handlers = {}
    for name, handler in recorder.handlers.items():
        handler = handler._replace(request_deserializer=tolerant(handler.request_deserializer))
        if handler.unary_unary is not None:
            handler = handler._replace(unary_unary=_refusing(handler.unary_unary, RequestTracker(metrics, name)))
        handlers[name] = handler
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(recorder.service, handlers),))
    server.add_registered_method_handlers(recorder.service, handlers)


def _refusing(behavior: Callable[[Any, Any], Awaitable[Any]],
              tracker: RequestTracker) -> Callable[[Any, Any], Awaitable[Any]]:
    async def unary(request: Any, context: Any) -> Any:
        if isinstance(request, Undecodable):
            with tracker.track(context.peer()) as outcome:
                outcome["code"], outcome["reason"] = "INVALID_ARGUMENT", request.message
            await abort(context, "INVALID_ARGUMENT", request.message)
        return await behavior(request, context)

    return unary
