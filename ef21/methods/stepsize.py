"""Theory constants and stepsizes: EF21 (Theorems 2 and 3 of the paper) and its variants.

Where the stepsize of a variant comes from:
- EF21, nonconvex: γ = 1/(L + L̃·√(β/θ)) (Theorem 2); PL: min{1/(L + L̃·√(2β/θ)), θ/(2μ)} (Theorem 3).
- EF21-PP (sampled participation with probability p): the bells-and-whistles paper's Theorem 7, as FL_PyTorch
  implements it: γ = 1/(L + √(B/θ_p)), θ_p = pθ − (1 − p)ρ, B = (βp + (1 + 1/ρ)(1 − p))·L̃², with the Young's
  parameters s (inside θ, β) and ρ chosen to make γ largest rather than FL_PyTorch's fixed 1e-3 (method doc §4).
- EF21-W (weights w_i = L_i/ΣL_j): γ = 1/(L + L_AM·√(β/θ)) (Error Feedback Reloaded; L_AM = mean L_i).
- EF21-BC, -HB, -Prox, -SGD, -PAGE: the Theorem 2 stepsize with the workers' α, which is what the authors' code
  runs for every one of them (method doc §4, last paragraph); their papers' own bounds sit in appendices that
  this project could not check, and the ``rule`` string says so.
- The family since 2021 (``family_stepsize``, docs/methods-family.md): CLAG 1/(L + L̃·√(max(β, ζ)/θ)) (the 3PC
  code); MARINA 1/(L + L̃·√((1 − p)ω/(pn))) (the 3PC code); DIANA 1/(L + (L̃/α)·√(12ω/n)) (derived here for the
  nonconvex case); EControl Theorem 2's (its own bound not read here); EF21-P the uplink's rule: the paper
  (arXiv 2209.15218v2) bounds EF21-P + DIANA only for convex f (Theorem 5.1: γ ≤ min{n/(160ωL_max), α_P/(100L)}),
  never with MARINA or EF21, and its nonconvex theorem (6.2) is for EF21-P + DCGD; docs/methods-family.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ef21.errors import UserError


@dataclass(frozen=True)
class TheoryConstants:
    L: float | None
    L_tilde: float | None
    alpha: float
    theta: float
    beta: float
    mu: float | None
    gamma_base: float
    multiplier: float
    gamma: float
    rule: str
    L_am: float | None = None
    """Arithmetic mean of the L_i (EF21-W's constant)."""
    p: float | None = None
    """Participation probability of EF21-PP."""
    omega: float | None = None
    """ω of the unbiased compressor (DIANA, MARINA)."""
    params: dict[str, float] | None = None
    """The method's own parameters as resolved (ζ, η, DIANA's α, MARINA's p)."""

    def describe(self) -> str:
        mu = "" if self.mu is None else f" mu={self.mu:.6g}"
        p = "" if self.p is None else f" p={self.p:.6g}"
        omega = "" if self.omega is None else f" omega={self.omega:.6g}"
        params = "".join(f" {k}={v:.6g}" for k, v in (self.params or {}).items())
        return (
            f"L={_num(self.L)} L~={_num(self.L_tilde)} alpha={self.alpha:.6g} theta={self.theta:.6g} "
            f"beta={self.beta:.6g}{mu}{p}{omega}{params} gamma={self.gamma:.6g} ({self.rule}, base "
            f"{self.gamma_base:.6g} x {self.multiplier:g})"
        )


def _num(v: float | None) -> str:
    return "unknown" if v is None else f"{v:.6g}"


def theta_beta(alpha: float) -> tuple[float, float]:
    """θ = 1 − √(1−α), β = (1−α)/θ: the optimal Young's-inequality parameters. α = 1 gives (1, 0)."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must lie in (0, 1], got {alpha}")
    if alpha >= 1.0:
        return 1.0, 0.0
    r = math.sqrt(1.0 - alpha)
    theta = 1.0 - r
    return theta, (1.0 - alpha) / theta


def _golden_min(f, lo: float, hi: float, iters: int = 200) -> float:  # type: ignore[no-untyped-def]
    """The minimizer of a unimodal f on (lo, hi), by a fixed number of golden-section steps (deterministic)."""
    g = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return (a + b) / 2.0


def pp_constant(alpha: float, p: float) -> float:
    """min over s, ρ of B/(θ_p·L̃²) for EF21-PP (Theorem 7 of the bells-and-whistles paper, uniform p)."""
    if p >= 1.0:
        theta, beta = theta_beta(alpha)
        return beta / theta

    def ratio(s: float, rho: float) -> float:
        theta = 1.0 - (1.0 - alpha) * (1.0 + s)
        beta = (1.0 - alpha) * (1.0 + 1.0 / s)
        theta_p = p * theta - (1.0 - p) * rho
        if theta_p <= 0.0:
            return math.inf
        return (beta * p + (1.0 + 1.0 / rho) * (1.0 - p)) / theta_p

    def best_over_rho(s: float) -> float:
        theta = 1.0 - (1.0 - alpha) * (1.0 + s)
        top = p * theta / (1.0 - p)  # θ_p > 0 needs ρ below this
        if top <= 0.0:
            return math.inf
        u = _golden_min(lambda v: ratio(s, v * top), 1e-9, 1.0 - 1e-9)
        return ratio(s, u * top)

    if alpha >= 1.0:
        return best_over_rho(1.0)  # θ = 1, β = 0 for every s
    s_max = alpha / (1.0 - alpha)  # θ > 0 needs s below this
    v = _golden_min(lambda w: best_over_rho(w * s_max), 1e-9, 1.0 - 1e-9)
    return best_over_rho(v * s_max)


def theory_stepsize(
    L: float | None,
    L_tilde: float | None,
    alpha: float,
    *,
    mu: float | None = None,
    uncompressed: bool = False,
    multiplier: float = 1.0,
    override: float | None = None,
    L_am: float | None = None,
    participation: float | None = None,
    weighted: bool = False,
    note: str = "",
) -> TheoryConstants:
    """The base stepsize of the rule that applies, times ``multiplier``.

    α = 1 and uncompressed methods (GD) degenerate to 1/L. ``override`` (``--stepsize``) replaces the base rule;
    the multiplier applies either way. ``participation``: p of EF21-PP; ``weighted``: EF21-W (needs ``L_am``).
    ``note`` names a variant whose stepsize is Theorem 2's (see the module docstring).
    """
    theta, beta = theta_beta(alpha)
    if override is not None:
        base, rule = override, "given"
    elif L is None or L_tilde is None:
        raise UserError("the objective gives no smoothness constant (L_i), so there is no theory stepsize: "
                        "give --stepsize")
    elif uncompressed or (alpha >= 1.0 and participation is None):
        base, rule = 1.0 / L, "1/L"
    elif participation is not None and participation < 1.0:
        base = 1.0 / (L + L_tilde * math.sqrt(pp_constant(alpha, participation)))
        rule = "EF21-PP, B&W Theorem 7" + (f" ({note})" if note else "")
    elif weighted:
        assert L_am is not None
        base, rule = 1.0 / (L + L_am * math.sqrt(beta / theta)), "EF21-W"
    elif mu is None:
        base, rule = 1.0 / (L + L_tilde * math.sqrt(beta / theta)), "Theorem 2" + (f" ({note})" if note else "")
    else:
        base = min(1.0 / (L + L_tilde * math.sqrt(2.0 * beta / theta)), theta / (2.0 * mu))
        rule = "Theorem 3"
    return TheoryConstants(L, L_tilde, alpha, theta, beta, mu, base, multiplier, base * multiplier, rule,
                           L_am=L_am, p=participation)


FAMILY = ("clag", "lag", "econtrol", "diana", "marina")


def family_stepsize(
    method: str,
    L: float | None,
    L_tilde: float | None,
    alpha: float,
    *,
    n: int,
    omega: float | None = None,
    params: dict[str, float] | None = None,
    multiplier: float = 1.0,
    override: float | None = None,
    primal: bool = False,
) -> TheoryConstants:
    """The base stepsize of a method of the family since 2021 (``FAMILY``), times ``multiplier``.

    ``alpha``: the uplink compressor's α (1/(ω+1) for an unbiased-only one); ``params``: ``zeta`` (CLAG, LAG),
    ``eta`` (EControl), ``diana_alpha`` (DIANA's shift stepsize), ``marina_p`` (MARINA). ``primal``: EF21-P on the downlink. Its paper's
    bound covers only convex f with DIANA on the uplink (Theorem 5.1, far smaller: α_P/(100L)), so the uplink's rule
    stands and the rule string says so.
    """
    params = params or {}
    theta, beta = theta_beta(alpha)
    w = 0.0 if omega is None else omega
    if override is not None:
        base, rule = override, "given"
    elif L is None or L_tilde is None:
        raise UserError("the objective gives no smoothness constant (L_i), so there is no theory stepsize: "
                        "give --stepsize")
    elif method in ("clag", "lag"):
        base = 1.0 / (L + L_tilde * math.sqrt(max(beta, params["zeta"]) / theta))
        rule = f"{method.upper()}, 3PC code: 1/(L + L~ sqrt(max(beta, zeta)/theta))"
    elif method == "diana":
        base = 1.0 / (L + (L_tilde / params["diana_alpha"]) * math.sqrt(12.0 * w / n))
        rule = "DIANA, nonconvex, derived here: 1/(L + (L~/alpha_D) sqrt(12 omega/n))"
    elif method == "marina":
        p = params["marina_p"]
        base = 1.0 / (L + L_tilde * math.sqrt((1.0 - p) * w / (p * n)))
        rule = "MARINA, 3PC code: 1/(L + L~ sqrt((1-p) omega/(p n)))"
    elif method == "econtrol":
        base = 1.0 / L if alpha >= 1.0 else 1.0 / (L + L_tilde * math.sqrt(beta / theta))
        rule = "EF21 Theorem 2 (EControl's own bound not read here)"
    else:
        raise ValueError(f"{method} is not a method of the family")
    if primal and override is None:
        # EF21-P's paper (arXiv 2209.15218v2) pairs it with DIANA (convex f, Theorem 5.1) and DCGD (Theorem 6.2);
        # its DIANA bound is far below the uplink's rule, so the uplink's rule stands and says so.
        rule += ("; EF21-P: the uplink's rule (the paper's Thm 5.1, convex f only: min{n/(160 omega L_max), "
                 "alpha_P/(100 L)})" if method == "diana" else
                 f"; EF21-P + {method.upper()} is a heuristic: the paper pairs EF21-P with DIANA and DCGD only")
    return TheoryConstants(L, L_tilde, alpha, theta, beta, None, base, multiplier, base * multiplier, rule,
                           omega=omega, params=params or None)
