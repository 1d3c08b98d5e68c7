"""A small ResNet (BatchNorm, a residual block, dropout) trained in train mode on scikit-learn's ``digits`` upscaled
to 16×16, fed by a ``torch.utils.data.Dataset`` with seeded augmentation. Nothing is downloaded: the 1797 8×8
images ship inside scikit-learn.

    ef21 run --workers 4 --objective examples/digits_resnet.py:make --k-per-tensor 0.05 \\
        --estimator sgd --batch-size 32 --optimizer sgd --momentum 0.9 --nesterov --weight-decay 5e-4 \\
        --stepsize 0.05 --lr-schedule cosine --warmup 30 --rounds 600 --eval-every 50 --checkpoint runs/resnet.ckpt
    ef21 export runs/resnet.ckpt        # runs/resnet.safetensors: model.load_state_dict(load_file(...))

The data: every worker makes the same fixed, seeded, stratified 80/20 split, upscales the images bilinearly to
16×16 and trains on its own contiguous part of the training rows (by rank); each training item is augmented when
it is fetched — shifted by up to 2 pixels, rotated by up to 10° and scaled by 0.9–1.1 (one ``affine_grid``), with
torch's generator, which ef21 seeds from (seed, rank, round) — and the held-out set is the whole 20 %, not
augmented. The model: conv 3×3 → BN → ReLU, a residual block (two conv-BN, identity skip), a downsampling residual
block (stride 2, 1×1 conv-BN skip), global average pooling, dropout, linear; d = 19.7k for ``channels=16``, 294
buffer entries (BatchNorm's running statistics).

Options (``--objective-arg KEY=VALUE``): ``channels`` (16), ``dropout`` (0.2), ``augment`` (1; 0: none),
``rows`` (all: at most this many training rows per worker, for quick tries), ``split_seed`` (0), ``dtype``
(float32).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from ef21.problems.torch import TorchObjective, seeded

SIZE = 16


def digits16(split_seed: int) -> tuple[torch.Tensor, np.ndarray, torch.Tensor, np.ndarray]:
    """All of digits as (N, 1, 16, 16) in [0, 1], split 80/20 (fixed seed, stratified)."""
    X, y = load_digits(return_X_y=True)
    images = F.interpolate(torch.from_numpy(X / 16.0).float().reshape(-1, 1, 8, 8), size=(SIZE, SIZE),
                           mode="bilinear", align_corners=False)
    train, test = train_test_split(np.arange(len(y)), test_size=0.2, random_state=split_seed, stratify=y)
    return images[train], y[train], images[test], y[test]


class Digits16(torch.utils.data.Dataset):
    """(image, label) pairs; with ``augment``, each fetch draws a random shift, rotation and scale."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray, augment: bool) -> None:
        self.images, self.labels, self.augment = images, labels, augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.images[i]
        if self.augment:
            angle = math.radians(float(torch.empty(()).uniform_(-10, 10)))
            scale = float(torch.empty(()).uniform_(0.9, 1.1))
            shift = torch.randint(-2, 3, (2,)).float() * (2 / SIZE)  # pixels in affine_grid's [-1, 1] units
            theta = torch.tensor([[math.cos(angle) / scale, -math.sin(angle) / scale, float(shift[0])],
                                  [math.sin(angle) / scale, math.cos(angle) / scale, float(shift[1])]])
            grid = F.affine_grid(theta[None], [1, 1, SIZE, SIZE], align_corners=False)
            img = F.grid_sample(img[None], grid, align_corners=False, padding_mode="zeros")[0]
        return img, int(self.labels[i])


class Block(torch.nn.Module):
    """A basic residual block: conv-BN-ReLU-conv-BN plus the input (through a 1×1 conv-BN when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(c_out)
        self.conv2 = torch.nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(c_out)
        self.skip = torch.nn.Identity() if stride == 1 and c_in == c_out else torch.nn.Sequential(
            torch.nn.Conv2d(c_in, c_out, 1, stride, bias=False), torch.nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.skip(x))


class ResNet(torch.nn.Module):
    def __init__(self, c: int = 16, dropout: float = 0.2) -> None:
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(1, c, 3, 1, 1, bias=False), torch.nn.BatchNorm2d(c),
                                        torch.nn.ReLU())
        self.block1 = Block(c, c)
        self.block2 = Block(c, 2 * c, stride=2)
        self.head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Dropout(dropout),
                                        torch.nn.Linear(2 * c, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block2(self.block1(self.stem(x))))


def build(options: dict[str, str]) -> ResNet:
    return ResNet(int(options.get("channels", 16)), float(options.get("dropout", 0.2)))


def shard(ctx, n_rows: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    """This worker's rows of the training set: its contiguous part, by rank."""
    return np.array_split(np.arange(n_rows), ctx.n)[ctx.rank]


def make(ctx) -> TorchObjective:  # type: ignore[no-untyped-def]
    X, y, X_test, y_test = digits16(int(ctx.options.get("split_seed", 0)))
    mine = shard(ctx, len(y))[:int(ctx.options.get("rows", len(y)))]
    train = Digits16(X[mine], y[mine], augment=ctx.options.get("augment", "1") != "0")
    model = seeded(ctx.seed, lambda: build(ctx.options))  # the same initial weights on every worker
    return TorchObjective(model, torch.nn.CrossEntropyLoss(), train, test=(X_test, y_test),
                          dtype=ctx.options.get("dtype", "float32"))
