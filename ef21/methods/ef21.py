"""EF21: c_i = C(∇f_i(x) − g_i), g_i ← g_i + c_i; the master adds (1/n)Σ c_i to g (EF21-W: Σ w_i c_i).

The aggregate alone needs no g_i on the master, but the master keeps a copy of each (updated with the same
operation as the worker, so the bits agree) to hand a rank over to a replacement worker or to a resumed master.
A worker left out of a round sends nothing and keeps g_i: this is EF21-PP, still divided by n.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ef21.compression.ops import NUMPY
from ef21.compression.sparse import SparseVector

from .base import Downlink, InPlace, Message, WorkerContext, sq_dist, sum_messages


def initial_step(grad: np.ndarray, ctx: WorkerContext, *, replace: bool,
                 reference: np.ndarray | None) -> tuple[Message, np.ndarray, float | None]:
    """Round 0: g_i⁰ is the uncompressed local gradient (``full``, the official experiments) or C(∇f_i(x⁰))
    (Algorithm 1). Sent whole, since g_i starts from 0 on the master as well."""
    ops = ctx.ops
    host = ops.to_numpy(grad)
    vec = SparseVector.dense(host.copy()) if ctx.init == "full" else ctx.compressor(host, ctx.rng)
    g_new = vec.to_dense()
    dist = None if reference is None else sq_dist(g_new, ops.to_numpy(reference))
    return Message(vec, replace=replace), ops.from_numpy(g_new), dist


@dataclass(frozen=True)
class EF21:
    name: str = "ef21"
    sums_messages = True  # the master only adds the messages up (ef21.engine.tree)
    needs_contractive: bool = True
    uncompressed: bool = False
    gamma_in_message: bool = False
    tolerates_missing: bool = True
    ops_aware: bool = True  # worker_step's vector work goes through ctx.ops (numpy or the model's tensors)

    def worker_init(self, d: int) -> np.ndarray | None:
        return None  # g_i does not exist until round 0 sends it

    def worker_step(self, g_i: np.ndarray | None, grad: np.ndarray, ctx: WorkerContext,
                    reference: np.ndarray | None) -> tuple[Message, np.ndarray | InPlace, float | None]:
        if g_i is None:
            return initial_step(grad, ctx, replace=False, reference=reference)
        ops = ctx.ops
        if ops is NUMPY and ctx.scratch is not None and ctx.cand is not None:
            # One compiled pass over d instead of four (five on an evaluation round): C(∇ − g_i) without the
            # residual (None: not applicable, the numpy path below runs).
            if reference is grad:
                # An evaluation round with full gradients: G = ‖r − C(r)‖² comes out of the same pass, equal to the
                # numpy path's to rounding (another summation order; G is only logged, nothing feeds it back).
                fused_err = getattr(ctx.compressor, "compress_difference_with_error", None)
                found = None if fused_err is None else fused_err(grad, g_i, ctx.cand)
                if found is not None:
                    message, pending, _ = self._commit(g_i, found[0], None)
                    return message, pending, found[1]
            else:
                fused = getattr(ctx.compressor, "compress_difference", None)
                c = None if fused is None else fused(grad, g_i, ctx.cand)
                if c is not None:
                    return self._commit(g_i, c, reference)
        # The residual in the gradient's dtype and on its device (float64, or a --dtype float32 run's float32).
        r = ops.subtract(grad, g_i, ops.empty_like(grad) if ctx.scratch is None else ctx.scratch)
        c = ops.compress(ctx.compressor, r, ctx.rng, ctx.mag)
        new: Any
        if ctx.scratch is not None and c.indices is not None:
            # g_i moves at c's k entries only: update it in place (O(k)), keeping what it held there.
            new = InPlace(g_i, c.indices, ops.take(g_i, c.indices), ops)
            ops.add_sparse(g_i, c)
            g_new = g_i
        else:
            g_new = ops.copy(g_i)
            ops.add_sparse(g_new, c)
            new = g_new
        if reference is None:
            return Message(c), new, None
        if reference is not grad:
            return Message(c), new, ops.sq_norm(ops.subtract(g_new, reference, r))
        # ‖g_new − ∇f_i‖² = ‖r − c‖², from the residual already in hand (compressors never alias their input):
        # one O(d) pass fewer than subtracting the gradient again.
        ops.add_sparse(r, c, -1.0)
        return Message(c), new, ops.sq_norm(r)

    @staticmethod
    def _commit(g_i: np.ndarray, c: SparseVector, reference: np.ndarray | None
                ) -> tuple[Message, InPlace, float | None]:
        """The fused step's end: g_i moved in place at c's k entries, as the buffered path below moves it."""
        assert c.indices is not None
        new = InPlace(g_i, c.indices, g_i[c.indices])
        c.add_to(g_i)
        return Message(c), new, None if reference is None else sq_dist(g_i, reference)

    def stale_distortion(self, g_i: np.ndarray | None, reference: np.ndarray) -> float | None:
        return None if g_i is None else sq_dist(g_i, reference)

    def master_init(self, n: int, d: int, dtype: Any = np.float64) -> np.ndarray | None:
        return None if dtype is None else np.zeros((n, d), dtype=dtype)

    def master_aggregate(self, rows: np.ndarray | None, messages: Sequence[Message | None], d: int,
                         weights: np.ndarray | None = None, round_: int = 0) -> Downlink:
        if rows is not None:
            for rank, msg in enumerate(messages):
                if msg is not None:
                    msg.vector.add_to(rows[rank])
        if weights is not None:
            return Downlink(sum_messages(messages, d, weights), "add", 1.0)
        return Downlink(sum_messages(messages, d), "add", 1.0 / len(messages))

    def master_worker_state(self, rows: np.ndarray | None, rank: int) -> np.ndarray | None:
        if rows is None:
            return None
        row = rows[rank]
        return None if not row.any() else row.copy()

    def resume_state(self, row: np.ndarray) -> Any:
        return row
