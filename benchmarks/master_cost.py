"""Master cost per round for EF21: O(n·k + d), never O(n·d); aggregation against one vectorised scatter-add; and
what ``--master-rows full|float32|none`` (how the master keeps every worker's g_i) costs and gives up.

The master's work on a round is ``MasterNode.aggregate`` (fold n sparse messages into the sum, update the
per-worker copies of g_i, apply to x and g) plus decoding. This script times it directly, without the network,
for growing d and n at fixed k, and compares the folding of n messages with one ``np.add.at`` of all their
entries. It also reports the memory the master holds against (n + 3)·8·d bytes.

Master rows: the master's state (its replica and the n rows) for each setting at d = 10⁷ with 16 workers (the
quadratic's size class: no data needed), memory held and round time. What a setting gives up is measured with
a hand-over: the same run (mushrooms, EF21 Top-2, n = 8) in which every rank is handed over at round 100 from the
master's rows — what a resumed master does, and for one rank what a replacement worker gets — against the
uninterrupted run: ``full`` continues bit for bit; ``float32`` continues from g_i rounded to float32, and since
the master's g keeps the exact sum, g and the mean of the workers' g_i then differ by the rounding for good, which
sets a floor under ‖∇f‖²; ``none`` has no rows to hand over (a replacement restarts g_i from 0, and a checkpoint
is refused).

    python benchmarks/master_cost.py [--smoke] [--json out.json]
"""

from __future__ import annotations

import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_parser, best_time, print_table, write_json  # noqa: E402

from ef21.compression.compressors import TopK  # noqa: E402
from ef21.compression.sparse import _masked_sum, _merged_sum, sparse_sum  # noqa: E402
from ef21.engine.config import RunConfig, make_x0  # noqa: E402
from ef21.engine.nodes import MasterNode, WorkerNode  # noqa: E402
from ef21.engine.records import mean_gradient  # noqa: E402
from ef21.engine.simulate import plan_for  # noqa: E402
from ef21.methods import EF21, Message  # noqa: E402
from ef21.problems.problem import build_problem  # noqa: E402
from ef21_server.coordinator import MASTER_ROWS  # noqa: E402


def fold_grid(smoke: bool) -> tuple[list[list], list[dict]]:
    rng = np.random.default_rng(0)
    grid = ([(10_000, 4, 100)] if smoke else
            [(d, n, k) for d in (10_000, 100_000, 1_000_000, 10_000_000) for n in (4, 16, 64)
             for k in (100, 10_000) if d * n <= 2 * 10**8 and k * 10 <= d])
    rows, results = [], []
    for d, n, k in grid:
        row, result = fold_case(d, n, k, rng)
        rows.append(row)
        results.append(result)
    return rows, results


def fold_case(d: int, n: int, k: int, rng: np.random.Generator) -> tuple[list, dict]:
    """One (d, n, k): the master's round, its fold alone and one np.add.at of all the entries, and what it holds."""
    msgs = [Message(TopK(k)(rng.standard_normal(d))) for _ in range(n)]
    tracemalloc.start()
    master = MasterNode(EF21(), n, np.zeros(d), gamma=0.1)
    master.aggregate(msgs)  # warm-up; also the first allocation of everything it holds
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    number = 5 if d >= 1_000_000 else 50
    t_round = best_time(lambda: master.aggregate(msgs), number, repeat=3)
    vecs = [m.vector for m in msgs]
    t_fold = best_time(lambda: sparse_sum(vecs, d), number, repeat=3)
    # The earlier folds, each with the same bits (asserted): a fresh d-long accumulator and mask for every round
    # (before issue 22; still the path sparse_sum takes when the union is a good part of d), and numpy's merge of
    # the n ascending runs (O(m·log n); the path without numba).
    cat = [np.concatenate([v.indices for v in vecs]), np.concatenate([v.values for v in vecs])]
    fold, merged, masked = sparse_sum(vecs, d), _merged_sum(*cat, d), _masked_sum(*cat, d)
    for other in (merged, masked):
        assert fold.indices.tobytes() == other.indices.tobytes() and fold.values.tobytes() == other.values.tobytes()
    t_mask = best_time(lambda: _masked_sum(*cat, d), number, repeat=3)
    t_merge = best_time(lambda: _merged_sum(*cat, d), number, repeat=3)
    t_node_fold = best_time(lambda: master.fold(msgs), number, repeat=3)  # whatever MasterNode folds with
    all_idx = np.concatenate([m.vector.indices for m in msgs]).astype(np.intp)
    all_val = np.concatenate([m.vector.values for m in msgs])
    acc = np.zeros(d)

    def scatter() -> None:
        np.add.at(acc, all_idx, all_val)

    t_scatter = best_time(scatter, number, repeat=3)
    target = (n + 3) * 8 * d
    return ([d, n, k, t_round * 1e3, t_fold * 1e3, t_mask * 1e3, t_scatter * 1e3, t_fold / t_scatter, held / target],
            {"d": d, "n": n, "k": k, "round_ms": t_round * 1e3, "fold_ms": t_fold * 1e3, "mask_fold_ms": t_mask * 1e3,
             "merge_fold_ms": t_merge * 1e3,
             "node_fold_ms": t_node_fold * 1e3, "scatter_add_ms": t_scatter * 1e3, "held_bytes": held,
             "target_bytes": target})


def rows_settings(d: int, n: int, k: int) -> tuple[list[list], list[dict]]:
    """Memory the master's state holds (replica, rows) and its round time, per --master-rows setting."""
    rng = np.random.default_rng(1)
    msgs = [Message(TopK(k)(rng.standard_normal(d))) for _ in range(n)]
    table, out = [], []
    # One round untraced first: the compiled x-step (numba, imported and compiled at its first use, d ≥ 2^15) would
    # otherwise count its modules in the first setting's held bytes.
    MasterNode(EF21(), n, np.zeros(d), gamma=0.1, rows_dtype=None).aggregate(msgs)
    for setting, dtype in MASTER_ROWS.items():
        tracemalloc.start()
        master = MasterNode(EF21(), n, np.zeros(d), gamma=0.1, rows_dtype=dtype)
        master.aggregate(msgs)
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        t_round = best_time(lambda: master.aggregate(msgs), 3, repeat=3)
        table.append([setting, d, n, k, held / 2**30, t_round * 1e3])
        out.append({"master_rows": setting, "d": d, "n": n, "k": k, "held_bytes": held, "round_ms": t_round * 1e3})
        del master
    return table, out


def handover_run(cfg: RunConfig, setting: str, at: int | None, ranks: range) -> tuple[np.ndarray, list[float]]:
    """The simulator's loop with ``ranks`` handed over at round ``at`` from the master's copy of their g_i (as the
    service's Start does), under a --master-rows setting. Returns x and ‖∇f(x^t)‖² of every round."""
    problem = build_problem(cfg)
    plan = plan_for(cfg, problem)
    x0 = make_x0(cfg.x0, problem.d, problem.x0)

    def worker(rank: int, **takeover: object) -> WorkerNode:
        return WorkerNode(plan.method, plan.compressor, problem.objectives[rank], rank, gamma=plan.gamma,
                          setting=plan.worker_setting(rank), **takeover)  # type: ignore[arg-type]

    workers = [worker(i, x0=x0) for i in range(cfg.workers)]
    master = plan.master_node(x0, MASTER_ROWS[setting])
    curve: list[float] = []
    for t in range(cfg.rounds + 1):
        if t == at:
            rep = master.replica
            for r in ranks:
                workers[r] = worker(r, x0=rep.x, g=rep.g, v=rep.v, state=master.worker_state(r), round_=t)
        reports = [w.step(evaluate=True) for w in workers]
        grad = mean_gradient([r.grad for r in reports])  # type: ignore[misc]
        curve.append(float(grad @ grad))
        if curve[-1] < cfg.tol:
            break
        down = master.fold([r.message for r in reports])
        master.apply(down)
        for w in workers:
            w.apply(down)
    return master.x.copy(), curve


def handover(smoke: bool) -> tuple[list[list], list[dict]]:
    n = 4 if smoke else 8
    cfg = RunConfig(workers=n, method="ef21", k=2, stepsize_mult=256.0, x0="normal:0", rounds=250 if smoke else 3000,
                    tol=0.0)
    at = 50 if smoke else 100
    x_ref, ref = handover_run(cfg, "full", None, range(0))
    tol = 1e-2 if smoke else 1e-7
    first = next(t for t, g in enumerate(ref) if g < tol)
    table, out = [], []
    for setting, ranks in (("full", range(n)), ("float32", range(n)), ("float32", range(1))):
        x, curve = handover_run(cfg, setting, at, ranks)
        hit = next((t for t, g in enumerate(curve) if g < tol), None)
        diff = float(np.linalg.norm(x - x_ref) / np.linalg.norm(x_ref))
        what = "resume (every rank)" if len(ranks) == n else "replacement (one rank)"
        table.append([setting, what, at, first, hit, diff, min(ref), min(curve)])
        out.append({"master_rows": setting, "handed_over": len(ranks), "at_round": at, "tol": tol,
                    "rounds_to_tol_uninterrupted": first, "rounds_to_tol": hit, "reached": hit is not None,
                    "x_rel_diff": diff, "min_grad_norm_sq_uninterrupted": min(ref),
                    "min_grad_norm_sq": min(curve), "rounds": cfg.rounds})
    return table, out


def main() -> None:
    args = base_parser(__doc__).parse_args()
    rows, results = fold_grid(args.smoke)
    print("EF21 master, Top-k messages: time per round and memory held")
    print_table(["d", "n", "k", "round ms", "fold ms", "mask fold ms", "scatter-add ms", "fold/scatter", "mem/(n+3)8d"],
                rows)

    d, n, k = (100_000, 4, 100) if args.smoke else (10_000_000, 16, 10_000)
    t0 = time.perf_counter()
    table, settings = rows_settings(d, n, k)
    print(f"\n--master-rows: the master's state (replica and the n rows of g_i) and its round, d = {d}, n = {n}, "
          f"Top-{k} messages ({time.perf_counter() - t0:.0f} s)")
    print_table(["master rows", "d", "n", "k", "held GiB", "round ms"], table)

    table, drift = handover(args.smoke)
    print("\nHand-over from the master's rows at a round, against the uninterrupted run (mushrooms, EF21 Top-2 "
          "256x, x0 ~ N(0, I))")
    print_table(["master rows", "hand-over", "at round", "rounds to tol (uninterrupted)", "rounds to tol",
                 "|x - x_ref|/|x_ref|", "min |grad f|^2 (uninterrupted)", "min |grad f|^2"], table)
    write_json(args.json, "master_cost", results, rows_settings=settings, handover=drift)


if __name__ == "__main__":
    main()
