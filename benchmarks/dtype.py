"""What ``--dtype float32`` does to convergence: the same EF21 run in float64 and in float32 (x, g and every g_i
rounded at every step), side by side.

    python benchmarks/dtype.py --json benchmarks/results/dtype.json --plot benchmarks/results/dtype.png

Problems (shipped data only): the paper's logistic regression with the nonconvex regulariser on mushrooms
(n = 20, 2000 rounds of Top-1 at the theory stepsize × 16 and of Top-8 × 64), and the digits MLP
(``examples/digits_mlp.py``, n = 4, Top-96, γ = 0.5, full gradients, 300 rounds). For each: ‖∇f(x^t)‖² along the
run (the log's, from the workers' gradients in the run's dtype), the final f and ‖∇f‖² evaluated again in float64 at the final iterate, the relative distance
‖x₃₂ − x₆₄‖/‖x₆₄‖ of the two final iterates, the MLP's held-out accuracy, and the simulator's seconds a round.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import base_parser, print_table, save_figure, thin, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def cases(smoke: bool) -> list[tuple[str, dict, int]]:
    """(name, RunConfig's settings, rounds); the MLP only where PyTorch is installed."""
    mlp = [("digits MLP top-96", dict(objective=str(ROOT / "examples" / "digits_mlp.py") + ":make", workers=4,
                                      k=96, stepsize=0.5, eval_grad=True), 5 if smoke else 300)]
    try:
        import torch  # noqa: F401
    except ImportError:
        print("dtype: the digits MLP is left out: PyTorch is not installed (pip install torch==2.13.0)")
        mlp = []
    if smoke:
        return [("mushrooms top-1", dict(workers=20, k=1, stepsize_mult=16.0), 20), *mlp]
    return [("mushrooms top-1 x16", dict(workers=20, k=1, stepsize_mult=16.0), 2000),
            ("mushrooms top-8 x64", dict(workers=20, k=8, stepsize_mult=64.0), 2000), *mlp]


def final_figures(cfg: object, x: np.ndarray) -> tuple[float, float]:
    """f and ‖∇f‖² at x (widened), in float64: the same yardstick for both dtypes."""
    from ef21.problems.problem import build_problem

    p = build_problem(cfg)  # type: ignore[arg-type]
    x64 = x.astype(np.float64)
    vg = [o.value_and_grad(x64) for o in p.objectives]
    grad = np.mean([g for _, g in vg], axis=0)
    return float(np.mean([f for f, _ in vg])), float(grad @ grad)


def main() -> int:
    ap = base_parser(__doc__)
    ap.add_argument("--plot", type=Path, default=None, help="write the figure (PNG) here")
    ns = ap.parse_args()
    from ef21.engine.config import RunConfig
    from ef21.engine.simulate import simulate

    results, rows, curves = [], [], {}
    for name, kw, rounds in cases(ns.smoke):
        every = max(1, rounds // 100)
        finals: dict[str, np.ndarray] = {}
        for dtype in ("float64", "float32"):
            cfg = RunConfig(rounds=rounds, dtype=dtype, **kw)
            t0 = time.perf_counter()
            run = simulate(cfg, eval_every=every)
            secs = (time.perf_counter() - t0) / (rounds + 1)
            recs = [r for r in run.records if r.grad_norm_sq is not None or r.metrics]
            f, gn = final_figures(cfg, run.x)
            finals[dtype] = run.x
            acc = recs[-1].metrics.get("test_acc") if recs[-1].metrics else None
            curve = [(r.round, r.grad_norm_sq) for r in recs if r.grad_norm_sq is not None]
            curves[(name, dtype)] = curve
            res = {"problem": name, "dtype": dtype, "rounds": rounds, "x_dtype": str(run.x.dtype),
                   "final_f": f, "final_grad_norm_sq": gn, "test_acc": acc, "s_per_round": secs,
                   "min_logged_grad_norm_sq": min((g for _, g in curve), default=None),
                   "curve": [curve[i] for i in thin(curve)]}
            results.append(res)
            print(f"  {name} {dtype}: final |grad f|^2 {gn:.4e}, {1e3 * secs:.1f} ms a round", flush=True)
        gap = float(np.linalg.norm(finals["float32"].astype(np.float64) - finals["float64"])
                    / np.linalg.norm(finals["float64"]))
        for res in results[-2:]:
            res["x_rel_gap"] = gap
            rows.append([name, res["dtype"], rounds, f"{res['final_f']:.9g}", f"{res['final_grad_norm_sq']:.4e}",
                         "" if res["test_acc"] is None else f"{100 * res['test_acc']:.1f}",
                         f"{gap:.1e}", f"{1e3 * res['s_per_round']:.2f}"])
    print_table(["problem", "dtype", "rounds", "final f", "final |grad f|^2 (float64)", "held-out %",
                 "|x32 - x64|/|x64|", "ms/round (simulator)"], rows)
    write_json(ns.json, "dtype", results)
    if ns.plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(dict.fromkeys(n for n, _ in curves))
        fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4))
        for ax, name in zip(np.atleast_1d(axes), names):
            for dtype, style in (("float64", "-"), ("float32", "--")):
                c = curves[(name, dtype)]
                ax.semilogy([t for t, _ in c], [g for _, g in c], style, label=dtype)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("round")
            ax.set_ylabel("‖∇f(x^t)‖²")
            ax.legend(fontsize=8)
        fig.tight_layout()
        save_figure(fig, ns.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
