"""Round rate of the service against the transport's floor.

The floor: a bare grpc.aio barrier round with the same n worker processes and the same message sizes (each
worker sends a message of the size of a Top-k Update, the master waits for all n and answers each with a
message of the size of our RoundResult). Ours: `ef21` EF21/Top-k on the cheap separable quadratic (so the
gradient does not hide system overhead), master in this process, workers as processes. Both are measured in
the same run, one after the other, and reported as a ratio.

    python benchmarks/round_rate.py                    # the full grid (several minutes on 2 cores)
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
from common import print_table, write_json  # noqa: E402

from ef21.config import RunConfig  # noqa: E402
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
async def main(target, up, rounds):
    async with grpc.aio.insecure_channel(target) as ch:
        call = ch.stream_stream("/floor.Barrier/Round")()
        msg = b"\x02" * up
        for _ in range(rounds):
            await call.write(msg)
            await call.read()
        await call.done_writing()
asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
'''


async def floor_rate(n: int, up_bytes: int, down_bytes: int, rounds: int) -> float:
    barrier = Barrier(n, down_bytes)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 256 << 20)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "floor.Barrier", {"Round": grpc.stream_stream_rpc_method_handler(barrier.handle)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    procs = [await asyncio.create_subprocess_exec(sys.executable, "-c", FLOOR_CLIENT, f"127.0.0.1:{port}",
                                                  str(up_bytes), str(rounds), stdin=subprocess.DEVNULL)
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

async def ef21_rate(n: int, d: int, k: int, rounds: int) -> tuple[float, float, float]:
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
                                                  stdin=subprocess.DEVNULL) for _ in range(n)]
    await master.wait()
    for p in procs:
        await p.wait()
    await master.shutdown()
    (t0, up0, down0), (t1, up1, down1) = marks[lo], marks[hi]
    msgs = (hi - lo) * n  # steady-state rounds only: round 0 sends the dense g_i^0
    return (hi - lo) / (t1 - t0), (up1 - up0) / msgs, (down1 - down0) / msgs


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--n", type=int, nargs="+", default=[1, 4, 8, 16], help="numbers of workers to measure")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.smoke:
        grid, rounds = [(2, 10_000, 1)], 40
    else:
        grid = [(n, d, k) for n in args.n for d in (10_000, 1_000_000) for k in (1, d // 100)]
        rounds = args.rounds
    results = []
    for n, d, k in grid:
        r = rounds if d * n <= 4_000_000 else max(40, rounds // 5)
        ours, up, down = await ef21_rate(n, d, k, r)
        floor = await floor_rate(n, int(up), int(down), r)
        results.append({"n": n, "d": d, "k": k, "rounds": r, "ours_rps": ours, "floor_rps": floor,
                        "ratio": ours / floor, "up_bytes": up, "down_bytes": down})
        print(f"  n={n} d={d} k={k}: ours {ours:.1f} rounds/s, floor {floor:.1f} rounds/s", flush=True)
    print_table(["n", "d", "k", "ours r/s", "floor r/s", "ratio", "up B", "down B"],
                [[r["n"], r["d"], r["k"], r["ours_rps"], r["floor_rps"], r["ratio"], int(r["up_bytes"]),
                  int(r["down_bytes"])] for r in results])
    write_json(args.json, "round_rate", results, cpus=os.cpu_count())


if __name__ == "__main__":
    asyncio.run(main())
