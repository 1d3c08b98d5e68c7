"""Theory constants and stepsizes of EF21 (Theorems 2 and 3 of the paper)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class TheoryConstants:
    L: float
    L_tilde: float
    alpha: float
    theta: float
    beta: float
    mu: float | None
    gamma_base: float
    multiplier: float
    gamma: float
    rule: str

    def describe(self) -> str:
        mu = "" if self.mu is None else f" mu={self.mu:.6g}"
        return (
            f"L={self.L:.6g} L~={self.L_tilde:.6g} alpha={self.alpha:.6g} theta={self.theta:.6g} "
            f"beta={self.beta:.6g}{mu} gamma={self.gamma:.6g} ({self.rule}, base {self.gamma_base:.6g} "
            f"x {self.multiplier:g})"
        )


def theta_beta(alpha: float) -> tuple[float, float]:
    """θ = 1 − √(1−α), β = (1−α)/θ: the optimal Young's-inequality parameters. α = 1 gives (1, 0)."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must lie in (0, 1], got {alpha}")
    if alpha >= 1.0:
        return 1.0, 0.0
    r = math.sqrt(1.0 - alpha)
    theta = 1.0 - r
    return theta, (1.0 - alpha) / theta


def theory_stepsize(
    L: float,
    L_tilde: float,
    alpha: float,
    *,
    mu: float | None = None,
    uncompressed: bool = False,
    multiplier: float = 1.0,
    override: float | None = None,
) -> TheoryConstants:
    """γ = 1/(L + L̃·√(β/θ)) (Theorem 2); with μ, min{1/(L + L̃·√(2β/θ)), θ/(2μ)} (Theorem 3).

    α = 1 and uncompressed methods (GD) degenerate to 1/L. ``override`` (``--stepsize``) replaces the base rule;
    the multiplier applies either way.
    """
    theta, beta = theta_beta(alpha)
    if override is not None:
        base, rule = override, "given"
    elif uncompressed or alpha >= 1.0:
        base, rule = 1.0 / L, "1/L"
    elif mu is None:
        base, rule = 1.0 / (L + L_tilde * math.sqrt(beta / theta)), "Theorem 2"
    else:
        base = min(1.0 / (L + L_tilde * math.sqrt(2.0 * beta / theta)), theta / (2.0 * mu))
        rule = "Theorem 3"
    return TheoryConstants(L, L_tilde, alpha, theta, beta, mu, base, multiplier, base * multiplier, rule)
