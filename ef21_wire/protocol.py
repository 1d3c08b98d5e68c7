"""Protocol facts both sides must agree on, in one place."""

from __future__ import annotations

# 2: RoundResult.checksum covers the state the round started from (CRC-32 of x and g), not the state after it.
# 3: f and the distortion ride on Eval, not on every Update; PowerStep/PowerReply; Start carries EF21-HB's v,
#    EF21-W's weight and PAGE's p; Hello carries the objective's identity.
# 4: a model's layout and initial buffers on Setup, its buffer changes on Update and RoundResult, the replicated
#    state beside x, g and v (buffers, the optimizer's state) on Start and Resync.
# 5: the Gram comes on request (GramRequest/GramReply, one rank at a time, in rank order), not in Setup; the
#    set-up attempt on GramRequest/PowerStep, echoed by GramReply/PowerReply.
# 6: the EF21 family (docs/methods-family.md): under EF21-P, Start's and Resync's x and the checksum are the
#    workers' shared point w; MARINA's dense rounds carry whole gradients; CLAG's skip is an empty Update.
# 7: lean set-up and evaluation: Setup.x0_digest and Start.x_is_own_x0 (no x at round 0 for a worker that has it),
#    Start/Resync state vectors sparse when smaller, Eval.grad absent for objectives that report metrics.
# 8: aligned payloads: SparseVector.align_values/align_indices pads put a vector's arrays 8-byte aligned in the
#    message (read in place, no copy); JoinReply.protocol_version, and a peer of another version refused at Join
#    (FAILED_PRECONDITION naming both versions; the worker exits 2).
#    The aggregator tier: Update.covers (an aggregator's sum over a block of ranks, docs/aggregators.md); the
#    master sends a block's RoundResult on the stream of the first rank covered, and its aggregator relays it;
#    Start.included_through, so that a worker joining again keeps its own state when the master has none.
#    RunConfig.dtype (--dtype float32: float32 values in every vector of the run).
PROTOCOL_VERSION = 8
SERVICE = "ef21.v1.Master"
TRAIN_METHOD = f"/{SERVICE}/Train"


def version_mismatch(worker: int, master: int) -> str:
    """The one line both sides log when their protocol versions differ (0: the peer did not say; a master before
    protocol 8 sends no version in its JoinReply)."""
    return (f"protocol version mismatch: the worker speaks protocol {worker or 'none stated'}, the master "
            f"{master or 'before 8'}: run the same ef21 release on the master and every worker")

# The gRPC framing adds a 5-byte prefix (compressed flag + length) to every message on the stream.
GRPC_FRAME_BYTES = 5


from ef21.engine.nodes import is_eval_round  # noqa: E402,F401  (re-exported: both sides use the same rule)
