"""ef21 against the way a PyTorch user trains data-parallel today: ``DistributedDataParallel`` over Gloo.

The same model (``examples/digits_mlp.py`` or ``digits_cnn.py``, float32, the same seeded initial weights), the
same shards and the same minibatches: at step t ≥ 1 rank r uses the rows ef21 draws from (seed, r, t) (round 0
is a full-shard gradient, as ef21's round 0), and ``torch.optim.SGD`` at the same stepsize. DDP's mean of the
ranks' gradients followed by SGD is exactly ef21's ``--method gd --estimator sgd``, which runs too: the same
algorithm through our service. Then EF21 with Top-k, k = 1 % of d: with full local gradients, the broadcast
compressed (EF21-BC) and the compact encoding; and EF21-SGDM on exactly DDP's minibatches. All in one invocation:

    python benchmarks/vs_ddp.py --json benchmarks/results/vs_ddp.json --plot benchmarks/results/vs_ddp.png

Bytes. ef21's are measured by the master (serialized messages + gRPC's 5-byte frame prefix, up + down, evaluation
traffic apart). Gloo's are counted: its all-reduce of CPU tensors is a ring (reduce-scatter then all-gather), in
which each of the N processes sends 2(N − 1)/N · 4d bytes per step, 2(N − 1)·4d in all — the least any
all-reduce can move, so DDP is given its best case — plus DDP's one broadcast of the initial weights from rank 0,
(N − 1)·4d. A parameter server (ef21's topology) moving the same dense float32 gradients would send 8Nd a step.
``--measure-loopback``, run alone in a network namespace, also measures every run's bytes on the wire.

Time runs from step 0 (after every process has started and joined) and includes evaluations, every
``--eval-every`` steps on both sides: DDP's rank 0 evaluates the held-out set while the others wait at the next
all-reduce; ef21's workers evaluate theirs (and send a dense gradient for ‖∇f‖², counted apart).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ddp_runs  # noqa: E402
from common import base_parser, print_table, write_json  # noqa: E402
from ddp_runs import GLOO_NOTE, Contender, iface_bytes  # noqa: E402
from digits_runs import EXAMPLES, Curve, example_dim, mb, run_ef21  # noqa: E402


def loopback_tx_bytes() -> int:
    """Bytes sent on ``lo`` so far: everything a run sends — TCP/IP headers, rendezvous, HTTP/2, evaluations —
    when it is alone in its network namespace (``--measure-loopback``)."""
    return iface_bytes("lo")[0]


def run_ddp(model: str, workers: int, rounds: int, eval_every: int, stepsize: float, batch_size: int,
            objective_args: list[str], tmp: Path) -> Curve:
    t0 = time.perf_counter()
    (r,) = ddp_runs.run_ddp(str(EXAMPLES[model]), objective_args, [(Contender("DDP (Gloo) SGD"), rounds, eval_every)],
                            workers, stepsize=stepsize, batch_size=batch_size, tmp=tmp)
    return Curve("DDP (Gloo) SGD", d=r.d, rounds=r.rounds, acc=r.acc, loss=r.loss, time_s=r.time_s,
                 wire_bytes=r.counted_bytes, eval_bytes=[0] * len(r.rounds), process_s=time.perf_counter() - t0,
                 command=f"torch DDP, {workers} processes, SGD lr={stepsize}, batch {batch_size}")


def plot(curves: list[Curve], target: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), sharey=True)
    for c in curves:
        axes[0].plot([max(b, 1) / 1e6 for b in c.wire_bytes], [100 * a for a in c.acc], marker=".", label=c.label)
        axes[1].plot(c.time_s, [100 * a for a in c.acc], marker=".", label=c.label)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("bytes sent, all processes (MB, log)")
    axes[1].set_xlabel("wall time from step 0 (s)")
    axes[0].set_ylabel("held-out accuracy (%)")
    for ax in axes:
        ax.axhline(100 * target, color="grey", lw=0.8, ls="--")
        ax.set_ylim(max(0, 100 * target - 25), 100)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> int:
    ap = base_parser(__doc__)
    ap.add_argument("--model", default="mlp", choices=sorted(EXAMPLES))
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=600, help="DDP's and ef21-SGD's steps")
    ap.add_argument("--ef21-rounds", type=int, default=1200)
    ap.add_argument("--eval-every", type=int, default=20, help="DDP's and ef21-SGD's evaluations")
    ap.add_argument("--ef21-eval-every", type=int, default=100,
                    help="EF21's (coarser: it can only overstate EF21's bytes to the target)")
    ap.add_argument("--stepsize", type=float, default=0.5, help="SGD's learning rate (DDP and ef21 gd)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--ef21", action="append", default=None, metavar="FLAGS",
                    help="ef21 run flags of an EF21 run (repeatable; {k} is 1 %% of d). Default: EF21 with full "
                         "local gradients, BC and compact; EF21-SGDM on DDP's minibatches, compact")
    ap.add_argument("--plot", type=Path, default=None, help="figure (PNG): accuracy against bytes and time")
    ap.add_argument("--work-dir", type=Path, default=Path("runs/vs_ddp"), help="where the ef21 logs go")
    ap.add_argument("--measure-loopback", action="store_true",
                    help="also measure each run's bytes on lo; meaningful only alone in a network namespace: "
                         "sudo unshare -n sh -c 'ip link set lo up && python benchmarks/vs_ddp.py --measure-loopback'")
    ns = ap.parse_args()
    try:
        import torch  # noqa: F401
    except ImportError:
        print("vs_ddp: skipped: PyTorch is not installed (pip install torch==2.13.0)")
        return 0
    objective_args: list[str] = []
    ef21_runs = [(None, flags) for flags in ns.ef21] if ns.ef21 else [
        ("EF21 Top-{k}, BC {k}, compact", "--method ef21 --k {k} --stepsize 0.5 --downlink-k {k} --encoding compact"),
        ("EF21-SGDM Top-{k} on DDP's batches, compact",
         f"--method ef21 --k {{k}} --estimator sgdm --batch-size {ns.batch_size} --sgdm-eta 0.1 --stepsize 0.5 "
         f"--encoding compact"),
    ]
    if ns.smoke:
        objective_args = ["hidden=16"] if ns.model == "mlp" else ["channels=2"]
        ns.workers, ns.rounds, ns.ef21_rounds, ns.eval_every, ns.ef21_eval_every = 2, 10, 10, 5, 5
        ef21_runs = ef21_runs[:1]
    ns.work_dir.mkdir(parents=True, exist_ok=True)
    d = example_dim(ns.model, objective_args)
    k = max(1, round(d / 100))
    sgd_flags = ["--method", "gd", "--estimator", "sgd", "--batch-size", str(ns.batch_size),
                 "--stepsize", str(ns.stepsize)]
    lo_bytes: list[int | None] = []

    def measured(run: Any, *args: Any) -> Curve:
        before = loopback_tx_bytes() if ns.measure_loopback else 0
        c = run(*args)
        lo_bytes.append(loopback_tx_bytes() - before if ns.measure_loopback else None)
        return c

    curves = [measured(run_ddp, ns.model, ns.workers, ns.rounds, ns.eval_every, ns.stepsize, ns.batch_size,
                       objective_args, ns.work_dir)]
    if not ns.smoke:
        curves.append(measured(run_ef21, "ef21 service, same SGD", ns.model, ns.workers, ns.rounds, ns.eval_every,
                               sgd_flags, ns.work_dir, objective_args))
    for label, flags in ef21_runs:
        flags = flags.format(k=k)
        label = f"EF21 ({flags})" if label is None else label.format(k=k)
        curves.append(measured(run_ef21, label, ns.model, ns.workers, ns.ef21_rounds, ns.ef21_eval_every,
                               flags.split(), ns.work_dir, objective_args))
    for c in curves:
        c.d = d
    target = max(curves[0].acc) - 0.01  # DDP's best held-out accuracy, less one point
    ddp = curves[0].summary(target)
    rows, results = [], []
    for c, lo in zip(curves, lo_bytes):
        s = c.summary(target)
        s["loopback_bytes"] = lo
        tt = s["to_target"]
        ratio = None
        if tt is not None and ddp["to_target"] is not None:
            ratio = ddp["to_target"]["wire_bytes"] / tt["wire_bytes"]
        s["byte_gain_vs_ddp"] = ratio
        results.append(s)
        rows.append([c.label, f"{100 * s['best_acc']:.1f}", f"{100 * s['final_acc']:.1f}",
                     "-" if tt is None else tt["round"], "-" if tt is None else f"{tt['time_s']:.2f}",
                     "-" if tt is None else f"{mb(tt['wire_bytes']):.3g}", "-" if ratio is None else f"{ratio:.1f}",
                     f"{mb(s['wire_bytes']):.3g}", "-" if lo is None else f"{mb(lo):.3g}", f"{s['time_s']:.1f}"])
    print(f"{ns.model}, d = {d}, N = {ns.workers}; target = DDP's best accuracy - 1 point = {100 * target:.1f} %")
    print(f"bytes: {GLOO_NOTE}; ef21 measured (up + down, evaluation apart)"
          + ("; lo: everything sent on loopback, headers, set-up and evaluation included" if ns.measure_loopback
             else ""))
    print_table(["run", "best %", "final %", "round@target", "s@target", "MB@target", "DDP MB / MB",
                 "MB total", "lo MB total", "s total"], rows)
    write_json(ns.json, "vs_ddp", results, model=ns.model, d=d, workers=ns.workers, target_acc=target,
               gloo_bytes=GLOO_NOTE, curves=[c.to_dict() for c in curves])
    if ns.plot is not None:
        plot(curves, target, ns.plot, f"digits {ns.model.upper()} (d = {d}), {ns.workers} processes: "
                                      f"DDP over Gloo vs ef21")
    return 0


if __name__ == "__main__":
    sys.exit(main())
