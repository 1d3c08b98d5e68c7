"""Why the race's ResNet gives DDP dense and ef21 dense different steps to the target: the two drift apart from
float32 rounding, and the recipe's steps-to-target moves that much from one seed to the next.

The race (``vs_powersgd.py``) trains the same model, shards, initial weights, minibatches and augmentation draws
with dense DDP and with ``ef21 --method gd --estimator sgd``. Two things still differ by design: DDP averages the
ranks' float32 gradients in float32, in Gloo's ring order, and ef21 adds them in float64 in rank order; and both
read accuracy off a 360-image held-out set every 20 steps. This script measures what that does:

* drift — DDP dense and ``ef21 simulate`` dense over the first steps of the recipe, at n = 2 and n = 4, the
  held-out loss at every evaluation and its relative difference (0 while the two agree to the bit);
* spread — both, over the race's 600 steps, for several ``--seed`` values (other initial weights and draws), and
  the step at which each first reaches the race's target accuracy.

    python benchmarks/race_drift.py [--smoke] [--json out.json] [--seeds 0 1 2] [--target 0.9872]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_parser, load_average, print_table, write_json  # noqa: E402
from ddp_runs import ROOT, Contender, run_ddp  # noqa: E402

MODULE = "examples/digits_resnet.py"
RECIPE = "--optimizer sgd --momentum 0.9 --nesterov --weight-decay 5e-4 --stepsize 0.05 --lr-schedule cosine"


def recipe(warmup: int, horizon: int) -> str:
    """The race's ResNet recipe (``vs_powersgd.py``'s bn-cnn): Nesterov SGD, warm-up, then cosine to ``horizon``."""
    return f"{RECIPE} --warmup {warmup} --decay-rounds {horizon}"


def ddp_curve(n: int, seed: int, steps: int, every: int, args: list[str], batch: int, optim: str, horizon: int,
              tmp: Path) -> dict[int, tuple[float, float]]:
    """Held-out (loss, accuracy) at every evaluation step of dense DDP over ``n`` Gloo ranks on loopback."""
    r = run_ddp(MODULE, args, [(Contender("DDP dense"), steps, every)], n, stepsize=0.0, batch_size=batch,
                tmp=tmp / f"ddp-{n}-{seed}", seed=seed, optim=optim, horizon=horizon)[0]
    return {t: (loss, acc) for t, loss, acc in zip(r.rounds, r.loss, r.acc)}


def ef21_curve(n: int, seed: int, steps: int, every: int, args: list[str], batch: int, optim: str,
               tmp: Path) -> dict[int, tuple[float, float]]:
    """The same with ``ef21 simulate --method gd --estimator sgd`` (the race's ef21 dense contender)."""
    log = tmp / f"ef21-{n}-{seed}.jsonl"
    subprocess.run([sys.executable, "-m", "ef21", "simulate", "--workers", str(n), "--objective", f"{MODULE}:make",
                    *[a for kv in args for a in ("--objective-arg", kv)], "--method", "gd", "--estimator", "sgd",
                    "--batch-size", str(batch), *optim.split(), "--seed", str(seed), "--rounds", str(steps),
                    "--eval-every", str(every), "--log", str(log), "-q"], check=True, cwd=ROOT, capture_output=True)
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    return {r["round"]: (r["metrics"]["test_loss"], r["metrics"]["test_acc"]) for r in recs if r.get("metrics")}


def first_reaching(curve: dict[int, tuple[float, float]], target: float) -> int | None:
    return next((t for t in sorted(curve) if curve[t][1] >= target), None)


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--target", type=float, default=0.9872,
                    help="accuracy to reach (the race's phase 4: dense DDP's best 99.72 %% less one point)")
    args = ap.parse_args()
    smoke = args.smoke
    model = ["channels=2", "rows=12"] if smoke else ["channels=8"]
    batch = 4 if smoke else 32
    drift_steps, drift_every = (4, 2) if smoke else (60, 5)
    steps, every, warmup = (6, 3, 1) if smoke else (600, 20, 20)
    seeds = args.seeds[:1] if smoke else args.seeds
    load_before = load_average()
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="race_drift-"))

    optim = recipe(warmup, steps)
    drift, rows = [], []
    for n in (2,) if smoke else (2, 4):
        ddp = ddp_curve(n, 0, drift_steps, drift_every, model, batch, optim, steps, tmp)
        ours = ef21_curve(n, 0, drift_steps, drift_every, model, batch, optim, tmp)
        for t in sorted(ddp):
            a, b = ddp[t][0], ours[t][0]
            rel = abs(a - b) / abs(a)
            drift.append({"n": n, "step": t, "ddp_loss": a, "ef21_loss": b, "rel_diff": rel})
            rows.append([n, t, f"{a:.9f}", f"{b:.9f}", "equal" if rel == 0 else f"{rel:.1e}"])
        print(f"drift n={n}: {time.perf_counter() - t0:.0f} s", flush=True)
    print("\nDrift: held-out loss, DDP dense (float32 all-reduce) against ef21 dense (float64 sum), seed 0")
    print_table(["n", "step", "DDP dense", "ef21 dense", "relative difference"], rows)

    spread, rows = [], []
    n = 2 if smoke else 4
    for seed in seeds:
        ddp = ddp_curve(n, seed, steps, every, model, batch, optim, steps, tmp)
        ours = ef21_curve(n, seed, steps, every, model, batch, optim, tmp)
        r = {"seed": seed, "ddp_steps_to_target": first_reaching(ddp, args.target),
             "ef21_steps_to_target": first_reaching(ours, args.target),
             "ddp_best_acc": max(v[1] for v in ddp.values()), "ef21_best_acc": max(v[1] for v in ours.values()),
             "ddp_final_acc": ddp[max(ddp)][1], "ef21_final_acc": ours[max(ours)][1]}
        spread.append(r)
        rows.append([seed, r["ddp_steps_to_target"], r["ef21_steps_to_target"], r["ddp_best_acc"], r["ef21_best_acc"],
                     r["ddp_final_acc"], r["ef21_final_acc"]])
        print(f"spread seed={seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"\nSpread: steps to {args.target:.2%} held-out accuracy (evaluated every {every} steps), n = {n}, by seed")
    print_table(["seed", "DDP dense", "ef21 dense", "DDP best", "ef21 best", "DDP final", "ef21 final"], rows)

    if args.json:
        write_json(args.json, "race_drift", [{"section": "drift", **d} for d in drift] +
                   [{"section": "spread", **s} for s in spread],
                   target=args.target, model=model, batch_size=batch, steps=steps, eval_every=every,
                   load_before=load_before, load_after=load_average(), seconds=time.perf_counter() - t0)


if __name__ == "__main__":
    main()
