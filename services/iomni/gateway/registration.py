"""Registering the `iomni.v1.Dialogue` service with request parsing we control.

grpc parses requests before the servicer runs; a message that does not parse (a string field
that is not UTF-8, truncated bytes) would end the call with INTERNAL or UNKNOWN and a message
about deserialization. Here a request that does not parse becomes a `MalformedRequest` the
servicer answers with INVALID_ARGUMENT, naming what is wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from iomni.errors import InvalidInput
from iomni.v1 import dialogue_pb2 as pb

SERVICE = "iomni.v1.Dialogue"


@dataclass(frozen=True)
class MalformedRequest:
    message_type: str
    reason: str

    def error(self) -> InvalidInput:
        return InvalidInput(
            f"the request is not a valid {self.message_type}: {self.reason} "
            "(string fields must be UTF-8)"
        )


def _parse(message: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message.FromString(data)
        except (DecodeError, ValueError, UnicodeDecodeError) as exc:
            return MalformedRequest(message.DESCRIPTOR.full_name, str(exc) or type(exc).__name__)

    return parse


def add_dialogue_service(servicer: Any, server: grpc.aio.Server) -> None:
    handlers = {
        "Converse": grpc.stream_stream_rpc_method_handler(
            servicer.Converse,
            request_deserializer=_parse(pb.ConverseRequest),
            response_serializer=pb.ConverseResponse.SerializeToString,
        ),
        "Chat": grpc.unary_stream_rpc_method_handler(
            servicer.Chat,
            request_deserializer=_parse(pb.ChatRequest),
            response_serializer=pb.ConverseResponse.SerializeToString,
        ),
        "GetSession": grpc.unary_unary_rpc_method_handler(
            servicer.GetSession,
            request_deserializer=_parse(pb.GetSessionRequest),
            response_serializer=pb.Session.SerializeToString,
        ),
        "DeleteSession": grpc.unary_unary_rpc_method_handler(
            servicer.DeleteSession,
            request_deserializer=_parse(pb.DeleteSessionRequest),
            response_serializer=pb.DeleteSessionResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


def check(request: Any) -> Any:
    """The request, or InvalidInput when it did not parse."""
    if isinstance(request, MalformedRequest):
        raise request.error()
    return request
