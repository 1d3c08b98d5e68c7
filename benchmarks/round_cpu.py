"""Where a round's CPU goes: `ef21 run` on mushrooms (EF21 Top-k, evaluation off) against the bare grpc.aio floor.

On a machine with fewer cores than processes a round cannot be shorter than the CPU all processes spend on it
divided by the cores; this script measures that CPU, so that a round time can be read against it.

* ours — `ef21 run` with n worker processes; after a warm-up, the CPU time (user and system, from /proc) of every
  thread of the master and the workers over a window, divided by the rounds closed in it (read from the log),
  by role and thread: the event loop's thread ("main"), gRPC's threads (event_engine, the poller).
* floor — `round_rate.py`'s bare barrier with the same n and message sizes: its CPU (this process and its
  children, from getrusage) for two run lengths, the difference divided by the difference in rounds; then the same
  with its clients on grpc's synchronous API ("floor, sync clients").

Linux only (/proc).

    python benchmarks/round_cpu.py --n 4 8 [--event-loop uvloop] [--json out.json]
"""

from __future__ import annotations

import collections
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_parser, print_table, write_json  # noqa: E402
from round_rate import ROOT, floor_run  # noqa: E402

from ef21_wire.eventloop import EVENT_LOOPS  # noqa: E402
from ef21_wire.protocol import GRPC_FRAME_BYTES  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def _threads(pid: int, role: str) -> dict[tuple[str, int], tuple[str, float, float]]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        except OSError:
            continue
        f = stat.rsplit(")", 1)[1].split()
        kind = "main" if int(tid) == pid else name
        out[(role, int(tid))] = (kind, int(f[11]) / TICK, int(f[12]) / TICK)
    return out


def _snapshot(master: int) -> dict:
    snap = _threads(master, "master")
    for child in Path(f"/proc/{master}/task/{master}/children").read_text().split():
        snap.update(_threads(int(child), "worker"))
    return snap


def _last_round(log: Path, at_least: int = 0) -> tuple[int, float, float]:
    """(round, bytes up, bytes down) of the log's last complete line, once the run has reached ``at_least``."""
    while True:
        lines = []
        if log.exists():
            with open(log, "rb") as fh:
                fh.seek(max(0, log.stat().st_size - 4000))
                lines = fh.read().splitlines()
        if len(lines) >= 2:  # the last line may be half written
            rec = json.loads(lines[-2])
            if rec["round"] >= at_least:
                return rec["round"], rec["wire_bytes_up"], rec["wire_bytes_down"]
        time.sleep(0.2)


def ours(n: int, k: int, loop: str, warm: float, window: float, tmp: Path) -> dict:
    log = tmp / f"ours-{n}.jsonl"
    cmd = [sys.executable, "-m", "ef21", "run", "--workers", str(n), "--data", "mushrooms", "--method", "ef21",
           "--k", str(k), "--rounds", "10000000", "--eval-every", str(10**9), "--quiet", "--log", str(log),
           "--event-loop", loop]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        _last_round(log, at_least=20)  # started (slow on a loaded machine), past round 0's dense messages
        time.sleep(warm)
        a, (ra, upa, downa), ta = _snapshot(proc.pid), _last_round(log), time.monotonic()
        time.sleep(window)
        b, (rb, upb, downb), tb = _snapshot(proc.pid), _last_round(log), time.monotonic()
    finally:
        proc.terminate()
        proc.wait()
    rounds = rb - ra
    split: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for key, (kind, user, sys_) in b.items():
        if key in a:
            role = key[0]
            split[f"{role} {'main' if kind == 'main' else 'gRPC/other threads'}"][0] += user - a[key][1]
            split[f"{role} {'main' if kind == 'main' else 'gRPC/other threads'}"][1] += sys_ - a[key][2]
    per_round = {name: {"user_ms": 1e3 * u / rounds, "sys_ms": 1e3 * s / rounds} for name, (u, s) in split.items()}
    return {"rounds": rounds, "wall_ms": 1e3 * (tb - ta) / rounds,
            "cpu_ms": sum(v["user_ms"] + v["sys_ms"] for v in per_round.values()), "split": per_round,
            "up_bytes": (upb - upa) / (rounds * n), "down_bytes": (downb - downa) / (rounds * n)}


def _cpu_s() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def floor(n: int, up: int, down: int, loop: str, short: int, long: int, client: str = "aio") -> dict:
    runs = []
    for rounds in (short, long):
        c0, t0 = _cpu_s(), time.monotonic()
        median = floor_run(n, up, down, rounds, loop, client)
        runs.append((_cpu_s() - c0, time.monotonic() - t0, median))
    return {"cpu_ms": 1e3 * (runs[1][0] - runs[0][0]) / (long - short),
            "wall_ms": 1e3 * (runs[1][1] - runs[0][1]) / (long - short), "median_ms": 1e3 * runs[1][2]}


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--n", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--event-loop", choices=EVENT_LOOPS, default="asyncio")
    ap.add_argument("--window", type=float, default=8.0, help="seconds of steady state measured (ours)")
    args = ap.parse_args()
    warm, window, short, long = (1.0, 2.0, 50, 250) if args.smoke else (5.0, args.window, 300, 3300)
    ns = [2] if args.smoke else args.n
    results, rows = [], []
    with tempfile.TemporaryDirectory(prefix="round_cpu-") as tmp:
        for n in ns:
            o = ours(n, args.k, args.event_loop, warm, window, Path(tmp))
            sizes = (int(round(o["up_bytes"])) - GRPC_FRAME_BYTES,
                     int(round(o["down_bytes"])) - GRPC_FRAME_BYTES)
            f = floor(n, *sizes, args.event_loop, short, long)
            # The same floor with its clients on grpc's synchronous API (round_rate.py's "floor sync").
            fs = floor(n, *sizes, args.event_loop, short, long, client="sync")
            cores = os.cpu_count() or 1
            results.append({"n": n, "k": args.k, "event_loop": args.event_loop, "cpus": cores, "ours": o, "floor": f,
                            "floor_sync": fs,
                            "ours_cpu_per_core_ms": o["cpu_ms"] / cores, "floor_cpu_per_core_ms": f["cpu_ms"] / cores})
            for name, v in sorted(o["split"].items()):
                rows.append([n, f"ours: {name}", v["user_ms"], v["sys_ms"], v["user_ms"] + v["sys_ms"], "-"])
            rows.append([n, "ours: total", "-", "-", o["cpu_ms"], o["wall_ms"]])
            rows.append([n, "floor: total", "-", "-", f["cpu_ms"], f["wall_ms"]])
            rows.append([n, "floor, sync clients: total", "-", "-", fs["cpu_ms"], fs["wall_ms"]])
    print(f"CPU ms a round, mushrooms EF21 Top-{args.k}, {args.event_loop} loop, {os.cpu_count()} CPUs "
          f"(workers: the sum over all n)")
    print_table(["n", "what", "user ms", "sys ms", "CPU ms", "wall ms/round"], rows)
    write_json(args.json, "round_cpu", results)


if __name__ == "__main__":
    main()
