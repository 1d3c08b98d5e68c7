"""Which estimators and EF21 extensions go together, with a one-line refusal for the rest.

The theory (EF21 and its "bells and whistles" paper, method doc §3.6–3.13, §4) covers EF21 with one extension at
a time and a few pairs: bidirectional compression (BC) or heavy ball (HB) with partial participation (PP), and the
stochastic estimators (SGD, PAGE) with BC and PP. Anything else would run, but with no stepsize to back it, so
it is refused rather than silently tuned by hand.
"""

from __future__ import annotations

from typing import Protocol

from ef21.errors import UserError


class VariantSpec(Protocol):
    """The settings that decide a variant (``ef21.engine.config.RunConfig`` has them all)."""

    @property
    def method(self) -> str: ...
    @property
    def estimator(self) -> str: ...
    @property
    def downlink_k(self) -> int | None: ...
    @property
    def participation(self) -> str | None: ...
    @property
    def momentum(self) -> float: ...
    @property
    def prox(self) -> str | None: ...
    @property
    def weights(self) -> str: ...
    @property
    def mu(self) -> float | None: ...
    @property
    def downlink_method(self) -> str: ...


# Methods that take a stochastic estimator in place of ∇f_i (EF21+ compares its candidates with ∇f_i itself).
ESTIMATOR_METHODS = ("gd", "dcgd", "ef", "ef21")
PROX_METHODS = ("gd", "ef21")
# EF21-P's uplinks: DIANA as in its paper (arXiv 2209.15218v2, Algorithm 1); MARINA and EF21 run too, as heuristics
# (the paper leaves EF21-P + MARINA open, §6, and never pairs EF21-P with EF21).
PRIMAL_METHODS = ("ef21", "diana", "marina")
# Methods whose stepsize rule has a PL variant (--mu): EF21's Theorem 3 and the older baselines it is applied to.
MU_METHODS = ("gd", "dcgd", "ef", "ef21", "ef21plus")


def extensions(cfg: VariantSpec) -> list[str]:
    """The extensions a configuration switches on, by their paper names."""
    out = []
    if cfg.downlink_k is not None:
        out.append("P" if cfg.downlink_method == "ef21-p" else "BC")
    if cfg.participation is not None:
        out.append("PP")
    if cfg.momentum > 0.0 and getattr(cfg, "optimizer", None) is None:
        # With --optimizer sgd, --momentum is the optimizer's (the same heavy ball, ef21.methods.optim.trace), chosen
        # with the other heuristics the optimizer brings rather than as the extension the theory covers.
        out.append("HB")
    if cfg.prox is not None:
        out.append("Prox")
    if cfg.weights != "uniform":
        out.append("W")
    return out


# Pairs of extensions the theory covers (and each extension alone); W also with the SGD estimator (EF21-W-SGD).
COVERED = [{"BC", "PP"}, {"HB", "PP"}]


def check_combination(cfg: VariantSpec) -> None:
    ext = extensions(cfg)
    stochastic = cfg.estimator != "full"
    if stochastic and cfg.method not in ESTIMATOR_METHODS:
        why = (" (EF21+ chooses between candidates by their distance to the full gradient)"
               if cfg.method == "ef21plus" else "")
        raise UserError(f"--estimator {cfg.estimator} works with {', '.join(ESTIMATOR_METHODS)}, not "
                        f"{cfg.method}{why}")
    for name in ext:
        allowed = PROX_METHODS if name == "Prox" else PRIMAL_METHODS if name == "P" else ("ef21",)
        if cfg.method not in allowed:
            raise UserError(f"{_flag(name)} is an option of the {_join(allowed)} method"
                            f"{'s' if len(allowed) > 1 else ''}, not {cfg.method}")
    if getattr(cfg, "optimizer", None) is not None and (cfg.method == "diana" or "P" in ext):
        # Both move x by their own rule (DIANA's shifted step, EF21-P's shared point), which an optimizer would
        # have to replace.
        raise UserError(f"--optimizer is not an option of {'EF21-P' if 'P' in ext else 'diana'}: it moves x by its "
                        f"own rule (docs/methods-family.md)")
    if len(ext) > 1 and set(ext) not in COVERED:
        raise UserError(f"EF21 with {' + '.join(ext)} is not covered by the theory (covered: one extension at a time, "
                        f"BC + PP, HB + PP); choose one")
    if stochastic:
        if cfg.estimator == "sgdm" and ext:
            raise UserError(f"--estimator sgdm with {' + '.join(ext)} is not covered by the theory")
        bad = [e for e in ext if e not in ("BC", "PP", "W")]
        if bad or (cfg.estimator == "page" and "W" in ext):
            raise UserError(f"--estimator {cfg.estimator} with {' + '.join(bad or ['W'])} is not covered by the theory "
                            f"(covered: the stochastic estimators with BC and PP, and SGD with W)")
    if cfg.mu is not None and (ext or stochastic or cfg.method not in MU_METHODS):
        raise UserError("--mu (the PL stepsize of Theorem 3) is derived for plain EF21 with full gradients only")


def _join(names: tuple[str, ...]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _flag(name: str) -> str:
    return {"BC": "--downlink-k", "P": "--downlink-method ef21-p", "PP": "--participation", "HB": "--momentum", "Prox": "--prox",
            "W": "--weights smoothness"}[name]


def variant_name(cfg: VariantSpec) -> str:
    """E.g. ``ef21-BC+PP/sgd``: the method, its extensions and its estimator, for logs and the status."""
    name = cfg.method + "".join(f"-{e}" if i == 0 else f"+{e}" for i, e in enumerate(extensions(cfg)))
    return name if cfg.estimator == "full" else f"{name}/{cfg.estimator}"
