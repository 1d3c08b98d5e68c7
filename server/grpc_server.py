"""The one place that builds the master's gRPC server and explains its options."""

from __future__ import annotations

from typing import Callable

import grpc

from ef21_wire.protocol import SERVICE
from ef21_wire.v1 import ef21_pb2 as pb

# Liveness, the same on both sides and chosen from measurements (worker/channel.py says which): ping every 2 s,
# give a connection up 4 s after an unanswered ping (and, through TCP_USER_TIMEOUT, after 4 s of unacknowledged
# data), so a worker that vanished is marked lost 4-6 s later, with or without --round-timeout; pings also keep
# NATs and load balancers from dropping a quiet connection.
SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 2_000),
    ("grpc.keepalive_timeout_ms", 4_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # Workers ping every 2 s: accept pings 1 s apart without data before counting a strike, and never send
    # GOAWAY (too_many_pings) for them, which would cut an honest worker off.
    ("grpc.http2.min_ping_interval_without_data_ms", 1_000),
    ("grpc.http2.max_ping_strikes", 0),
    # Incoming messages are size-checked against d by the service before parsing; this is the transport's
    # ceiling, well above any message of a d ≤ 2048 Gram or a dense vector of d ≤ 10^7 (80 MB).
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    # gRPC sets SO_REUSEPORT by default: a second master on the same port would then bind too and the kernel
    # would share the workers between the two runs. One port, one master.
    ("grpc.so_reuseport", 0),
]


def build_server(handler: grpc.GenericRpcHandler, address: str, *,
                 credentials: grpc.ServerCredentials | None = None,
                 max_message: int | None = None) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server with our handler bound to ``address`` ("host:port", port 0 for any free port).

    ``max_message``: the receive limit, when the dimension is known up front (it follows from d).
    """
    options = list(SERVER_OPTIONS)
    if max_message is not None:
        options = [o for o in options if o[0] != "grpc.max_receive_message_length"]
        options.append(("grpc.max_receive_message_length", max_message))
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((handler,))
    try:
        port = (server.add_insecure_port(address) if credentials is None
                else server.add_secure_port(address, credentials))
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {address}: {exc}") from None
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return server, port


def service_handler(join: Callable, status: Callable, train: Callable) -> grpc.GenericRpcHandler:
    """The Master service (the master's, and an aggregator's in front of it): Join and Status as protobuf, Train as
    raw bytes both ways (sizes are measured, and parsing happens after the size check)."""
    return grpc.method_handlers_generic_handler(SERVICE, {
        "Join": grpc.unary_unary_rpc_method_handler(
            join, request_deserializer=pb.JoinRequest.FromString, response_serializer=pb.JoinReply.SerializeToString),
        "Status": grpc.unary_unary_rpc_method_handler(
            status, request_deserializer=pb.StatusRequest.FromString,
            response_serializer=pb.StatusReply.SerializeToString),
        "Train": grpc.stream_stream_rpc_method_handler(train),
    })
