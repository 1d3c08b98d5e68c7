"""A PyTorch model, its loss and its data as an ef21 objective (``pip install -e '.[torch]'``).

May import: torch (lazily: ``import ef21.problems.torch`` works without it and ``require_torch`` says how to get
it), numpy and ``ef21.errors``.
"""

from .objective import TorchObjective, require_torch, seeded

__all__ = ["TorchObjective", "require_torch", "seeded"]
