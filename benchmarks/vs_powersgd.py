"""The race a PyTorch user will run: ef21 against DDP, DDP + PowerSGD and DDP + fp16 over Gloo, to a target
accuracy, in steps, bytes on the wire and seconds, on loopback and on shaped star links (issue 22).

Every contender trains the same model with N processes on the same shards from the same seeded initial weights,
with the same minibatch stream (step 0 on the whole shard, as ef21's round 0; step t ≥ 1 on the rows ef21 draws from
(seed, rank, t)) and the same constant learning rate:

* DDP dense over Gloo; DDP + ``fp16_compress_hook``; DDP + ``powerSGD_hook`` at ranks 1 and 4, each with a small
  ``start_powerSGD_iter`` (2, the least PowerSGD allows with error feedback) and with its default (1000: dense
  all-reduce until then). The layer-wise hook: ``batched_powerSGD_hook`` fails in torch 2.13 on a 2-D Q.
* ef21 through the service (``ef21 master`` and N ``ef21 worker`` processes): dense (``--method gd --estimator
  sgd``, what DDP computes, through our service) and EF21-SGDM with global Top-1 % on the same minibatches; EF21-BC
  (Top-0.3 %, BC 0.3 %, compact) with full local gradients — the one contender off the common minibatch stream
  (SGDM is refused with BC, and plain SGD oscillates).

Target: the dense DDP run's best held-out accuracy less ``--margin`` (one point). Three passes per model:

1. curves — every contender ``--steps`` steps on loopback, evaluated every ``--eval-every`` steps: its accuracy
   curve, the step at which it first reaches the target, and its training traffic counted (DDP: the all-reduced
   payloads as Gloo's ring moves them; ef21: the master's count of its messages, evaluation apart);
2. timing — on each link of ``--links``, every contender that reached the target runs exactly that many steps
   with no evaluation but the last (ef21 also evaluates round 0: today's set-up does), so the seconds to the target
   are not padded by evaluations; the runs are deterministic, and the final accuracy is checked against the curve's;
3. bytes — on a star link every process (N DDP ranks; ef21's master and N workers) has its own network namespace
   behind its own veth to a bridge, shaped with ``tc tbf`` on both ends, and the kernel's counters of each link
   give the bytes on the wire, everything included (rendezvous, set-up, evaluation, TCP/IP and Ethernet headers);
   on loopback (a private namespace) ``lo`` gives what all processes sent.

"Per worker" is what one worker's link carries, both directions (mean over the workers); ef21's master has a link
of its own (the parameter server's, reported apart). The run is one invocation; its ratios are what count on a
shared machine.

    sudo python benchmarks/vs_powersgd.py --json benchmarks/results/vs_powersgd_baseline.json \\
        --plot benchmarks/results/vs_powersgd_baseline.png
    python benchmarks/vs_powersgd.py --smoke            # tiny, as CI runs it (loopback only without root)
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import netns  # noqa: E402
from common import add_logs_arg, base_parser, exit_on_sigterm, load_average, logs_dir, print_table, write_json  # noqa: E402
from ddp_runs import GLOO_NOTE, Contender, DDPResult, free_port, run_ddp  # noqa: E402
from digits_runs import example_dim, read_curve, run_ef21_apart  # noqa: E402


@dataclass(frozen=True)
class Ef21Contender:
    label: str
    flags: str
    """``ef21 master`` flags; {k1}, {k03}, {k5}, {k20}, {k50} are 1, 0.3, 5, 20 and 50 % of d, {batch} the minibatch
    size. The learning rate (``--stepsize``, or the model's ``optim``) is added."""


@dataclass(frozen=True)
class Model:
    """A model both sides build: ``module`` has ``build(options)`` (DDP's ranks) and ``make(ctx)`` (ef21's
    objective, whose data, draws and evaluation DDP's ranks use too).

    The MLPs keep the race's first settings (plain SGD at the constant ``--stepsize``, the target an accuracy); a
    recipe model (issue 23) brings its own ``optim`` — ef21's optimizer and schedule flags, which DDP's ranks build
    as torch's classes ({horizon}: the cosine's, the curve's steps, so that a timing run that stops at the target
    follows the curve's schedule) — its ``metric`` (``test_loss``: the target is dense DDP's best loss plus
    ``margin``), its steps, minibatch and ef21 contenders."""

    key: str
    title: str
    module: str
    objective_args: tuple[str, ...] = ()
    metric: str = "test_acc"
    margin: float | None = None
    steps: int | None = None
    eval_every: int | None = None
    batch_size: int | None = None
    optim: str | None = None
    ef21: tuple[Ef21Contender, ...] | None = None


DDP_CONTENDERS = (
    Contender("DDP dense (Gloo)"),
    Contender("DDP + fp16 hook", "fp16"),
    Contender("DDP + PowerSGD r1, start 2", "powersgd", 1, 2),
    Contender("DDP + PowerSGD r1, start 1000 (default)", "powersgd", 1, 1000),
    Contender("DDP + PowerSGD r4, start 2", "powersgd", 4, 2),
    Contender("DDP + PowerSGD r4, start 1000 (default)", "powersgd", 4, 1000),
)
SAME_BATCHES = "--estimator sgd --batch-size {batch}"
EF21_CONTENDERS = (
    Ef21Contender("ef21 dense (GD + SGD)", f"--method gd {SAME_BATCHES}"),
    # EF21 on the same minibatches needs SGDM's momentum: plain EF21-SGD (--estimator sgd) oscillates at this
    # learning rate (Top-1 % of a noisy gradient; `ef21 simulate`: digits MLP below the target after 600 steps).
    Ef21Contender("EF21-SGDM Top-1 %", "--method ef21 --k {k1} --estimator sgdm --batch-size {batch}"),
    # Layer-wise Top-k (issue 23's compressor): 1 % of every tensor (at least 4 entries: the biases).
    Ef21Contender("EF21-SGDM layer-wise Top-1 %",
                  "--method ef21 --k-per-tensor 0.01 --k-floor 4 --estimator sgdm --batch-size {batch}"),
    # float32 method vectors and the aligned wire (issue 22, points 4 and 6): the same contenders with their flags.
    # EF21-BC refuses SGDM (the theory does not cover the pair) and oscillates with SGD: full local gradients, so
    # this one does NOT use the common minibatch stream (each worker's whole shard, every round).
    Ef21Contender("EF21-BC Top-0.3 %, BC 0.3 %, compact, full local gradients",
                  "--method ef21 --k {k03} --downlink-k {k03} --encoding compact"),
    # The same with g_i⁰ = C(∇f_i(x⁰)) (Algorithm 1): round 0 then moves k entries each way instead of d float64.
    Ef21Contender("EF21-BC Top-0.3 %, BC 0.3 %, compact, full local gradients, compressed g0",
                  "--method ef21 --k {k03} --downlink-k {k03} --encoding compact --init compressed"),
    Ef21Contender("EF21-SGDM Top-1 %, compressed g0",
                  "--method ef21 --k {k1} --estimator sgdm --batch-size {batch} --init compressed"),
)
# The recipe models: the recipe's optimizer on ef21's master (and torch's in DDP), on the common minibatch stream
# (--estimator sgd: EF21-BC takes it with a master optimizer, unlike with the MLPs' plain SGD). The fractions are
# the recipes' (issue 23: the ResNet kept its accuracy at 20 % per tensor, the transformer its loss at 50 %) and
# one smaller each.
RECIPE_SGD = "--estimator sgd --batch-size {batch}"


def _recipe_contenders(big: str, small: str, *, bc_small: bool = False) -> tuple[Ef21Contender, ...]:
    """The recipe models' ef21 contenders. ``bc_small``: also EF21-BC with the small layer-wise fraction up and the
    same fraction of d down (the transformer: its master link carries the n downlinks, 80 % of its bytes without
    BC; ``ef21 simulate`` reached the target at step 140 with BC 20 %, as without BC, and not with BC 10 % or 5 %)."""
    frac = {"k20": 0.2, "k50": 0.5, "k5": 0.05}
    extra = (Ef21Contender(f"EF21-BC layer-wise Top-{frac[small]:.0%}, BC {frac[small]:.0%}",
                           f"--method ef21 --k-per-tensor {frac[small]} --k-floor 4 --downlink-k {{{small}}} "
                           f"--encoding compact {RECIPE_SGD}"),) if bc_small else ()
    return (
        Ef21Contender("ef21 dense (GD + SGD)", f"--method gd {RECIPE_SGD}"),
        Ef21Contender(f"EF21 layer-wise Top-{frac[big]:.0%}", f"--method ef21 --k-per-tensor {frac[big]} --k-floor 4 "
                      f"--encoding compact {RECIPE_SGD}"),
        Ef21Contender(f"EF21 layer-wise Top-{frac[small]:.0%}", f"--method ef21 --k-per-tensor {frac[small]} "
                      f"--k-floor 4 --encoding compact {RECIPE_SGD}"),
        Ef21Contender(f"EF21 global Top-{frac[big]:.0%}", f"--method ef21 --k {{{big}}} --encoding compact {RECIPE_SGD}"),
        Ef21Contender(f"EF21-BC Top-{frac[big]:.0%}, BC {frac[big]:.0%}",
                      f"--method ef21 --k {{{big}}} --downlink-k {{{big}}} --encoding compact {RECIPE_SGD}"),
        *extra,
    )


MODELS = {
    "digits-mlp": Model("digits-mlp", "digits MLP 64-128-10", "examples/digits_mlp.py"),
    "wide-mlp": Model("wide-mlp", "MLP 64-512-512-10", "benchmarks/wide_mlp.py"),
    # examples/digits_resnet.py at 8 channels (d = 5,066; 150 BatchNorm buffer entries): train mode, augmentation,
    # dropout; the recipe's SGD with Nesterov momentum, weight decay, warm-up and cosine, shortened to 200 steps.
    "bn-cnn": Model("bn-cnn", "BatchNorm ResNet (8 channels), digits 16x16", "examples/digits_resnet.py",
                    ("channels=8",), steps=200, eval_every=20, batch_size=32,
                    optim="--optimizer sgd --momentum 0.9 --nesterov --weight-decay 5e-4 --stepsize 0.05 "
                          "--lr-schedule cosine --warmup 20 --decay-rounds {horizon}",
                    ef21=_recipe_contenders("k20", "k5")),
    # examples/stdlib_lm.py shrunk (width 32, context 32, 64 KiB of text): the recipe's AdamW with clipping,
    # warm-up and cosine over 200 steps; the target a held-out loss (nats per character).
    "transformer": Model("transformer", "transformer LM (width 32, 2 layers), stdlib text", "examples/stdlib_lm.py",
                         ("width=32", "layers=2", "heads=4", "context=32", "train_kb=64", "test_kb=8"),
                         metric="test_loss", margin=0.05, steps=200, eval_every=20, batch_size=8,
                         optim="--optimizer adamw --weight-decay 0.1 --clip-norm 1.0 --stepsize 3e-3 "
                               "--lr-schedule cosine --warmup 20 --min-lr 1e-4 --decay-rounds {horizon}",
                         ef21=_recipe_contenders("k50", "k20", bc_small=True)),
}
SMOKE_MODEL = Model("digits-mlp", "digits MLP 64-16-10", "examples/digits_mlp.py", ("hidden=16",))
SMOKE_DDP = (DDP_CONTENDERS[0], DDP_CONTENDERS[2])
SMOKE_EF21 = (EF21_CONTENDERS[1],)
WORKER_HOSTS = "w{}"


def ef21_flags(c: Ef21Contender, d: int, batch_size: int, stepsize: float, optim: str | None = None) -> list[str]:
    ks = {f"k{p}": max(1, round(d * f)) for p, f in (("1", 0.01), ("03", 0.003), ("5", 0.05), ("20", 0.2),
                                                      ("50", 0.5))}
    flags = c.flags.format(**ks, batch=batch_size).split()
    return flags + (optim.split() if optim else ["--stepsize", repr(stepsize)])


def lower_is_better(metric: str) -> bool:
    return metric != "test_acc"


def first_reaching(rounds: Sequence[int], vals: Sequence[float], target: float, metric: str = "test_acc") -> int | None:
    if lower_is_better(metric):
        return next((t for t, v in zip(rounds, vals) if v <= target + 1e-12), None)
    return next((t for t, a in zip(rounds, vals) if a >= target - 1e-12), None)


def metric_values(curve: dict[str, Any], metric: str) -> list[float]:
    return curve["loss"] if lower_is_better(metric) else curve["acc"]


# -- one link ----------------------------------------------------------------------------------------------------------

Env = netns.Loopback | netns.Star


def open_link(name: str, n: int, private: bool) -> Env:
    if name == "loopback":
        return netns.Loopback(private)
    return netns.Star(["m", *(WORKER_HOSTS.format(r) for r in range(n))], name)


def ddp_on(env: Env, model: Model, args: Sequence[str], runs: list[tuple[Contender, int, int]], ns: Any,
           tmp: Path) -> list[DDPResult]:
    n = ns.workers
    hosts = [WORKER_HOSTS.format(r) for r in range(n)]
    private = isinstance(env, netns.Star) or env.ns is not None
    return run_ddp(model.module, args, runs, n, stepsize=ns.stepsize, batch_size=ns.batch_size, tmp=tmp,
                   prefixes=[env.prefix(h) for h in hosts], addr=env.addr(hosts[0]), iface=env.iface,
                   port=29500 if private else None, optim=_optim(model, ns), horizon=ns.steps)


def _optim(model: Model, ns: Any) -> str | None:
    return None if model.optim is None else model.optim.format(horizon=ns.steps)


def ddp_wire(env: Env, r: DDPResult) -> dict[str, Any]:
    """A DDP contender's measured bytes: each rank's link over the contender plus its share of the launch's
    rendezvous (a run of its own would pay it)."""
    links = [(a + c, b + e) for (a, b), (c, e) in zip(r.link_bytes, r.setup_link_bytes)]
    if isinstance(env, netns.Star):
        return {"per_worker_bytes": sum(s + v for s, v in links) / len(links), "master_bytes": None,
                "total_sent_bytes": sum(s for s, _ in links), "per_rank": links}
    # Loopback: rank 0 read lo, which carries every rank's traffic.
    return {"per_worker_bytes": None, "master_bytes": None,
            "total_sent_bytes": links[0][0] if env.ns is not None else None}


def ef21_on(env: Env, model: Model, c: Ef21Contender, d: int, rounds: int, eval_every: int, ns: Any,
            log: Path) -> tuple[Any, list[dict], dict[str, Any]]:
    n = ns.workers
    hosts = [WORKER_HOSTS.format(r) for r in range(n)]
    private = isinstance(env, netns.Star) or env.ns is not None
    before = env.link_bytes() if isinstance(env, netns.Star) else env.sent()
    curve, records = run_ef21_apart(
        c.label, f"{model.module}:make", n, rounds, eval_every, ef21_flags(c, d, ns.batch_size, ns.stepsize,
                                                                            _optim(model, ns)), log,
        model.objective_args, master_prefix=env.prefix("m"), worker_prefixes=[env.prefix(h) for h in hosts],
        host=env.addr("m"), port=50051 if private else free_port())
    if isinstance(env, netns.Star):
        after = env.link_bytes()
        delta = {h: (after[h][0] - before[h][0], after[h][1] - before[h][1]) for h in after}
        wire = {"per_worker_bytes": sum(sum(delta[h]) for h in hosts) / n, "master_bytes": sum(delta["m"]),
                "total_sent_bytes": sum(s for s, _ in delta.values()), "per_host": delta}
    else:
        sent = env.sent()
        wire = {"per_worker_bytes": None, "master_bytes": None,
                "total_sent_bytes": None if sent is None else sent - before}
    return curve, records, wire


# -- one model ---------------------------------------------------------------------------------------------------------

def race(model: Model, ns: Any, private: bool, links: list[str], logs: Path,
         save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """One model's race; ``save(doc)`` after every pass (the JSON so far: a run cut short keeps what it did)."""
    args = list(model.objective_args)
    d = example_dim(model.module, args)
    metric = model.metric
    ddp_cs, ef21_cs = (SMOKE_DDP, SMOKE_EF21) if ns.smoke else (DDP_CONTENDERS, model.ef21 or EF21_CONTENDERS)
    if ns.only:
        ddp_cs = tuple(c for c in ddp_cs if c.label in ns.only or c is ddp_cs[0])  # dense DDP sets the target
        ef21_cs = tuple(c for c in ef21_cs if c.label in ns.only)
    out: dict[str, Any] = {"model": model.key, "title": model.title, "module": model.module,
                           "objective_args": args, "d": d, "metric": metric, "optim": _optim(model, ns),
                           "batch_size": ns.batch_size, "steps": ns.steps, "eval_every": ns.eval_every,
                           "contenders": [], "links_done": []}
    t_model = time.perf_counter()
    # 1. curves, on loopback
    with open_link("loopback", ns.workers, private) as env:
        t0 = time.perf_counter()
        ddp = ddp_on(env, model, args, [(c, ns.steps, ns.eval_every) for c in ddp_cs], ns, logs / "ddp-curves")
        print(f"  {model.key}: DDP curves in {time.perf_counter() - t0:.0f} s", flush=True)
        if lower_is_better(metric):
            best = min(ddp[0].loss)
            target = best + ns.margin
        else:
            best = max(ddp[0].acc)
            target = best - ns.margin
            out.update(target_acc=target, dense_best_acc=best)
        out.update(target=target, margin=ns.margin, dense_best=best)
        for c, r in zip(ddp_cs, ddp):
            out["contenders"].append({
                "label": c.label, "kind": "ddp", "settings": dataclasses.asdict(c),
                "curve": {"rounds": r.rounds, "acc": r.acc, "loss": r.loss, "counted_bytes": r.counted_bytes,
                          "time_s": r.time_s},
                "curve_lo_sent_bytes": ddp_wire(env, r)["total_sent_bytes"]})
        for c in ef21_cs:
            t0 = time.perf_counter()
            curve, records, wire = ef21_on(env, model, c, d, ns.steps, ns.eval_every, ns,
                                           logs / f"{slug(c.label)}.jsonl")
            by_round = {rec["round"]: rec for rec in records}
            out["contenders"].append({
                "label": c.label, "kind": "ef21", "command": curve.command,
                "curve": _ef21_curve(curve, by_round),
                "curve_lo_sent_bytes": wire["total_sent_bytes"]})
            print(f"  {model.key}: {c.label} curve in {time.perf_counter() - t0:.0f} s", flush=True)
    _score(out["contenders"], target, metric)
    reached = {c["label"]: c["steps_to_target"] for c in out["contenders"] if c["steps_to_target"]}
    save(out)
    # 2 and 3: timing and bytes, link by link
    for link in links:
        with open_link(link, ns.workers, private) as env:
            runs = [(c, reached[c.label], 10**9) for c in ddp_cs if c.label in reached]
            if runs:
                t0 = time.perf_counter()
                for r in ddp_on(env, model, args, runs, ns, logs / f"ddp-{link}"):
                    entry = _entry(out, r.label)
                    final = r.loss[-1] if lower_is_better(metric) else r.acc[-1]
                    entry["links"][link] = {
                        "time_to_target_s": r.step_end_s[-1], "final_acc": r.acc[-1], "final": final,
                        "same_as_curve": final == _curve_value(entry, metric),
                        "time_at": _at_evals(entry, r.step_end_s),
                        **ddp_wire(env, r)}
                print(f"  {model.key} {link}: DDP timing in {time.perf_counter() - t0:.0f} s", flush=True)
            for c in ef21_cs:
                if c.label not in reached:
                    continue
                t0 = time.perf_counter()
                steps = reached[c.label]
                curve, records, wire = ef21_on(env, model, c, d, steps, 10**9, ns,
                                               logs / f"{slug(c.label)}-{link}.jsonl")
                entry = _entry(out, c.label)
                by_round = {rec["round"]: rec for rec in records}
                ends = [by_round[t]["elapsed_s"] for t in range(steps)]
                final = curve.loss[-1] if lower_is_better(metric) else curve.acc[-1]
                entry["links"][link] = {
                    "time_to_target_s": ends[-1], "final_acc": curve.acc[-1], "final": final,
                    "same_as_curve": final == _curve_value(entry, metric), "time_at": _at_evals(entry, ends),
                    "counted_bytes": _ef21_bytes(by_round, steps), "eval_bytes": by_round[steps]["eval_bytes"],
                    "process_s": curve.process_s, **wire}
                print(f"  {model.key} {link}: {c.label} in {time.perf_counter() - t0:.0f} s", flush=True)
        out.setdefault("links_done", []).append(link)
        out["seconds"] = time.perf_counter() - t_model
        save(out)
    out["seconds"] = time.perf_counter() - t_model
    return out


def from_logs(model: Model, ns: Any, logs: Path) -> dict[str, Any]:
    """The curves pass of a run that was cut short, rebuilt from its logs (``--logs``, or a copy of its scratch
    folder): dense DDP's launch (``ddp-curves/ddp_results.json``: all its contenders, written when the launch ends)
    and every ef21 contender whose log reached its last round. No link pass: the steps to the target, the counted
    bytes and the curves only."""
    metric = model.metric
    ddp = [DDPResult(**r) for r in json.loads((logs / "ddp-curves" / "ddp_results.json").read_text())]
    out: dict[str, Any] = {"model": model.key, "title": model.title, "module": model.module,
                           "objective_args": list(model.objective_args), "d": ddp[0].d, "metric": metric,
                           "optim": _optim(model, ns), "batch_size": ns.batch_size, "steps": ns.steps,
                           "eval_every": ns.eval_every, "contenders": [], "links_done": [], "from_logs": True}
    best = min(ddp[0].loss) if lower_is_better(metric) else max(ddp[0].acc)
    target = best + ns.margin if lower_is_better(metric) else best - ns.margin
    out.update(target=target, margin=ns.margin, dense_best=best)
    if not lower_is_better(metric):
        out.update(target_acc=target, dense_best_acc=best)
    for r in ddp:
        out["contenders"].append({"label": r.label, "kind": "ddp",
                                  "curve": {"rounds": r.rounds, "acc": r.acc, "loss": r.loss,
                                            "counted_bytes": r.counted_bytes, "time_s": r.time_s}})
    for c in model.ef21 or EF21_CONTENDERS:
        log = logs / f"{slug(c.label)}.jsonl"
        records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        if not records or records[-1]["round"] < ns.steps:
            continue  # not run, or cut short
        curve = read_curve(c.label, log)
        by_round = {rec["round"]: rec for rec in records}
        out["contenders"].append({
            "label": c.label, "kind": "ef21", "command": " ".join(ef21_flags(c, out["d"], ns.batch_size, ns.stepsize,
                                                                             _optim(model, ns))),
            "curve": _ef21_curve(curve, by_round)})
    _score(out["contenders"], target, metric)
    return out


def _score(contenders: list[dict[str, Any]], target: float, metric: str) -> None:
    """Each curve's steps to the target, best figure and counted bytes to the target."""
    for c in contenders:
        cv = c["curve"]
        t = first_reaching(cv["rounds"], metric_values(cv, metric), target, metric)
        c["steps_to_target"] = t
        c["best_acc"] = None if lower_is_better(metric) else max(cv["acc"])
        c["best"] = min(cv["loss"]) if lower_is_better(metric) else c["best_acc"]
        c["counted_bytes_to_target"] = None if t is None else cv["counted_bytes"][cv["rounds"].index(t)]
        c["links"] = {}


def _ef21_curve(curve: Any, by_round: dict[int, dict]) -> dict[str, Any]:
    return {"rounds": curve.rounds, "acc": curve.acc, "loss": curve.loss,
            # training traffic that produced x^t: rounds 0..t-1 (the log's row t-1)
            "counted_bytes": [_ef21_bytes(by_round, t) for t in curve.rounds],
            "eval_bytes": [by_round[t - 1]["eval_bytes"] if t else 0 for t in curve.rounds],
            "time_s": curve.time_s}


def _ef21_bytes(by_round: dict[int, dict], t: int) -> int:
    if t == 0:
        return 0
    rec = by_round[t - 1]
    return rec["wire_bytes_up"] + rec["wire_bytes_down"]


def _entry(out: dict[str, Any], label: str) -> dict[str, Any]:
    return next(c for c in out["contenders"] if c["label"] == label)


def _curve_value(entry: dict[str, Any], metric: str) -> float:
    cv = entry["curve"]
    return metric_values(cv, metric)[cv["rounds"].index(entry["steps_to_target"])]


def _at_evals(entry: dict[str, Any], ends: list[float]) -> list[list[float]]:
    """(t, seconds at which x^t existed on this link) at the curve's evaluation steps up to the target: the
    figure's time axis. ``ends[t]`` is when step t's update (x^{t+1}) was done."""
    return [[t, 0.0 if t == 0 else round(ends[t - 1], 4)] for t in entry["curve"]["rounds"]
            if t <= entry["steps_to_target"]]


def slug(label: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in label).strip("_")


# -- report ------------------------------------------------------------------------------------------------------------

def mb(b: float | None) -> str:
    return "-" if b is None else f"{b / 1e6:.3g}"


def table(doc: dict[str, Any], links: list[str]) -> None:
    links = [ln for ln in links if ln in doc.get("links_done", links)]
    stars = [ln for ln in links if ln != "loopback"]
    wire_link = stars[-1] if stars else None
    if lower_is_better(doc.get("metric", "test_acc")):
        print(f"\n{doc['title']} (d = {doc['d']:,}), N = {doc['workers']}: target = dense DDP's best held-out loss "
              f"{doc['dense_best']:.3f} + {doc['margin']:g} = {doc['target']:.3f}")
    else:
        print(f"\n{doc['title']} (d = {doc['d']:,}), N = {doc['workers']}: target = dense DDP's best "
              f"{100 * doc['dense_best_acc']:.1f} % - {100 * doc['margin']:.0f} point = {100 * doc['target_acc']:.1f} %")
    headers = ["contender", "steps", "MB counted", *([f"MB wire/worker ({wire_link})", "MB wire all",
                                                       "MB master link"] if wire_link else ["MB lo all"]),
               *[f"s {ln}" for ln in links], "same"]
    rows = []
    for c in doc["contenders"]:
        t = c["steps_to_target"]
        if t is None:
            rows.append([c["label"], f"> {doc['steps']}", "-", *(["-"] * (3 if wire_link else 1)),
                         *(["-"] * len(links)), "-"])
            continue
        w = c["links"].get(wire_link or "loopback", {})
        wire = ([mb(w.get("per_worker_bytes")), mb(w.get("total_sent_bytes")), mb(w.get("master_bytes"))]
                if wire_link else [mb(w.get("total_sent_bytes"))])
        times = [f"{c['links'][ln]['time_to_target_s']:.2f}" if ln in c["links"] else "-" for ln in links]
        same = all(v["same_as_curve"] for v in c["links"].values())
        rows.append([c["label"], t, mb(c["counted_bytes_to_target"]), *wire, *times,
                     "yes" if same else "NO"])
    print_table(headers, rows)


def plot(docs: list[dict[str, Any]], links: list[str], path: Path) -> None:
    """One row per model: accuracy against bytes (counted, all processes; x marks the bytes measured on the wire
    to the target), then against seconds on each link (timing runs' clocks at the curve's evaluation steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 1 + len(links)
    height = 4.0 * len(docs) + 1.0  # inches: a row per model and the legend's strip
    fig, axes = plt.subplots(len(docs), cols, figsize=(4.2 * cols, height), squeeze=False)
    for row, doc in zip(axes, docs):
        metric = doc.get("metric", "test_acc")
        scale = 1 if lower_is_better(metric) else 100
        target = scale * doc.get("target", doc.get("target_acc"))
        doc_links = [ln for ln in links if ln in doc.get("links_done", links)]
        for i, c in enumerate(doc["contenders"]):
            cv = c["curve"]
            style = dict(color=f"C{i % 10}", ls="-" if c["kind"] == "ef21" else "--", marker=".", ms=3,
                         label=c["label"])
            acc = [scale * a for a in metric_values(cv, metric)]
            sent = [(b / 1e6, a) for b, a in zip(cv["counted_bytes"], acc) if b > 0]  # ef21's x^0 costs no round
            row[0].plot([p[0] for p in sent], [p[1] for p in sent], **style)
            star = next((c["links"][ln] for ln in reversed(doc_links) if ln in c["links"]
                         and c["links"][ln].get("total_sent_bytes")), None)
            if star is not None:
                row[0].plot([star["total_sent_bytes"] / 1e6], [target], marker="x", color=style["color"], ms=8)
            for ax, ln in zip(row[1:], links):
                if ln not in c["links"]:
                    continue
                at = dict((int(t), s) for t, s in c["links"][ln]["time_at"])
                pts = [(at[t], a) for t, a in zip(cv["rounds"], acc) if t in at and t > 0]  # log axis: t > 0
                ax.plot([p[0] for p in pts], [p[1] for p in pts], **style)
        row[0].set_xscale("log")
        row[0].set_xlabel("MB sent, all processes (counted; x: on the wire to target)")
        row[0].set_ylabel(f"{doc['title']}\n" + ("held-out loss (nats/char)" if scale == 1 else
                                                   "held-out accuracy (%)"), fontsize=8)
        for ax, ln in zip(row[1:], links):
            ax.set_xlabel(f"seconds from step 0, {ln} (log)")
            ax.set_xscale("log")
        for ax in row:
            ax.axhline(target, color="grey", lw=0.8, ls=":")
            if scale == 1:
                ax.set_ylim(target - 0.5, target + 1.5)
            else:
                ax.set_ylim(max(0, target - 30), 100)
            ax.grid(alpha=0.3, which="both")
    legend: dict[str, Any] = {}  # every model's contenders (the recipe models have their own EF21 settings)
    for row in axes:
        for h, lab in zip(*row[0].get_legend_handles_labels()):
            legend.setdefault(lab, h)
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=3, fontsize=7)
    fig.suptitle(f"ef21 against DDP + PowerSGD, N = {docs[0]['workers']} (dashed: DDP; the curves stop at the "
                 f"target on the links)", fontsize=9)
    fig.tight_layout(rect=(0, 1.0 / height, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


# -- main --------------------------------------------------------------------------------------------------------------

def main() -> int:
    ap = base_parser(__doc__)
    ap.add_argument("--model", action="append", choices=sorted(MODELS), default=None,
                    help="repeatable (default: all)")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=None, help="steps of every curve run (default: the model's, 400 "
                                                            "for the MLPs)")
    ap.add_argument("--eval-every", type=int, default=None, help="the curves' evaluation period (steps to target "
                                                                 "are a multiple of it; default: the model's, 25)")
    ap.add_argument("--margin", type=float, default=None,
                    help="target = dense DDP's best accuracy less this (default 0.01), or its best loss plus it")
    ap.add_argument("--links", nargs="+", default=["loopback", "1gbit", "100mbit"],
                    help="loopback and/or tbf rates of the star's links (each link shaped both ways)")
    ap.add_argument("--stepsize", type=float, default=0.5, help="every contender's constant learning rate")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the model's (32 for the MLPs)")
    ap.add_argument("--only", nargs="+", default=None, metavar="LABEL",
                    help="only these contenders (dense DDP always runs: it sets the target)")
    ap.add_argument("--plot", type=Path, default=None, help="figure (PNG)")
    ap.add_argument("--replot", type=Path, nargs="+", default=None, metavar="JSON",
                    help="only print the tables and draw --plot again from earlier runs' --json (their models in "
                         "one figure)")
    ap.add_argument("--from-logs", type=Path, default=None, metavar="DIR",
                    help="rebuild the curves pass of one --model from a cut-short run's logs (DIR/<model>) and "
                         "write --json from it")
    ap.add_argument("--plot-per-link", action="store_true",
                    help="with --plot, also one figure per link (PLOT_LINK.png: the bytes and that link's seconds)")
    add_logs_arg(ap)
    ns = ap.parse_args()
    exit_on_sigterm()
    if ns.replot is not None:
        runs = [json.loads(p.read_text()) for p in ns.replot]
        models_done = [m for doc in runs for m in doc["models"]]
        all_links = list(dict.fromkeys(ln for doc in runs for ln in doc["links"]))
        for doc in runs:
            for m in doc["models"]:
                table(m, doc["links"])
        if ns.plot is not None:
            plots(models_done, all_links, ns.plot, ns.plot_per_link)
        return 0
    try:
        import torch  # noqa: F401
    except ImportError:
        print("vs_powersgd: skipped: PyTorch is not installed (pip install torch==2.13.0)")
        return 0
    reason = netns.unavailable()
    links = list(ns.links)
    if ns.smoke:
        ns.workers, ns.steps, ns.eval_every, ns.margin = 2, 10, 5, 0.3
        links = ["1gbit"] if reason is None else ["loopback"]
        models = [SMOKE_MODEL]
    else:
        models = [MODELS[m] for m in (ns.model or list(MODELS))]
    if reason is not None:
        print(f"vs_powersgd: no network namespaces ({reason}): loopback only, bytes on the wire not measured")
        links = [ln for ln in links if ln == "loopback"] or ["loopback"]
    load = load_average()
    print(f"load average before: {' '.join(map(str, load))}; {os.cpu_count()} CPUs", flush=True)
    docs: list[dict[str, Any]] = []
    given = {k: getattr(ns, k) for k in ("steps", "eval_every", "margin", "batch_size")}

    def save(docs: list[dict[str, Any]]) -> None:
        results = [{"model": doc["model"], "d": doc["d"], "metric": doc["metric"], "target": doc.get("target"),
                    "target_acc": doc.get("target_acc"),
                    **{k: c.get(k) for k in ("label", "kind", "steps_to_target", "best", "best_acc",
                                             "counted_bytes_to_target")},
                    "links": {ln: {k: v for k, v in c.get("links", {})[ln].items() if k != "time_at"}
                              for ln in c.get("links", {})}}
                   for doc in docs for c in doc["contenders"]]
        write_json(ns.json, "vs_powersgd", results, workers=ns.workers, stepsize=ns.stepsize,
                   links=links, namespaces=reason is None, load_before=load, load_after=load_average(),
                   cpus=os.cpu_count(), models=docs)

    with logs_dir(ns.logs) as logs:
        for m in models:
            if ns.from_logs is not None:
                logs = ns.from_logs
            if not ns.smoke:  # the model's own sizes unless given
                ns.steps = given["steps"] or m.steps or 400
                ns.eval_every = given["eval_every"] or m.eval_every or 25
                ns.margin = given["margin"] if given["margin"] is not None else (m.margin or 0.01)
            ns.batch_size = given["batch_size"] or m.batch_size or 32
            if ns.from_logs is not None:
                doc = from_logs(m, ns, logs / m.key)
                doc["links_done"] = []
            else:
                doc = race(m, ns, reason is None, links, logs / m.key,
                           lambda d: save([*docs, {**d, "workers": ns.workers}]))
            doc.update(workers=ns.workers)
            docs.append(doc)
            table(doc, links)
    print(f"\nbytes counted: {GLOO_NOTE}; ef21: the master's count of its messages (evaluation apart). On the wire: "
          f"the kernel's counters of each link, everything included.")
    save(docs)
    if ns.plot is not None:
        plots(docs, links, ns.plot, ns.plot_per_link)
    return 0


def plots(docs: list[dict[str, Any]], links: list[str], path: Path, per_link: bool) -> None:
    plot(docs, links, path)
    if per_link:
        for ln in links:
            done = [d for d in docs if ln in d.get("links_done", links)]
            if done:
                plot(done, [ln], path.with_name(f"{path.stem}_{ln}{path.suffix}"))


if __name__ == "__main__":
    sys.exit(main())
