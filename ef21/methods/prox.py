"""Proximal operators for EF21-Prox: x^{t+1} = prox_{γr}(x^t − γg^t), prox_{γr}(y) = argmin_x γr(x) + ½‖x − y‖².

Each is exact and elementwise (or one norm), so every replica computes the same bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ef21.errors import UserError


class Prox(Protocol):
    spec: str

    def apply(self, y: np.ndarray, gamma: float) -> None:
        """y ← prox_{γr}(y), in place."""

    def value(self, x: np.ndarray) -> float:
        """r(x) (inf outside a constraint set)."""


@dataclass(frozen=True)
class L1:
    """r(x) = λ‖x‖₁: soft thresholding at γλ."""

    lam: float
    spec: str = ""

    def apply(self, y: np.ndarray, gamma: float) -> None:
        t = gamma * self.lam
        # sign(y)·max(|y| − t, 0) in place, without temporaries of size d beyond one
        mag = np.abs(y)
        np.subtract(mag, t, out=mag)
        np.maximum(mag, 0.0, out=mag)
        np.copysign(mag, y, out=y)

    def value(self, x: np.ndarray) -> float:
        return self.lam * float(np.abs(x).sum())


@dataclass(frozen=True)
class Box:
    """r = indicator of [lo, hi]^d: clipping (γ plays no role)."""

    lo: float
    hi: float
    spec: str = ""

    def apply(self, y: np.ndarray, gamma: float) -> None:
        np.clip(y, self.lo, self.hi, out=y)

    def value(self, x: np.ndarray) -> float:
        return 0.0 if bool(np.all((x >= self.lo) & (x <= self.hi))) else math.inf


@dataclass(frozen=True)
class L2Ball:
    """r = indicator of {‖x‖₂ ≤ R}: projection onto the ball."""

    radius: float
    spec: str = ""

    def apply(self, y: np.ndarray, gamma: float) -> None:
        norm = math.sqrt(float(y @ y))
        if norm > self.radius:
            y *= self.radius / norm

    def value(self, x: np.ndarray) -> float:
        return 0.0 if math.sqrt(float(x @ x)) <= self.radius * (1 + 1e-12) else math.inf


def parse_prox(spec: str) -> Prox:
    """``l1:LAMBDA``, ``box:LO:HI`` or ``l2ball:R``."""
    kind, _, rest = spec.partition(":")
    try:
        args = [float(a) for a in rest.split(":")] if rest else []
    except ValueError:
        raise UserError(f"--prox {spec!r}: parameters must be numbers") from None
    if kind == "l1" and len(args) == 1 and math.isfinite(args[0]) and args[0] >= 0:
        return L1(args[0], spec)
    if kind == "box" and len(args) == 2 and all(math.isfinite(a) for a in args) and args[0] <= args[1]:
        return Box(args[0], args[1], spec)
    if kind == "l2ball" and len(args) == 1 and math.isfinite(args[0]) and args[0] > 0:
        return L2Ball(args[0], spec)
    if kind not in ("l1", "box", "l2ball"):
        raise UserError(f"unknown --prox {kind!r}; use l1:LAMBDA, box:LO:HI or l2ball:R")
    raise UserError(f"--prox {spec!r}: malformed; use l1:LAMBDA (λ >= 0), box:LO:HI (LO <= HI) or l2ball:R (R > 0)")


def gradient_mapping_sq(prox: Prox, x: np.ndarray, grad: np.ndarray, gamma: float) -> float:
    """‖G_γ(x)‖² with G_γ(x) = (x − prox_{γr}(x − γ∇f(x)))/γ: EF21-Prox's stationarity measure."""
    y = x - gamma * grad
    prox.apply(y, gamma)
    y -= x
    return float(y @ y) / (gamma * gamma)
