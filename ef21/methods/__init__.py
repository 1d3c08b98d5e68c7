"""The method family. Each method is a small object with a worker side and a master side (see ``base``)."""

from __future__ import annotations

from ..errors import UserError
from ..replica import Replica
from .base import Downlink, InitMode, Message, Method, WorkerContext
from .dcgd import DCGD
from .ef import EF
from .ef21 import EF21
from .ef21plus import EF21Plus
from .gd import GD

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
