"""ef21 at the sizes people train (issue 22, point 7): every figure of the issue's "today", measured in one
invocation, printed next to the issue's number and its target, and — with ``--baseline FILE`` — next to the same
figure of an earlier run (the committed ``benchmarks/results/model_scale_baseline.json``), so that optimized code
shows old and new side by side.

Sections (``--sections``, default all):

* rounds — the separable quadratic at d = 10⁶ and 10⁷, n = 4 and 8: the median steady-state round of ef21
  (EF21, Top-k with k = d/100, ``ef21 master`` and n ``ef21 worker`` processes) against the median step of the
  Gloo all-reduce GD loop and of DDP + PowerSGD (rank 1, x held as a 1000 × d/1000 matrix) on the same quadratic
  (``round_rate.gloo_times``), on loopback and, each process in its own namespace behind a ``tc tbf`` link
  (``netns.Star``), at 100 Mbit/s (d = 10⁶ only by default: at 10⁷ ef21's set-up alone moves ~1.3 GB through the
  master's link today, minutes per run).
* cpu — CPU per round on mushrooms (d = 112, EF21 Top-2), n = 4 and 8, against the bare grpc.aio floor's
  (``round_cpu.ours`` / ``round_cpu.floor``).
* mlp — an ef21 round on the MLP 64-512-512-10 (d = 301,066; EF21 Top-1 %, minibatches of 32) against a step of
  DDP + PowerSGD rank 1 (start 2) on the same model, n = 4, loopback (``ddp_runs``).
* worker — one worker's arithmetic in a steady round of EF21 Top-k (k = d/100) on the quadratic at d = 10⁶ and
  10⁷, no network: the gradient, the method step (difference, selection, error update), the Update's encoding and
  the replica's update from a downlink of n·k entries; in ``--dtype`` (float32 is a switch for when the core has
  it: today it says so and measures nothing).
* torch — one worker's steady round on the digits MLP and the wide MLP with the method's vectors in numpy and as
  torch tensors (``torch_native.py``).
* decode — the master's decoding of one Update (``wire.decode_update``: read, decode, validate) at k = 10⁴ and
  10⁵ of d = 10⁶, against a numpy copy of the same index and value bytes (``wire.py``'s yardstick).
* fold — the master's fold of n Top-k messages (``master_cost.fold_case``) against one ``np.add.at`` of all
  their entries.

    python benchmarks/model_scale.py --json benchmarks/results/model_scale_baseline.json   # today's, committed
    python benchmarks/model_scale.py --baseline benchmarks/results/model_scale_baseline.json [--json new.json]
    python benchmarks/model_scale.py --smoke              # tiny, as CI runs it
"""

from __future__ import annotations

import os

# One BLAS thread, before numpy loads, as every ef21 process runs (ef21/__main__.py): the in-process sections time
# ef21's own arithmetic (the worker's step, the decode's finite check, the fold), and numpy's default pool — one
# thread per core, fighting the other processes of a loaded 2-core machine — turned a 10^5-long dot product into
# milliseconds (issue 22's diagnosis; the first full run here measured a decode 1000x a copy before this line).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
             "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import dataclasses  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Iterator  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import netns  # noqa: E402
from common import base_parser, best_time, exit_on_sigterm, load_average, print_table, run_apart, write_json  # noqa: E402

SECTIONS = ("rounds", "cpu", "mlp", "worker", "torch", "decode", "fold")


@dataclass(frozen=True)
class Figure:
    """One printed figure: ``key`` names it across runs (what ``--baseline`` matches on)."""

    key: str
    section: str
    what: str
    value: float | None
    unit: str
    today: str = ""
    """The issue's figure for it (measured before this benchmark existed), where the issue gives one."""
    target: str = ""
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)


# The issue's "today" (issue 22, measured on this machine before point 1's one BLAS thread) and its targets.
TODAY = {
    "rounds/quadratic-1000000/n4/loopback/ef21_vs_allreduce": ("2.32x (92.2 / 39.7 ms)", "<= 1.0x"),
    "rounds/quadratic-1000000/n4/loopback/ef21_ms": ("92.2 ms (59 ms with 1 BLAS thread)", ""),
    "rounds/quadratic-1000000/n4/loopback/allreduce_ms": ("39.7 ms", ""),
    "rounds/quadratic-1000000/n4/100mbit/ef21_vs_allreduce": ("", "<= 0.5x"),
    "rounds/quadratic-1000000/n8/100mbit/ef21_vs_allreduce": ("", "<= 0.5x"),
    "cpu/mushrooms/n4/ours_vs_floor": ("2.9x (4.87 / 1.66 CPU ms)", "<= 2x"),
    "cpu/mushrooms/n8/ours_vs_floor": ("3.0x (9.42 / 3.13 CPU ms)", "<= 2x"),
    "cpu/mushrooms/n4/ours_cpu_ms": ("4.87 CPU ms", ""),
    "cpu/mushrooms/n8/ours_cpu_ms": ("9.42 CPU ms", ""),
    "mlp/wide/n4/ef21_vs_powersgd1": ("3.7x (~100 / 27 ms; 32.6 ms with 1 BLAS thread)", "<= 1.0x"),
    "worker/quadratic-1000000/float32/step_ms": ("", "<= 3 ms"),
    "worker/quadratic-1000000/float64/step_ms": ("12.7 ms; 7.72 ms with kept buffers (phase 2)", ""),
    "worker/quadratic-10000000/float64/step_ms": ("1190 ms; 527 ms with kept buffers (phase 2)", ""),
    "worker/quadratic-1000000/float64/step_in_passes": ("~8.3 passes over d", "<= 3 passes beyond the gradient"),
    "decode/k10000/copy_vs_decode": ("0.15x", ">= 0.5x"),
    "decode/k100000/copy_vs_decode": ("0.26x", ">= 0.5x"),
    "fold/d1000000/n4/k10000/fold_vs_add_at": ("15.2x (master_cost.json)", "O(n k + K)"),
    "fold/d10000000/n4/k100000/fold_vs_add_at": ("4-19x over master_cost's grid", "O(n k + K)"),
}


def figure(key: str, section: str, what: str, value: float | None, unit: str, **detail: Any) -> Figure:
    today, target = TODAY.get(key, ("", ""))
    return Figure(key, section, what, value, unit, today, target, detail)


def dtype_supported(dtype: str) -> bool:
    """Whether the core keeps the method's vectors in ``dtype`` (float32: issue 22, point 4 — a ``dtype`` field of
    RunConfig, read by the worker and master nodes, is the switch this benchmark looks for)."""
    from ef21.engine.config import RunConfig

    return dtype == "float64" or "dtype" in {f.name for f in dataclasses.fields(RunConfig)}


# -- rounds ------------------------------------------------------------------------------------------------------------

def ef21_round(d: int, n: int, rounds: int, env: Any, log: Path, dtype: str = "float64") -> dict[str, float]:
    """Median seconds between the closes of consecutive steady rounds of EF21 Top-(d/100) on the quadratic, with
    the master and workers started apart under ``env`` (a Star or a Loopback), and the bytes a round moved."""
    from round_rate import Case, steady

    case = Case(f"quadratic-{d}", "ef21", max(1, d // 100))
    hosts = [f"w{r}" for r in range(n)]
    private = isinstance(env, netns.Star) or env.ns is not None
    flags = [*case.flags(), "--rounds", str(rounds), "--eval-every", str(10**9),
             *([] if dtype == "float64" else ["--dtype", dtype])]  # the flag phase 2 adds (issue 22, point 4)
    recs, seconds = run_apart(flags, n, log, label=str(case), master_prefix=env.prefix("m"),
                              worker_prefixes=[env.prefix(h) for h in hosts], host=env.addr("m"),
                              port=50051 if private else _free_port())
    cut = max(2, len(recs) // 10)
    lo, hi = recs[cut], recs[-cut]
    msgs = (hi["round"] - lo["round"]) * n
    return {"ef21_s": float(np.median(steady([r["elapsed_s"] for r in recs]))), "process_s": seconds,
            "up_bytes": (hi["wire_bytes_up"] - lo["wire_bytes_up"]) / msgs,
            "down_bytes": (hi["wire_bytes_down"] - lo["wire_bytes_down"]) / msgs}


def gloo_steps(d: int, n: int, steps: int, env: Any, tmp: Path, dtype: str) -> dict[str, float | None]:
    from round_rate import Case, gloo_times

    hosts = [f"w{r}" for r in range(n)]
    private = isinstance(env, netns.Star) or env.ns is not None
    return gloo_times(Case(f"quadratic-{d}", "gd", None), n, steps, 0, 0, tmp, star=False, powersgd_rank=1,
                      dtype=dtype, prefixes=[env.prefix(h) for h in hosts], addr=env.addr(hosts[0]),
                      iface=env.iface, port=29500 if private else None)


def _free_port() -> int:
    from ddp_runs import free_port

    return free_port()


def rounds_section(grid: list[tuple[int, int, str, int, int]], dtype: str, private: bool,
                   tmp: Path) -> Iterator[Figure]:
    if not dtype_supported(dtype):
        print(f"  rounds: --dtype {dtype}: the core has no {dtype} method vectors yet (issue 22, point 4): "
              f"nothing measured", flush=True)
        return
    for d, n, link, rounds, steps in grid:
        t0 = time.perf_counter()
        env: Any = (netns.Loopback(private) if link == "loopback" else
                    netns.Star(["m", *(f"w{r}" for r in range(n))], link))
        with env:
            ours = ef21_round(d, n, rounds, env, tmp / f"ef21-{d}-{n}-{link}.jsonl", dtype)
            gloo = gloo_steps(d, n, steps, env, tmp, dtype)
        base = f"rounds/quadratic-{d}/n{n}/{link}"
        ef, ar, ps = ours["ef21_s"], gloo["allreduce"], gloo["powersgd"]
        what = f"quadratic d={d:.0e} n={n} {link}"
        yield figure(f"{base}/ef21_ms", "rounds", f"{what}: ef21 round", 1e3 * ef, "ms", rounds=rounds,
                     up_bytes=ours["up_bytes"], down_bytes=ours["down_bytes"])
        yield figure(f"{base}/allreduce_ms", "rounds", f"{what}: Gloo all-reduce step ({dtype})",
                     None if ar is None else 1e3 * ar, "ms", steps=steps)
        yield figure(f"{base}/powersgd1_ms", "rounds", f"{what}: DDP + PowerSGD r1 step ({dtype})",
                     None if ps is None else 1e3 * ps, "ms", steps=steps)
        yield figure(f"{base}/ef21_vs_allreduce", "rounds", f"{what}: ef21 / all-reduce",
                     None if ar is None else ef / ar, "x")
        yield figure(f"{base}/ef21_vs_powersgd1", "rounds", f"{what}: ef21 / PowerSGD r1",
                     None if ps is None else ef / ps, "x")
        print(f"  rounds d={d} n={n} {link}: ef21 {1e3 * ef:.1f} ms, all-reduce {_ms(ar)}, PowerSGD r1 {_ms(ps)} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{1e3 * s:.1f} ms"


# -- cpu ---------------------------------------------------------------------------------------------------------------

def cpu_section(ns_: list[int], smoke: bool, tmp: Path) -> Iterator[Figure]:
    import round_cpu

    from ef21_wire.protocol import GRPC_FRAME_BYTES

    warm, window, short, long = (1.0, 2.0, 50, 250) if smoke else (5.0, 8.0, 300, 3300)
    for n in ns_:
        o = round_cpu.ours(n, 2, "asyncio", warm, window, tmp)
        sizes = (int(round(o["up_bytes"])) - GRPC_FRAME_BYTES, int(round(o["down_bytes"])) - GRPC_FRAME_BYTES)
        f = round_cpu.floor(n, *sizes, "asyncio", short, long)
        base = f"cpu/mushrooms/n{n}"
        yield figure(f"{base}/ours_cpu_ms", "cpu", f"mushrooms EF21 Top-2 n={n}: CPU a round, all processes",
                     o["cpu_ms"], "CPU ms", wall_ms=o["wall_ms"], split=o["split"])
        yield figure(f"{base}/floor_cpu_ms", "cpu", f"mushrooms n={n}: the bare grpc.aio floor's CPU a round",
                     f["cpu_ms"], "CPU ms")
        yield figure(f"{base}/ours_vs_floor", "cpu", f"mushrooms n={n}: ef21 / floor, CPU", o["cpu_ms"] / f["cpu_ms"],
                     "x")
        print(f"  cpu n={n}: ours {o['cpu_ms']:.2f} CPU ms, floor {f['cpu_ms']:.2f}", flush=True)


# -- mlp ---------------------------------------------------------------------------------------------------------------

def mlp_section(n: int, rounds: int, private: bool, tmp: Path, objective_args: list[str]) -> Iterator[Figure]:
    from ddp_runs import Contender, run_ddp
    from digits_runs import example_dim
    from round_rate import steady

    module = "benchmarks/wide_mlp.py"
    d = example_dim(module, objective_args)
    k = max(1, round(d / 100))
    with netns.Loopback(private) as env:
        flags = ["--objective", f"{module}:make", *[a for kv in objective_args for a in ("--objective-arg", kv)],
                 "--method", "ef21", "--k", str(k), "--estimator", "sgd", "--batch-size", "32", "--stepsize", "0.5",
                 "--rounds", str(rounds), "--eval-every", str(10**9)]
        recs, _ = run_apart(flags, n, tmp / "mlp.jsonl", label="mlp", master_prefix=env.prefix("m"),
                            worker_prefixes=[env.prefix("w")] * n, host="127.0.0.1",
                            port=50051 if env.ns is not None else _free_port())
        ef = float(np.median(steady([r["elapsed_s"] for r in recs])))
        (r,) = run_ddp(module, objective_args, [(Contender("PowerSGD r1", "powersgd", 1, 2), rounds, 10**9)], n,
                       stepsize=0.5, batch_size=32, tmp=tmp / "mlp-ddp", prefixes=[env.prefix("w")] * n,
                       port=29500 if env.ns is not None else None)
        ps = float(np.median(steady(r.step_end_s)))
    yield figure(f"mlp/wide/n{n}/ef21_ms", "mlp",
                 f"MLP d={d} n={n} loopback: ef21 round (EF21 Top-{k}, batch 32)", 1e3 * ef, "ms")
    yield figure(f"mlp/wide/n{n}/powersgd1_ms", "mlp", f"MLP d={d} n={n} loopback: DDP + PowerSGD r1 step",
                 1e3 * ps, "ms")
    yield figure(f"mlp/wide/n{n}/ef21_vs_powersgd1", "mlp", f"MLP d={d} n={n}: ef21 / PowerSGD r1", ef / ps, "x")
    print(f"  mlp: ef21 {1e3 * ef:.1f} ms, PowerSGD r1 {1e3 * ps:.1f} ms", flush=True)


# -- worker ------------------------------------------------------------------------------------------------------------

def worker_section(dims: list[int], n: int, dtypes: list[str]) -> Iterator[Figure]:
    """One worker's steady round without the network, part by part, on the quadratic; with the compiled loops
    (numba, ``ef21.compression.kernels``) where installed, and the numpy path beside it."""
    from ef21.compression import kernels
    from ef21.engine.config import RunConfig
    from ef21.engine.nodes import MasterNode, WorkerNode, WorkerReport, gradient
    from ef21.engine.plan import resolve_method
    from ef21.methods import WorkerContext
    from ef21.problems.problem import build_problem
    from ef21_worker.client import update_message

    for dtype in dtypes:
        if not dtype_supported(dtype):
            print(f"  worker: --dtype {dtype}: the core has no {dtype} method vectors yet (issue 22, point 4): "
                  f"nothing measured", flush=True)
            return
    for d, dtype in [(d, dt) for dt in dtypes for d in dims]:
        k = max(1, d // 100)
        extra = {} if dtype == "float64" else {"dtype": dtype}
        cfg = RunConfig(workers=n, problem="quadratic", dim=d, method="ef21", k=k, **extra)  # type: ignore[arg-type]
        zeros = np.zeros(d, dtype=dtype)
        prob = build_problem(cfg)
        method, comp = resolve_method(cfg, d)
        obj = prob.objectives[0]
        # Rank 0 beside n - 1 others, so that the downlink is the sparse sum of n distinct Top-k supports, as in a
        # real round; rounds 0 (g_i⁰ dense) and 1 out of the way.
        nodes = [WorkerNode(method, comp, prob.objectives[i], i, gamma=1e-3, x0=zeros) for i in range(n)]
        master = MasterNode(method, n, zeros, gamma=1e-3, rows_dtype=dtype)
        for _ in range(2):
            down = master.aggregate([w.step(evaluate=False).message for w in nodes])
            for w in nodes:
                w.apply(down)
        down = master.aggregate([w.step(evaluate=False).message for w in nodes])
        worker = nodes[0]
        worker.apply(down)
        x = worker.replica.x
        number = 3 if d >= 10**7 else 10
        t_grad = best_time(lambda: gradient(obj, x), number, repeat=3)
        grad = gradient(obj, x)
        # With the worker's kept buffers, as WorkerNode passes them: the step then moves g_i in place (here a
        # copy of it, moved again at every repetition: the timing does not depend on its values).
        ctx = WorkerContext(comp, 1e-3, "full", None, scratch=np.empty_like(x), mag=np.empty_like(x),
                            cand=np.empty(8 * k + 4096, dtype=np.int64))
        state = np.array(worker.state)
        t_method = best_time(lambda: method.worker_step(state, grad, ctx, None), number, repeat=3)
        # The same step without the buffers: it allocates the residual and |residual| and copies g_i, as every
        # step did before issue 22's phase 2 — the before/after ratio from one invocation.
        bare = WorkerContext(comp, 1e-3, "full", None)
        t_copying = best_time(lambda: method.worker_step(state, grad, bare, None), number, repeat=3)
        msg = method.worker_step(state, grad, ctx, None)[0]
        report = WorkerReport(worker.round, msg, None, None, None)
        t_encode = best_time(lambda: update_message(report), number, repeat=3)
        t_apply = best_time(lambda: worker.replica.apply(down), number, repeat=3)
        t_round = best_time(lambda: (worker.step(evaluate=False), worker.apply(down)), number, repeat=3)
        compiled, t_round_numpy = kernels.available(d), t_round
        if compiled:  # the numpy path, the same bits (tests/test_passes.py), timed in the same invocation
            own, kernels._compile = kernels._compile, lambda: None  # type: ignore[assignment]
            try:
                t_round_numpy = best_time(lambda: (worker.step(evaluate=False), worker.apply(down)), number,
                                          repeat=3)
            finally:
                kernels._compile = own
        base = f"worker/quadratic-{d}/{dtype}"
        what = f"worker d={d:.0e} {dtype} EF21 Top-{k}"
        yield figure(f"{base}/step_ms", "worker", f"{what}: step + apply (no network, no codec)", 1e3 * t_round, "ms",
                     downlink_nnz=down.vector.nnz)
        yield figure(f"{base}/step_numpy_ms", "worker", f"{what}: step + apply on the numpy path (no numba)",
                     1e3 * t_round_numpy, "ms", compiled=compiled)
        yield figure(f"{base}/compiled_vs_numpy", "worker", f"{what}: step + apply, compiled loops / numpy",
                     t_round / t_round_numpy, "x", compiled=compiled)
        yield figure(f"{base}/gradient_ms", "worker", f"{what}: the gradient", 1e3 * t_grad, "ms")
        yield figure(f"{base}/method_ms", "worker", f"{what}: the method step (difference, Top-k, error update)",
                     1e3 * t_method, "ms")
        yield figure(f"{base}/method_copying_ms", "worker", f"{what}: the method step without kept buffers "
                     f"(allocating, copying g_i: the code before)", 1e3 * t_copying, "ms")
        yield figure(f"{base}/method_vs_copying", "worker", f"{what}: method step with buffers / without",
                     t_method / t_copying, "x")
        yield figure(f"{base}/encode_ms", "worker", f"{what}: the Update's encoding", 1e3 * t_encode, "ms")
        yield figure(f"{base}/apply_ms", "worker", f"{what}: the replica's update ({down.vector.nnz} entries)",
                     1e3 * t_apply, "ms")
        # A full pass over d at memory speed, to read the parts in passes: a numpy copy of one vector.
        t_pass = best_time(lambda: np.copyto(np.empty_like(x), x), number, repeat=3)
        yield figure(f"{base}/one_pass_ms", "worker", f"d={d:.0e}: one pass over d (a numpy copy, the yardstick)",
                     1e3 * t_pass, "ms")
        yield figure(f"{base}/step_in_passes", "worker", f"{what}: step + apply - gradient, in copies of d",
                     (t_round - t_grad) / t_pass, "passes")
        print(f"  worker d={d}: step {1e3 * t_round:.2f} ms (gradient {1e3 * t_grad:.2f}, method {1e3 * t_method:.2f},"
              f" apply {1e3 * t_apply:.2f}; one copy of d {1e3 * t_pass:.2f})", flush=True)


# -- decode and fold ---------------------------------------------------------------------------------------------------

def decode_section(d: int, ks: list[int]) -> Iterator[Figure]:
    from wire import decode_update, update_raw

    from ef21.compression.compressors import TopK
    from ef21_wire.serde import vector_to_proto
    from ef21_wire.v1 import ef21_pb2 as pb

    rng = np.random.default_rng(0)
    for k in ks:
        vec = TopK(k)(rng.standard_normal(d))
        raw = update_raw(vec)
        idx, val = vec.indices, vec.values
        number = max(20, 200_000 // k)
        t_copy = best_time(lambda: (idx.copy(), val.copy()), number)
        t_dec = best_time(lambda: decode_update(raw, d), number)
        base = f"decode/k{k}"
        yield figure(f"{base}/decode_us", "decode", f"decode an Update, k={k} of d={d:.0e}", 1e6 * t_dec, "us",
                     message_bytes=len(raw))
        yield figure(f"{base}/copy_us", "decode", f"numpy copy of the same {12 * k} bytes", 1e6 * t_copy, "us")
        yield figure(f"{base}/copy_vs_decode", "decode", f"k={k}: copy / decode (1 = as fast as a copy)",
                     t_copy / t_dec, "x")
        # Before protocol 8: the same Update without pads, as the generated code writes it; its arrays land where
        # their fields start (the values 4 bytes off here), and decode copies what is unaligned.
        plain = pb.WorkerMessage(update=pb.Update(round=12345, message=vector_to_proto(vec))).SerializeToString()
        t_plain = best_time(lambda: decode_update(plain, d), number)
        yield figure(f"{base}/unpadded_decode_us", "decode", f"decode the same Update without pads (protocol 7's "
                     f"layout)", 1e6 * t_plain, "us")
        yield figure(f"{base}/copy_vs_unpadded_decode", "decode", f"k={k}: copy / decode without pads",
                     t_copy / t_plain, "x")


def fold_section(cases: list[tuple[int, int, int]]) -> Iterator[Figure]:
    from master_cost import fold_case

    rng = np.random.default_rng(0)
    for d, n, k in cases:
        _, r = fold_case(d, n, k, rng)
        base = f"fold/d{d}/n{n}/k{k}"
        what = f"master d={d:.0e} n={n} Top-{k}"
        yield figure(f"{base}/fold_ms", "fold", f"{what}: fold (sparse_sum of the messages)", r["fold_ms"], "ms")
        yield figure(f"{base}/mask_fold_ms", "fold", f"{what}: the previous fold (d-long accumulator and mask)",
                     r["mask_fold_ms"], "ms")
        yield figure(f"{base}/fold_vs_mask", "fold", f"{what}: fold / the previous fold",
                     r["fold_ms"] / r["mask_fold_ms"], "x")
        yield figure(f"{base}/fold_ns_per_entry", "fold", f"{what}: fold per entry (flat in n and k: linear)",
                     1e6 * r["fold_ms"] / (n * k), "ns")
        yield figure(f"{base}/merge_fold_ms", "fold", f"{what}: numpy's merge of the runs (O(m log n), no numba)",
                     r["merge_fold_ms"], "ms")
        yield figure(f"{base}/fold_vs_merge", "fold", f"{what}: fold / numpy's merge", r["fold_ms"] / r["merge_fold_ms"],
                     "x")
        yield figure(f"{base}/node_fold_ms", "fold", f"{what}: MasterNode.fold (the downlink, the rows)",
                     r["node_fold_ms"], "ms")
        yield figure(f"{base}/round_ms", "fold", f"{what}: fold + apply (the master's round)", r["round_ms"], "ms")
        yield figure(f"{base}/add_at_ms", "fold", f"{what}: one np.add.at of the {n * k} entries",
                     r["scatter_add_ms"], "ms")
        yield figure(f"{base}/fold_vs_add_at", "fold", f"{what}: fold / np.add.at", r["fold_ms"] / r["scatter_add_ms"],
                     "x")


# -- report ------------------------------------------------------------------------------------------------------------

def report(figs: list[Figure], baseline: dict[str, Any] | None) -> None:
    base = {r["key"]: r for r in baseline["results"]} if baseline else {}
    headers = ["figure", "value", "unit", "issue: today", "target"]
    if baseline:
        headers += [f"baseline ({baseline.get('date', '?')})", "new / baseline"]
    for section in SECTIONS:
        rows = []
        for f in (f for f in figs if f.section == section):
            row = [f.what, "-" if f.value is None else f"{f.value:.3g}", f.unit, f.today or "", f.target or ""]
            if baseline:
                old = base.get(f.key, {}).get("value")
                row += ["-" if old is None else f"{old:.3g}",
                        "-" if old in (None, 0) or f.value is None else f"{f.value / old:.2f}"]
            rows.append(row)
        if rows:
            print(f"\n{section}")
            print_table(headers, rows)


def run_sections(args: Any, private: bool, links: list[str], tmp: Path) -> list[Figure]:
    s = args.smoke
    steps: list[tuple[str, Callable[[], Iterator[Figure]]]] = []
    if "rounds" in args.sections:
        grid = ([(10_000, 2, ln, 30, 30) for ln in links] if s else
                [(d, n, "loopback", 60 if d < 10**7 else 20, 60 if d < 10**7 else 20)
                 for d in (10**6, 10**7) for n in (4, 8)]
                + [(10**6, n, ln, 20, 10) for n in (4, 8) for ln in links if ln != "loopback"])
        steps.append(("rounds", lambda: rounds_section(grid, args.dtype, private, tmp)))
    if "cpu" in args.sections and not s:  # round_cpu.py's own smoke run covers it
        steps.append(("cpu", lambda: cpu_section([2] if s else [4, 8], s, tmp)))
    if "mlp" in args.sections:
        steps.append(("mlp", lambda: mlp_section(2 if s else 4, 20 if s else 100, private, tmp,
                                                 ["layers=16"] if s else [])))
    if "worker" in args.sections:
        steps.append(("worker", lambda: worker_section([10_000] if s else [10**6, 10**7], 2 if s else 4,
                                                       ["float64", "float32"])))
    if "torch" in args.sections:  # numpy vs torch-native method vectors on the MLPs (torch_native.py)
        from torch_native import torch_section

        steps.append(("torch", lambda: torch_section(s, figure)))
    if "decode" in args.sections:
        steps.append(("decode", lambda: decode_section(100_000 if s else 10**6, [100, 1000] if s else [10**4, 10**5])))
    if "fold" in args.sections:
        steps.append(("fold", lambda: fold_section([(10_000, 2, 100)] if s else
                                                   [(10**6, 4, 10**4), (10**6, 8, 10**4), (10**7, 4, 10**5),
                                                    (10**7, 8, 10**5), (10**7, 16, 10**4), (10**7, 64, 10**4)])))
    figs: list[Figure] = []
    for name, step in steps:
        t0 = time.perf_counter()
        figs.extend(step())
        print(f"{name}: {time.perf_counter() - t0:.0f} s (load {' '.join(map(str, load_average()))})", flush=True)
    return figs


def main() -> int:
    ap = base_parser(__doc__)
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--links", nargs="+", default=["loopback", "100mbit"],
                    help="loopback and/or tbf rates of the star (the rounds section; d = 10^6 on shaped links)")
    ap.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                    help="the method's vectors (worker section) and the Gloo loops' dtype; float32 once the core "
                         "has it (issue 22, point 4)")
    ap.add_argument("--baseline", type=Path, default=None, metavar="JSON",
                    help="an earlier run's --json: print its figures beside these")
    ns = ap.parse_args()
    exit_on_sigterm()
    try:
        import torch  # noqa: F401
    except ImportError:
        print("model_scale: skipped: PyTorch is not installed (the Gloo and DDP peers need it)")
        return 0
    baseline = json.loads(ns.baseline.read_text()) if ns.baseline else None
    reason = netns.unavailable()
    links = list(ns.links)
    if ns.smoke:
        links = ["loopback"] + (["100mbit"] if reason is None else [])
    if reason is not None:
        print(f"model_scale: no network namespaces ({reason}): loopback only")
        links = ["loopback"]
    load = load_average()
    print(f"load average before: {' '.join(map(str, load))}; {os.cpu_count()} CPUs", flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="model_scale-") as tmp:
        figs = run_sections(ns, reason is None, links, Path(tmp))
    report(figs, baseline)
    write_json(ns.json, "model_scale", [dataclasses.asdict(f) for f in figs], dtype=ns.dtype, links=links,
               namespaces=reason is None, load_before=load, load_after=load_average(), cpus=os.cpu_count(),
               seconds=time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
