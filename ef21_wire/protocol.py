"""Protocol facts both sides must agree on, in one place."""

from __future__ import annotations

PROTOCOL_VERSION = 1
SERVICE = "ef21.v1.Master"
TRAIN_METHOD = f"/{SERVICE}/Train"

# The gRPC framing adds a 5-byte prefix (compressed flag + length) to every message on the stream.
GRPC_FRAME_BYTES = 5


def is_eval_round(t: int, eval_every: int, rounds: int) -> bool:
    """Rounds on which workers also send their dense local gradient, for the exact ‖∇f‖² in the log."""
    return t % eval_every == 0 or t >= rounds
