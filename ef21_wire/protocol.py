"""Protocol facts both sides must agree on, in one place."""

from __future__ import annotations

# 2: RoundResult.checksum covers the state the round started from (CRC-32 of x and g), not the state after it.
PROTOCOL_VERSION = 2
SERVICE = "ef21.v1.Master"
TRAIN_METHOD = f"/{SERVICE}/Train"

# The gRPC framing adds a 5-byte prefix (compressed flag + length) to every message on the stream.
GRPC_FRAME_BYTES = 5


def is_eval_round(t: int, eval_every: int, rounds: int) -> bool:
    """Rounds on which workers also send their dense local gradient, for the exact ‖∇f‖² in the log."""
    return t % eval_every == 0 or t >= rounds
