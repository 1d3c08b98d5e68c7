"""Time a round takes: `ef21 run` against the bare transport's floor and against torch.distributed over Gloo.

For each case, four things run one after another in the same run (this process and its children), each with the
same number n of worker processes:

* ours — `ef21 run` itself, as a user starts it (master + n worker processes on loopback, evaluation off, the
  JSONL log on): the median time between the closes of consecutive rounds, steady state only.
* floor — a bare grpc.aio barrier: this process serves, n client processes each send a message of our Update's
  size, the server waits for all n and answers each with a message of our RoundResult's size (sizes measured from
  ours). No arithmetic, no validation, no state: what the transport alone costs a round. It runs twice (or
  --floor-pairs times each, alternating): with grpc.aio clients ("floor ms") and with clients on grpc's synchronous
  API, a blocking bidirectional stream fed from a queue ("floor sync ms") — what a worker whose loop ran on a plain
  thread instead of an event loop would pay for the transport (the server is grpc.aio in both).
* Gloo all-reduce — the data-parallel GD loop a PyTorch user writes: the gradient of the same objective on the
  same shard by autograd, ``dist.all_reduce``, the step; n processes (rank 0 is a worker too), float64.
* Gloo star — ef21's pattern on Gloo's transport: every rank's message of our Update's size gathered to rank 0
  and a message of our RoundResult's size broadcast back.

"compute ms" is the arithmetic one round must do, timed in this process without any network: one worker's step
and replica update plus the master's fold of n messages. Ratios: floor / ours (1 would be a round that costs
what the transport costs) and Gloo all-reduce / ours (above 1: ef21's round is the faster).

    python benchmarks/round_rate.py                     # the full grid (several minutes on 2 cores)
    python benchmarks/round_rate.py --event-loop uvloop # ours, the floor's server and clients on uvloop
    python benchmarks/round_rate.py --case mushrooms:ef21:2 --n 4 8
    python benchmarks/round_rate.py --smoke             # a tiny run, as CI does
    python benchmarks/round_rate.py --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
from common import base_parser, best_time, print_table, write_json  # noqa: E402

from ef21.engine.config import RunConfig  # noqa: E402
from ef21.engine.nodes import MasterNode, WorkerNode  # noqa: E402
from ef21.engine.plan import resolve_method  # noqa: E402
from ef21.problems.problem import build_problem  # noqa: E402
from ef21_wire import eventloop  # noqa: E402
from ef21_wire.eventloop import EVENT_LOOPS  # noqa: E402
from ef21_wire.protocol import GRPC_FRAME_BYTES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    """PROBLEM:METHOD[:K]: PROBLEM is mushrooms or quadratic-D (the cheap separable quadratic of dimension D)."""

    problem: str
    method: str
    k: int | None

    @staticmethod
    def parse(spec: str) -> Case:
        parts = spec.split(":")
        if len(parts) not in (2, 3) or not (parts[0] == "mushrooms" or parts[0].startswith("quadratic-")):
            raise argparse.ArgumentTypeError(f"case {spec!r}: PROBLEM:METHOD[:K], PROBLEM mushrooms or quadratic-D")
        return Case(parts[0], parts[1], int(parts[2]) if len(parts) == 3 else None)

    @property
    def d(self) -> int:
        return 112 if self.problem == "mushrooms" else int(self.problem.split("-")[1])

    def flags(self) -> list[str]:
        problem = (["--data", "mushrooms"] if self.problem == "mushrooms"
                   else ["--problem", "quadratic", "--dim", str(self.d)])
        return problem + ["--method", self.method] + ([] if self.k is None else ["--k", str(self.k)])

    def config(self, n: int) -> RunConfig:
        kw: dict = ({"data": "mushrooms"} if self.problem == "mushrooms"
                    else {"problem": "quadratic", "dim": self.d})
        if self.k is not None:
            kw["k"] = self.k
        return RunConfig(workers=n, method=self.method, compressor="topk", **kw)

    def __str__(self) -> str:
        return f"{self.problem} {self.method.upper()}" + ("" if self.k is None else f" Top-{self.k}")


def steady(times: list[float]) -> list[float]:
    """The intervals between consecutive rounds, without the first and last tenth (start-up, shut-down)."""
    cut = max(2, len(times) // 10)
    t = np.asarray(times[cut:len(times) - cut])
    return list(np.diff(t))


# -- ours: `ef21 run` --------------------------------------------------------------------------------------------------

def ef21_run(case: Case, n: int, rounds: int, loop: str, tmp: Path) -> tuple[float, float, float]:
    """Median seconds a round of `ef21 run`, and the mean Update and RoundResult sizes on the wire (bytes)."""
    log = tmp / f"ef21-{case.problem}-{case.method}-{n}.jsonl"
    cmd = [sys.executable, "-m", "ef21", "run", "--workers", str(n), *case.flags(), "--rounds", str(rounds),
           "--eval-every", str(10**9), "--quiet", "--log", str(log), "--event-loop", loop]
    r = subprocess.run(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise SystemExit(f"ef21 run failed ({' '.join(cmd)}):\n{r.stderr[-2000:]}")
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    cut = max(2, len(recs) // 10)
    lo, hi = recs[cut], recs[-cut]
    msgs = (hi["round"] - lo["round"]) * n  # steady state only: round 0 sends the dense g_i^0
    up = (hi["wire_bytes_up"] - lo["wire_bytes_up"]) / msgs
    down = (hi["wire_bytes_down"] - lo["wire_bytes_down"]) / msgs
    return float(np.median(steady([r["elapsed_s"] for r in recs]))), up, down


# -- the floor: a bare grpc.aio barrier --------------------------------------------------------------------------------

class Barrier:
    def __init__(self, n: int, down_bytes: int) -> None:
        self.n = n
        self.down = b"\x01" * down_bytes
        self.arrived = 0
        self.queues: list[asyncio.Queue] = []
        self.times: list[float] = []

    async def handle(self, requests, context):  # type: ignore[no-untyped-def]
        q: asyncio.Queue = asyncio.Queue()
        self.queues.append(q)

        async def reader() -> None:
            async for _ in requests:
                self.arrived += 1
                if self.arrived == self.n:
                    self.arrived = 0
                    self.times.append(time.perf_counter())
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


# The same client on grpc's synchronous API: what a worker whose loop ran on a plain thread (not an event loop)
# would pay for the transport. A blocking bidirectional stream: gRPC's own thread consumes the request iterator
# (fed through a queue), this thread writes into the queue and blocks on the response iterator.
FLOOR_CLIENT_SYNC = r'''
import queue, sys, grpc
target, up, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
q = queue.SimpleQueue()
def requests():
    while (m := q.get()) is not None:
        yield m
with grpc.insecure_channel(target) as ch:
    responses = ch.stream_stream("/floor.Barrier/Round")(requests())
    msg = b"\x02" * up
    for _ in range(rounds):
        q.put(msg)
        next(responses)
    q.put(None)
    for _ in responses:
        pass
'''

FLOOR_CLIENTS = {"aio": FLOOR_CLIENT, "sync": FLOOR_CLIENT_SYNC}


async def _floor(n: int, up_bytes: int, down_bytes: int, rounds: int, loop: str, client: str = "aio") -> float:
    barrier = Barrier(n, down_bytes)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 256 << 20)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "floor.Barrier", {"Round": grpc.stream_stream_rpc_method_handler(barrier.handle)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    procs = [await asyncio.create_subprocess_exec(sys.executable, "-c", FLOOR_CLIENTS[client], f"127.0.0.1:{port}",
                                                  str(up_bytes), str(rounds), loop, stdin=subprocess.DEVNULL)
             for _ in range(n)]
    for p in procs:
        await p.wait()
    await server.stop(0)
    return float(np.median(steady(barrier.times)))


def floor_run(n: int, up_bytes: int, down_bytes: int, rounds: int, loop: str, client: str = "aio") -> float:
    """Median seconds a round of the bare barrier (message sizes without gRPC's 5-byte frame prefix); its server
    is always grpc.aio, its n clients grpc.aio (``client="aio"``) or grpc's synchronous API (``"sync"``)."""
    return eventloop.run(_floor(n, up_bytes, down_bytes, rounds, loop, client), loop)


# -- the peer: torch.distributed over Gloo -----------------------------------------------------------------------------

GLOO_RANK = r'''
import json, os, sys, time
import numpy as np
import torch
import torch.distributed as dist
from ef21.engine.config import RunConfig
from ef21.problems.problem import local_objective
torch.set_num_threads(1)  # n processes share the cores, as ef21's workers do
rank, n, port, problem, d, rounds, up, down, out, addr, iface, star, psgd_rank, dtype = sys.argv[1:15]
rank, n, d, rounds, up, down, psgd_rank = int(rank), int(n), int(d), int(rounds), int(up), int(down), int(psgd_rank)
dtype = getattr(torch, dtype)
os.environ.update(MASTER_ADDR=addr, MASTER_PORT=port, **({"GLOO_SOCKET_IFNAME": iface} if iface else {}))
dist.init_process_group("gloo", rank=rank, world_size=n)
cfg = (RunConfig(workers=n, data="mushrooms") if problem == "mushrooms"
       else RunConfig(workers=n, problem="quadratic", dim=d))
obj = local_objective(cfg, rank)
if problem == "mushrooms":
    A, y, lam = torch.from_numpy(np.ascontiguousarray(obj.A)), torch.from_numpy(obj.y), obj.lam
    def loss(x):
        x2 = x * x
        return torch.nn.functional.softplus(-y * (A @ x)).mean() + lam * (x2 / (1 + x2)).sum()
else:
    h, c = torch.from_numpy(obj.h).to(dtype), torch.from_numpy(obj.c).to(dtype)
    def loss(x):
        return 0.5 * (h * (x - c) ** 2).sum()
x = torch.zeros(d, dtype=torch.float64 if problem == "mushrooms" else dtype, requires_grad=True)
opt = torch.optim.SGD([x], lr=0.5 / n)  # the step does not matter for the time; the sum is averaged by lr
times = {"star": [], "allreduce": [], "powersgd": []}
if star == "1":
    msg_up, msg_down = torch.full((up,), 2, dtype=torch.uint8), torch.full((down,), 1, dtype=torch.uint8)
    gather = [torch.empty(up, dtype=torch.uint8) for _ in range(n)] if rank == 0 else None
    dist.barrier()
    for _ in range(rounds):  # Gloo's transport in ef21's pattern: gather to rank 0, broadcast back
        dist.gather(msg_up, gather, dst=0)
        dist.broadcast(msg_down, src=0)
        times["star"].append(time.perf_counter())
dist.barrier()
for _ in range(rounds):  # the data-parallel GD loop
    opt.zero_grad(set_to_none=True)
    loss(x).backward()
    dist.all_reduce(x.grad)
    opt.step()
    times["allreduce"].append(time.perf_counter())
if psgd_rank and problem != "mushrooms" and d % 1000 == 0:
    # DDP + PowerSGD on the same quadratic, x held as a 1000 x (d/1000) matrix (PowerSGD leaves vectors alone):
    # what a PyTorch user's compressed all-reduce costs a step at this size. Start after 2 dense steps.
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd
    from torch.nn.parallel import DistributedDataParallel
    class Quadratic(torch.nn.Module):
        def __init__(self):
            super().__init__()
            shape = (1000, d // 1000)
            self.w = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
            self.h, self.c = h.view(shape), c.view(shape)  # this rank's own: plain tensors, never synced
        def forward(self):
            return 0.5 * (self.h * (self.w - self.c) ** 2).sum()
    ddp = DistributedDataParallel(Quadratic())
    ddp.register_comm_hook(psgd.PowerSGDState(None, matrix_approximation_rank=psgd_rank, start_powerSGD_iter=2),
                           psgd.powerSGD_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
    dist.barrier()
    for _ in range(rounds):
        opt.zero_grad(set_to_none=True)
        ddp().backward()
        opt.step()
        times["powersgd"].append(time.perf_counter())
if rank == 0:
    with open(out, "w") as f:
        json.dump(times, f)
dist.barrier()  # everyone leaves together: tearing Gloo down under a peer still in a collective aborts it
dist.destroy_process_group()
'''


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def gloo_run(case: Case, n: int, rounds: int, up: int, down: int, tmp: Path) -> tuple[float, float]:
    """Median seconds a step of Gloo's star pattern and of the all-reduce GD loop (n processes)."""
    times = gloo_times(case, n, rounds, up, down, tmp)
    return times["star"], times["allreduce"]


def gloo_times(case: Case, n: int, rounds: int, up: int, down: int, tmp: Path, *, star: bool = True,
               powersgd_rank: int = 0, dtype: str = "float64", prefixes: list[list[str]] | None = None,
               addr: str = "127.0.0.1", iface: str = "", port: int | None = None) -> dict[str, float | None]:
    """Median seconds a step of each Gloo loop that ran: ``star`` (ef21's pattern on Gloo), ``allreduce`` (the GD
    loop) and, with ``powersgd_rank``, DDP + PowerSGD on the quadratic; rank r starts under ``prefixes[r]`` (a
    network namespace) and the rendezvous is at ``addr`` over ``iface``."""
    if port is None:
        with socket.socket() as s:  # a free port for the rendezvous (released just before rank 0 binds it)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    out = tmp / "gloo.json"
    out.unlink(missing_ok=True)
    procs = [subprocess.Popen([*(prefixes[r] if prefixes else []), sys.executable, "-c", GLOO_RANK, str(r), str(n),
                               str(port), case.problem, str(case.d), str(rounds), str(up), str(down), str(out), addr,
                               iface, "1" if star else "0", str(powersgd_rank), dtype], cwd=ROOT,
                              stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in range(n)]
    errs = [p.communicate(timeout=3600)[1] for p in procs]  # c10d's warnings: shown only if a rank fails
    codes = [p.returncode for p in procs]
    if any(codes):
        raise SystemExit(f"a Gloo process failed: exit statuses {codes}\n{next(e for e, c in zip(errs, codes) if c)}")
    times = json.loads(out.read_text())
    return {k: float(np.median(steady(v))) if v else None for k, v in times.items()}


# -- the arithmetic a round must do ------------------------------------------------------------------------------------

def compute_per_round(case: Case, n: int) -> float:
    """Seconds of arithmetic in one round without any transport: one worker's step and replica update, and the
    master's fold of n messages (those of n copies of the worker)."""
    cfg = case.config(n)
    prob = build_problem(cfg)
    d = prob.d
    method, comp = resolve_method(cfg, d)
    worker = WorkerNode(method, comp, prob.objectives[0], 0, gamma=1e-3, x0=np.zeros(d))
    master = MasterNode(method, n, np.zeros(d), gamma=1e-3)
    down = master.aggregate([worker.step().message] * n)  # round 0 (dense) out of the way
    worker.apply(down)
    down = master.aggregate([worker.step().message] * n)  # a sparse downlink, as in every later round

    number = max(3, min(200, 2_000_000 // d))
    t_worker = best_time(lambda: (worker.step(evaluate=False), worker.apply(down)), number, repeat=3)
    msgs = [worker.step(evaluate=False).message] * n
    t_master = best_time(lambda: master.fold(msgs), number, repeat=3)
    return t_worker + t_master


# -- the grid ----------------------------------------------------------------------------------------------------------

DEFAULT_GRID = [
    ("mushrooms:ef21:2", [4, 8]), ("mushrooms:gd", [4, 8]),
    ("quadratic-10000:ef21:100", [1, 4, 8]), ("quadratic-1000000:ef21:10000", [1, 4]),
]


def parse_args() -> argparse.Namespace:
    ap = base_parser(__doc__)
    ap.add_argument("--rounds", type=int, default=600, help="rounds of each run (a tenth at either end not timed)")
    ap.add_argument("--case", type=Case.parse, action="append", default=None,
                    help="PROBLEM:METHOD[:K] (repeatable; with --n); default: the full grid")
    ap.add_argument("--n", type=int, nargs="+", default=[4, 8], help="numbers of workers for --case")
    ap.add_argument("--event-loop", choices=EVENT_LOOPS, default="asyncio")
    ap.add_argument("--no-gloo", action="store_true", help="leave torch.distributed out")
    ap.add_argument("--floor-pairs", type=int, default=1,
                    help="alternating (aio clients, sync clients) floor runs per case; each floor is the median")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    if args.smoke:
        grid, rounds = [(Case.parse("mushrooms:ef21:2"), 2)], 40
    elif args.case:
        grid, rounds = [(c, n) for c in args.case for n in args.n], args.rounds
    else:
        grid, rounds = [(Case.parse(c), n) for c, ns in DEFAULT_GRID for n in ns], args.rounds
    gloo = not args.no_gloo and torch_available()
    if not gloo:
        print("round_rate: Gloo peer skipped: " + ("--no-gloo" if args.no_gloo else
                                                   "PyTorch is not installed (pip install 'ef21[torch]')"))
    cpus = os.cpu_count() or 1
    results, rows = [], []
    with tempfile.TemporaryDirectory(prefix="round_rate-") as tmp_dir:
        tmp = Path(tmp_dir)
        for case, n in grid:
            r = rounds if case.d * n <= 4_000_000 else max(40, rounds // 10)
            ours, up, down = ef21_run(case, n, r, args.event_loop, tmp)
            up_msg, down_msg = int(round(up)) - GRPC_FRAME_BYTES, int(round(down)) - GRPC_FRAME_BYTES
            floors: dict[str, list[float]] = {"aio": [], "sync": []}
            for _ in range(args.floor_pairs):  # A/B/A/B: the aio and the sync clients' floors alternate
                for client in floors:
                    floors[client].append(floor_run(n, up_msg, down_msg, r, args.event_loop, client))
            floor, floor_sync = float(np.median(floors["aio"])), float(np.median(floors["sync"]))
            star = allreduce = None
            if gloo:
                star, allreduce = gloo_run(case, n, r, up_msg, down_msg, tmp)
            compute = compute_per_round(case, n)
            res = {"case": str(case), "problem": case.problem, "method": case.method, "n": n, "d": case.d,
                   "k": case.k, "rounds": r, "event_loop": args.event_loop, "ours_ms": ours * 1e3,
                   "floor_ms": floor * 1e3, "ratio": floor / ours, "compute_ms": compute * 1e3,
                   "floor_sync_ms": floor_sync * 1e3, "floor_sync_vs_aio": floor_sync / floor,
                   "floor_runs_ms": [t * 1e3 for t in floors["aio"]],
                   "floor_sync_runs_ms": [t * 1e3 for t in floors["sync"]],
                   "gloo_star_ms": None if star is None else star * 1e3,
                   "gloo_allreduce_ms": None if allreduce is None else allreduce * 1e3,
                   "allreduce_vs_ours": None if allreduce is None else allreduce / ours,
                   "up_bytes": up, "down_bytes": down,
                   # the same figures as rates, for older readers of this file
                   "ours_rps": 1 / ours, "floor_rps": 1 / floor}
            results.append(res)
            print(f"  {case} n={n}: ours {ours * 1e3:.3g} ms, floor {floor * 1e3:.3g} ms"
                  f" (sync clients {floor_sync * 1e3:.3g} ms)"
                  + ("" if star is None else f", Gloo star {star * 1e3:.3g} ms, all-reduce {allreduce * 1e3:.3g} ms"),
                  flush=True)
            dash = "-"
            rows.append([str(case), n, res["ours_ms"], res["floor_ms"], res["ratio"], res["floor_sync_ms"],
                         dash if star is None else res["gloo_star_ms"],
                         dash if allreduce is None else res["gloo_allreduce_ms"],
                         dash if allreduce is None else res["allreduce_vs_ours"],
                         res["compute_ms"], int(up), int(down)])
    print(f"\nMedian ms a round ({args.event_loop} loop, {cpus} CPUs); floor/ours: 1 = no cost beyond the transport; "
          f"all-reduce/ours > 1: ef21's round is faster than the PyTorch loop")
    print_table(["case", "n", "ours ms", "floor ms", "floor/ours", "floor sync ms", "Gloo star ms",
                 "Gloo all-reduce ms", "all-reduce/ours", "compute ms", "up B", "down B"], rows)
    write_json(args.json, "round_rate", results, cpus=cpus, event_loop=args.event_loop, gloo=gloo,
               gloo_note=None if gloo else "torch not installed: Gloo not measured")


if __name__ == "__main__":
    main()
