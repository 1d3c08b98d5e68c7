"""An independent oracle: every update rule of the method doc, written out plainly, densely, in one process.

The tests compare ``ef21.engine.simulate`` with these functions. They share no code with ``ef21.methods``,
``ef21.engine`` or ``ef21.compression``: the compressors, the bit counts and
the objectives' f_i and ∇f_i are written again here, from the method doc (``ef21-method.md`` §2, §3.1–3.5,
§3.8, §7) and the docs' definitions of the log (docs/configuration.md). Every vector is a dense numpy array and every rule is one
function whose loop reads like the doc's; nothing is optimised, so that a reader can check it line by line.

Round t of every rule, as the simulator logs it: the workers evaluate ∇f_i(x^t) and send their message (round 0:
the initialization), the log records the state x^t, then the master forms its direction and moves to x^{t+1}.
A rule runs rounds 0..T and returns a ``Trace`` with one entry per round.

Rules for the extensions (§3.6–3.12: SGD, PAGE and SGDM with a given minibatch sequence and coins, BC, HB, Prox,
W, and PP by sampling, which is EF21-PP with the sampled pattern) follow the same shape. The family since 2021
(docs/methods-family.md: CLAG/LAG, EControl, DIANA, MARINA, and EF21-P on the downlink) is written as uplink rules
driven by one loop, ``family``. To add a rule: one more
function, with its math in the docstring, using ``Recorder`` for the log and the compressors below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np

# -- problems: f = (1/n) Σ f_i, each f_i with its own value and gradient formula -------------------------------------


class Problem(Protocol):
    n: int
    d: int

    def value(self, i: int, x: np.ndarray) -> float: ...

    def grad(self, i: int, x: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class LogReg:
    """f_i(x) = (1/N_i) Σ_j log(1 + exp(−y_j a_jᵀx)) + λ Σ_l x_l²/(1 + x_l²)  (method doc §5).

    ∇f_i(x) = −(1/N_i) Σ_j y_j a_j / (1 + exp(y_j a_jᵀx)) + 2λ x/(1 + x²)²."""

    A: Sequence[np.ndarray]
    y: Sequence[np.ndarray]
    lam: float

    @property
    def n(self) -> int:
        return len(self.A)

    @property
    def d(self) -> int:
        return self.A[0].shape[1]

    def value(self, i: int, x: np.ndarray) -> float:
        margins = self.y[i] * (self.A[i] @ x)
        return float(np.mean(np.logaddexp(0.0, -margins)) + self.lam * np.sum(x**2 / (1.0 + x**2)))

    def grad(self, i: int, x: np.ndarray) -> np.ndarray:
        return self.grad_rows(i, x, np.arange(self.A[i].shape[0]))

    def grad_rows(self, i: int, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """The mean loss gradient over ``rows`` of worker i's data, plus the whole regularizer's (§3.6)."""
        A, y = self.A[i][rows], self.y[i][rows]
        weights = -y * np.exp(-np.logaddexp(0.0, y * (A @ x)))  # −y_j / (1 + e^{m_j}), without overflow
        return A.T @ weights / rows.shape[0] + 2.0 * self.lam * x / (1.0 + x**2) ** 2


@dataclass(frozen=True)
class LeastSquares:
    """f_i(x) = (1/N_i)‖A_i x − b_i‖², ∇f_i(x) = (2/N_i) A_iᵀ(A_i x − b_i)  (docs/configuration.md: ``--problem lsq``)."""

    A: Sequence[np.ndarray]
    b: Sequence[np.ndarray]

    @property
    def n(self) -> int:
        return len(self.A)

    @property
    def d(self) -> int:
        return self.A[0].shape[1]

    def value(self, i: int, x: np.ndarray) -> float:
        r = self.A[i] @ x - self.b[i]
        return float(np.sum(r**2)) / self.A[i].shape[0]

    def grad(self, i: int, x: np.ndarray) -> np.ndarray:
        return 2.0 * (self.A[i].T @ (self.A[i] @ x - self.b[i])) / self.A[i].shape[0]

    def grad_rows(self, i: int, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
        A = self.A[i][rows]
        return 2.0 * (A.T @ (A @ x - self.b[i][rows])) / rows.shape[0]


@dataclass(frozen=True)
class Quadratic:
    """f_i(x) = ½ Σ_j h_ij (x_j − c_ij)², ∇f_i(x) = h_i ⊙ (x − c_i)  (the synthetic ``quadratic`` problem)."""

    h: Sequence[np.ndarray]
    c: Sequence[np.ndarray]

    @property
    def n(self) -> int:
        return len(self.h)

    @property
    def d(self) -> int:
        return self.h[0].shape[0]

    def value(self, i: int, x: np.ndarray) -> float:
        return 0.5 * float(np.sum(self.h[i] * (x - self.c[i]) ** 2))

    def grad(self, i: int, x: np.ndarray) -> np.ndarray:
        return self.h[i] * (x - self.c[i])


@dataclass(frozen=True)
class RankOne:
    """f_i(x) = ⟨a_i, x⟩² + ¼‖x‖², ∇f_i(x) = 2⟨a_i, x⟩ a_i + ½x: the DCGD counterexample of the method doc §3.2."""

    a: Sequence[np.ndarray]

    @property
    def n(self) -> int:
        return len(self.a)

    @property
    def d(self) -> int:
        return self.a[0].shape[0]

    def value(self, i: int, x: np.ndarray) -> float:
        return float(np.dot(self.a[i], x)) ** 2 + 0.25 * float(np.sum(x**2))

    def grad(self, i: int, x: np.ndarray) -> np.ndarray:
        return 2.0 * float(np.dot(self.a[i], x)) * self.a[i] + 0.5 * x


# -- compressors (method doc §2): dense in, dense out, plus what the message costs -----------------------------------


@dataclass(frozen=True)
class Sent:
    """A compressed vector as the receiver sees it (dense), and its cost: ``entries`` values sent, ``sparse``
    when each carries an index."""

    value: np.ndarray
    entries: int
    sparse: bool
    support: np.ndarray | None = None
    """The kept coordinates of a sparse message (a kept value may be 0); None for a dense one."""


@dataclass
class TopK:
    """Keep the k largest |v_j|, zero the rest; among equal magnitudes the lower index wins. Deterministic.

    ``ties`` counts the calls where the k-th and the (k+1)-th largest magnitudes were equal, i.e. where the tie
    rule decided what was kept (the tests check that their problems exercise it)."""

    k: int
    randomized: bool = False
    ties: int = 0

    def __call__(self, v: np.ndarray, rng: np.random.Generator | None = None) -> Sent:
        d = v.shape[0]
        # lexsort sorts by the last key first: by −|v_j| (largest first), then by index j (lowest first).
        order = np.lexsort((np.arange(d), -np.abs(v)))
        if self.k < d and abs(v[order[self.k - 1]]) == abs(v[order[self.k]]):
            self.ties += 1
        out = np.zeros(d)
        keep = order[: self.k]
        out[keep] = v[keep]
        return Sent(out, self.k, True, np.sort(keep))


@dataclass
class RandK:
    """Keep k coordinates drawn uniformly without replacement, unscaled (contractive, α = k/d).

    The draw is the project's documented convention: ``rng.choice(d, k, replace=False)`` from the generator
    ``default_rng([seed, rank, round])`` of the worker and round (docs/methods.md: randomized compressors)."""

    k: int
    randomized: bool = True

    def __call__(self, v: np.ndarray, rng: np.random.Generator | None = None) -> Sent:
        assert rng is not None
        keep = rng.choice(v.shape[0], size=self.k, replace=False)
        out = np.zeros(v.shape[0])
        out[keep] = v[keep]
        return Sent(out, self.k, True, np.sort(keep))


@dataclass
class Identity:
    """C(v) = v: a dense vector of d values."""

    randomized: bool = False

    def __call__(self, v: np.ndarray, rng: np.random.Generator | None = None) -> Sent:
        return Sent(v.copy(), v.shape[0], False)


@dataclass
class Float32Rounded:
    """The compact encoding's compressor: the inner one, its kept values rounded to float32 (the worker keeps the
    rounded values, which are what it sends)."""

    inner: TopK | RandK

    @property
    def randomized(self) -> bool:
        return self.inner.randomized

    def __call__(self, v: np.ndarray, rng: np.random.Generator | None = None) -> Sent:
        s = self.inner(v, rng)
        return Sent(s.value.astype(np.float32).astype(np.float64), s.entries, s.sparse, s.support)


Compressor = Callable[[np.ndarray, "np.random.Generator | None"], Sent]


def worker_rng(comp: object, seed: int, rank: int, round_: int) -> np.random.Generator | None:
    """The generator a randomized compressor draws from in one worker's round (None for deterministic ones)."""
    return np.random.default_rng([seed, rank, round_]) if getattr(comp, "randomized", False) else None


def dense(v: np.ndarray) -> Sent:
    """An uncompressed vector: d values, no indices (EF21's g_i⁰ = ∇f_i(x⁰) under ``--init full``)."""
    return Sent(v.copy(), v.shape[0], False)


# -- the log (docs/configuration.md "The log"; method doc §7 for the paper's bit convention) ----------------------------------------


def index_bits(d: int) -> int:
    """⌈log2 d⌉ for d ≥ 2: the bits that name one of d coordinates."""
    return (d - 1).bit_length()


@dataclass
class Trace:
    """One entry per round t = 0..T: the state x^t and what the log says about it."""

    x: list[np.ndarray] = field(default_factory=list)
    f: list[float] = field(default_factory=list)
    grad_norm_sq: list[float] = field(default_factory=list)
    G: list[float] = field(default_factory=list)
    bits_per_worker: list[float] = field(default_factory=list)
    payload_bits_per_worker: list[float] = field(default_factory=list)
    g_norm_sq: list[float | None] = field(default_factory=list)
    grad_scale: list[float] = field(default_factory=list)
    """(1/n) Σ ‖∇f_i(x^t)‖²: the scale against which G and ‖∇f‖² can be resolved in float64."""
    bits_down_per_worker: list[float] = field(default_factory=list)
    """The broadcasts each worker received, 32 bits a value, round 0 excluded (up to x^t)."""
    grad_map_norm_sq: list[float | None] = field(default_factory=list)
    """EF21-Prox: ‖(x^t − prox_{γr}(x^t − γ∇f(x^t)))/γ‖²."""
    kept_fresh: list[list[bool]] = field(default_factory=list)
    """EF21+ only: for each round and worker, whether the fresh C(∇f_i) was kept (else the EF21 candidate)."""


@dataclass
class Recorder:
    """Builds the log of a run, round by round.

    f = (1/n) Σ f_i(x^t); ‖∇f‖² of (1/n) Σ ∇f_i(x^t); G = (1/n) Σ ‖ĝ_i − ∇f_i(x^t)‖² over the workers' current
    estimates ĝ_i; paper bits: 32 per value sent, round 0 excluded, no index bits; payload bits: 32 per value plus
    ⌈log2 d⌉ per index of a sparse message, round 0 included, plus 1 selector bit per message of a method that
    sends one (EF21+). Both per worker: the total over all workers divided by n. A worker left out of a round
    (``None``) sends nothing.
    """

    problem: Problem
    selector: bool = False
    trace: Trace = field(default_factory=Trace)
    paper_total: int = 0
    payload_total: int = 0
    down_total: int = 0

    def broadcast(self, t: int, entries: int) -> None:
        """A round's broadcast of ``entries`` values reaches every worker (counted from round 1 on)."""
        if t > 0:
            self.down_total += 32 * entries

    def record(self, t: int, x: np.ndarray, grads: list[np.ndarray], estimates: list[np.ndarray],
               sent: list[Sent | None], g_prev: np.ndarray | None, *, targets: list[np.ndarray] | None = None,
               grad_map: float | None = None) -> None:
        """``targets``: what G measures the estimates against (∇f_i, or EF21-W's ∇f_i/(n·w_i))."""
        p, n = self.problem, self.problem.n
        for s in sent:
            if s is None:
                continue
            if t > 0:
                self.paper_total += 32 * s.entries
            self.payload_total += s.entries * (32 + (index_bits(p.d) if s.sparse else 0)) + (1 if self.selector else 0)
        mean_grad = sum(grads) / n
        tr = self.trace
        tr.x.append(x.copy())
        tr.f.append(sum(p.value(i, x) for i in range(n)) / n)
        tr.grad_norm_sq.append(float(np.sum(mean_grad**2)))
        tr.G.append(sum(float(np.sum((e - g) ** 2)) for e, g in zip(estimates, targets or grads)) / n)
        tr.bits_per_worker.append(self.paper_total / n)
        tr.payload_bits_per_worker.append(self.payload_total / n)
        tr.g_norm_sq.append(None if g_prev is None else float(np.sum(g_prev**2)))
        tr.grad_scale.append(sum(float(np.sum(g**2)) for g in grads) / n)
        tr.bits_down_per_worker.append(float(self.down_total))
        tr.grad_map_norm_sq.append(grad_map)


def union_entries(sent: list[Sent | None]) -> int:
    """The values in the sum of the round's messages: the union of their supports, or d if one is dense."""
    kept = [s for s in sent if s is not None]
    if any(s.support is None for s in kept):
        return kept[0].value.shape[0]
    return int(np.unique(np.concatenate([s.support for s in kept])).shape[0]) if kept else 0


def tree_sum(vectors: Sequence[np.ndarray | None], F: int) -> np.ndarray | None:
    """The aggregator tier's order (docs/aggregators.md): n vectors in F blocks of consecutive ranks, block j from
    rank ⌊j·n/F⌋ up to ⌊(j+1)·n/F⌋; each block summed from zero in rank order, then the block sums from zero in
    block order. ``None``: left out. None when every vector is."""
    n = len(vectors)
    total = None
    for j in range(F):
        acc = None
        for r in range(j * n // F, (j + 1) * n // F):
            if vectors[r] is not None:
                acc = (np.zeros_like(vectors[r]) if acc is None else acc) + vectors[r]
        if acc is not None:
            total = (np.zeros_like(acc) if total is None else total) + acc
    return total


def all_grads(p: Problem, x: np.ndarray) -> list[np.ndarray]:
    return [p.grad(i, x) for i in range(p.n)]


# -- the update rules ------------------------------------------------------------------------------------------------


def gd(p: Problem, x0: np.ndarray, gamma: float, T: int) -> Trace:
    """GD (§3.1): x^{t+1} = x^t − γ (1/n) Σ ∇f_i(x^t); every worker sends its d values."""
    rec, x, g = Recorder(p), x0.copy(), None
    for t in range(T + 1):
        grads = all_grads(p, x)
        rec.record(t, x, grads, grads, [dense(v) for v in grads], g)
        rec.broadcast(t, p.d)
        g = sum(grads) / p.n
        x = x - gamma * g
    return rec.trace


def dcgd(p: Problem, x0: np.ndarray, gamma: float, T: int, comp: Compressor, seed: int = 0) -> Trace:
    """DCGD (§3.2): x^{t+1} = x^t − γ (1/n) Σ C(∇f_i(x^t)); no state. G is the distortion of C(∇f_i)."""
    rec, x, g = Recorder(p), x0.copy(), None
    for t in range(T + 1):
        grads = all_grads(p, x)
        sent = [comp(grads[i], worker_rng(comp, seed, i, t)) for i in range(p.n)]
        rec.record(t, x, grads, [s.value for s in sent], sent, g)
        rec.broadcast(t, union_entries(sent))
        g = sum(s.value for s in sent) / p.n
        x = x - gamma * g
    return rec.trace


def ef(p: Problem, x0: np.ndarray, gamma: float, T: int, comp: Compressor, seed: int = 0) -> Trace:
    """EF14 in the official code's form (§3.3): γ inside the compressed vector.

    e_i⁰ = 0; each round w_i^t = C(e_i^t + γ∇f_i(x^t)), e_i^{t+1} = e_i^t + γ∇f_i(x^t) − w_i^t, and the master
    moves x^{t+1} = x^t − (1/n) Σ w_i^t (no second γ). The worker's estimate of ∇f_i is w_i^t/γ (for G), and the
    aggregate in the log is (1/n) Σ w_i^t, the vector x actually moved by.
    """
    rec, x, g = Recorder(p), x0.copy(), None
    e = [np.zeros(p.d) for _ in range(p.n)]
    for t in range(T + 1):
        grads = all_grads(p, x)
        sent = [comp(e[i] + gamma * grads[i], worker_rng(comp, seed, i, t)) for i in range(p.n)]
        rec.record(t, x, grads, [s.value / gamma for s in sent], sent, g)
        rec.broadcast(t, union_entries(sent))
        for i in range(p.n):
            e[i] = e[i] + gamma * grads[i] - sent[i].value
        g = sum(s.value for s in sent) / p.n
        x = x - g
    return rec.trace


def ef21(p: Problem, x0: np.ndarray, gamma: float, T: int, comp: Compressor, *, init: str = "full", seed: int = 0,
         missing: dict[int, Sequence[int]] | None = None, aggregators: int = 0) -> Trace:
    """EF21 (§3.4), and EF21-PP (§3.8) when ``missing`` gives the participation pattern (round → ranks left out).

    g_i⁰ = ∇f_i(x⁰) (``init="full"``, sent whole) or C(∇f_i(x⁰)) (``"compressed"``); g⁰ = (1/n) Σ g_i⁰. Then each
    round a participating worker sends c_i^t = C(∇f_i(x^t) − g_i^{t−1}) and sets g_i^t = g_i^{t−1} + c_i^t; a
    worker left out sends nothing and keeps g_i; the master adds (1/n) Σ_{participants} c_i^t to g — still
    divided by n, so g is the mean of all n g_i, stale ones included — and moves x^{t+1} = x^t − γ g^t.
    ``aggregators`` = F > 0: the messages are added in the tier's order (``tree_sum``).
    """
    missing = missing or {}
    rec, x = Recorder(p), x0.copy()
    g_i: list[np.ndarray] = []
    g = np.zeros(p.d)
    for t in range(T + 1):
        grads = all_grads(p, x)
        out = set(missing.get(t, ()))
        sent: list[Sent | None] = []
        for i in range(p.n):
            rng = worker_rng(comp, seed, i, t)
            if t == 0:
                s = dense(grads[i]) if init == "full" else comp(grads[i], rng)
            else:
                s = comp(grads[i] - g_i[i], rng)
            sent.append(None if i in out else s)
        if t == 0:
            if out:
                raise ValueError("the oracle starts every worker at round 0")
            g_i = [s.value for s in sent]  # type: ignore[union-attr]
        else:
            g_i = [g_i[i] if s is None else g_i[i] + s.value for i, s in enumerate(sent)]
        rec.record(t, x, grads, g_i, sent, None if t == 0 else g)
        rec.broadcast(t, union_entries(sent))
        if aggregators:
            total = tree_sum([None if s is None else s.value for s in sent], aggregators)
            g = g + (0.0 if total is None else total) / p.n
        else:
            g = g + sum(s.value for s in sent if s is not None) / p.n
        x = x - gamma * g
    return rec.trace


def ef21_plus(p: Problem, x0: np.ndarray, gamma: float, T: int, comp: Compressor, *, init: str = "full",
              missing: dict[int, Sequence[int]] | None = None) -> Trace:
    """EF21+ (§3.5): each worker keeps the closer to ∇f_i(x^t), in ‖·‖², of two candidates:

    b_i = C(∇f_i(x^t)) (fresh) and m_i = g_i^{t−1} + C(∇f_i(x^t) − g_i^{t−1}) (the EF21 / Markov step); equal
    distances keep m_i. g_i^t is the one kept; the master holds every g_i and moves x^{t+1} = x^t − γ (1/n) Σ g_i^t.
    Each message is k values and a 1-bit selector. Round 0 is EF21's. With ``missing`` a left-out worker keeps g_i.
    C must be deterministic (the theory's condition).
    """
    missing = missing or {}
    rec, x = Recorder(p, selector=True), x0.copy()
    g_i: list[np.ndarray] = []
    g = None
    for t in range(T + 1):
        grads = all_grads(p, x)
        out = set(missing.get(t, ()))
        sent: list[Sent | None] = []
        new: list[np.ndarray] = []
        fresh: list[bool] = []
        for i in range(p.n):
            if t == 0:
                s = dense(grads[i]) if init == "full" else comp(grads[i], None)
                kept, took_fresh = s.value, True
            else:
                b = comp(grads[i], None)
                c = comp(grads[i] - g_i[i], None)
                m = g_i[i] + c.value
                took_fresh = float(np.sum((b.value - grads[i]) ** 2)) < float(np.sum((m - grads[i]) ** 2))
                s, kept = (b, b.value) if took_fresh else (c, m)
            sent.append(None if i in out else s)
            new.append(g_i[i] if i in out else kept)
            fresh.append(took_fresh and i not in out)
        if t == 0 and out:
            raise ValueError("the oracle starts every worker at round 0")
        g_i = new
        rec.record(t, x, grads, g_i, sent, g)
        rec.trace.kept_fresh.append(fresh)
        # A replaced g_i changes the mean in every coordinate: the broadcast is dense; otherwise EF21's sparse sum.
        rec.broadcast(t, p.d if any(f for f, s in zip(fresh, sent) if s is not None) else union_entries(sent))
        g = sum(g_i) / p.n
        x = x - gamma * g
    return rec.trace


# -- the extensions (method doc §3.6–3.12) ---------------------------------------------------------------------------

Batches = dict[int, list[np.ndarray]]
"""round → each worker's minibatch (rows of its data), for rounds 1..T."""


def _ef21_with(p: Problem, x0: np.ndarray, gamma: float, T: int, comp: Compressor, *, seed: int,
               estimate: Callable[[int, int, np.ndarray, list[np.ndarray]], np.ndarray] | None = None,
               scale: Sequence[float] | None = None, weights: Sequence[float] | None = None,
               down: Compressor | None = None, step: Callable[[np.ndarray, np.ndarray, int], np.ndarray],
               gmap: Callable[[np.ndarray, np.ndarray], float] | None = None) -> Trace:
    """EF21 with the pieces the extensions change, each written out by the rule that uses it:
    ``estimate(t, i, x, grads)`` the vector worker i compresses against (t ≥ 1; round 0 is ∇f_i(x⁰) whole);
    ``scale`` EF21-W's 1/(n·w_i) on it; ``weights`` g = Σ w_i g_i instead of the mean; ``down`` EF21-BC's master
    compressor; ``step(x, g, t)`` the move of x; ``gmap(x, mean ∇f)`` the logged gradient mapping."""
    rec, x = Recorder(p), x0.copy()
    n = p.n
    s_i = [1.0] * n if scale is None else list(scale)
    g_i: list[np.ndarray] = []
    g_tilde = np.zeros(p.d)  # the workers' mean estimate (EF21-BC's g̃; plain EF21's g)
    g = np.zeros(p.d)  # what moves x: g̃, or with BC the master's own EF21 on it
    for t in range(T + 1):
        grads = all_grads(p, x)
        targets = [s_i[i] * grads[i] for i in range(n)]
        if t == 0:
            sent = [dense(targets[i]) for i in range(n)]
            g_i = [v.value for v in sent]
        else:
            sent = []
            for i in range(n):
                v = s_i[i] * (grads[i] if estimate is None else estimate(t, i, x, grads))
                sent.append(comp(v - g_i[i], worker_rng(comp, seed, i, t)))
            g_i = [g_i[i] + sent[i].value for i in range(n)]
        mean_grad = sum(grads) / n
        rec.record(t, x, grads, g_i, sent, None if t == 0 else g, targets=targets,
                   grad_map=None if gmap is None else gmap(x, mean_grad))
        # g̃ moves by the round's messages (Σ w_i c_i with weights, else their mean), as the master adds them.
        if weights is None:
            # (1/n)·Σ rather than Σ/n: the same number, rounded as the master rounds it, so that EF21-BC's Top-K on
            # g̃ − g meets its exact ties (integer data, a duplicated column) on the same side.
            g_tilde = g_tilde + (1.0 / n) * sum(v.value for v in sent)
        else:
            g_tilde = g_tilde + sum(w * v.value for w, v in zip(weights, sent))
        if down is None:
            rec.broadcast(t, union_entries(sent))
            g = g_tilde
        elif t == 0:
            rec.broadcast(t, p.d)
            g = g_tilde.copy()
        else:
            b = down(g_tilde - g, None)
            rec.broadcast(t, b.entries)
            g = g + b.value
        x = step(x, g, t)
    return rec.trace


def _plain_step(gamma: float) -> Callable[[np.ndarray, np.ndarray, int], np.ndarray]:
    return lambda x, g, t: x - gamma * g


def ef21_sgd(p: Problem, x0: np.ndarray, gamma: float, T: int, comp: Compressor, batches: Batches,
             seed: int = 0) -> Trace:
    """EF21-SGD (§3.6): from round 1, worker i compresses ĝ_i(x^t) − g_i with ĝ_i the mean gradient over its
    minibatch I_i^t (the regularizer taken whole); g_i⁰ = ∇f_i(x⁰), the full gradient."""
    return _ef21_with(p, x0, gamma, T, comp, seed=seed, step=_plain_step(gamma),
                      estimate=lambda t, i, x, grads: p.grad_rows(i, x, batches[t][i]))  # type: ignore[attr-defined]


def ef21_page(p: Problem, x0: np.ndarray, gamma: float, T: int, comp: Compressor, batches: Batches,
              coins: dict[int, bool], seed: int = 0) -> Trace:
    """EF21-PAGE (§3.7): v_i⁰ = g_i⁰ = ∇f_i(x⁰); from round 1, if the round's coin (one for all workers) is up,
    v_i = ∇f_i(x^t), else v_i = v_i + ĝ_I(x^t) − ĝ_I(x^{t−1}) over the same minibatch I = I_i^t at both points;
    then c_i = C(v_i − g_i)."""
    v: list[np.ndarray] = []
    prev: list[np.ndarray] = []

    def estimate(t: int, i: int, x: np.ndarray, grads: list[np.ndarray]) -> np.ndarray:
        if coins[t]:
            v[i] = grads[i]
        else:
            rows = batches[t][i]
            v[i] = v[i] + p.grad_rows(i, x, rows) - p.grad_rows(i, prev[0], rows)  # type: ignore[attr-defined]
        if i == p.n - 1:
            prev[0] = x.copy()
        return v[i]

    def step(x: np.ndarray, g: np.ndarray, t: int) -> np.ndarray:
        if t == 0:
            v.extend(all_grads(p, x))
            prev.append(x.copy())
        return x - gamma * g

    return _ef21_with(p, x0, gamma, T, comp, seed=seed, step=step, estimate=estimate)


def ef21_sgdm(p: Problem, x0: np.ndarray, gamma: float, T: int, comp: Compressor, batches: Batches, eta: float,
              seed: int = 0) -> Trace:
    """EF21-SGDM (§3.13): v_i⁰ = g_i⁰ = ∇f_i(x⁰); from round 1, v_i = (1 − η)v_i + η·ĝ_i(x^t) over the round's
    minibatch, then c_i = C(v_i − g_i)."""
    v: list[np.ndarray] = []

    def estimate(t: int, i: int, x: np.ndarray, grads: list[np.ndarray]) -> np.ndarray:
        v[i] = (1.0 - eta) * v[i] + eta * p.grad_rows(i, x, batches[t][i])  # type: ignore[attr-defined]
        return v[i]

    def step(x: np.ndarray, g: np.ndarray, t: int) -> np.ndarray:
        if t == 0:
            v.extend(all_grads(p, x))
        return x - gamma * g

    return _ef21_with(p, x0, gamma, T, comp, seed=seed, step=step, estimate=estimate)


def ef21_bc(p: Problem, x0: np.ndarray, gamma: float, T: int, comp: Compressor, down: Compressor,
            seed: int = 0) -> Trace:
    """EF21-BC (§3.9): the workers' g̃_i follow EF21 with C_w; the master keeps g̃ = (1/n) Σ g̃_i and its own g,
    broadcasts b = C_M(g̃ − g) and sets g = g + b (round 0: g⁰ = g̃⁰, sent whole); x^{t+1} = x^t − γ g."""
    return _ef21_with(p, x0, gamma, T, comp, seed=seed, down=down, step=_plain_step(gamma))


def ef21_hb(p: Problem, x0: np.ndarray, gamma: float, T: int, comp: Compressor, eta: float, seed: int = 0) -> Trace:
    """EF21-HB (§3.10): g from EF21; v⁰ = g⁰, v = ηv + g after every later round; x^{t+1} = x^t − γ v (one γ)."""
    v: list[np.ndarray] = []

    def step(x: np.ndarray, g: np.ndarray, t: int) -> np.ndarray:
        if t == 0:
            v.append(g.copy())
        else:
            v[0] = eta * v[0] + g
        return x - gamma * v[0]

    return _ef21_with(p, x0, gamma, T, comp, seed=seed, step=step)


def prox_box(lo: float, hi: float) -> Callable[[np.ndarray, float], np.ndarray]:
    """prox of the indicator of [lo, hi]^d: the projection, whatever the step."""
    return lambda y, gamma: np.minimum(np.maximum(y, lo), hi)


def prox_l1(lam: float) -> Callable[[np.ndarray, float], np.ndarray]:
    """prox of γλ‖·‖₁: soft thresholding at γλ."""
    return lambda y, gamma: np.sign(y) * np.maximum(np.abs(y) - gamma * lam, 0.0)


def ef21_prox(p: Problem, x0: np.ndarray, gamma: float, T: int, comp: Compressor,
              prox: Callable[[np.ndarray, float], np.ndarray], seed: int = 0) -> Trace:
    """EF21-Prox (§3.11): x^{t+1} = prox_{γr}(x^t − γ g^t), g from EF21; logs ‖G_γ(x^t)‖² with
    G_γ(x) = (x − prox_{γr}(x − γ∇f(x)))/γ."""
    return _ef21_with(p, x0, gamma, T, comp, seed=seed, step=lambda x, g, t: prox(x - gamma * g, gamma),
                      gmap=lambda x, grad: float(np.sum(((x - prox(x - gamma * grad, gamma)) / gamma) ** 2)))


def ef21_w(p: Problem, x0: np.ndarray, gamma: float, T: int, comp: Compressor, weights: Sequence[float],
           seed: int = 0) -> Trace:
    """EF21-W (§3.12): worker i compresses ∇f_i/(n·w_i) − g_i, g = Σ w_i g_i; G measures g_i against
    ∇f_i/(n·w_i)."""
    n = p.n
    return _ef21_with(p, x0, gamma, T, comp, seed=seed, step=_plain_step(gamma), weights=weights,
                      scale=[1.0 / (n * w) for w in weights])


# -- theory constants (method doc §4, §5), for pinned figures --------------------------------------------------------


def theory_gamma(L: float, L_tilde: float, alpha: float) -> float:
    """γ = 1/(L + L̃ √(β/θ)) with θ = 1 − √(1 − α), β = (1 − α)/θ (Theorem 2 of the EF21 paper)."""
    theta = 1.0 - np.sqrt(1.0 - alpha)
    beta = (1.0 - alpha) / theta
    return float(1.0 / (L + L_tilde * np.sqrt(beta / theta)))


def logreg_smoothness(A: np.ndarray, lam: float) -> float:
    """λ_max(AᵀA/(4N)) + 2λ (method doc §5)."""
    return float(np.linalg.eigvalsh(A.T @ A / (4.0 * A.shape[0]))[-1]) + 2.0 * lam


# -- the family since 2021 (docs/methods-family.md) ----------------------------------------------------------------


@dataclass
class URandK:
    """Keep k coordinates drawn uniformly without replacement and scale them by d/k: unbiased, ω = d/k − 1. The
    draw is the convention of RandK above."""

    k: int
    randomized: bool = True

    def __call__(self, v: np.ndarray, rng: np.random.Generator | None = None) -> Sent:
        assert rng is not None
        d = v.shape[0]
        keep = rng.choice(d, size=self.k, replace=False)
        out = np.zeros(d)
        out[keep] = v[keep] * (d / self.k)
        return Sent(out, self.k, True, np.sort(keep))


@dataclass
class Natural:
    """Natural compression: each nonzero v_j, with 2^e ≤ |v_j| < 2^(e+1), becomes sign(v_j)·2^(e+1) with
    probability |v_j|/2^e − 1, else sign(v_j)·2^e: unbiased, ω = 1/8. One uniform draw per nonzero coordinate,
    in index order (``rng.random(count)``); a dense message of d values."""

    randomized: bool = True

    def __call__(self, v: np.ndarray, rng: np.random.Generator | None = None) -> Sent:
        assert rng is not None
        out = np.zeros_like(v)
        nz = np.flatnonzero(v)
        u = rng.random(nz.shape[0])
        for j, draw in zip(nz, u):
            low = 2.0 ** (np.frexp(abs(v[j]))[1] - 1)  # the power of two at or below |v_j|
            out[j] = np.sign(v[j]) * (2.0 * low if draw < abs(v[j]) / low - 1.0 else low)
        return Sent(out, v.shape[0], False)


def skip(d: int) -> Sent:
    """CLAG's message of a worker whose trigger did not fire: no values, an empty support."""
    return Sent(np.zeros(d), 0, True, np.zeros(0, dtype=int))


class Uplink(Protocol):
    """One uplink rule of the family, worker and master sides, round by round at the points the workers hold."""

    selector: bool

    def round(self, t: int, grads: list[np.ndarray]) -> tuple[list[Sent], list[np.ndarray], np.ndarray, int]:
        """Round t: (the messages, each worker's estimate of ∇f_i for G, the direction g^t that moves x, the
        values the master's sum of the messages carries)."""

    @property
    def logged_g(self) -> np.ndarray | None:
        """What the log's ‖g‖² is of, before this round (None at round 0)."""


@dataclass
class ClagUplink:
    """CLAG (3PC): g_i⁰ = ∇f_i(x⁰) sent whole; from round 1 worker i sends c_i = C(∇f_i − g_i) and sets
    g_i = g_i + c_i when ‖∇f_i − g_i‖² > ζ‖∇f_i(x^t) − ∇f_i(x^{t−1})‖², else a skip (g_i unchanged). g = g + Σc_i/n.
    LAG: C the identity. Every message carries one selector bit (sent or skipped)."""

    comp: Compressor
    zeta: float
    seed: int = 0
    selector: bool = True
    g_i: list[np.ndarray] = field(default_factory=list)
    prev: list[np.ndarray] = field(default_factory=list)
    g: np.ndarray | None = None
    skipped: int = 0
    fired: int = 0

    @property
    def logged_g(self) -> np.ndarray | None:
        return self.g

    def round(self, t: int, grads: list[np.ndarray]) -> tuple[list[Sent], list[np.ndarray], np.ndarray, int]:
        n = len(grads)
        if t == 0:
            sent = [dense(v) for v in grads]
            self.g_i = [v.copy() for v in grads]
            self.g = sum(self.g_i) / n
        else:
            sent = []
            for i in range(n):
                lhs = float(np.sum((grads[i] - self.g_i[i]) ** 2))
                rhs = self.zeta * float(np.sum((grads[i] - self.prev[i]) ** 2))
                if lhs > rhs:
                    s = self.comp(grads[i] - self.g_i[i], worker_rng(self.comp, self.seed, i, t))
                    self.g_i[i] = self.g_i[i] + s.value
                    self.fired += 1
                else:
                    s = skip(grads[i].shape[0])
                    self.skipped += 1
                sent.append(s)
            self.g = self.g + sum(s.value for s in sent) / n
        self.prev = [v.copy() for v in grads]
        return sent, list(self.g_i), self.g, union_entries(sent)


@dataclass
class Ef21Uplink:
    """EF21 (§3.4) as an uplink: g_i⁰ = ∇f_i(x⁰) sent whole, then c_i = C(∇f_i − g_i), g_i = g_i + c_i,
    g = g + Σc_i/n."""

    comp: Compressor
    seed: int = 0
    selector: bool = False
    g_i: list[np.ndarray] = field(default_factory=list)
    g: np.ndarray | None = None

    @property
    def logged_g(self) -> np.ndarray | None:
        return self.g

    def round(self, t: int, grads: list[np.ndarray]) -> tuple[list[Sent], list[np.ndarray], np.ndarray, int]:
        n = len(grads)
        if t == 0:
            sent = [dense(v) for v in grads]
            self.g_i = [v.copy() for v in grads]
            self.g = sum(self.g_i) / n
        else:
            sent = [self.comp(grads[i] - self.g_i[i], worker_rng(self.comp, self.seed, i, t)) for i in range(n)]
            self.g_i = [self.g_i[i] + sent[i].value for i in range(n)]
            self.g = self.g + sum(s.value for s in sent) / n
        return sent, list(self.g_i), self.g, union_entries(sent)


@dataclass
class EControlUplink:
    """EControl: h_i⁰ = ∇f_i(x⁰) sent whole, e_i⁰ = 0; then Δ_i = C(η e_i + ∇f_i − h_i), e_i = e_i + ∇f_i − h_i − Δ_i,
    h_i = h_i + Δ_i; g = g + ΣΔ_i/n."""

    comp: Compressor
    eta: float
    seed: int = 0
    selector: bool = False
    h: list[np.ndarray] = field(default_factory=list)
    e: list[np.ndarray] = field(default_factory=list)
    g: np.ndarray | None = None

    @property
    def logged_g(self) -> np.ndarray | None:
        return self.g

    def round(self, t: int, grads: list[np.ndarray]) -> tuple[list[Sent], list[np.ndarray], np.ndarray, int]:
        n = len(grads)
        if t == 0:
            sent = [dense(v) for v in grads]
            self.h = [v.copy() for v in grads]
            self.e = [np.zeros_like(v) for v in grads]
            self.g = sum(self.h) / n
        else:
            sent = []
            for i in range(n):
                s = self.comp(self.eta * self.e[i] + grads[i] - self.h[i], worker_rng(self.comp, self.seed, i, t))
                self.e[i] = self.e[i] + grads[i] - self.h[i] - s.value
                self.h[i] = self.h[i] + s.value
                sent.append(s)
            self.g = self.g + sum(s.value for s in sent) / n
        return sent, list(self.h), self.g, union_entries(sent)


@dataclass
class DianaUplink:
    """DIANA: h_i⁰ = ∇f_i(x⁰) sent whole (``full``: the first direction is their mean) or h_i⁰ = 0; then
    m_i = Q(∇f_i − h_i), the direction ĝ = h + Σm_i/n with h = (1/n)Σh_i, then h_i = h_i + α m_i. The estimate of
    ∇f_i for G is h_i + m_i; the log's ‖g‖² is ‖h‖²."""

    comp: Compressor
    alpha: float
    full_start: bool = True
    seed: int = 0
    selector: bool = False
    h_i: list[np.ndarray] = field(default_factory=list)
    h: np.ndarray | None = None

    @property
    def logged_g(self) -> np.ndarray | None:
        return self.h

    def round(self, t: int, grads: list[np.ndarray]) -> tuple[list[Sent], list[np.ndarray], np.ndarray, int]:
        n = len(grads)
        if t == 0 and self.full_start:
            sent = [dense(v) for v in grads]
            self.h_i = [v.copy() for v in grads]
            self.h = sum(self.h_i) / n
            return sent, list(self.h_i), self.h, union_entries(sent)
        if t == 0:
            self.h_i = [np.zeros_like(v) for v in grads]
            self.h = np.zeros_like(grads[0])
        sent = [self.comp(grads[i] - self.h_i[i], worker_rng(self.comp, self.seed, i, t)) for i in range(n)]
        estimates = [self.h_i[i] + sent[i].value for i in range(n)]
        mean_m = sum(s.value for s in sent) / n
        direction = self.h + mean_m
        self.h_i = [self.h_i[i] + self.alpha * sent[i].value for i in range(n)]
        self.h = self.h + self.alpha * mean_m
        return sent, estimates, direction, union_entries(sent)


@dataclass
class MarinaUplink:
    """MARINA: in round 0 and whenever the round's coin is up, worker i sends ∇f_i whole and g_i = ∇f_i; else it
    sends q_i = Q(∇f_i(x^t) − ∇f_i(x^{t−1})) and g_i = g_i + q_i. g = (1/n)Σg_i."""

    comp: Compressor
    coins: dict[int, bool]
    seed: int = 0
    selector: bool = False
    g_i: list[np.ndarray] = field(default_factory=list)
    prev: list[np.ndarray] = field(default_factory=list)
    g: np.ndarray | None = None

    @property
    def logged_g(self) -> np.ndarray | None:
        return self.g

    def round(self, t: int, grads: list[np.ndarray]) -> tuple[list[Sent], list[np.ndarray], np.ndarray, int]:
        n = len(grads)
        if t == 0 or self.coins[t]:
            sent = [dense(v) for v in grads]
            self.g_i = [v.copy() for v in grads]
        else:
            sent = [self.comp(grads[i] - self.prev[i], worker_rng(self.comp, self.seed, i, t)) for i in range(n)]
            self.g_i = [self.g_i[i] + sent[i].value for i in range(n)]
        self.prev = [v.copy() for v in grads]
        self.g = sum(self.g_i) / n
        return sent, list(self.g_i), self.g, union_entries(sent)


def family(p: Problem, x0: np.ndarray, gamma: float, T: int, uplink: Uplink, *,
           down: Compressor | None = None, seed: int = 0) -> Trace:
    """A rule of the family: each round the workers send at the point they hold, the master moves
    x^{t+1} = x^t − γ g^t.

    Without ``down`` the workers hold x itself and the broadcast is the sum of the messages. With ``down``, EF21-P:
    the workers hold w (w⁰ = x⁰) and evaluate there (the log's f, ‖∇f‖² and G are at w^t; ``Trace.x`` is the
    master's x^t); the broadcast is b = C_P(x^{t+1} − w^t) (its generator ``default_rng([seed, t, 4])`` when C_P is
    randomized) and w^{t+1} = w^t + b."""
    rec, x = Recorder(p, selector=uplink.selector), x0.copy()
    w = x0.copy()
    for t in range(T + 1):
        at = x if down is None else w
        grads = all_grads(p, at)
        logged = uplink.logged_g
        sent, estimates, g, entries = uplink.round(t, grads)
        rec.record(t, x, grads, estimates, sent, None if t == 0 else logged)
        rec.trace.f[-1] = sum(p.value(i, at) for i in range(p.n)) / p.n
        x = x - gamma * g
        if down is None:
            rec.broadcast(t, entries)
        else:
            rng = np.random.default_rng([seed, t, 4]) if getattr(down, "randomized", False) else None
            b = down(x - w, rng)
            rec.broadcast(t, b.entries)
            w = w + b.value
    return rec.trace


def ef21_float32(p: Problem, x0: np.ndarray, gamma: float, T: int, k: int) -> list[np.ndarray]:
    """EF21 with Top-k (§3.4, ``init="full"``) with every vector in float32 (``--dtype float32``); returns x^0..x^T.

    ∇f_i(x^t) is evaluated (in float64, as the data are) at the float32 x^t and rounded to float32 once. Then, all
    in float32: c_i = TopK(∇f_i − g_i) (lower index first among equal magnitudes), g_i ← g_i + c_i; the sum Σ c_i is
    formed in rank order from 0; g ← g + (1/n)·Σ c_i, the scalar rounded to float32 first; x ← x − γ·g, γ likewise
    rounded to float32 (a Python scalar takes the vector's dtype)."""
    f32 = np.float32
    x = x0.astype(f32)
    xs = [x.copy()]
    g = np.zeros(p.d, dtype=f32)
    g_i: list[np.ndarray] = []
    for t in range(T + 1):
        grads = [p.grad(i, x.astype(np.float64)).astype(f32) for i in range(p.n)]
        if t == 0:
            sent = [gr.copy() for gr in grads]
            g_i = [gr.copy() for gr in grads]
        else:
            sent = []
            for i in range(p.n):
                r = grads[i] - g_i[i]
                keep = np.lexsort((np.arange(p.d), -np.abs(r)))[:k]
                c = np.zeros(p.d, dtype=f32)
                c[keep] = r[keep]
                sent.append(c)
                g_i[i] = g_i[i] + c
        total = np.zeros(p.d, dtype=f32)
        for c in sent:
            total = total + c
        g = g + total * f32(1.0 / p.n)
        x = x - f32(gamma) * g
        assert x.dtype == g.dtype == f32
        xs.append(x.copy())
    return xs
