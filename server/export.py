"""``ef21 export RUN``: the trained model of a run as a PyTorch state dict, from the master's checkpoint.

The master imports no user code, so everything comes from the checkpoint: the model's layout (the names, shapes
and dtypes its workers reported at set-up), x (the trainable parameters) and the replicated buffers b (BatchNorm's
running statistics, frozen parameters). Parameters are written in the model's own dtype — a float32 model gets x
rounded to float32, the values its workers computed with — and buffers in theirs. Loading it back:

    model.load_state_dict(safetensors.torch.load_file("run.safetensors"))
    model.load_state_dict(torch.load("run.pt"))

safetensors (the format of choice: no pickle, so loading it runs no code) is written with its numpy API, which
needs no torch; ``--format pt`` needs torch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from ef21.errors import UserError
from ef21.problems.layout import ModelLayout

from . import checkpoint

FORMATS = ("safetensors", "pt")


def state_dict_arrays(ckpt: checkpoint.Checkpoint, source: Path) -> dict[str, np.ndarray]:
    """The model's state dict as numpy arrays, keys in the model's own order."""
    text = ckpt.meta.get("layout")
    if not text:
        objective = ckpt.meta.get("config", {}).get("objective") or ckpt.meta.get("config", {}).get("problem")
        raise UserError(f"checkpoint {source} holds no model: its objective ({objective}) reported no tensors; "
                        f"ef21 export writes a PyTorch model's state dict (ef21.problems.torch)")
    try:
        layout = ModelLayout.from_json(text, f"checkpoint {source}")
    except ValueError as exc:
        raise UserError(str(exc)) from None
    b = ckpt.extra.get(checkpoint.STATE_PREFIX + "buffers", np.zeros(0))
    if ckpt.x.shape != (layout.d,) or b.shape != (layout.buffer_size,):
        raise UserError(f"checkpoint {source}: x has {ckpt.x.shape[0]} entries and the buffers {b.shape[0]}, but the "
                        f"model's layout holds {layout.d} and {layout.buffer_size}")
    tensors: dict[str, np.ndarray] = {}
    for specs, flat in ((layout.params, ckpt.x), (layout.buffers, b)):
        offset = 0
        for t in specs:
            part = flat[offset:offset + t.size]
            if t.dtype not in ("float32", "float64", "float16"):
                part = np.rint(part)
            tensors[t.name] = part.astype(t.dtype).reshape(t.shape)
            offset += t.size
    keys = layout.keys or tuple((name, name) for name in tensors)
    # A tied weight is one tensor under two keys: each key gets its own array, as torch.save would write it.
    return {key: tensors[name].copy() for key, name in keys}


def export(source: Path, fmt: str, out: Path) -> tuple[int, int]:
    """Write the model of the run checkpointed at ``source``; returns (tensors, bytes written)."""
    ckpt, used, warning = checkpoint.load_latest(source)
    if warning:
        print(f"ef21 export: warning: {warning}", file=sys.stderr)
    arrays = state_dict_arrays(ckpt, used)
    meta = {"format": "pt", "ef21_run": str(ckpt.meta.get("run_id", "")), "ef21_round": str(ckpt.meta.get("round"))}
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        try:
            from safetensors.numpy import save_file
        except ImportError:
            raise UserError("--format safetensors needs the safetensors package: pip install safetensors "
                            "(it is in the [torch] extra)") from None
        save_file(arrays, str(out), metadata=meta)
    else:
        from ef21.problems.torch import require_torch

        torch = require_torch()
        torch.save({k: torch.from_numpy(a) for k, a in arrays.items()}, out)
    return len(arrays), out.stat().st_size


def cmd_export(ns: argparse.Namespace) -> int:
    if ns.format not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {ns.format!r}")
    out = ns.output or ns.run.with_suffix(f".{ns.format}")
    try:
        count, size = export(ns.run, ns.format, out)
    except OSError as exc:
        raise UserError(f"cannot write {out}: {exc.strerror or exc}") from None
    print(f"wrote {out}: {count} tensors, {size} bytes ({ns.format})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("export", help="write a run's trained model as a PyTorch state dict (from its checkpoint)")
    e.add_argument("run", type=Path, metavar="RUN", help="the run's checkpoint (the master's --checkpoint PATH)")
    e.add_argument("--format", default="safetensors", choices=FORMATS,
                   help="safetensors (default; no pickle) or pt (torch.save)")
    e.add_argument("-o", "--output", type=Path, default=None, help="default: RUN with the format's suffix")
    e.set_defaults(func=cmd_export)
