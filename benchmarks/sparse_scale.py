"""Large sparse data through the service: each worker's peak memory against its shard, time and bytes per round,
and the rounds EF21 Top-k needs to lower ‖∇f‖² by 10³.

Logistic regression on the news20-shaped generator (20,000 × 1.35M, density 3e-4) with ``ef21 run --workers 4``.
Each worker generates only its rows (CSR) and L comes from a power iteration the master runs with its workers.

- Memory: the peak resident set (VmHWM, sampled from /proc) of every worker process, against the target
  3 × its CSR shard (data + indices + indptr bytes) + 10 vectors of d float64. An interpreter that has only
  imported the worker's modules already holds ~60 MB (numpy, scipy, grpc, protobuf): its peak is printed too,
  and the table gives both readings, the process's peak and the peak above that idle interpreter.
- Rounds: the simulator (which gives the service's iterates bit for bit) finds the first round R with
  ‖∇f(x^R)‖² ≤ ‖∇f(x⁰)‖² / 10³; the service then runs exactly R rounds, evaluating ‖∇f‖² (dense gradients
  from every worker, counted apart as ``eval_bytes``) only every --eval-every rounds and at the end, and its final
  ‖∇f‖² must equal the simulation's.
- Time and bytes per round: medians over the rounds that do not evaluate (round 0, which sends every g_i⁰ whole,
  is reported apart).

    python benchmarks/sparse_scale.py [--k 10000] [--json PATH] [--logs DIR]     # ~10 min on 2 cores
    python benchmarks/sparse_scale.py --smoke                                     # seconds, as CI does
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    PeakMemory,
    add_logs_arg,
    base_parser,
    idle_rss_mib,
    logs_dir,
    print_table,
    thin,
    write_json,
)

from ef21.engine.config import RunConfig  # noqa: E402
from ef21.engine.simulate import simulate  # noqa: E402
from ef21.problems.data import load_shard  # noqa: E402

MIB = 2**20
# What `python -m ef21_worker` imports before it reads any data.
WORKER_IMPORTS = ("ef21.__main__", "ef21_worker.cli", "ef21_worker.client")


def shard_csr_bytes(data: str, rank: int, n: int) -> int:
    """data + indices + indptr of a worker's CSR shard, built exactly as the worker builds it."""
    A = load_shard(data, rank, n).A
    return int(A.data.nbytes + A.indices.nbytes + A.indptr.nbytes)


def rounds_to_reduce(cfg: RunConfig, reduction: float) -> tuple[int, list[float], float]:
    """(R, ‖∇f(x^t)‖² for t = 0..R, seconds): the first round whose ‖∇f‖² is below ‖∇f(x⁰)‖² / reduction."""
    t0 = time.perf_counter()
    g0 = simulate(dataclasses.replace(cfg, rounds=0)).records[0].grad_norm_sq
    res = simulate(dataclasses.replace(cfg, tol=g0 / reduction))
    curve = [r.grad_norm_sq for r in res.records]
    if curve[-1] >= g0 / reduction:
        raise SystemExit(f"EF21 did not lower |grad f|^2 by {reduction:g} in {cfg.rounds} rounds "
                         f"(reached {curve[0] / curve[-1]:.3g}x): raise --max-rounds or --stepsize-mult")
    return len(curve) - 1, curve, time.perf_counter() - t0


def run_service(cfg: RunConfig, eval_every: int, log: Path) -> tuple[dict, PeakMemory, float]:
    cmd = [sys.executable, "-m", "ef21", "run", "--workers", str(cfg.workers), "--data", str(cfg.data),
           "--k", str(cfg.k), "--stepsize-mult", str(cfg.stepsize_mult), "--rounds", str(cfg.rounds),
           "--eval-every", str(eval_every), "--log", str(log), "-q"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with PeakMemory(proc.pid) as mem:
        _, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"ef21 run failed ({proc.returncode}): {err.strip()[-2000:]}")
    return {"rows": [json.loads(line) for line in log.read_text().splitlines()]}, mem, wall


def per_round(rows: list[dict]) -> dict:
    """Medians over steady rounds (not round 0, not evaluation rounds) of the time and bytes one round adds."""
    dt, up, down = [], [], []
    for a, b in zip(rows, rows[1:]):
        # Record t holds round t's Updates and round t−1's results: a steady step is between two records of
        # rounds that did not evaluate, after round 1 (round 0's dense g_i⁰ and results land in records 0-1).
        if a["round"] >= 2 and a["grad_norm_sq"] is None and b["grad_norm_sq"] is None:
            dt.append(b["elapsed_s"] - a["elapsed_s"])
            up.append(b["wire_bytes_up"] - a["wire_bytes_up"])
            down.append(b["wire_bytes_down"] - a["wire_bytes_down"])
    return {"round_s": statistics.median(dt), "up_bytes": statistics.median(up),
            "down_bytes": statistics.median(down), "steady_rounds": len(dt)}


def main() -> None:
    ap = base_parser(__doc__)
    add_logs_arg(ap)
    ap.add_argument("--data", default="synthetic-sparse:20000:1350000:3e-4")
    ap.add_argument("--workers", type=int, default=4)
    # k = 10⁴ (0.74 % of d): the gradient at x⁰ = 0 spreads over ~4·10⁵ features of each shard, and Top-k must
    # reach most of them to take 99.9 % of ‖∇f‖² away; 10⁴ a round gets there in ~100 rounds with an Update of
    # 120 kB against the 10.8 MB of a dense gradient (10³ a round would need ten times the rounds). The
    # multiplier: 16x of the theory stepsize is the largest of 16/32/64/256 that converges (32x and up diverge,
    # ef21 simulate).
    ap.add_argument("--k", type=int, default=10_000)
    ap.add_argument("--stepsize-mult", type=float, default=16.0)
    ap.add_argument("--reduction", type=float, default=1e3)
    ap.add_argument("--eval-every", type=int, default=None, help="default: a quarter of the rounds")
    ap.add_argument("--max-rounds", type=int, default=2000)
    args = ap.parse_args()
    if args.smoke:
        args.data, args.workers, args.k, args.reduction = "synthetic-sparse:400:20000:5e-3", 2, 200, 30.0
        args.stepsize_mult = 16.0
    cfg = RunConfig(workers=args.workers, data=args.data, k=args.k, stepsize_mult=args.stepsize_mult,
                    rounds=args.max_rounds)
    d = int(args.data.split(":")[2])

    need, curve, sim_s = rounds_to_reduce(cfg, args.reduction)
    print(f"simulated: EF21 Top-{args.k} lowers |grad f|^2 by {args.reduction:g} in {need} rounds "
          f"({curve[0]:.3g} -> {curve[-1]:.3g}; {sim_s:.0f} s)", flush=True)
    eval_every = args.eval_every or max(1, need // 4)
    idle = idle_rss_mib(WORKER_IMPORTS)
    shards = [shard_csr_bytes(args.data, r, args.workers) for r in range(args.workers)]
    with logs_dir(args.logs) as logs:
        run, mem, wall = run_service(dataclasses.replace(cfg, rounds=need), eval_every,
                                     logs / "sparse_scale.jsonl")
    rows = run["rows"]
    final = rows[-1]["grad_norm_sq"]
    steady = per_round(rows)

    workers = []
    for pid, kib in mem.peak_kib.items():
        argv = mem.argv.get(pid, [])
        if "ef21_worker" in argv and "--rank" in argv:
            workers.append((int(argv[argv.index("--rank") + 1]), kib / 1024))
    workers.sort()
    if sorted(r for r, _ in workers) != list(range(args.workers)):
        raise SystemExit(f"sampled the memory of ranks {[r for r, _ in workers]}, expected 0..{args.workers - 1}")
    table, results = [], []
    for rank, peak in workers:
        target = (3 * shards[rank] + 10 * 8 * d) / MIB
        table.append([rank, shards[rank] / MIB, target, peak, peak - idle, peak <= target, peak - idle <= target])
        results.append({"rank": rank, "shard_csr_bytes": shards[rank], "target_mib": target, "peak_rss_mib": peak,
                        "peak_above_idle_mib": peak - idle})
    master_mib = mem.peak_kib.get(mem.pid, 0) / 1024
    print(f"\nWorker memory (MiB): target = 3 x CSR shard + 10 x 8d (d = {d}); idle worker interpreter "
          f"(imports only) {idle:.1f} MiB; master (ef21 run) peak {master_mib:.0f} MiB")
    print_table(["rank", "shard", "target", "peak RSS", "peak - idle", "RSS meets", "above idle meets"], table)
    eval_bytes = rows[-1]["eval_bytes"]
    round0_up = rows[0]["wire_bytes_up"]
    print(f"\nEF21 Top-{args.k}, n = {args.workers}: |grad f|^2 lowered {curve[0] / final:.4g}x in {need} rounds "
          f"(service final {final!r}, simulation {curve[-1]!r}: {'same' if final == curve[-1] else 'DIFFERENT'})")
    print(f"per round (median of {steady['steady_rounds']} steady rounds): {steady['round_s'] * 1e3:.0f} ms, "
          f"up {steady['up_bytes'] / 1e3:.1f} kB, down {steady['down_bytes'] / 1e3:.1f} kB (all workers); "
          f"round 0 up {round0_up / 1e6:.1f} MB (every g_i^0 whole)")
    print(f"evaluation traffic (every {eval_every} rounds, apart): {eval_bytes / 1e6:.1f} MB; "
          f"wall {wall:.0f} s for the whole command")
    write_json(args.json, "sparse_scale", results, data=args.data, workers=args.workers, k=args.k,
               stepsize_mult=args.stepsize_mult, reduction=args.reduction, rounds=need,
               grad_norm_sq_start=curve[0], grad_norm_sq_final=final, same_as_simulation=final == curve[-1],
               idle_worker_mib=idle, master_peak_mib=master_mib, round_s=steady["round_s"],
               up_bytes_per_round=steady["up_bytes"], down_bytes_per_round=steady["down_bytes"],
               round0_up_bytes=round0_up, eval_bytes=eval_bytes, eval_every=eval_every, wall_s=wall,
               d=d, curve=[[t, curve[t]] for t in thin(curve)])


if __name__ == "__main__":
    main()
