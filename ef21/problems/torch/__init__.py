"""A PyTorch model, its loss and its data as an ef21 objective (``pip install -e '.[torch]'``).

May import: torch (lazily: ``import ef21.problems.torch`` works without it and ``require_torch`` says how to get
it), numpy, ``ef21.errors``, ``ef21.compression`` (``ops``: the method vectors as tensors) and
``ef21.problems.layout``.
"""

from .objective import TorchObjective, require_torch, seeded

__all__ = ["TorchObjective", "require_torch", "seeded"]
