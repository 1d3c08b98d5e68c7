"""A model's layout: the names, shapes and dtypes of the tensors behind x (the trainable parameters) and behind b
(the rest of its state dict: BatchNorm's running statistics and other buffers, frozen parameters).

A worker sends it at set-up, so the master — which imports no user code — knows the tensors' boundaries
(layer-wise Top-k), checks that every worker built the same model, keeps it in checkpoints and can export the
trained model as a state dict (``ef21 export``). It arrives from the network as JSON, so ``from_json`` checks
everything it reads.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from ef21.errors import UserError

DTYPES = ("float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8", "bool")
# Far above any real model's tensor count; a bound on what a peer's JSON may make the master hold.
MAX_TENSORS = 100_000


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def describe(self) -> str:
        return f"{self.name!r} of shape {self.shape} ({self.dtype})"


@dataclass(frozen=True)
class ModelLayout:
    params: tuple[TensorSpec, ...]
    """The trainable parameters, in the order they are flattened into x."""
    buffers: tuple[TensorSpec, ...] = ()
    """The rest of the state dict (buffers, frozen parameters), in the order they are flattened into b."""
    keys: tuple[tuple[str, str], ...] = ()
    """The state dict's keys in order, each with the name in ``params`` or ``buffers`` that holds its tensor (a tied
    weight is two keys of one tensor)."""

    @property
    def d(self) -> int:
        return sum(t.size for t in self.params)

    @property
    def buffer_size(self) -> int:
        return sum(t.size for t in self.buffers)

    def tensors(self) -> list[tuple[str, int]]:
        """(name, entries) of every parameter tensor, in x's order: what layer-wise compression needs."""
        return [(t.name, t.size) for t in self.params]

    def to_json(self) -> str:
        return json.dumps({"params": [[t.name, list(t.shape), t.dtype] for t in self.params],
                           "buffers": [[t.name, list(t.shape), t.dtype] for t in self.buffers],
                           "keys": [list(k) for k in self.keys]}, separators=(",", ":"))

    @staticmethod
    def from_json(text: str, what: str = "layout") -> ModelLayout:
        """Parse and check a layout (from a peer or a checkpoint): ValueError naming the fault."""
        try:
            doc = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{what}: not JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise ValueError(f"{what}: not an object")
        params = _specs(doc.get("params"), f"{what} params")
        buffers = _specs(doc.get("buffers", []), f"{what} buffers")
        names = [t.name for t in params + buffers]
        if len(set(names)) != len(names):
            raise ValueError(f"{what}: a tensor name appears twice")
        raw_keys = doc.get("keys", [])
        if not isinstance(raw_keys, list) or len(raw_keys) > MAX_TENSORS:
            raise ValueError(f"{what}: keys must be a list")
        keys = []
        known = set(names)
        for k in raw_keys:
            if not (isinstance(k, list) and len(k) == 2 and all(isinstance(v, str) for v in k) and k[1] in known):
                raise ValueError(f"{what}: bad key {k!r}")
            keys.append((k[0], k[1]))
        if not params:
            raise ValueError(f"{what}: no parameters")
        return ModelLayout(params, buffers, tuple(keys))

    def difference(self, other: ModelLayout) -> str | None:
        """What differs from ``other`` (the run's), in words; None when the two are the same model."""
        for kind, mine, theirs in (("parameter", self.params, other.params), ("buffer", self.buffers, other.buffers)):
            for a, b in zip(mine, theirs):
                if a != b:
                    return f"{kind} {a.describe()} where the run's model has {b.describe()}"
            if len(mine) != len(theirs):
                return f"{len(mine)} {kind}s where the run's model has {len(theirs)}"
        if self.keys != other.keys:
            return "the same tensors under other state-dict keys"
        return None


def _specs(items: Any, what: str) -> tuple[TensorSpec, ...]:
    if not isinstance(items, list) or len(items) > MAX_TENSORS:
        raise ValueError(f"{what}: must be a list")
    out = []
    for item in items:
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str) and isinstance(item[1], list)
                and item[2] in DTYPES and all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**40
                                              for n in item[1]) and len(item[1]) <= 16):
            raise ValueError(f"{what}: bad tensor {str(item)[:80]}")
        out.append(TensorSpec(item[0], tuple(item[1]), item[2]))
    return tuple(out)


def check_same_layout(layouts: list[ModelLayout | None]) -> ModelLayout | None:
    """The one layout of n objectives (rank order), or a one-line error naming the first rank whose model differs."""
    first = layouts[0]
    for rank, lay in enumerate(layouts[1:], start=1):
        if (lay is None) != (first is None):
            raise UserError(f"rank {rank}'s objective {'reports no' if lay is None else 'reports a'} model layout "
                            f"and rank 0's {'does' if lay is None else 'does not'}")
        if lay is not None and first is not None:
            diff = lay.difference(first)
            if diff is not None:
                raise UserError(f"the model differs between workers: rank {rank}'s has {diff} (rank 0)")
    return first
