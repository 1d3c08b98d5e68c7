"""Command-line flags of a run configuration, shared by ``simulate``, ``master`` and ``run``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .compressors import COMPRESSOR_NAMES
from .config import ENCODINGS, INIT_MODES, PROBLEMS, RunConfig
from .methods import METHODS


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit status 2 (argparse's own status, kept)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def add_config_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("problem")
    g.add_argument("--data", default="mushrooms",
                   help="shipped dataset name (mushrooms), synthetic:N:D[:SEED], or a LIBSVM/.npz path")
    g.add_argument("--problem", default="logreg", choices=PROBLEMS)
    g.add_argument("--lam", type=float, default=0.1, help="λ of the logistic regularizer (default 0.1)")
    g.add_argument("--workers", "-n", type=int, default=20, help="number of workers n (default 20)")
    g.add_argument("--shuffle", type=int, default=None, metavar="SEED",
                   help="shuffle rows with SEED before sharding (default: file order, as the paper)")
    g.add_argument("--dim", type=int, default=1000, help="d of --problem quadratic")
    m = p.add_argument_group("method")
    m.add_argument("--method", default="ef21", help=f"one of {', '.join(METHODS)} (default ef21)")
    m.add_argument("--compressor", default="topk", help=f"one of {', '.join(COMPRESSOR_NAMES)} (default topk)")
    m.add_argument("--k", type=int, default=1, help="k of Top-k / Rand-k (default 1)")
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
    s = p.add_argument_group("stopping and start")
    s.add_argument("--rounds", "-T", type=int, default=1000, help="number of rounds (default 1000)")
    s.add_argument("--tol", type=float, default=0.0, help="stop once |grad f|^2 < tol")
    s.add_argument("--x0", default="zeros", help="zeros, normal:SEED or a .npy file (default zeros)")


def config_from_args(ns: argparse.Namespace) -> RunConfig:
    return RunConfig(
        data=ns.data, problem=ns.problem, lam=ns.lam, workers=ns.workers, shuffle=ns.shuffle, method=ns.method,
        compressor=ns.compressor, k=ns.k, init=ns.init, stepsize=ns.stepsize, stepsize_mult=ns.stepsize_mult,
        mu=ns.mu, rounds=ns.rounds, tol=ns.tol, x0=ns.x0, seed=ns.seed, dim=ns.dim, encoding=ns.encoding,
    )


def add_output_args(p: argparse.ArgumentParser) -> None:
    o = p.add_argument_group("output")
    o.add_argument("--log", type=Path, default=None, help="per-round JSONL log")
    o.add_argument("--out", type=Path, default=None, help="write the final x (.npy)")
    o.add_argument("--plot", type=Path, default=None, help="plot |grad f|^2 against bits per worker (PNG/SVG)")
    o.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
