"""An MLP on scikit-learn's ``digits`` (8×8 images of handwritten digits, 1797 rows; shipped inside scikit-learn, so
nothing is downloaded), trained by ef21 through the PyTorch adapter.

    pip install torch==2.13.0 && pip install -e '.[torch]'    # the CPU wheel first
    ef21 run --workers 4 --objective examples/digits_mlp.py:make --k 96 --stepsize 0.5 \\
        --downlink-k 96 --encoding compact --rounds 1200 --eval-every 100 --log runs/mlp.jsonl

Every worker splits the data the same way (a fixed, seeded, stratified 80/20 split: ``--objective-arg
split_seed=S``), trains on its own contiguous part of the training rows (by rank) and reports the accuracy on the
whole held-out set (``test_acc`` in the log and the status). Options (``--objective-arg KEY=VALUE``): ``hidden``
(default 128: d = 9610), ``dtype`` (float32 or float64), ``split_seed`` (0).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from ef21.problems.torch import TorchObjective, seeded


def digits_split(ctx, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """This worker's training rows and the whole held-out set; pixels scaled to [0, 1]."""
    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X / 16.0, y, test_size=0.2, random_state=seed, stratify=y)
    mine = np.array_split(np.arange(len(y_train)), ctx.n)[ctx.rank]
    return X_train[mine], y_train[mine], X_test, y_test


def build(options: dict[str, str]) -> torch.nn.Module:
    hidden = int(options.get("hidden", 128))
    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))


def make(ctx) -> TorchObjective:
    X, y, X_test, y_test = digits_split(ctx, int(ctx.options.get("split_seed", 0)))
    model = seeded(ctx.seed, lambda: build(ctx.options))  # the same initial weights on every worker
    return TorchObjective(model, torch.nn.CrossEntropyLoss(), X, y, test=(X_test, y_test),
                          dtype=ctx.options.get("dtype", "float32"))
