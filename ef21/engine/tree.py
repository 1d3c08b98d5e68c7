"""The aggregator tier's arithmetic: ranks in F contiguous blocks, each block's messages summed by its
aggregator in rank order, and the F sums added by the master in block order.

Float addition is not associative, so the tree fixes the order: block j holds ranks [j·n//F, (j+1)·n//F); its
sum starts from zero and adds its ranks' messages one after another (``sum_messages``, the master's own rule for a
flat run), and the master adds the block sums the same way, block 0 first. ``simulate`` with
``RunConfig.aggregators = F`` sums in this order, so a networked run through F aggregators reproduces it bit for
bit; with F = 1 the tree is the flat sum itself (``sparse_sum`` of one vector is that vector + 0.0). The
evaluation rounds' gradients are summed the same way (their mean is logged as ‖∇f‖²); f, G and the metrics travel
per rank and are reduced exactly as in a flat run.

Only methods whose master step is "add up the messages, then scale by 1/n" can be summed before the master: they
say so with ``sums_messages = True`` in their own class body (a subclass must say it again: a method that keeps
per-worker state on the master — EF21+'s replacements, a DIANA-like shift, CLAG's skips are fine but are not
claimed here — is not summable by inheritance). The master then hands the method ``tree_messages``: each block's
sum at its first rank, an empty message at the block's other ranks, so the method's own ``master_aggregate``
(whatever its mode and scale) sees the tree's sum and n.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ef21.compression.sparse import SparseVector
from ef21.errors import UserError
from ef21.methods import METHODS, Message
from ef21.methods.base import sum_messages

SUMMABLE = ("ef21", "gd", "dcgd", "ef")


@dataclass(frozen=True)
class Tree:
    """n ranks in F blocks."""

    n: int
    F: int

    def __post_init__(self) -> None:
        if not 1 <= self.F <= self.n:
            raise UserError(f"--aggregators must lie in 1..{self.n} (the number of workers), got {self.F}")

    def block(self, j: int) -> range:
        """The ranks aggregator j sums: [j·n//F, (j+1)·n//F)."""
        return range(j * self.n // self.F, (j + 1) * self.n // self.F)

    def blocks(self) -> list[range]:
        return [self.block(j) for j in range(self.F)]

    def block_of(self, rank: int) -> int:
        """The block that holds ``rank`` (the largest j with j·n//F ≤ rank)."""
        return ((rank + 1) * self.F - 1) // self.n

    def sums(self, messages: Sequence[Message | None], d: int) -> list[Message | None]:
        """Every block's sum of one round's messages (rank order, None: left out), or None for a block whose
        ranks were all left out."""
        if len(messages) != self.n:
            raise ValueError(f"expected {self.n} messages, got {len(messages)}")
        return [block_sum([messages[r] for r in b], d) for b in self.blocks()]

    def tree_messages(self, sums: Sequence[Message | None], d: int) -> list[Message | None]:
        """What the master's method folds, n long: block j's sum at its first rank, an empty message at its other
        ranks (None for all of them when the whole block was left out). The method's rank-ordered sum of these is
        the block sums added in block order, and its scale is still 1/n."""
        if len(sums) != self.F:
            raise ValueError(f"expected {self.F} block sums, got {len(sums)}")
        # The empty messages in the sums' dtype: a float64 zero would widen a --dtype float32 run's sum.
        dtype = next((s.vector.values.dtype for s in sums if s is not None), np.dtype(np.float64))
        empty = Message(SparseVector.zeros(d, dtype))
        out: list[Message | None] = []
        for b, s in zip(self.blocks(), sums):
            out.extend([None] * len(b) if s is None else [s] + [empty] * (len(b) - 1))
        return out

    def fold(self, messages: Sequence[Message | None], d: int) -> list[Message | None]:
        """One round's n messages as the master of a tree sees them (``tree_messages`` of ``sums``)."""
        return self.tree_messages(self.sums(messages, d), d)

    def grad_sums(self, grads: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Every block's sum of the workers' dense gradients, in rank order."""
        return [dense_sum([grads[r] for r in b]) for b in self.blocks()]


def block_sum(messages: Sequence[Message | None], d: int) -> Message | None:
    """One block's messages added in rank order (what an aggregator sends); None when none came."""
    if all(m is None for m in messages):
        return None
    if any(m is not None and (m.replace or m.buffers is not None) for m in messages):
        raise ValueError("a message that replaces its worker's state or carries buffers cannot be summed "
                         "before the master")
    return Message(sum_messages(messages, d))


def dense_sum(vectors: Sequence[np.ndarray]) -> np.ndarray:
    """Σ vectors from zero, in the order given (``ef21.engine.records.mean_gradient``'s order)."""
    acc = np.zeros_like(vectors[0])
    for v in vectors:
        acc += v
    return acc


def sums_messages(method: str) -> bool:
    """Whether the method's own class says its master step only adds the messages up (see the module doc)."""
    cls = METHODS.get(method)
    return cls is not None and bool(vars(cls).get("sums_messages", False))


def check_tree(method: str, *, weighted: bool, buffers: bool) -> None:
    """Refuse, with one line, what an aggregator tier cannot run."""
    if method in METHODS and not sums_messages(method):
        raise UserError(f"--aggregators: {method} cannot be summed before the master (it needs every "
                        f"worker's own message there); aggregators run {', '.join(SUMMABLE)}")
    if weighted:
        raise UserError("--aggregators with --weights smoothness: EF21-W weighs each worker's message on the master; "
                        "an aggregator sends only the sum")
    if buffers:
        raise UserError("--aggregators: a model with buffers (BatchNorm's statistics) sends its buffer changes "
                        "per worker, which the tier does not sum; use a model without buffers")
