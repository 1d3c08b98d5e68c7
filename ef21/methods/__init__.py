"""Methods: the rules of a round, each a small object with a worker side and a master side.

- ``base``: the contract every method keeps (``worker_step``, ``master_aggregate``), ``Message`` and ``Downlink``.
- ``gd``, ``dcgd``, ``ef``, ``ef21``, ``ef21plus``: the rules, registered by name in ``METHODS``.
- ``estimators``: what a worker compresses against (full gradients, SGD, PAGE, SGDM).
- ``replica``: (x, g) and the step that moves x (plain, heavy ball, proximal, an optimizer), with the state beside
  them, held alike by every side.
- ``optim``: the master's optimizers on g (SGD, momentum, Nesterov, Adam, AdamW, clipping, schedules), optax-shaped.
- ``buffers``: a model's buffers (BatchNorm's running statistics) carried beside x: the workers' changes averaged.
- ``downlink``: EF21-BC, the master's own EF21 on its broadcast.
- ``participation``: EF21-PP's sampling of who takes part in a round.
- ``prox``: the proximal operators of EF21-Prox.
- ``stepsize``: the theory stepsizes and their constants.
- ``variants``: which estimators and extensions combine, with a one-line refusal for the rest.

May import: ``ef21.compression``, numpy and ``ef21.errors``. No problem, engine or transport.
"""

from __future__ import annotations

from ef21.errors import UserError

from .base import Downlink, InitMode, Message, Method, WorkerContext
from .dcgd import DCGD
from .ef import EF
from .ef21 import EF21
from .ef21plus import EF21Plus
from .gd import GD
from .replica import Replica

METHODS: dict[str, type] = {"gd": GD, "dcgd": DCGD, "ef": EF, "ef21": EF21, "ef21plus": EF21Plus}


def make_method(name: str) -> Method:
    try:
        return METHODS[name]()
    except KeyError:
        raise UserError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


__all__ = [
    "DCGD", "EF", "EF21", "EF21Plus", "GD", "METHODS", "Downlink", "InitMode", "Message", "Method", "Replica",
    "WorkerContext", "make_method",
]
