"""The run configuration shared by the simulator, the master and the workers."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ef21.errors import UserError
from ef21.methods.optim import check_optimizer
from ef21.methods.participation import participation_count
from ef21.methods.prox import parse_prox
from ef21.methods.variants import check_combination

from .tree import check_tree

PROBLEMS = ("logreg", "lsq", "quadratic")
INIT_MODES = ("full", "compressed")
ENCODINGS = ("plain", "compact")
ESTIMATORS = ("full", "sgd", "page", "sgdm")
WEIGHTS = ("uniform", "smoothness")
DOWNLINK_METHODS = ("ef21-bc", "ef21-p")
DTYPES = ("float64", "float32")
# What float32 method vectors run with: the methods and extensions whose every d-long vector keeps the run's dtype
# (checked end to end against the simulator). The rest keep float64 state of their own, so they are refused.
FLOAT32_METHODS = ("ef21", "ef21plus")


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run's iterates. Two runs with equal configs give the same x, bit for bit."""

    data: str | None = None
    """None: the shipped ``mushrooms`` for the data problems (``logreg``, ``lsq``). A shipped dataset name, ``synthetic:N:D[:SEED]``, ``synthetic-sparse:N:D:DENSITY[:SEED]``, a path to a
    LIBSVM or .npz file; None for objectives that need no data (``quadratic``, most plugins)."""
    problem: str = "logreg"
    """``logreg`` (nonconvex-regularized logistic regression), ``lsq`` (least squares) or ``quadratic``
    (synthetic separable quadratic of dimension ``dim``; no data file). Ignored when ``objective`` is set."""
    objective: str | None = None
    """A user's objective: ``FILE.py:FUNC`` or ``package.module:FUNC`` (see ``ef21.problems.plugins``)."""
    objective_args: tuple[tuple[str, str], ...] = ()
    """KEY=VALUE options handed to the objective's factory, in the order given."""
    lam: float = 0.1
    """λ of the logistic regularizer."""
    workers: int = 20
    """n, the number of workers (and shards)."""
    aggregators: int = 0
    """F > 0: the workers' messages are summed through F aggregators, each over a contiguous block of ranks, and
    the master adds the F sums (``ef21.engine.tree``: the order of the additions, hence the last bits of x). 0: the
    master sums all n itself, which F = 1 equals bit for bit."""
    shuffle: int | None = None
    """Shuffle rows with this seed before sharding; None keeps the file order (the paper's split)."""
    method: str = "ef21"
    compressor: str = "topk"
    k: int | None = 1
    init: str = "full"
    """g_i⁰: ``full`` (uncompressed ∇f_i(x⁰), the official experiments) or ``compressed`` (C(∇f_i(x⁰)))."""
    stepsize: float | None = None
    """Base stepsize; None takes the theory stepsize."""
    stepsize_mult: float = 1.0
    mu: float | None = None
    """PL constant; when given, the base stepsize follows Theorem 3."""
    rounds: int = 1000
    eval_grad: bool = False
    """Evaluate ‖∇f‖² (every worker's dense gradient travels to the master) even for an objective that reports its
    own metrics; without it such objectives log f and their metrics only, unless ``tol`` needs ‖∇f‖². Objectives
    without metrics always evaluate it (it is their only figure)."""
    tol: float = 0.0
    """Stop once ‖∇f(x^t)‖² (with a prox: ‖G_γ(x^t)‖²) < tol."""
    x0: str | None = None
    """``zeros``, ``normal:SEED`` (N(0, I)) or a path to a .npy file; None: the objective's own x⁰ if it has one
    (a plugin's initial weights), else zeros."""
    seed: int = 0
    """Seed of every random choice (compressors, minibatches, PAGE's coin, sampled participation): each draw
    comes from a generator derived from (seed, rank, round), so runs replay and a replacement worker continues
    the same stream."""
    dim: int = 1000
    """d of the ``quadratic`` problem."""
    encoding: str = "plain"
    """How messages travel: ``plain`` (float64 values, uint32 indices) or ``compact`` (the workers' values rounded
    to float32, indices Elias–Fano coded both ways). Compact changes the iterates — workers update their state
    with the rounded values they send — so it is part of the configuration, and the simulator does the same."""
    # -- gradient estimators (EF21-SGD, EF21-PAGE, EF21-SGDM) --------------------------------------------------------
    estimator: str = "full"
    """What a worker compresses against: ``full`` local gradients, ``sgd`` minibatch gradients, ``page``
    (PAGE's variance-reduced estimator) or ``sgdm`` (momentum on minibatch gradients)."""
    batch_size: int | None = None
    """τ, the minibatch size of every worker (rows drawn without replacement from its shard)."""
    batch_fraction: float | None = None
    """τ_i = max(1, ⌊fraction·N_i⌋), the official code's ``--prb``; exclusive with ``batch_size``."""
    page_p: float | None = None
    """Probability of PAGE's full-gradient round; None: mean_i τ_i/(τ_i + N_i) (the official code's choice)."""
    sgdm_eta: float = 0.1
    """η of EF21-SGDM: v_i ← (1 − η)v_i + η·(minibatch gradient); η = 1 is EF21-SGD."""
    # -- EF21 extensions (bells and whistles) -----------------------------------------------------------------------
    downlink_k: int | None = None
    """EF21-BC: the master compresses its broadcast to this many entries (its own EF21 on g)."""
    downlink_compressor: str = "topk"
    participation: str | None = None
    """EF21-PP by sampling: a fraction in (0, 1] (``0.25``) or a count 1..n (``5``) of workers drawn each round."""
    momentum: float = 0.0
    """EF21-HB: η of the heavy ball, x ← x − γv, v ← ηv + g; 0 is plain EF21."""
    prox: str | None = None
    """EF21-Prox: ``l1:LAMBDA``, ``box:LO:HI`` or ``l2ball:R``; x ← prox_{γr}(x − γg)."""
    weights: str = "uniform"
    """EF21-W: ``smoothness`` weighs worker i by w_i = L_i / Σ L_j (its own stepsize rule)."""
    downlink_method: str = "ef21-bc"
    """What ``downlink_k`` compresses: ``ef21-bc`` the direction g (EF21-BC), ``ef21-p`` the model (EF21-P: the
    workers hold a point w that the broadcast C_P(x − w) moves)."""
    # -- the family since 2021 (docs/methods-family.md) ---------------------------------------------------------------
    clag_zeta: float = 1.0
    """ζ ≥ 0 of CLAG/LAG's trigger: send only when ‖∇f_i − g_i‖² > ζ‖∇f_i(x^t) − ∇f_i(x^{t−1})‖²."""
    econtrol_eta: float | None = None
    """η in (0, 1] of EControl: the share of its error a worker feeds back; None: the compressor's α (δ)."""
    diana_alpha: float | None = None
    """α of DIANA's shifts, in (0, 1/(ω+1)]; None: 1/(ω+1)."""
    marina_p: float | None = None
    """Probability of MARINA's dense round, in (0, 1]; None: 1/(ω+1) (k/d for urandk)."""
    # -- the master's optimizer on g (ef21.methods.optim), replicated on every replica ----------------------------
    optimizer: str | None = None
    """None: the method's own step (x ← x − γg, with EF21-HB or -Prox); ``sgd``, ``adam`` or ``adamw``: that
    optimizer on the aggregate g, with peak learning rate γ (``stepsize``). ``momentum`` is then SGD's."""
    nesterov: bool = False
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    """L2 (``sgd``, ``adam``: g + λx, as torch's weight_decay) or decoupled (``adamw``: x·(1 − lr·λ))."""
    clip_norm: float | None = None
    """Clip g to this global norm before the optimizer (``torch.nn.utils.clip_grad_norm_``)."""
    lr_schedule: str = "constant"
    """``constant`` or ``cosine`` (down to ``min_lr`` at ``decay_rounds``), either after ``warmup`` rounds of a
    linear ramp."""
    warmup: int = 0
    decay_rounds: int | None = None
    """The cosine's horizon; None: ``rounds``."""
    min_lr: float = 0.0
    # -- layer-wise compression -------------------------------------------------------------------------------------
    k_per_tensor: str | None = None
    """Top-k per parameter tensor: a fraction in (0, 1) of each tensor (``0.01``) or a count (``16``), instead of a
    global k over x; needs an objective that reports its tensors (a PyTorch model)."""
    k_floor: int = 1
    """With a fractional ``k_per_tensor``: every tensor keeps at least this many entries (all of a smaller one)."""
    dtype: str = "float64"
    """The dtype of the method's vectors — x, g, every g_i, the messages' values, the checkpoint: ``float64`` or
    ``float32`` (half the memory and bytes; the iterates round at every step, docs/configuration.md)."""

    def __post_init__(self) -> None:
        if self.objective is None and self.problem in ("logreg", "lsq") and self.data is None:
            object.__setattr__(self, "data", "mushrooms")
        if self.objective is None and self.problem not in PROBLEMS:
            raise UserError(f"unknown problem {self.problem!r}; choose one of {', '.join(PROBLEMS)}")
        if self.init not in INIT_MODES:
            raise UserError(f"--init must be one of {', '.join(INIT_MODES)}, got {self.init!r}")
        if self.workers <= 0:
            raise UserError(f"--workers must be positive, got {self.workers}")
        if not 0 <= self.aggregators <= self.workers:
            raise UserError(f"--aggregators must lie in 0..{self.workers} (the number of workers), got {self.aggregators}")
        if self.rounds < 0:
            raise UserError(f"--rounds must be >= 0, got {self.rounds}")
        if self.stepsize is not None and not (math.isfinite(self.stepsize) and self.stepsize > 0):
            raise UserError(f"--stepsize must be positive, got {self.stepsize}")
        if not (math.isfinite(self.stepsize_mult) and self.stepsize_mult > 0):
            raise UserError(f"--stepsize-mult must be positive, got {self.stepsize_mult}")
        if self.mu is not None and not self.mu > 0:
            raise UserError(f"--mu must be positive, got {self.mu}")
        if self.encoding not in ENCODINGS:
            raise UserError(f"--encoding must be one of {', '.join(ENCODINGS)}, got {self.encoding!r}")
        if self.objective is None and self.problem == "quadratic" and self.dim <= 0:
            raise UserError(f"--dim must be positive, got {self.dim}")
        self._check_estimator()
        self._check_extensions()
        self._check_dtype()

    def _check_dtype(self) -> None:
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.dtype == "float64":
            return
        if self.method not in FLOAT32_METHODS:
            raise UserError(f"--dtype float32 runs {', '.join(FLOAT32_METHODS)}; --method {self.method} keeps "
                            "float64 state of its own")
        for flag, given in (("--optimizer", self.optimizer is not None), ("--prox", self.prox is not None),
                            ("--downlink-method ef21-p", self.downlink_method == "ef21-p" and self.downlink_k),
                            ("--estimator page", self.estimator == "page")):
            if given:
                raise UserError(f"--dtype float32 does not run with {flag} (its state stays float64); "
                                "use --dtype float64")

    @property
    def np_dtype(self) -> np.dtype:
        """The numpy dtype of the method's vectors."""
        return np.dtype(self.dtype)

    def _check_estimator(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise UserError(f"--estimator must be one of {', '.join(ESTIMATORS)}, got {self.estimator!r}")
        if self.batch_size is not None and self.batch_fraction is not None:
            raise UserError("give --batch-size or --batch-fraction, not both")
        if self.batch_size is not None and self.batch_size <= 0:
            raise UserError(f"--batch-size must be positive, got {self.batch_size}")
        if self.batch_fraction is not None and not 0.0 < self.batch_fraction <= 1.0:
            raise UserError(f"--batch-fraction must lie in (0, 1], got {self.batch_fraction}")
        if self.estimator != "full" and self.batch_size is None and self.batch_fraction is None:
            raise UserError(f"--estimator {self.estimator} needs --batch-size B or --batch-fraction F")
        if self.page_p is not None and not 0.0 < self.page_p <= 1.0:
            raise UserError(f"--page-p must lie in (0, 1], got {self.page_p}")
        if not 0.0 < self.sgdm_eta <= 1.0:
            raise UserError(f"--sgdm-eta must lie in (0, 1], got {self.sgdm_eta}")

    def _check_extensions(self) -> None:
        if self.downlink_k is not None and self.downlink_k <= 0:
            raise UserError(f"--downlink-k must be positive, got {self.downlink_k}")
        participation_count(self.participation, self.workers)  # raises on a malformed value
        if not 0.0 <= self.momentum < 1.0:
            raise UserError(f"--momentum must lie in [0, 1), got {self.momentum}")
        if self.prox is not None:
            parse_prox(self.prox)
        if self.weights not in WEIGHTS:
            raise UserError(f"--weights must be one of {', '.join(WEIGHTS)}, got {self.weights!r}")
        if self.downlink_method not in DOWNLINK_METHODS:
            raise UserError(f"--downlink-method must be one of {', '.join(DOWNLINK_METHODS)}, "
                            f"got {self.downlink_method!r}")
        if self.downlink_method == "ef21-p" and self.downlink_k is None:
            raise UserError("--downlink-method ef21-p compresses the broadcast model: it needs --downlink-k K")
        self._check_family()
        if self.aggregators:
            check_tree(self.method, weighted=self.weights == "smoothness", buffers=False)
        check_combination(self)
        check_optimizer(self)
        if self.k_per_tensor is not None:
            from ef21.compression.compressors import parse_k_per_tensor

            parse_k_per_tensor(self.k_per_tensor)
            if self.compressor != "topk":
                raise UserError(f"--k-per-tensor is layer-wise Top-k: it needs --compressor topk, not {self.compressor}")
        if self.k_floor < 1:
            raise UserError(f"--k-floor must be >= 1, got {self.k_floor}")

    def _check_family(self) -> None:
        if not (math.isfinite(self.clag_zeta) and self.clag_zeta >= 0.0):
            raise UserError(f"--clag-zeta must be >= 0 (the trigger's ζ), got {self.clag_zeta}")
        if self.econtrol_eta is not None and not 0.0 < self.econtrol_eta <= 1.0:
            raise UserError(f"--econtrol-eta must lie in (0, 1] (0 is EF21: use --method ef21), "
                            f"got {self.econtrol_eta}")
        if self.diana_alpha is not None and not 0.0 < self.diana_alpha <= 1.0:
            raise UserError(f"--diana-alpha must lie in (0, 1/(omega+1)], got {self.diana_alpha}")
        if self.marina_p is not None and not 0.0 < self.marina_p <= 1.0:
            raise UserError(f"--marina-p must lie in (0, 1], got {self.marina_p}")

    @property
    def uses_data(self) -> bool:
        """Whether the workers load ``data`` (the quadratic and data-free plugins do not)."""
        if self.objective is not None:
            return self.data is not None
        return self.problem != "quadratic"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["objective_args"] = [list(p) for p in self.objective_args]
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> RunConfig:
        names = {f.name for f in dataclasses.fields(RunConfig)}
        unknown = set(d) - names
        if unknown:
            raise UserError(f"unknown configuration keys: {', '.join(sorted(unknown))}")
        d = dict(d)
        if "objective_args" in d:
            d["objective_args"] = tuple((str(k), str(v)) for k, v in d["objective_args"])
        return RunConfig(**d)


def make_x0(spec: str | None, d: int, default: np.ndarray | None = None, dtype: Any = np.float64) -> np.ndarray:
    """x⁰ from ``zeros``, ``normal:SEED`` or a .npy path, checked against d; None takes ``default`` (the
    objective's own x⁰) or zeros. Drawn or read in float64, then rounded once to ``dtype`` (the run's)."""
    x0 = _make_x0(spec, d, default)
    return x0 if np.dtype(dtype) == x0.dtype else x0.astype(dtype)


def _make_x0(spec: str | None, d: int, default: np.ndarray | None) -> np.ndarray:
    if spec is None:
        if default is None:
            return np.zeros(d)
        x0 = np.asarray(default, dtype=np.float64).reshape(-1)
        if x0.shape[0] != d or not np.all(np.isfinite(x0)):
            raise UserError(f"the objective's x0 has {x0.shape[0]} entries or non-finite values (d = {d})")
        return x0.copy()
    if spec == "zeros":
        return np.zeros(d)
    if spec.startswith("normal:"):
        try:
            seed = int(spec.split(":", 1)[1])
        except ValueError:
            raise UserError(f"bad --x0 {spec!r}; use normal:SEED") from None
        return np.random.default_rng(seed).standard_normal(d)
    path = Path(spec)
    try:
        x0 = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"--x0 {spec}: no such file (use zeros, normal:SEED or a .npy path)") from None
    except Exception as exc:
        raise UserError(f"--x0 {spec}: cannot read .npy ({exc})") from None
    x0 = np.asarray(x0, dtype=np.float64).reshape(-1)
    if x0.shape[0] != d:
        raise UserError(f"--x0 {spec}: has {x0.shape[0]} entries, the problem has d = {d}")
    if not np.all(np.isfinite(x0)):
        raise UserError(f"--x0 {spec}: non-finite values")
    return x0
