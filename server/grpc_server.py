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


PENDING_CALLS_DEFAULT = 1_000
"""gRPC core's own soft limit on calls that arrived but that the application has not taken yet (its hard limit is
3× that). grpc.aio takes new calls one at a time from the event loop, so a join storm queues them there; past the
soft limit core drops new calls at random with a rising probability (random early detection) and past the hard
one all of them, and the client sees its fresh stream end ``CANCELLED`` or, when a write raced the drop,
``INTERNAL: Internal error from Core``, before the master has seen any of it."""


def pending_calls(peers: int) -> int:
    """The pending-call limit for a server that ``peers`` clients may reach at once: each may have its Join and its
    Train stream queued, plus the master's own slack for replacements and knockers (``service.stream_limit``).
    Below n ≈ 500 gRPC's default holds; at n = 4 096 it dropped 12 229 fresh streams during one join
    (benchmarks/capacity.py, docs/benchmarks/capacity.md)."""
    return max(PENDING_CALLS_DEFAULT, 2 * peers + max(64, peers // 4))


def build_server(handler: grpc.GenericRpcHandler, address: str, *,
                 credentials: grpc.ServerCredentials | None = None,
                 max_message: int | None = None, peers: int = 0) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server with our handler bound to ``address`` ("host:port", port 0 for any free port).

    ``max_message``: the receive limit, when the dimension is known up front (it follows from d). ``peers``: how
    many clients may reach it at once (the master's n, an aggregator's block), which sizes gRPC's queue of calls
    not yet taken (``pending_calls``): the server's own limits, which say why, then decide, not a random drop.
    """
    options = list(SERVER_OPTIONS)
    if max_message is not None:
        options = [o for o in options if o[0] != "grpc.max_receive_message_length"]
        options.append(("grpc.max_receive_message_length", max_message))
    pending = pending_calls(peers)
    options += [("grpc.server.max_pending_requests", pending),
                ("grpc.server.max_pending_requests_hard_limit", 3 * pending)]
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
