"""``model_scale.py --sections torch``: one worker's steady round on a PyTorch model with its method vectors in numpy
(``EF21_TORCH_NATIVE=0``, the path before issue 22's point 5) and as torch tensors (the default), part by part, in
one invocation: the minibatch gradient, the method step (difference, Top-k, g_i's update) and the replica's apply,
each a median over calls made in turn with the other backend's.

Models: the digits MLP (``examples/digits_mlp.py``, d = 9,610) and the wide MLP 64-512-512-10 of the race
(``benchmarks/wide_mlp.py``, d = 301,066); EF21 Top-1 % on minibatches of 32 (the race's EF21), n = 4 (the
downlink is the sum of four supports). No network and no codec: both paths hand the codec the same k entries.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "digits-mlp": (f"{ROOT / 'examples' / 'digits_mlp.py'}:make", ()),
    "wide-mlp": (f"{ROOT / 'benchmarks' / 'wide_mlp.py'}:make", ()),
}
SMOKE_MODELS = {"digits-mlp": (f"{ROOT / 'examples' / 'digits_mlp.py'}:make", (("hidden", "16"),))}


def _setup(objective: str, args: tuple, n: int, native: bool) -> dict[str, Any]:
    """A worker in a steady round, on the backend ``native`` says (read when the objective is built), and the
    parts of its round as callables."""
    import numpy as np

    from ef21.engine.config import RunConfig
    from ef21.engine.nodes import WorkerNode
    from ef21.engine.simulate import plan_for
    from ef21.methods import WorkerContext
    from ef21.methods.estimators import batch_rng, draw_batch
    from ef21.problems.problem import build_problem

    os.environ["EF21_TORCH_NATIVE"] = "1" if native else "0"
    probe = RunConfig(workers=n, objective=objective, objective_args=args, stepsize=0.05, estimator="sgd",
                      batch_size=32)
    prob = build_problem(probe)
    d = prob.d
    k = max(1, d // 100)
    cfg = RunConfig(**{**probe.__dict__, "k": k})
    plan = plan_for(cfg, prob)
    x0 = prob.x0 if prob.x0 is not None else np.zeros(d)
    nodes = [WorkerNode(plan.method, plan.compressor, prob.objectives[i], i, gamma=plan.gamma, x0=x0,
                        setting=plan.worker_setting(i), buffers=prob.buffers0) for i in range(n)]
    master = plan.master_node(x0, buffers=prob.buffers0)
    for _ in range(3):  # round 0 (dense g_i⁰) and two more out of the way
        down = master.aggregate([w.step(evaluate=False).message for w in nodes])
        for w in nodes:
            w.apply(down)
    worker, ops = nodes[0], nodes[0].ops
    obj = worker.objective
    x = ops.copy(worker.replica.x)
    rows = draw_batch(batch_rng(0, 0, 5), obj.n_samples, 32)
    grad = obj.grad_batch(x, rows)
    ctx = WorkerContext(plan.compressor, plan.gamma, "full", None, scratch=ops.empty_like(x), mag=ops.empty_like(x),
                       ops=ops)
    state = ops.copy(worker.state)

    def method() -> None:  # g_i moves in place and back: every repetition steps from the same state
        plan.method.worker_step(state, grad, ctx, None)[1].undo()

    return {"d": d, "k": k, "backend": ops.name, "parts": {
        "gradient": lambda: obj.grad_batch(x, rows),
        "method": method,
        "apply": lambda: worker.replica.apply(down),
        "round": lambda: (worker.step(evaluate=False), worker.apply(down)),
    }}


def _times(setups: list[dict[str, Any]], calls: int) -> list[dict[str, float]]:
    """ms per call of every part, the median over ``calls`` calls made in turn (numpy, torch, numpy, …), and the
    median of the per-turn ratios: the load of a shared machine drifts by the second, so neither backend gets a
    quiet moment the other did not, and a ratio of neighbouring calls cancels most of the drift."""
    import statistics
    import time

    out: list[dict[str, float]] = [{} for _ in setups]
    ratios: dict[str, float] = {}
    for part in setups[0]["parts"]:
        fns = [s["parts"][part] for s in setups]
        for fn in fns:  # warm
            fn()
        samples: list[list[float]] = [[] for _ in setups]
        for _ in range(calls):
            for i, fn in enumerate(fns):
                t0 = time.perf_counter()
                fn()
                samples[i].append(1e3 * (time.perf_counter() - t0))
        for i in range(len(setups)):
            out[i][part] = statistics.median(samples[i])
        ratios[part] = statistics.median(b / a for a, b in zip(samples[0], samples[1]))
    out.append(ratios)
    return out


def torch_section(smoke: bool, figure: Callable[..., Any]) -> Iterator[Any]:
    """Figures for ``model_scale.py`` (``figure(key, section, what, value, unit, **detail)``)."""
    n, calls = (2, 5) if smoke else (4, 300)
    before = os.environ.get("EF21_TORCH_NATIVE")
    try:
        for name, (objective, args) in (SMOKE_MODELS if smoke else MODELS).items():
            setups = [_setup(objective, args, n, native) for native in (False, True)]
            assert [u["backend"] for u in setups] == ["numpy", "torch"], [u["backend"] for u in setups]
            a, b, ratio = _times(setups, calls)
            a.update(d=setups[0]["d"], k=setups[0]["k"])
            what = f"worker {name} (d={a['d']}) EF21 Top-{a['k']}, SGD batch 32"
            for part, label in (("round", "step + apply"), ("gradient", "the minibatch gradient"),
                                ("method", "the method step"), ("apply", "the replica's apply")):
                base = f"torch/{name}/{part}"
                yield figure(f"{base}/numpy_ms", "torch", f"{what}: {label}, numpy vectors", a[part], "ms")
                yield figure(f"{base}/native_ms", "torch", f"{what}: {label}, torch tensors", b[part], "ms")
                yield figure(f"{base}/native_vs_numpy", "torch", f"{what}: {label}, torch / numpy (median of "
                             f"the ratios of neighbouring calls)", ratio[part], "x", calls=calls)
            print(f"  torch {name}: round {a['round']:.2f} -> {b['round']:.2f} ms, method "
                  f"{a['method']:.3f} -> {b['method']:.3f} ms (medians)", flush=True)
    finally:
        if before is None:
            os.environ.pop("EF21_TORCH_NATIVE", None)
        else:
            os.environ["EF21_TORCH_NATIVE"] = before
