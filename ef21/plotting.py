"""Convergence plots: ‖∇f‖² (log scale) against bits per worker, rounds, wire bytes or time."""

from __future__ import annotations

from pathlib import Path

from .errors import UserError
from .runlog import ensure_parent, read_jsonl

X_AXES = {
    "bits": ("bits_per_worker", "bits per worker (32 per value, paper convention)"),
    "payload": ("payload_bits_per_worker", "payload bits per worker (values + indices)"),
    "rounds": ("round", "round"),
    "time": ("elapsed_s", "wall time (s)"),
    "wire": ("wire_bytes_up", "uplink wire bytes (all workers)"),
}


def plot_logs(logs: list[Path], out: Path, *, x_axis: str = "bits", labels: list[str] | None = None,
              title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, xlabel = X_AXES[x_axis]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, path in enumerate(logs):
        rows = [r for r in read_jsonl(path) if r.get(key) is not None and r.get("grad_norm_sq") is not None]
        if not rows:
            raise UserError(f"{path}: no rounds with both {key!r} and 'grad_norm_sq'")
        label = labels[i] if labels and i < len(labels) else Path(path).stem
        ax.semilogy([r[key] for r in rows], [max(r["grad_norm_sq"], 1e-300) for r in rows], label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(r"$\|\nabla f(x^t)\|^2$")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    try:
        fig.savefig(ensure_parent(out, "plot"))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot write plot {out}: {exc}") from None
    finally:
        plt.close(fig)
