"""ef21 core: the EF21 method family over numpy, and a single-process simulator.

The rooms, from the bottom up (each subpackage's docstring says what lives there and what it may import):

- ``ef21.errors``: ``UserError``, the one-line error every room raises for bad input.
- ``ef21.compression``: sparse vectors, the compressors, the codec.
- ``ef21.methods``: the rules (GD, DCGD, EF, EF21, EF21+), estimators, extensions, stepsizes.
- ``ef21.problems``: objectives, data and sharding, user plugins, the PyTorch adapter (beside the methods).
- ``ef21.engine``: the run configuration, the worker and master nodes, the plan, the simulator.
- ``ef21.cli``: the command line's flags, config files, progress, plots and log.
- ``ef21.experiments``: ``ef21 experiment``, the paper's figures from versioned definitions.

It imports no gRPC and no protobuf (the wire format is ``ef21_wire``, the service ``ef21_server`` and
``ef21_worker``), so everything here can be tested and simulated in one process. The names below are the library's
public entry points; they load on first use, so ``import ef21`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["RunConfig", "UserError", "build_problem", "simulate", "__version__"]

_PUBLIC = {
    "RunConfig": "ef21.engine.config",
    "simulate": "ef21.engine.simulate",
    "build_problem": "ef21.problems.problem",
    "UserError": "ef21.errors",
}

if TYPE_CHECKING:
    from ef21.engine.config import RunConfig
    from ef21.engine.simulate import simulate
    from ef21.errors import UserError
    from ef21.problems.problem import build_problem


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'ef21' has no attribute {name!r}")
