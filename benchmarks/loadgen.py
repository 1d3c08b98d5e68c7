"""Fake workers for ``capacity.py``: many in one process, each on its own gRPC channel (its own TCP connection),
speaking the real Train protocol with the worker's own wire code.

A fake worker joins like ``ef21 worker`` (Join, Hello, Setup with its shard's real curvature, the answers the
master asks for during set-up — the same ``worker.client`` functions), then sends precomputed round messages
instead of computing gradients: a dense g_i⁰ of tiny values at round 0, then a Top-k-shaped sparse message
whose support is fixed per rank, and on evaluation rounds a dense zero gradient. The master cannot tell them
from workers (it never checks the values), and the load generator's CPU stays small next to the master's.

Run by ``capacity.py``, one process per slice of ranks; it writes one JSON line per worker to ``--out``:

    python benchmarks/loadgen.py --target HOST:PORT --ranks 0:512 --out gen0.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from ef21.compression.codec import EncodedVector, encode
from ef21.compression.sparse import SparseVector
from ef21.engine.config import RunConfig
from ef21.problems import objectives
from ef21.problems.data import load_dataset
from ef21.problems.problem import local_objective, quadratic_fingerprint
from ef21_wire import eventloop
from ef21_wire.fastwire import RoundResultIn, eval_bytes
from ef21_wire.protocol import TRAIN_METHOD, is_eval_round
from ef21_wire.serde import update_to_bytes
from ef21_wire.v1 import ef21_pb2 as pb
from ef21_wire.v1.ef21_pb2_grpc import MasterStub
from ef21_worker import client as wc
from ef21_worker.channel import CHANNEL_OPTIONS

# gRPC shares one connection among the channels of a process that have the same target and options; a real
# worker is a process of its own, so every fake one asks for a connection of its own.
OPTIONS = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]


def small_side_lambda_max(A) -> float:  # type: ignore[no-untyped-def]
    """λ_max(AᵀA) from the smaller of AᵀA and AAᵀ (the same nonzero eigenvalues).

    Why: every fake worker's Setup carries its L_i, which the worker gets from an eigensolver on its d×d Gram —
    about a second at d = 10³ on this machine, which a real worker spends once on its own core, but which here
    would make the load generator, not the master, the bottleneck of set-up (hundreds of workers in one process).
    A shard of a few rows has a tiny AAᵀ. The value differs from the worker's in the last bits only, and the
    master uses L_i for nothing the capacity runs measure (the stepsize comes from the sum of the Grams)."""
    rows, d = A.shape
    if rows >= d:
        return _worker_lambda_max(A)
    K = A @ A.T
    return float(np.linalg.eigvalsh(K.toarray() if hasattr(K, "toarray") else K)[-1])


_worker_lambda_max = objectives.lambda_max_gram




max_retries = 5


def raise_fd_limit() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit (each fake worker holds a socket); returns (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


@dataclass
class Outcome:
    rank: int
    welcomed: float | None = None
    started: float | None = None
    rounds: int = 0
    stop: str = ""
    error: str = ""
    retries: list[str] = field(default_factory=list)  # streams that broke before the Welcome, and why


class Shared:
    """What every fake worker of this process shares: the run's config and data, loaded once."""

    def __init__(self) -> None:
        self.cfg: RunConfig | None = None
        self.ds = None
        self.fingerprint = ""
        self.n_rows = 0
        self.lock = asyncio.Lock()

    async def load(self, reply: pb.JoinReply) -> RunConfig:
        async with self.lock:
            if self.cfg is None:
                cfg = RunConfig.from_dict(json.loads(reply.config_json))
                if cfg.problem == "quadratic" and cfg.objective is None:
                    self.fingerprint = quadratic_fingerprint(cfg)
                else:
                    data = await asyncio.to_thread(wc.load_worker_data, cfg)
                    self.fingerprint, self.n_rows, self.ds = data.fingerprint, data.n_rows, data.ds
                    if self.ds is None:
                        self.ds = await asyncio.to_thread(load_dataset, cfg.data, problem=cfg.problem)
                self.cfg = cfg
        return self.cfg


def round_messages(rank: int, d: int, k: int) -> tuple[EncodedVector, EncodedVector, EncodedVector]:
    """Round 0's dense g_i⁰ and a Top-k-shaped message (tiny values, support fixed per rank), and an evaluation
    round's dense zero gradient, encoded once."""
    rng = np.random.default_rng([rank, 4242])
    dense = SparseVector.dense(rng.standard_normal(d) * 1e-9)
    idx = np.sort(rng.choice(d, size=min(k, d), replace=False)).astype("<u4")
    sparse = SparseVector(d, idx, rng.standard_normal(idx.shape[0]) * 1e-9)
    return encode(dense), encode(sparse), encode(SparseVector.dense(np.zeros(d)))


async def fake_worker(target: str, rank: int, k: int, shared: Shared, out: Outcome, reply_timeout: float,
                      options: list) -> None:
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        reply = await wc.join_with_backoff(MasterStub(channel), wc.WorkerOptions(master=target, hostname="loadgen",
                                                                                 connect_timeout=600.0))
        if reply.ended:
            out.stop = reply.ended
            return
        cfg = await shared.load(reply)
        d = cfg.dim if cfg.problem == "quadratic" and cfg.objective is None else shared.ds.d  # type: ignore[union-attr]
        while True:
            call = channel.stream_stream(TRAIN_METHOD)()
            st = wc.Stream(call, reply_timeout)
            try:
                await st.send(pb.WorkerMessage(hello=pb.Hello(
                    run_id=reply.run_id, requested_rank=rank, hostname=f"loadgen-{rank}",
                    data_fingerprint=shared.fingerprint, dim=d, n_rows=shared.n_rows)))
                first = await st.recv_proto()
                break
            except (wc.Reconnect, grpc.aio.AioRpcError) as exc:  # what `ef21 worker` does too: a new stream
                if isinstance(exc, grpc.aio.AioRpcError) and exc.code() not in wc.RETRYABLE:
                    raise
                out.retries.append((f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.aio.AioRpcError)
                                    else str(exc))[:200])
                call.cancel()
                await st.close()
                if len(out.retries) >= max_retries:
                    out.error = f"Reconnect: {len(out.retries)} streams broke before the Welcome: {exc}"[:300]
                    return
                await asyncio.sleep(0.5)
        try:
            if first.WhichOneof("kind") != "welcome":
                out.error = f"expected Welcome, got {first.WhichOneof('kind')}"
                return
            out.welcomed = time.time()
            obj = local_objective(cfg, rank, shared.ds)
            start = await wc._set_up(st, obj, rank)
            if start.WhichOneof("kind") == "stop":
                out.stop = start.stop.reason
                return
            out.started = time.time()
            await _rounds(st, start.start, cfg, rank, d, k, out)
        except wc.RunStopped as exc:
            out.stop = str(exc)
        except (wc.WorkerFailure, wc.Reconnect, grpc.aio.AioRpcError) as exc:
            out.error = f"{type(exc).__name__}: {exc}"[:300]
        finally:
            call.cancel()
            await st.close()


async def _rounds(st: wc.Stream, start: pb.Start, cfg: RunConfig, rank: int, d: int, k: int, out: Outcome) -> None:
    dense, sparse, zero_grad = round_messages(rank, d, k)
    eval_rest = pb.Eval(f=0.0).SerializeToString()
    t = start.round
    eval_every = max(1, start.eval_every)
    while True:
        vec = dense if t == 0 else sparse
        await st.send(update_to_bytes(t, vec, False))
        if is_eval_round(t, eval_every, cfg.rounds):
            await st.send(eval_bytes(t, zero_grad, eval_rest))
        got = await st.recv()
        if isinstance(got, RoundResultIn):
            r = got.round
        elif got.WhichOneof("kind") == "stop":
            out.stop = got.stop.reason
            return
        elif got.WhichOneof("kind") == "round_result":
            r = got.round_result.round
        else:
            raise wc.WorkerFailure(f"expected a RoundResult, got {got.WhichOneof('kind')}")
        if r != t:
            raise wc.WorkerFailure(f"expected round {t}, got {r}")
        out.rounds += 1
        t += 1


async def main(ns: argparse.Namespace) -> None:
    lo, hi = (int(v) for v in ns.ranks.split(":"))
    shared = Shared()
    outcomes = [Outcome(r) for r in range(lo, hi)]
    targets = ns.target.split(",")
    options = list(OPTIONS)
    if ns.keepalive_timeout_ms is not None:  # an experiment: is a starved process's late ping answer the cause?
        options = [o for o in options if o[0] != "grpc.keepalive_timeout_ms"]
        options.append(("grpc.keepalive_timeout_ms", ns.keepalive_timeout_ms))
    global max_retries
    max_retries = ns.retries

    async def one(o: Outcome) -> None:
        # --target A,B,...: rank r goes to the aggregator of its block (--block-size ranks each), else to the master.
        target = targets[o.rank // ns.block_size] if len(targets) > 1 else targets[0]
        try:
            await fake_worker(target, o.rank, ns.k, shared, o, ns.reply_timeout, options)
        except Exception as exc:  # every worker's fate is reported, none ends the process
            o.error = f"{type(exc).__name__}: {exc}"[:300]

    await asyncio.gather(*(one(o) for o in outcomes))
    with open(ns.out, "w") as fh:
        for o in outcomes:
            fh.write(json.dumps(o.__dict__) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True, help="HOST:PORT of the master, or A,B,... of the aggregators")
    ap.add_argument("--block-size", type=int, default=1 << 30, help="ranks per aggregator (with several targets)")
    ap.add_argument("--ranks", required=True, help="LO:HI, the ranks this process plays")
    ap.add_argument("--k", type=int, default=10, help="entries of a round's sparse message")
    ap.add_argument("--reply-timeout", type=float, default=1800.0)
    ap.add_argument("--event-loop", default="asyncio")
    ap.add_argument("--retries", type=int, default=5, help="new streams a fake worker opens before it gives up")
    ap.add_argument("--keepalive-timeout-ms", type=int, default=None, help="instead of the worker's")
    ap.add_argument("--out", type=Path, required=True)
    return ap.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    raise_fd_limit()
    objectives.lambda_max_gram = small_side_lambda_max  # this process only: see its docstring
    eventloop.run(main(args), args.event_loop)
