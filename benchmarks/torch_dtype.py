"""What the PyTorch adapter's float32/float64 choice costs: time per gradient, what the thread count does to the
bits, and whether training ends anywhere different.

    python benchmarks/torch_dtype.py --json benchmarks/results/torch_dtype.json

For the digits MLP and CNN (``examples/``, one worker's shard of 4, 360 rows): the best-of-5 time of a minibatch
gradient (32 rows) and of a full-shard gradient, with the model in float32 and in float64, one intra-op thread;
the part of it spent at the boundary (x float64 → model parameters, gradient → float64); whether a gradient
computed with 2 threads equals the one computed with 1 bit for bit; and the held-out accuracy along the same EF21
run (simulator, 4 workers; the configurations of ``torch_digits.py``: full gradients for the MLP, SGDM for the CNN)
in each dtype.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import base_parser, best_time, print_table, write_json  # noqa: E402
from digits_runs import EXAMPLES  # noqa: E402


def main() -> int:
    ap = base_parser(__doc__)
    ap.add_argument("--rounds", type=int, default=600, help="rounds of the EF21 run in each dtype")
    ns = ap.parse_args()
    try:
        import torch
    except ImportError:
        print("torch_dtype: skipped: PyTorch is not installed (pip install torch==2.13.0)")
        return 0
    from ef21.engine.config import RunConfig
    from ef21.engine.simulate import simulate
    from ef21.problems.plugins import build_objective

    rounds = 5 if ns.smoke else ns.rounds
    number = 2 if ns.smoke else 20
    results, rows = [], []
    for model in ("mlp", "cnn"):
        spec = f"{EXAMPLES[model]}:make"
        k = {"mlp": 96, "cnn": 38}[model]
        for dtype in ("float32", "float64"):
            obj = build_objective(spec, (("dtype", dtype),), 0, 4, 0).inner
            x = obj.x0() + 0.01 * np.random.default_rng(1).standard_normal(obj.d)
            rows32 = np.sort(np.random.default_rng(2).choice(obj.n_samples, 32, replace=False))
            torch.set_num_threads(1)
            t_batch = best_time(lambda: obj.grad_batch(x, rows32), number)
            t_full = best_time(lambda: obj.value_and_grad(x), number)
            flat = torch.zeros(obj.d, dtype=obj._dtype)
            t_edge = best_time(lambda: (obj._load(x), flat.to(torch.float64).numpy()), number * 10)
            g1 = obj.value_and_grad(x)[1]
            torch.set_num_threads(2)
            g2 = obj.value_and_grad(x)[1]
            torch.set_num_threads(1)
            est = {"mlp": {}, "cnn": {"estimator": "sgdm", "batch_size": 32, "sgdm_eta": 0.1}}[model]
            cfg = RunConfig(objective=spec, objective_args=(("dtype", dtype),), workers=4, method="ef21", k=k,
                            stepsize=0.5, rounds=rounds, **est)
            recs = [r for r in simulate(cfg, eval_every=max(1, rounds // 6)).records if r.metrics]
            rec = recs[-1]
            r = {"model": model, "dtype": dtype, "d": obj.d, "batch_ms": 1e3 * t_batch, "full_ms": 1e3 * t_full,
                 "boundary_us": 1e6 * t_edge, "threads_1_vs_2_equal": bool(np.array_equal(g1, g2)),
                 "max_diff_1_vs_2": float(np.abs(g1 - g2).max()), "ef21_rounds": rounds,
                 "test_acc": rec.metrics["test_acc"], "train_loss": rec.f,
                 "acc_curve": [(r.round, r.metrics["test_acc"]) for r in recs]}
            results.append(r)
            rows.append([model, dtype, obj.d, f"{r['batch_ms']:.3f}", f"{r['full_ms']:.3f}",
                         f"{r['boundary_us']:.1f}", "yes" if r["threads_1_vs_2_equal"] else
                         f"no ({r['max_diff_1_vs_2']:.1e})",
                         " ".join(f"{100 * a:.1f}" for _, a in r["acc_curve"][1:]), f"{r['train_loss']:.4g}"])
    print_table(["model", "dtype", "d", "grad b32 ms", "grad full ms", "boundary µs", "1 thread == 2 threads",
                 f"held-out % every {max(1, rounds // 6)} rounds", "final train loss"], rows)
    write_json(ns.json, "torch_dtype", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
