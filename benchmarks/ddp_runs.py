"""DDP over Gloo as a PyTorch user trains, on ef21's shards, initial weights and minibatches: the contender every
torch benchmark here races (``vs_ddp.py``, ``vs_powersgd.py``).

One launch starts N rank processes (each optionally in its own network namespace: ``prefix``) that train a list
of contenders one after another — dense DDP, or DDP with a communication hook (fp16, PowerSGD) — so that the
processes' start-up (importing torch, the rendezvous) is paid once per launch. For every contender each rank builds
the model afresh (``seeded``: the same initial weights as ef21's ``x0``), wraps it in ``DistributedDataParallel``,
and runs ``steps`` steps of ``torch.optim.SGD`` (or the recipe's optimizer and schedule, ``optim``: ef21's flags,
built as torch's own classes): step 0 on the whole shard (as ef21's round 0), step t ≥ 1 on the rows ef21 draws
from (seed, rank, t), in train mode, with the random draws (augmentation, dropout) an ef21 worker makes at that
round — the data come from rank r's own ef21 objective (``make``). BatchNorm's running statistics are averaged over
the ranks after every step, as ef21's replicas average their updates (DDP's ``broadcast_buffers``, rank 0's
statistics everywhere, is off then). Rank 0 evaluates the held-out set at the evaluation steps with the objective's
own ``metrics`` (eval mode) while the others wait at the next all-reduce.

Bytes, two ways. Counted: the payload of every all-reduce (a hook's calls of ``dist.all_reduce``, seen by a
wrapper; without a hook DDP all-reduces the d float32 gradients a step from C++), as Gloo's ring moves it: each of
the N processes sends 2(N − 1)/N of it, 2(N − 1) times the payload in all, plus DDP's broadcast of the initial
weights, (N − 1)·4d. Measured: every rank reads its own link's counters (``/proc/net/dev`` of its namespace) before
and after each contender — the bytes on the wire, everything included; on a shared loopback rank 0 reads ``lo``,
which then holds what all ranks sent.

    python benchmarks/ddp_runs.py CONFIG.json RANK     # one rank (what ``run_ddp`` starts N times)
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]

DONE = "ddp_runs: past the last collective"
"""What a rank prints once its results are with rank 0: a failure after it is the teardown's, not the run's."""
GLOO_NOTE = "Gloo ring all-reduce, counted: 2(N-1) x the all-reduced bytes a step + (N-1)*4d for the initial broadcast"


def ring_allreduce_bytes(n: int, d: int, steps: int) -> int:
    """Bytes all N processes send for dense DDP: the initial broadcast of the weights and ``steps`` ring
    all-reduces of d float32 values (reduce-scatter and all-gather: 2(N − 1) chunks of d/N values from each)."""
    return (n - 1) * 4 * d + steps * 2 * (n - 1) * 4 * d


@dataclass(frozen=True)
class Contender:
    """One DDP configuration: ``hook`` None (dense), "fp16", or "powersgd" with ``rank`` and ``start`` (PowerSGD's
    ``matrix_approximation_rank`` and ``start_powerSGD_iter``; the layer-wise ``powerSGD_hook``: the batched one
    fails in torch 2.13 on a 2-D Q)."""

    label: str
    hook: str | None = None
    rank: int = 1
    start: int = 1000


@dataclass
class DDPResult:
    """What one contender did: rank 0's evaluations and step times, the counted bytes, each rank's measured link."""

    label: str
    d: int
    steps: int
    rounds: list[int] = field(default_factory=list)
    acc: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    time_s: list[float] = field(default_factory=list)
    """Seconds since step 0 began at each evaluation (rank 0's clock; earlier evaluations included, as ef21's)."""
    step_end_s: list[float] = field(default_factory=list)
    """Seconds since step 0 began at which x^{t+1} existed on rank 0 (after step t's update), t = 0..steps-1."""
    counted_bytes: list[int] = field(default_factory=list)
    """Training traffic of all N processes, counted, at each evaluation (what had produced x^t)."""
    link_bytes: list[tuple[int, int]] = field(default_factory=list)
    """Per rank: (sent, received) on its own link over the contender (DDP set-up to the last barrier), measured;
    on a shared loopback rank 0's entry is everything sent on lo and the others' are (0, 0)."""
    setup_link_bytes: list[tuple[int, int]] = field(default_factory=list)
    """Per rank: its link's bytes for the process group's rendezvous (once per launch, before any contender)."""


def iface_bytes(iface: str) -> tuple[int, int]:
    """(sent, received) so far on ``iface`` of this process's network namespace."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, fields = line.partition(":")
        if name.strip() == iface:
            f = fields.split()
            return int(f[8]), int(f[0])
    raise RuntimeError(f"no interface {iface} in /proc/net/dev")


def load_module(path: str) -> Any:
    """A model module (``build(options)``, ``make(ctx)``: the objective whose data and evaluation a rank uses) from
    its file, as ef21 loads objectives."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"ddp_model_{Path(path).stem}", ROOT / path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# -- one rank ----------------------------------------------------------------------------------------------------------

def _rank_main(cfg: dict[str, Any], rank: int) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # N processes share the cores, as ef21's workers do
    n, iface = cfg["workers"], cfg["iface"]
    os.environ.update(MASTER_ADDR=cfg["addr"], MASTER_PORT=str(cfg["port"]), GLOO_SOCKET_IFNAME=iface)
    before = iface_bytes(iface)
    dist.init_process_group("gloo", rank=rank, world_size=n, timeout=timedelta(seconds=cfg.get("timeout_s", 900)))
    dist.barrier()
    after = iface_bytes(iface)
    setup = (after[0] - before[0], after[1] - before[1])

    # Every hook's all-reduce goes through dist.all_reduce (default_hooks._allreduce_fut and PowerSGD alike): count
    # its payload. DDP without a hook all-reduces from C++, counted from d instead.
    payload = [0]
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor: Any, *args: Any, **kwargs: Any) -> Any:
        payload[0] += tensor.numel() * tensor.element_size()
        return real_all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce  # type: ignore[assignment]
    mod = load_module(cfg["module"])
    from ef21.problems.plugins import build_objective

    options = dict(kv.split("=", 1) for kv in cfg["objective_args"])
    # The data, the round's random draws (augmentation, dropout) and the held-out evaluation are the objective's
    # own, as an ef21 worker makes them: rank r's objective is the one ef21's worker r builds.
    obj = build_objective(f"{ROOT / cfg['module']}:make", tuple(options.items()), rank, n, cfg["seed"]).inner
    out = []
    for spec in cfg["contenders"]:
        res = _train(Contender(**spec["contender"]), spec["steps"], spec["eval_every"], cfg, rank, mod, options,
                     obj, payload)
        res.setup_link_bytes = [setup]
        out.append(res)
    dist.barrier()
    gathered: list[Any] = [None] * n
    dist.all_gather_object(gathered, [(r.link_bytes[0], r.setup_link_bytes[0]) for r in out])
    if rank == 0:
        for i, r in enumerate(out):
            r.link_bytes = [gathered[k][i][0] for k in range(n)]
            r.setup_link_bytes = [gathered[k][i][1] for k in range(n)]
        Path(cfg["out"]).write_text(json.dumps([asdict(r) for r in out]))
    # Everyone leaves together: a rank tearing Gloo down while a peer is still in a collective aborts the process.
    dist.barrier()
    print(DONE, flush=True)
    dist.destroy_process_group()
    # Gloo's threads can still abort a process at exit ("terminate called without an active exception", seen
    # once in a few hundred launches on a loaded machine): leave without running the interpreter's finalizers.
    os._exit(0)


def _train(c: Contender, steps: int, every: int, cfg: dict[str, Any], rank: int, mod: Any, options: dict[str, str],
           obj: Any, payload: list[int]) -> DDPResult:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torch_recipes import config_of, evaluate, torch_optimizer

    from ef21.methods.estimators import batch_rng, draw_batch
    from ef21.problems.torch import seeded

    n, seed, iface = cfg["workers"], cfg["seed"], cfg["iface"]
    dist.barrier()
    link0 = iface_bytes(iface)
    model = seeded(seed, lambda: mod.build(options))
    model.train()
    d = sum(p.numel() for p in model.parameters())
    # BatchNorm's running statistics as ef21's recipe keeps them (ef21.methods.buffers): every rank updates its
    # copy in the step's forward, then the copies are averaged over the ranks (an all-reduce after the step, its
    # bytes counted), so all ranks hold the mean of their updates, as every ef21 replica does. DDP's own default
    # (broadcast_buffers: rank 0's statistics overwrite the others' at every forward) is turned off for it.
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    # One bucket (an explicit cap also caps the first bucket, which is 1 MiB by default): with two, PowerSGD's
    # callbacks issue the buckets' P and Q all-reduces in an order that can differ between ranks, and Gloo aborts
    # on the mismatch (torch 2.13, d = 301,066).
    ddp = DistributedDataParallel(model, bucket_cap_mb=cfg.get("bucket_cap_mb", 25),
                                  broadcast_buffers=not buffers)  # broadcasts rank 0's weights
    state = None
    if c.hook == "fp16":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif c.hook == "powersgd":
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

        state = psgd.PowerSGDState(process_group=None, matrix_approximation_rank=c.rank,
                                   start_powerSGD_iter=c.start)
        ddp.register_comm_hook(state, psgd.powerSGD_hook)
    elif c.hook is not None:
        raise ValueError(f"unknown hook {c.hook!r}")
    sched, clip = None, None
    if cfg.get("optim"):  # the recipe's optimizer and schedule, as ef21's master runs them (torch's own classes)
        opt_cfg = config_of([*cfg["optim"].split(), "--rounds", str(cfg["horizon"])])
        opt, sched = torch_optimizer(model, opt_cfg)
        clip = opt_cfg.clip_norm
    else:
        opt = torch.optim.SGD(ddp.parameters(), lr=cfg["stepsize"])
    loss_fn = obj.loss
    res = DDPResult(c.label, d, steps)
    payload[0] = 0
    dist.barrier()
    t0 = time.perf_counter()
    for t in range(steps + 1):
        if rank == 0 and (t % every == 0 or t == steps):
            now = time.perf_counter() - t0
            m = evaluate(obj, model)  # ef21's evaluation: eval() mode, the averaged running statistics
            res.acc.append(m.get("test_acc", float("nan")))
            res.loss.append(m["test_loss"])
            res.rounds.append(t)
            res.time_s.append(now)
            sent = payload[0] + (t * 4 * d if c.hook is None else 0)  # dense DDP all-reduces from C++
            res.counted_bytes.append((n - 1) * 4 * d + 2 * (n - 1) * sent)
        if t == steps:
            break
        # Step 0 on the whole shard (as ef21's round 0, in the objective's chunks: gradient accumulation, the
        # all-reduce at the last), step t >= 1 on the rows ef21 draws from (seed, rank, t).
        rows = None if t == 0 else draw_batch(batch_rng(seed, rank, t), obj.n_samples, cfg["batch_size"])
        parts = list(obj.data.chunks(obj.chunk_size)) if rows is None else [rows]
        total = obj.n_samples if rows is None else len(rows)
        obj.begin_round((seed, rank, t), None)
        opt.zero_grad(set_to_none=True)
        with obj._draws("full" if rows is None else "batch"):  # the round's augmentation and dropout draws
            for i, part in enumerate(parts):
                inputs, targets = obj.data.batch(part)
                w = (obj.n_samples if part is None else len(part)) / total
                with ddp.no_sync() if i < len(parts) - 1 else contextlib.nullcontext():
                    (loss_fn(ddp(inputs), targets) * w).backward()  # DDP all-reduces (averages) at the last part
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if sched is not None:
            sched.step()
        if buffers:
            with torch.no_grad():
                # One all-reduce for all of them, as a PyTorch user would coalesce them: one collective a buffer
                # (12 on the race's ResNet) cost ~3-5 ms each on a loaded 2-core machine, most of DDP's step.
                flat = torch.cat([b.reshape(-1) for b in buffers])
                dist.all_reduce(flat)  # counted: goes through the wrapper
                flat.div_(n)
                at = 0
                for b in buffers:
                    b.copy_(flat[at:at + b.numel()].view_as(b))
                    at += b.numel()
        if rank == 0:
            res.step_end_s.append(time.perf_counter() - t0)
    dist.barrier()
    link1 = iface_bytes(iface)
    mine = (link1[0] - link0[0], link1[1] - link0[1])
    res.link_bytes = [mine if iface != "lo" or rank == 0 else (0, 0)]
    del ddp, opt, state
    return res


# -- the launch --------------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:  # a free port for the rendezvous (released just before rank 0 binds it)
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ddp(module: str, objective_args: Sequence[str], contenders: Sequence[tuple[Contender, int, int]],
            workers: int, *, stepsize: float, batch_size: int, tmp: Path, seed: int = 0, optim: str | None = None,
            horizon: int = 0,
            prefixes: Sequence[Sequence[str]] | None = None, addr: str = "127.0.0.1", iface: str = "lo",
            port: int | None = None, timeout_s: float = 3600) -> list[DDPResult]:
    """Train each (contender, steps, eval_every) in turn with ``workers`` rank processes; rank r starts under
    ``prefixes[r]`` (e.g. ``ip netns exec NS``) and rank 0 listens on ``addr``."""
    tmp.mkdir(parents=True, exist_ok=True)
    out = tmp / "ddp_results.json"
    out.unlink(missing_ok=True)
    cfg = {"module": module, "objective_args": list(objective_args), "seed": seed, "workers": workers,
           "stepsize": stepsize, "batch_size": batch_size, "optim": optim, "horizon": horizon, "addr": addr,
           "iface": iface,
           "port": port if port is not None else free_port(), "out": str(out),
           "contenders": [{"contender": asdict(c), "steps": s, "eval_every": e} for c, s, e in contenders]}
    cfg_path = tmp / "ddp_config.json"
    cfg_path.write_text(json.dumps(cfg))
    procs = [subprocess.Popen([*(prefixes[r] if prefixes else []), sys.executable, __file__, str(cfg_path), str(r)],
                              cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for r in range(workers)]
    try:
        outs = [p.communicate(timeout=timeout_s) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    bad = [(r, p.returncode, outs[r][1]) for r, p in enumerate(procs) if p.returncode != 0 and DONE not in outs[r][0]]
    if bad or not out.exists():
        r, code, err = bad[0] if bad else (0, 0, "no results written")
        raise RuntimeError(f"DDP rank {r} failed ({code}): {err.strip()[-2000:]}")
    return [DDPResult(**{**r, "link_bytes": [tuple(b) for b in r["link_bytes"]],
                         "setup_link_bytes": [tuple(b) for b in r["setup_link_bytes"]]})
            for r in json.loads(out.read_text())]


if __name__ == "__main__":
    _rank_main(json.loads(Path(sys.argv[1]).read_text()), int(sys.argv[2]))
