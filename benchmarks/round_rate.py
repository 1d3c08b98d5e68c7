"""Round rate of the service against the transport's floor.

The floor: a bare grpc.aio barrier round with the same n worker processes and the same message sizes (each
worker sends a message of the size of a Top-k Update, the master waits for all n and answers each with a
message of the size of our RoundResult). Ours: `ef21` EF21/Top-k on the cheap separable quadratic (so the
gradient does not hide system overhead), master in this process, workers as processes. Both are measured in
the same run, one after the other, and reported as a ratio.

The floor does no arithmetic; a round of EF21 must: each worker evaluates its gradient, compresses
∇f_i − g_i with Top-k and moves its replica (all O(d)), the master folds the messages. ``compute ms`` is that
work for one round measured in this process without any network (worker step + replica update + the master's
fold), and ``vs floor+compute`` compares our rate with a transport that cost nothing beyond the floor:
1 / (1/floor + compute), with the workers' share multiplied by n / cpus when there are more workers than cores.

    python benchmarks/round_rate.py                    # the full grid (several minutes on 2 cores)
    python benchmarks/round_rate.py --event-loop uvloop  # master, workers and floor on uvloop
    python benchmarks/round_rate.py --smoke            # a tiny run, as CI does
    python benchmarks/round_rate.py --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
from common import base_parser, best_time, print_table, write_json  # noqa: E402

from ef21.config import RunConfig  # noqa: E402
from ef21.engine import MasterNode, WorkerNode  # noqa: E402
from ef21.problem import build_problem  # noqa: E402
from ef21.simulate import resolve_method  # noqa: E402
from ef21_wire import eventloop  # noqa: E402
from ef21_wire.eventloop import EVENT_LOOPS  # noqa: E402
from ef21_server.coordinator import MasterOptions  # noqa: E402
from ef21_server.master import ListenOptions, Master  # noqa: E402

FLOOR_METHOD = "/floor.Barrier/Round"


# -- the floor: a bare barrier ---------------------------------------------------------------------------------------

class Barrier:
    def __init__(self, n: int, down_bytes: int) -> None:
        self.n = n
        self.down = b"\x01" * down_bytes
        self.arrived = 0
        self.event = asyncio.Event()
        self.queues: list[asyncio.Queue] = []
        self.rounds = 0

    async def handle(self, requests, context):  # type: ignore[no-untyped-def]
        q: asyncio.Queue = asyncio.Queue()
        self.queues.append(q)

        async def reader() -> None:
            async for _ in requests:
                self.arrived += 1
                if self.arrived == self.n:
                    self.arrived = 0
                    self.rounds += 1
                    for qq in self.queues:
                        qq.put_nowait(self.down)
            for qq in self.queues:
                qq.put_nowait(None)

        task = asyncio.create_task(reader())
        try:
            while (item := await q.get()) is not None:
                await context.write(item)
        finally:
            task.cancel()


FLOOR_CLIENT = r'''
import asyncio, sys, grpc
from ef21_wire import eventloop
async def main(target, up, rounds):
    async with grpc.aio.insecure_channel(target) as ch:
        call = ch.stream_stream("/floor.Barrier/Round")()
        msg = b"\x02" * up
        for _ in range(rounds):
            await call.write(msg)
            await call.read()
        await call.done_writing()
eventloop.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])), sys.argv[4])
'''


async def floor_rate(n: int, up_bytes: int, down_bytes: int, rounds: int, loop: str = "asyncio") -> float:
    barrier = Barrier(n, down_bytes)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 256 << 20)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "floor.Barrier", {"Round": grpc.stream_stream_rpc_method_handler(barrier.handle)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    procs = [await asyncio.create_subprocess_exec(sys.executable, "-c", FLOOR_CLIENT, f"127.0.0.1:{port}",
                                                  str(up_bytes), str(rounds), loop, stdin=subprocess.DEVNULL)
             for _ in range(n)]
    # Time only the middle of the run: process start-up is not transport cost.
    while barrier.rounds < max(2, rounds // 10):
        await asyncio.sleep(0.001)
    r0, t0 = barrier.rounds, time.perf_counter()
    while barrier.rounds < rounds - max(2, rounds // 10):
        await asyncio.sleep(0.001)
    rate = (barrier.rounds - r0) / (time.perf_counter() - t0)
    for p in procs:
        await p.wait()
    await server.stop(0)
    return rate


# -- ours ------------------------------------------------------------------------------------------------------------

async def ef21_rate(n: int, d: int, k: int, rounds: int, loop: str = "asyncio") -> tuple[float, float, float]:
    """Rounds/s of ef21 on the quadratic, and the measured mean uplink and downlink message sizes."""
    cfg = RunConfig(problem="quadratic", dim=d, workers=n, method="ef21", compressor="topk", k=k, rounds=rounds,
                    stepsize_mult=1.0)
    marks: dict[int, tuple[float, int, int]] = {}
    lo, hi = max(2, rounds // 10), rounds - max(2, rounds // 10)
    opts = MasterOptions(cfg, eval_every=10**9)

    def on_round(rec):  # type: ignore[no-untyped-def]
        if rec.round in (lo, hi):
            marks[rec.round] = (time.perf_counter(), rec.wire_bytes_up, rec.wire_bytes_down)

    master = Master(opts, ListenOptions(port=0, status_port=None), on_round=on_round)
    await master.start()
    procs = [await asyncio.create_subprocess_exec(sys.executable, "-m", "ef21_worker", "--master", master.address,
                                                  "--event-loop", loop, stdin=subprocess.DEVNULL) for _ in range(n)]
    await master.wait()
    for p in procs:
        await p.wait()
    await master.shutdown()
    (t0, up0, down0), (t1, up1, down1) = marks[lo], marks[hi]
    msgs = (hi - lo) * n  # steady-state rounds only: round 0 sends the dense g_i^0
    return (hi - lo) / (t1 - t0), (up1 - up0) / msgs, (down1 - down0) / msgs


def compute_per_round(d: int, k: int) -> tuple[float, float]:
    """Seconds of arithmetic in one round without any transport: (one worker's step + replica update, the
    master's fold of one message)."""
    cfg = RunConfig(problem="quadratic", dim=d, workers=1, method="ef21", compressor="topk", k=k)
    prob = build_problem(cfg)
    method, comp = resolve_method(cfg, d)
    worker = WorkerNode(method, comp, prob.objectives[0], 0, gamma=1e-3, x0=np.zeros(d))
    master = MasterNode(method, 1, np.zeros(d), gamma=1e-3)
    worker.apply(master.aggregate([worker.step().message]))  # round 0 (dense) out of the way
    down = master.aggregate([worker.step().message])  # a sparse downlink, as in every later round

    number = max(3, min(200, 2_000_000 // d))
    t_worker = best_time(lambda: (worker.step(), worker.apply(down)), number, repeat=3)
    msg = worker.step().message
    t_master = best_time(lambda: master.fold([msg]), number, repeat=3)
    return t_worker, t_master


def parse_args() -> argparse.Namespace:
    ap = base_parser(__doc__)
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--n", type=int, nargs="+", default=[1, 4, 8, 16], help="numbers of workers to measure")
    ap.add_argument("--d", type=int, nargs="+", default=[10_000, 1_000_000], help="dimensions to measure")
    ap.add_argument("--event-loop", choices=EVENT_LOOPS, default="asyncio")
    return ap.parse_args()


async def main(args: argparse.Namespace) -> None:
    if args.smoke:
        grid, rounds = [(2, 10_000, 1)], 40
    else:
        grid = [(n, d, k) for n in args.n for d in args.d for k in (1, d // 100)]
        rounds = args.rounds
    cpus = os.cpu_count() or 1
    results = []
    for n, d, k in grid:
        r = rounds if d * n <= 4_000_000 else max(40, rounds // 5)
        ours, up, down = await ef21_rate(n, d, k, r, args.event_loop)
        floor = await floor_rate(n, int(up), int(down), r, args.event_loop)
        t_worker, t_master = compute_per_round(d, k)
        compute = t_worker * max(1.0, n / cpus) + t_master * n
        bound = 1.0 / (1.0 / floor + compute)
        results.append({"n": n, "d": d, "k": k, "rounds": r, "event_loop": args.event_loop, "ours_rps": ours,
                        "floor_rps": floor, "ratio": ours / floor, "compute_s": compute, "worker_compute_s": t_worker,
                        "master_fold_s": t_master, "floor_plus_compute_rps": bound, "ratio_vs_bound": ours / bound,
                        "up_bytes": up, "down_bytes": down})
        print(f"  n={n} d={d} k={k}: ours {ours:.1f} rounds/s, floor {floor:.1f} rounds/s, "
              f"compute {compute * 1e3:.2f} ms", flush=True)
    print_table(["n", "d", "k", "ours r/s", "floor r/s", "ratio", "compute ms", "vs floor+compute", "up B", "down B"],
                [[r["n"], r["d"], r["k"], r["ours_rps"], r["floor_rps"], r["ratio"], r["compute_s"] * 1e3,
                  r["ratio_vs_bound"], int(r["up_bytes"]), int(r["down_bytes"])] for r in results])
    write_json(args.json, "round_rate", results, cpus=cpus, event_loop=args.event_loop)


if __name__ == "__main__":
    ns = parse_args()
    eventloop.run(main(ns), ns.event_loop)
