"""The one place that builds the master's gRPC server and explains its options."""

from __future__ import annotations

import grpc

# A worker can sit a long time in a round waiting for the slowest peer; pings keep NATs and load balancers from
# dropping the idle connection, and let the master notice a dead worker (see docs of grpc keepalive).
SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 30_000),  # ping each client after 30 s of silence
    ("grpc.keepalive_timeout_ms", 10_000),  # a ping unanswered for 10 s closes the connection
    ("grpc.keepalive_permit_without_calls", 1),
    # Workers ping every 20 s (worker/channel.py); allow that without ENHANCE_YOUR_CALM/too_many_pings.
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
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
