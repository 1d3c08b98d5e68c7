"""Training recipes in train mode through ef21 against the same recipe without compression: the ResNet of
``examples/digits_resnet.py`` (BatchNorm, dropout, augmentation; SGD with Nesterov momentum, weight decay, warm-up
and cosine) and the transformer language model of ``examples/stdlib_lm.py`` (dropout; AdamW, clipping, warm-up
and cosine).

    python benchmarks/torch_recipes.py --json benchmarks/results/torch_recipes.json \\
        --plot benchmarks/results/torch_recipes.png

For each: ``ef21 run --workers 4`` (a master and 4 worker processes on loopback) with EF21, layer-wise Top-k and
the optimizer on the master, and the dense recipe — a plain single-process PyTorch loop (``torch.optim``, its
``lr_scheduler``, ``clip_grad_norm_``) over the union of the workers' shards: at step t it trains on the union of
the rows the workers draw at round t (the same rows: drawn from (seed, rank, t)), so it sees the same data, the
same number of steps and the same initial weights, with no compression. Both are evaluated with the same code on
the same held-out set. The EF21 run's model is exported (``ef21 export``) and loaded into a fresh ``nn.Module`` for
its final figures (and, for the language model, a generated sample), so what is reported is what a user gets.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import base_parser, print_table, save_figure, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# The recipes. ``optim``: shared by the dense loop and ef21 (the master's optimizer); ``ef21``: what compresses.
# Stepsizes and schedules were chosen on the dense recipe (the usual values for these models), then used as they
# are for EF21: nothing is tuned for the compressed run.
RECIPES: dict[str, dict[str, Any]] = {
    "resnet": dict(
        example="digits_resnet.py", options=[], workers=4, rounds=600, eval_every=50, metric="test_acc",
        # The margin: EF21's final held-out accuracy at most one point below the dense loop's (as in
        # torch_digits.py: 3.6 of the 360 held-out images).
        margin=0.01,
        optim="--estimator sgd --batch-size 32 --optimizer sgd --momentum 0.9 --nesterov --weight-decay 5e-4 "
              "--stepsize 0.05 --lr-schedule cosine --warmup 30",
        ef21="--k-per-tensor 0.1 --k-floor 4 --encoding compact",
        smoke=dict(options=["channels=4", "rows=24"], workers=2, rounds=6, eval_every=3),
    ),
    "lm": dict(
        example="stdlib_lm.py", options=[], workers=4, rounds=1500, eval_every=150, metric="test_loss",
        # The margin: EF21's final held-out loss at most 0.05 nats per character above the dense loop's
        # (its perplexity at most 5 % higher).
        margin=0.05,
        optim="--estimator sgd --batch-size 8 --optimizer adamw --weight-decay 0.1 --clip-norm 1.0 "
              "--stepsize 1e-3 --lr-schedule cosine --warmup 100 --min-lr 1e-4",
        # AdamW needs milder compression than SGD on EF21's aggregate (docs/benchmarks/pytorch.md): 10 % per tensor
        # ends 0.35 nats above the dense loop, 5 % stalls at the unigram level, 25 % ends 0.056 above.
        ef21="--k-per-tensor 0.25 --k-floor 4 --encoding compact",
        smoke=dict(options=["width=16", "layers=1", "heads=2", "context=16", "train_kb=8", "test_kb=2"], workers=2,
                   rounds=6, eval_every=3),
    ),
}


def load_example(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"example_{Path(name).stem}", ROOT / "examples" / name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def config_of(flags: list[str]) -> Any:
    from ef21.cli.args import config_from_args
    from ef21.cli.commands import simulate_parser

    return config_from_args(simulate_parser().parse_args(flags))


def torch_optimizer(model: Any, cfg: Any) -> tuple[Any, Any]:
    """``cfg``'s optimizer and schedule as torch's own classes (what the dense recipe would be written with)."""
    import torch
    from torch.optim import lr_scheduler as ls

    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.stepsize, momentum=cfg.momentum, nesterov=cfg.nesterov,
                              weight_decay=cfg.weight_decay)
    else:
        cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        opt = cls(params, lr=cfg.stepsize, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)
    w = cfg.warmup
    ramp = ls.LinearLR(opt, start_factor=1 / (w + 1), end_factor=1.0, total_iters=w) if w else None
    if cfg.lr_schedule == "constant":
        return opt, ramp
    horizon = cfg.decay_rounds if cfg.decay_rounds is not None else cfg.rounds
    cos = ls.CosineAnnealingLR(opt, T_max=horizon - w, eta_min=cfg.min_lr)
    return opt, cos if ramp is None else ls.SequentialLR(opt, [ramp, cos], milestones=[w])


def flat_state(model: Any, obj: Any) -> tuple[np.ndarray, np.ndarray]:
    """x and b of a plain model, in the order of an objective of the same architecture (to evaluate it there)."""
    import torch

    x = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad]).double().numpy()
    sd = model.state_dict()
    parts = [sd[t.name].reshape(-1).double().numpy() for t in obj.layout().buffers]
    return x, (np.concatenate(parts) if parts else np.zeros(0))


def evaluate(obj: Any, model: Any) -> dict[str, float]:
    x, b = flat_state(model, obj)
    obj.begin_round((0, 0, 0), b if len(b) else None)
    return obj.metrics(x)


def dense_recipe(recipe: dict[str, Any], options: list[str], workers: int, rounds: int, eval_every: int,
                 seed: int = 0) -> dict[str, Any]:
    """The recipe without compression: one process, the union of the workers' minibatches at every step."""
    import torch

    from ef21.methods.estimators import batch_rng, draw_batch
    from ef21.problems.plugins import build_objective
    from ef21.problems.torch import seeded

    module = load_example(recipe["example"])
    cfg = config_of([*recipe["optim"].split(), "--rounds", str(rounds)])
    opts = dict(kv.split("=", 1) for kv in options)
    spec = f"{ROOT / 'examples' / recipe['example']}:make"
    objs = [build_objective(spec, tuple(opts.items()), r, workers, seed).inner for r in range(workers)]
    model = seeded(seed, lambda: module.build(opts))
    opt, sched = torch_optimizer(model, cfg)
    loss_fn = objs[0].loss
    curve: dict[str, list[float]] = {"rounds": [], "metric": []}
    t0 = time.perf_counter()
    for t in range(rounds + 1):
        if t % eval_every == 0 or t == rounds:
            m = evaluate(objs[0], model)
            curve["rounds"].append(t)
            curve["metric"].append(m[recipe["metric"]])
        if t == rounds:
            break
        torch.manual_seed(seed * 1_000_003 + t)  # this loop's own augmentation and dropout draws
        batches = [o.data.batch(draw_batch(batch_rng(seed, r, t), o.n_samples, cfg.batch_size))
                   for r, o in enumerate(objs)]
        inputs = torch.cat([b[0] for b in batches])
        targets = torch.cat([b[1] for b in batches])
        model.train()
        loss = loss_fn(model(inputs), targets)
        opt.zero_grad()
        loss.backward()
        if cfg.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
        opt.step()
        if sched is not None:
            sched.step()
    final = evaluate(objs[0], model)
    return {"curve": curve, "final": final, "seconds": time.perf_counter() - t0, "d": objs[0].d,
            "buffers": objs[0].layout().buffer_size}


def ef21_recipe(recipe: dict[str, Any], options: list[str], workers: int, rounds: int, eval_every: int,
                work: Path, via: str) -> dict[str, Any]:
    """The recipe through ef21 (``ef21 run``, or ``ef21 simulate``: the same bits, no wire), its model exported and
    evaluated in a fresh module."""
    work.mkdir(parents=True, exist_ok=True)
    name = Path(recipe["example"]).stem
    log, ckpt = work / f"{name}.jsonl", work / f"{name}.ckpt"
    for p in (log, ckpt, ckpt.with_name(ckpt.name + ".prev")):
        p.unlink(missing_ok=True)
    flags = ["--workers", str(workers), "--objective", f"examples/{recipe['example']}:make",
             *[a for kv in options for a in ("--objective-arg", kv)], *recipe["optim"].split(),
             *recipe["ef21"].split(), "--rounds", str(rounds), "--eval-every", str(eval_every)]
    shown = "ef21 run " + " ".join(flags)
    extra = ["--checkpoint", str(ckpt), "--status-port", "-1"] if via == "run" else ["--out", str(work / "x.npy")]
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "ef21", via, *flags, "--log", str(log), "-q", *extra],
                       capture_output=True, text=True, cwd=ROOT, timeout=7200)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{name}: ef21 {via} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    curve: dict[str, list[float]] = {"rounds": [], "metric": [], "wire_bytes": []}
    last: dict[str, float] = {}
    for line in log.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("metrics"):
            last = rec["metrics"]
            curve["rounds"].append(rec["round"])
            curve["metric"].append(last[recipe["metric"]])
            curve["wire_bytes"].append((rec.get("wire_bytes_up") or 0) + (rec.get("wire_bytes_down") or 0))
    out: dict[str, Any] = {"curve": curve, "seconds": seconds, "command": shown, "final": last}
    if via == "run":  # the round traffic as the master measured it, per worker and round
        end = json.loads(log.read_text().splitlines()[-1])
        out["update_bytes"] = end["wire_bytes_up"] / rounds / workers
        out["round_result_bytes"] = end["wire_bytes_down"] / rounds / workers
    if via == "run":
        exported = work / f"{name}.safetensors"
        subprocess.run([sys.executable, "-m", "ef21", "export", str(ckpt), "-o", str(exported)], check=True,
                       capture_output=True, cwd=ROOT)
        out.update(exported_model(recipe, options, exported))
    return out


def buffer_cost(size: int) -> int:
    """Bytes a model's buffer change adds to an Update (and to a RoundResult: the same field) when all ``size``
    entries changed, as BatchNorm's running statistics and counters do every round: a dense float64 vector."""
    from ef21.compression.codec import encode
    from ef21.compression.sparse import SparseVector
    from ef21_wire.fastwire import update_bytes

    vec = encode(SparseVector.zeros(1))
    with_buffers = update_bytes(1, vec, False, encode(SparseVector.dense(np.ones(size))))
    return len(with_buffers) - len(update_bytes(1, vec, False))


def exported_model(recipe: dict[str, Any], options: list[str], path: Path) -> dict[str, Any]:
    """The exported state dict in a fresh module: its held-out figures and (the language model) a sample."""
    import torch
    from safetensors.torch import load_file

    from ef21.problems.plugins import build_objective

    module = load_example(recipe["example"])
    opts = dict(kv.split("=", 1) for kv in options)
    model = module.build(opts)
    model.load_state_dict(load_file(str(path)))
    obj = build_objective(f"{ROOT / 'examples' / recipe['example']}:make", tuple(opts.items()), 0, 1, 0).inner
    out: dict[str, Any] = {"final": evaluate(obj, model)}
    if hasattr(module, "generate"):
        out["sample"] = module.generate(model, "def ", 240, seed=0)
    del torch
    return out


def met(metric: str, gap: float, margin: float) -> bool:
    """Whether EF21's final figure is within ``margin`` of the dense loop's (accuracy: not lower by more; loss: not
    higher by more)."""
    return -gap <= margin if metric == "test_acc" else gap <= margin


def plot(entries: list[dict[str, Any]], path: Path) -> None:
    """Both curves of every recipe, from the JSON's entries (so a rerun of one recipe redraws the others too)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(entries), figsize=(6.5 * len(entries), 4.2), squeeze=False)
    for ax, res in zip(axes[0], entries):
        name, metric = res["model"], res["metric"]
        scale = 100 if metric == "test_acc" else 1
        for label, key in (("dense recipe (one process, union of the shards)", "dense_curve"),
                           ("EF21 through ef21 run", "ef21_curve")):
            c = res[key]
            ax.plot(c["rounds"], [scale * v for v in c["metric"]], marker=".", label=label)
        ax.set_xlabel("round (= optimizer step)")
        ax.set_ylabel("held-out accuracy (%)" if metric == "test_acc" else "held-out loss (nats per character)")
        ax.set_title(f"{name}: d = {res['d']}, {res['ef21_flags']}", fontsize=9)
        if metric == "test_loss":
            ax.set_ylim(top=min(ax.get_ylim()[1], 3.5))
        else:
            ax.set_ylim(bottom=max(0, ax.get_ylim()[0], 50))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def main() -> int:
    ap = base_parser(__doc__)
    ap.add_argument("--model", action="append", choices=sorted(RECIPES), help="repeatable; default both")
    ap.add_argument("--via", choices=("run", "simulate"), default="run",
                    help="ef21 run (default: through the service, bytes measured) or ef21 simulate (same iterates)")
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--work-dir", type=Path, default=Path("runs/torch_recipes"))
    ap.add_argument("--update", action="store_true",
                    help="keep the other recipes' entries of an existing --json (to rerun one recipe) and plot all")
    ns = ap.parse_args()
    try:
        import torch  # noqa: F401
    except ImportError:
        print("torch_recipes: skipped: PyTorch is not installed (pip install torch==2.13.0)")
        return 0
    results: dict[str, dict[str, Any]] = {}
    rows = []
    for name in ns.model or sorted(RECIPES, reverse=True):
        recipe = RECIPES[name]
        if ns.smoke:  # tiny models and a few rounds; the warm-up must fit in them
            optim = re.sub(r"--warmup \d+", "--warmup 2", recipe["optim"])
            recipe = {**recipe, **recipe["smoke"], "optim": re.sub(r"--batch-size \d+", "--batch-size 8", optim)}
        size = recipe
        args = (size["options"], size["workers"], size["rounds"], size["eval_every"])
        dense = dense_recipe(recipe, *args)
        ef21 = ef21_recipe(recipe, *args, ns.work_dir, ns.via)
        metric = recipe["metric"]
        final_ef21 = ef21["final"]
        res = {"d": dense["d"], "buffers": dense["buffers"], "metric": metric, "dense": dense, "ef21": ef21,
               "ef21_flags": recipe["ef21"], "optim_flags": recipe["optim"], "workers": size["workers"],
               "rounds": size["rounds"], "final_dense": dense["final"], "final_ef21": final_ef21,
               "gap": final_ef21[metric] - dense["final"][metric], "margin": recipe["margin"],
               "dense_seconds": dense["seconds"], "ef21_seconds": ef21["seconds"]}
        res["margin_met"] = met(metric, res["gap"], recipe["margin"])
        if res["buffers"] and "update_bytes" in ef21:
            cost = buffer_cost(res["buffers"])
            res["buffer_bytes_per_message"] = cost
            res["buffer_share_of_update"] = cost / ef21["update_bytes"]
            res["buffer_share_of_round_result"] = cost / ef21["round_result_bytes"]
            print(f"{name}: the buffers' change ({res['buffers']} entries) adds {cost} B to every Update and "
                  f"RoundResult: {100 * res['buffer_share_of_update']:.1f} % of a measured Update "
                  f"({ef21['update_bytes']:.0f} B), {100 * res['buffer_share_of_round_result']:.1f} % of a "
                  f"RoundResult ({ef21['round_result_bytes']:.0f} B)", flush=True)
        results[name] = res
        unit = (lambda v: f"{100 * v:.1f} %") if metric == "test_acc" else (lambda v: f"{v:.3f}")
        rows.append([name, res["d"], size["rounds"], unit(dense["final"][metric]), unit(final_ef21[metric]),
                     f"{res['gap']:+.4f}", f"{recipe['margin']:g}: {'met' if res['margin_met'] else 'MISSED'}",
                     f"{math.exp(dense['final']['test_loss']):.2f} / {math.exp(final_ef21['test_loss']):.2f}",
                     f"{(ef21['curve']['wire_bytes'] or [0])[-1] / 1e6:.3g}", f"{dense['seconds']:.0f}",
                     f"{ef21['seconds']:.0f}"])
        print(f"{name}: dense {dense['final']} {dense['curve']}\n  ef21 {final_ef21} {ef21['curve']}", flush=True)
        if "sample" in ef21:
            print(f"{name} sample (EF21's exported model, prompt 'def '):\n{ef21['sample']}\n", flush=True)
    print_table(["model", "d", "rounds", "dense final", "EF21 final", "EF21 - dense", "margin", "ppl dense / EF21",
                 "EF21 MB (up+down)", "dense s", "EF21 s"], rows)
    entries = [
        {k: v for k, v in r.items() if k not in ("dense", "ef21")} | {
            "model": n, "dense_curve": r["dense"]["curve"], "ef21_curve": r["ef21"]["curve"],
            "command": r["ef21"]["command"], "sample": r["ef21"].get("sample")}
        for n, r in results.items()]
    if ns.update and ns.json is not None and ns.json.exists():
        kept = [e for e in json.loads(ns.json.read_text())["results"] if e["model"] not in results]
        order = sorted(RECIPES, reverse=True)
        entries = sorted(kept + entries, key=lambda e: order.index(e["model"]))
    write_json(ns.json, "torch_recipes", entries)
    if ns.plot is not None:
        plot(entries, ns.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
