"""A model's buffers b (BatchNorm's running statistics, everything in its state dict that x does not hold),
carried beside x as uncompressed replicated state.

The policy: every replica holds the same b^t. A worker's training forwards of round t start from b^t and update it
as any training loop would; it sends its change b_i − b^t (only the entries that changed: a constant buffer costs
nothing), the master averages the changes of the round's messages in rank order, and every replica — the master's
and each worker's — adds that mean. Running statistics are exponential moving averages, which are linear, so b is
the moving average of the workers' mean batch statistics: what one process would hold after the same batches, up
to the (unbiased-variance) difference between a mean of per-worker variances and the variance of their union. One
set of buffers, exactly the same everywhere, at every round: evaluation, a checkpoint, a replacement worker and
``ef21 export`` all see it. The price is the buffers' changes on every message, up and down (measured in
docs/benchmarks/pytorch.md).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ef21.compression.sparse import INDEX_DTYPE, SparseVector, sparse_sum


def buffer_delta(new: np.ndarray | None, current: np.ndarray) -> SparseVector:
    """A worker's b_i − b^t at the entries that changed (dense when most did: no indices to pay for); no training
    forward this round (``new`` None) is no change."""
    size = current.shape[0]
    if new is None:
        return SparseVector.zeros(size)
    delta = new - current
    changed = np.flatnonzero(delta)
    if 2 * changed.shape[0] > size:
        return SparseVector.dense(delta)
    return SparseVector(size, changed.astype(INDEX_DTYPE), delta[changed])


def mean_delta(deltas: Sequence[SparseVector], size: int) -> SparseVector | None:
    """The mean of the round's changes, added in rank order (None: no worker's message is in the round)."""
    if not deltas:
        return None
    total = sparse_sum(list(deltas), size)
    return SparseVector(size, total.indices, total.values / len(deltas))
