"""Command-line flags of a run configuration, shared by ``simulate``, ``master`` and ``run``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ef21.compression.compressors import COMPRESSOR_NAMES
from ef21.engine.config import DOWNLINK_METHODS, ENCODINGS, ESTIMATORS, INIT_MODES, PROBLEMS, WEIGHTS, RunConfig
from ef21.errors import UserError
from ef21.methods import METHODS
from ef21.methods.optim import OPTIMIZERS, SCHEDULES


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit status 2 (argparse's own status, kept)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def add_config_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("problem")
    g.add_argument("--data", default=None,
                   help="shipped dataset name (mushrooms, the default of logreg/lsq), synthetic:N:D[:SEED], "
                        "synthetic-sparse:N:D:DENSITY[:SEED], or a LIBSVM/.npz path")
    g.add_argument("--problem", default="logreg", choices=PROBLEMS)
    g.add_argument("--objective", default=None, metavar="FILE.py:FUNC",
                   help="your own objective: FILE.py:FUNC or package.module:FUNC (see docs/objectives.md)")
    g.add_argument("--objective-arg", action="append", default=None, metavar="KEY=VALUE", dest="objective_arg",
                   help="an option handed to the objective's factory (repeatable)")
    g.add_argument("--lam", type=float, default=0.1, help="λ of the logistic regularizer (default 0.1)")
    g.add_argument("--workers", "-n", type=int, default=20, help="number of workers n (default 20)")
    g.add_argument("--aggregators", type=int, default=0, metavar="F",
                   help="sum the workers' messages through F aggregators (contiguous blocks of ranks; the order of "
                        "the sums is part of the run); 0: the master sums them all (default)")
    g.add_argument("--shuffle", type=int, default=None, metavar="SEED",
                   help="shuffle rows with SEED before sharding (default: file order, as the paper)")
    g.add_argument("--dim", type=int, default=1000, help="d of --problem quadratic")
    m = p.add_argument_group("method")
    m.add_argument("--method", default="ef21", help=f"one of {', '.join(METHODS)} (default ef21)")
    m.add_argument("--compressor", default="topk", help=f"one of {', '.join(COMPRESSOR_NAMES)} (default topk)")
    m.add_argument("--k", type=int, default=1, help="k of Top-k / Rand-k (default 1)")
    m.add_argument("--k-per-tensor", default=None, metavar="K",
                   help="layer-wise Top-k: a count per parameter tensor (16) or a fraction of each (0.01), "
                        "instead of --k over all of x (a PyTorch model's tensors)")
    m.add_argument("--k-floor", type=int, default=1, metavar="N",
                   help="with a fractional --k-per-tensor, keep at least N entries of every tensor (default 1)")
    m.add_argument("--init", default="full", choices=INIT_MODES,
                   help="g_i^0: full local gradient (official code, default) or compressed (Algorithm 1)")
    m.add_argument("--stepsize", type=float, default=None, metavar="GAMMA",
                   help="base stepsize (default: the theory stepsize of Theorem 2, or 3 with --mu)")
    m.add_argument("--stepsize-mult", type=float, default=1.0, metavar="M", help="multiplier of the base stepsize")
    m.add_argument("--mu", type=float, default=None, help="PL constant: use the Theorem 3 stepsize")
    m.add_argument("--seed", type=int, default=0, help="seed of randomized compressors")
    m.add_argument("--encoding", default="plain", choices=ENCODINGS,
                   help="plain: float64 values, uint32 indices (12 B an entry); compact: the workers' values "
                        "rounded to float32 and indices Elias–Fano coded (~6 B an entry for Top-k)")
    m.add_argument("--dtype", default="float64", choices=("float64", "float32"),
                   help="the method's vectors (x, g, every g_i, message values, checkpoint): float64 (default) or "
                        "float32 (half the bytes and memory; ef21 and ef21plus)")
    e = p.add_argument_group("stochastic gradients (EF21-SGD, -PAGE, -SGDM)")
    e.add_argument("--estimator", default="full", choices=ESTIMATORS,
                   help="full local gradients (default), sgd minibatches, page, or sgdm (momentum)")
    e.add_argument("--batch-size", type=int, default=None, metavar="B", help="minibatch size of every worker")
    e.add_argument("--batch-fraction", type=float, default=None, metavar="F",
                   help="minibatch size max(1, floor(F*N_i)) of each worker's N_i rows")
    e.add_argument("--page-p", type=float, default=None, metavar="P",
                   help="PAGE's probability of a full-gradient round (default mean tau_i/(tau_i+N_i))")
    e.add_argument("--sgdm-eta", type=float, default=0.1, metavar="ETA",
                   help="EF21-SGDM's momentum weight of the new minibatch gradient (default 0.1; 1 is EF21-SGD)")
    x = p.add_argument_group("EF21 extensions")
    x.add_argument("--downlink-k", type=int, default=None, metavar="K",
                   help="EF21-BC: the master compresses its broadcast to K entries")
    x.add_argument("--downlink-compressor", default="topk",
                   help="the master's compressor of its broadcast (default topk)")
    x.add_argument("--downlink-method", default="ef21-bc", choices=DOWNLINK_METHODS,
                   help="what --downlink-k compresses: ef21-bc the direction g (default), ef21-p the model "
                        "(EF21-P: workers hold w, the broadcast moves it by C(x - w))")
    x.add_argument("--participation", default=None, metavar="P",
                   help="EF21-PP: a fraction in (0, 1] or a count 1..n of workers sampled each round")
    x.add_argument("--momentum", type=float, default=0.0, metavar="ETA",
                   help="EF21-HB: heavy-ball eta in [0, 1) (x <- x - gamma v, v <- eta v + g)")
    x.add_argument("--prox", default=None, metavar="SPEC",
                   help="EF21-Prox: l1:LAMBDA, box:LO:HI or l2ball:R (x <- prox(x - gamma g))")
    x.add_argument("--weights", default="uniform", choices=WEIGHTS,
                   help="EF21-W: smoothness weighs worker i by L_i / sum L_j")
    f = p.add_argument_group("the EF21 family since 2021 (docs/methods-family.md)")
    f.add_argument("--clag-zeta", type=float, default=1.0, metavar="ZETA",
                   help="CLAG/LAG: send only when |grad f_i - g_i|^2 > ZETA |grad f_i(x^t) - grad f_i(x^t-1)|^2 "
                        "(default 1; 0 is EF21)")
    f.add_argument("--econtrol-eta", type=float, default=None, metavar="ETA",
                   help="EControl: the share of its error a worker feeds back, in (0, 1] (default: the compressor's "
                        "alpha, k/d for Top-k)")
    f.add_argument("--diana-alpha", type=float, default=None, metavar="ALPHA",
                   help="DIANA: stepsize of the shifts, in (0, 1/(omega+1)] (default 1/(omega+1))")
    f.add_argument("--marina-p", type=float, default=None, metavar="P",
                   help="MARINA: probability of a dense round (default 1/(omega+1), k/d for urandk)")
    o = p.add_argument_group("optimizer (the master's step on the aggregate g, on every replica)")
    o.add_argument("--optimizer", default=None, choices=OPTIMIZERS,
                   help="sgd, adam or adamw on g with peak learning rate --stepsize (default: the method's own "
                        "step x <- x - gamma g); with sgd, --momentum is its momentum")
    o.add_argument("--nesterov", action="store_true", help="Nesterov momentum (--optimizer sgd)")
    o.add_argument("--beta1", type=float, default=0.9, help="Adam's beta1 (default 0.9)")
    o.add_argument("--beta2", type=float, default=0.999, help="Adam's beta2 (default 0.999)")
    o.add_argument("--eps", type=float, default=1e-8, help="Adam's epsilon (default 1e-8)")
    o.add_argument("--weight-decay", type=float, default=0.0, metavar="L",
                   help="L2 (sgd, adam: g + L x) or decoupled (adamw: x (1 - lr L)) weight decay (default 0)")
    o.add_argument("--clip-norm", type=float, default=None, metavar="C",
                   help="clip g to global norm C before the optimizer (as clip_grad_norm_)")
    o.add_argument("--lr-schedule", default="constant", choices=SCHEDULES,
                   help="constant, or cosine down to --min-lr at --decay-rounds (default --rounds)")
    o.add_argument("--warmup", type=int, default=0, metavar="R",
                   help="a linear warm-up of R rounds before the schedule (default 0)")
    o.add_argument("--decay-rounds", type=int, default=None, metavar="R", help="the cosine's horizon")
    o.add_argument("--min-lr", type=float, default=0.0, help="where the cosine ends (default 0)")
    s = p.add_argument_group("stopping and start")
    s.add_argument("--rounds", "-T", type=int, default=1000, help="number of rounds (default 1000)")
    s.add_argument("--tol", type=float, default=0.0,
                   help="stop once |grad f|^2 < tol (with --prox: the gradient mapping's |G|^2)")
    s.add_argument("--eval-grad", action="store_true",
                   help="evaluate |grad f|^2 (each worker's dense gradient sent) on evaluation rounds even when the "
                        "objective reports its own metrics (default: only objectives without metrics, or --tol)")
    s.add_argument("--x0", default=None,
                   help="zeros, normal:SEED or a .npy file (default: the objective's own x0, else zeros)")


def parse_objective_args(items: list[str] | None) -> tuple[tuple[str, str], ...]:
    out = []
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--objective-arg {item!r}: use KEY=VALUE")
        out.append((key.strip(), value))
    return tuple(out)


def config_from_args(ns: argparse.Namespace) -> RunConfig:
    return RunConfig(
        data=ns.data, problem=ns.problem, lam=ns.lam, workers=ns.workers, aggregators=ns.aggregators,
        shuffle=ns.shuffle, method=ns.method,
        compressor=ns.compressor, k=ns.k, init=ns.init, stepsize=ns.stepsize, stepsize_mult=ns.stepsize_mult,
        mu=ns.mu, rounds=ns.rounds, tol=ns.tol, x0=ns.x0, seed=ns.seed, dim=ns.dim, encoding=ns.encoding,
        objective=ns.objective, objective_args=parse_objective_args(ns.objective_arg), estimator=ns.estimator,
        batch_size=ns.batch_size, batch_fraction=ns.batch_fraction, page_p=ns.page_p, sgdm_eta=ns.sgdm_eta,
        downlink_k=ns.downlink_k, downlink_compressor=ns.downlink_compressor, participation=ns.participation,
        momentum=ns.momentum, prox=ns.prox, weights=ns.weights, downlink_method=ns.downlink_method,
        clag_zeta=ns.clag_zeta, econtrol_eta=ns.econtrol_eta, diana_alpha=ns.diana_alpha, marina_p=ns.marina_p,
        optimizer=ns.optimizer, nesterov=ns.nesterov,
        beta1=ns.beta1, beta2=ns.beta2, eps=ns.eps, weight_decay=ns.weight_decay, clip_norm=ns.clip_norm,
        lr_schedule=ns.lr_schedule, warmup=ns.warmup, decay_rounds=ns.decay_rounds, min_lr=ns.min_lr,
        k_per_tensor=ns.k_per_tensor, k_floor=ns.k_floor, eval_grad=ns.eval_grad, dtype=ns.dtype,
    )


def add_output_args(p: argparse.ArgumentParser) -> None:
    o = p.add_argument_group("output")
    o.add_argument("--log", type=Path, default=None, help="per-round JSONL log")
    o.add_argument("--out", type=Path, default=None, help="write the final x (.npy)")
    o.add_argument("--plot", type=Path, default=None, help="plot |grad f|^2 against bits per worker (PNG/SVG)")
    o.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
