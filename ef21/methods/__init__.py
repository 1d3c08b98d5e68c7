"""Methods: the rules of a round, each a small object with a worker side and a master side.

- ``base``: the contract every method keeps (``worker_step``, ``master_aggregate``), ``Message`` and ``Downlink``.
- ``gd``, ``dcgd``, ``ef``, ``ef21``, ``ef21plus``: the rules, registered by name in ``METHODS``.
- ``lazy`` (CLAG, LAG), ``econtrol``, ``diana``, ``marina``: the family since 2021, with their parameters
  (``MethodParams``).
- ``estimators``: what a worker compresses against (full gradients, SGD, PAGE, SGDM).
- ``replica``: (x, g) and the step that moves x (plain, heavy ball, proximal, DIANA's shifted step, an optimizer),
  with the state beside them, held alike by every side.
- ``optim``: the master's optimizers on g (SGD, momentum, Nesterov, Adam, AdamW, clipping, schedules), optax-shaped.
- ``buffers``: a model's buffers (BatchNorm's running statistics) carried beside x: the workers' changes averaged.
- ``downlink``: EF21-BC, the master's own EF21 on its broadcast; EF21-P, error feedback on the model.
- ``participation``: EF21-PP's sampling of who takes part in a round.
- ``prox``: the proximal operators of EF21-Prox.
- ``stepsize``: the theory stepsizes and their constants.
- ``variants``: which estimators and extensions combine, with a one-line refusal for the rest.

May import: ``ef21.compression``, numpy and ``ef21.errors``. No problem, engine or transport.
"""

from __future__ import annotations

from dataclasses import dataclass

from ef21.errors import UserError

from .base import Downlink, InitMode, Message, Method, WorkerContext
from .dcgd import DCGD
from .diana import DIANA
from .econtrol import EControl
from .ef import EF
from .ef21 import EF21
from .ef21plus import EF21Plus
from .gd import GD
from .lazy import CLAG, LAG
from .marina import MARINA
from .replica import Replica

METHODS: dict[str, type] = {"gd": GD, "dcgd": DCGD, "ef": EF, "ef21": EF21, "ef21plus": EF21Plus, "clag": CLAG,
                            "lag": LAG, "econtrol": EControl, "diana": DIANA, "marina": MARINA}
UNBIASED_METHODS = ("diana", "marina")
"""Methods whose theory needs an unbiased compressor Q ∈ U(ω) (the rest that compress need a contractive one)."""


@dataclass(frozen=True)
class MethodParams:
    """The parameters of the methods that have some, resolved (defaults that depend on ω already filled in)."""

    clag_zeta: float = 1.0
    econtrol_eta: float = 0.1
    """(``make_method``'s default; the plan resolves a config's to the compressor's α.)"""
    diana_alpha: float = 1.0
    marina_p: float = 1.0
    seed: int = 0
    full_start: bool = True
    """``--init full``: DIANA's and MARINA's round 0 sends ∇f_i(x⁰) whole."""


def make_method(name: str, params: MethodParams | None = None) -> Method:
    params = params or MethodParams()
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    if name in ("clag", "lag"):
        return METHODS[name](zeta=params.clag_zeta)
    if name == "econtrol":
        return EControl(eta=params.econtrol_eta)
    if name == "diana":
        return DIANA(alpha=params.diana_alpha, full_start=params.full_start)
    if name == "marina":
        return MARINA(p=params.marina_p, seed=params.seed, full_start=params.full_start)
    return METHODS[name]()


__all__ = [
    "CLAG", "DCGD", "DIANA", "EF", "EF21", "EControl", "EF21Plus", "GD", "LAG", "MARINA", "METHODS",
    "UNBIASED_METHODS", "Downlink", "InitMode", "Message", "Method", "MethodParams", "Replica", "WorkerContext",
    "make_method",
]
