"""The worker's gRPC channel and its options."""

from __future__ import annotations

import grpc

CHANNEL_OPTIONS: list[tuple[str, int]] = [
    # A worker may wait minutes for a slow round; pings keep NATs from dropping the connection and detect a
    # dead master. 20 s is above the master's min_ping_interval (10 s), so it never answers too_many_pings.
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
]


def open_channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
