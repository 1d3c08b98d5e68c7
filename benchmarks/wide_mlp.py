"""The wider MLP of issue 22's race, 64-512-512-10 on scikit-learn's ``digits`` (d = 301,066), as an ef21 objective
(``--objective benchmarks/wide_mlp.py:make``) and as the module a DDP process builds the same model from.

It is ``examples/digits_mlp.py`` with two hidden layers: the same seeded split, the same shards by rank, the same
seeded initial weights on every worker. Options (``--objective-arg KEY=VALUE``): ``layers`` (hidden widths, default
``512,512``), ``dtype`` (float32 or float64), ``split_seed`` (0).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from ef21.problems.torch import TorchObjective, seeded

_spec = importlib.util.spec_from_file_location(
    "ef21_example_digits_mlp", Path(__file__).resolve().parents[1] / "examples" / "digits_mlp.py")
assert _spec is not None and _spec.loader is not None
_digits = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_digits)
digits_split = _digits.digits_split  # one split and one sharding for both models


def build(options: dict[str, str]) -> torch.nn.Module:
    widths = [64, *(int(w) for w in options.get("layers", "512,512").split(",")), 10]
    layers: list[torch.nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])  # no ReLU after the output layer


def make(ctx) -> TorchObjective:  # type: ignore[no-untyped-def]
    X, y, X_test, y_test = digits_split(ctx, int(ctx.options.get("split_seed", 0)))
    model = seeded(ctx.seed, lambda: build(ctx.options))  # the same initial weights on every worker
    return TorchObjective(model, torch.nn.CrossEntropyLoss(), X, y, test=(X_test, y_test),
                          dtype=ctx.options.get("dtype", "float32"))
