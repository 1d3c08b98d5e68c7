"""What the compact encoding does to convergence: float32 values on the uplink, measured against plain float64.

The compact encoding rounds each worker's message to float32 and the worker keeps the rounded values in its
state, so EF21's feedback treats the rounding as part of the compression error and absorbs it: ‖∇f‖² keeps
falling as with float64. GD has no such feedback: its rounded gradients leave an error of ~2⁻²⁴·‖∇f_i‖ in every
round, and ‖∇f‖² stops there. Run with the simulator (the networked service gives the same iterates bit for bit:
tests/test_service.py::test_compact_encoding_run_equals_simulate); the bytes per entry come from benchmarks/wire.py.

    python benchmarks/compact.py [--smoke] [--json out.json] [--plot compact.png]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_parser, print_table, write_json  # noqa: E402

from ef21.engine.config import RunConfig  # noqa: E402
from ef21.engine.simulate import simulate  # noqa: E402

THRESHOLDS = (1e-7, 1e-12, 1e-17, 1e-20)


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--plot", type=Path, default=Path("benchmarks/results/compact.png"))
    args = ap.parse_args()
    workers = 4 if args.smoke else 20  # 20: the paper's mushrooms setting (method doc §8)
    runs = [
        ("gd", dict(method="gd", stepsize_mult=4.0), 60 if args.smoke else 1500),
        ("ef21 top-2 256x", dict(method="ef21", k=2, stepsize_mult=256.0), 100 if args.smoke else 3100),
    ]
    rows, results, curves = [], [], {}
    for label, kw, rounds in runs:
        for enc in ("plain", "compact"):
            cfg = RunConfig(workers=workers, x0="normal:0", rounds=rounds, encoding=enc, tol=1e-24, **kw)
            t0 = time.perf_counter()
            res = simulate(cfg)
            gn = [(r.round, r.grad_norm_sq) for r in res.records]
            first = {th: next((t for t, g in gn if g < th), None) for th in THRESHOLDS}
            best = min(g for _, g in gn)
            curves[f"{label}, {enc}"] = gn
            rows.append([label, enc, *(("-" if first[th] is None else first[th]) for th in THRESHOLDS), best,
                         gn[-1][0]])
            results.append({"run": label, "encoding": enc, "workers": workers, "rounds_run": gn[-1][0],
                            "first_round_below": {str(th): first[th] for th in THRESHOLDS}, "min_grad_norm_sq": best,
                            "seconds": time.perf_counter() - t0})
            print(f"  {label} {enc}: min |grad f|^2 {best:.3g}", flush=True)
    print(f"\nmushrooms, n = {workers}: first round with |grad f|^2 below each threshold ('-': never)")
    print_table(["run", "encoding", *(f"< {th:g}" for th in THRESHOLDS), "min |grad f|^2", "rounds"], rows)
    if not args.smoke:
        _plot(curves, args.plot)
    write_json(args.json, "compact", results)


def _plot(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, gn in curves.items():
        ax.semilogy([t for t, _ in gn], [g for _, g in gn], label=name, ls="--" if "compact" in name else "-")
    ax.set_xlabel("round")
    ax.set_ylabel(r"$\|\nabla f(x^t)\|^2$")
    ax.set_title("float32 uplink (compact) vs float64 (plain), mushrooms")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
