"""Convergence plots: ‖∇f‖² (log scale) against bits per worker, rounds, wire bytes or time."""

from __future__ import annotations

from pathlib import Path

from ef21.errors import UserError

from .runlog import ensure_parent, read_jsonl

X_AXES = {
    "bits": ("bits_per_worker", "uplink bits per worker (32 per value, paper convention)"),
    "bits-both": ("bits_both", "uplink + downlink bits per worker (32 per value)"),
    "payload": ("payload_bits_per_worker", "payload bits per worker (values + indices)"),
    "rounds": ("round", "round"),
    "time": ("elapsed_s", "wall time (s)"),
    "wire": ("wire_bytes_up", "uplink wire bytes (all workers)"),
    "wire-both": ("wire_both", "uplink + downlink wire bytes (all workers)"),
}
Y_AXES = {
    "grad": ("grad_norm_sq", r"$\|\nabla f(x^t)\|^2$", True),
    "gradmap": ("grad_map_norm_sq", r"$\|G_\gamma(x^t)\|^2$ (gradient mapping)", True),
    "f": ("f", r"$f(x^t)$", False),
}


def _derived(r: dict) -> dict:
    if r.get("bits_down_per_worker") is not None:
        r["bits_both"] = r["bits_per_worker"] + r["bits_down_per_worker"]
    if r.get("wire_bytes_up") is not None and r.get("wire_bytes_down") is not None:
        r["wire_both"] = r["wire_bytes_up"] + r["wire_bytes_down"]
    for name, value in (r.get("metrics") or {}).items():
        r[f"metric:{name}"] = value
    return r


def plot_logs(logs: list[Path], out: Path, *, x_axis: str = "bits", y_axis: str = "grad",
              labels: list[str] | None = None, title: str | None = None) -> None:
    """``y_axis``: grad (‖∇f‖²), gradmap (EF21-Prox's ‖G_γ‖²), f, or metric:NAME (a plugin's metric)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, xlabel = X_AXES[x_axis]
    if y_axis.startswith("metric:"):
        ykey, ylabel, log_y = y_axis, y_axis.split(":", 1)[1], False
    elif y_axis in Y_AXES:
        ykey, ylabel, log_y = Y_AXES[y_axis]
    else:
        raise UserError(f"--y must be one of {', '.join(Y_AXES)} or metric:NAME, got {y_axis!r}")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, path in enumerate(logs):
        rows = [r for r in map(_derived, read_jsonl(path)) if r.get(key) is not None and r.get(ykey) is not None]
        if not rows:
            raise UserError(f"{path}: no rounds with both {key!r} and {ykey!r}")
        label = labels[i] if labels and i < len(labels) else Path(path).stem
        ys = [max(r[ykey], 1e-300) if log_y else r[ykey] for r in rows]
        (ax.semilogy if log_y else ax.plot)([r[key] for r in rows], ys, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
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
