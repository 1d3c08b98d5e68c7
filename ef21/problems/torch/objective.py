"""A PyTorch model, a loss and its data as an ef21 objective (``pip install -e '.[torch]'``).

    model = seeded(ctx.seed, lambda: MyNet())          # the same initial weights on every worker
    return TorchObjective(model, torch.nn.CrossEntropyLoss(), X_shard, y_shard, test=(X_test, y_test))
    return TorchObjective(model, loss, MyDataset(ctx.rank), test=MyDataset("test"))   # a map-style Dataset

f_i(x) is the loss (a mean over rows) of the model whose trainable parameters, flattened in ``parameters()`` order,
are x. What the method sees is float64 (x, gradients, its own state); the model computes in ``dtype``:

- ``float32`` (the default): x is rounded to float32 when it is loaded into the model, gradients come back in
  float32 and are widened exactly. The method's iterate, EF21's g_i and g stay float64, so no rounding accumulates
  across rounds; the model is evaluated at the float32 point nearest x.
- ``float64``: the model and data are converted to double; about 2× the time per gradient on CPU for matrix-heavy
  models (see docs/benchmarks/pytorch.md), nothing rounded anywhere.

With the run's ``--dtype float32`` the method's vectors are float32 themselves: x loads into a float32 model and
its gradient is handed back as it is, with no float64 copy either way.

**Train mode.** Gradients are taken in ``model.train()`` (``train=False``: ``eval()``), so dropout is on and
BatchNorm normalises with the batch's statistics; metrics are taken in ``eval()``. Every random draw of a gradient
call — dropout, and the dataset's random transforms (augmentation) — comes from torch's, numpy's and Python's
global generators seeded from (seed, rank, round, the call's kind: the whole shard or a minibatch) for the call
and restored after it, so a gradient is a function of (x, rows, seed, rank, round) and ``ef21 run`` equals
``ef21 simulate``. PAGE's two minibatch gradients of a round (at x and at the previous x) see the same draws.

**Buffers** (BatchNorm's running statistics; everything in the state dict that is not a trainable parameter) are
the vector b, carried beside x: every replica holds the same b^t, loaded into the model before each forward. The
forwards of the round's training batch (the estimator's, at the round's x) update them as in any training loop;
the worker sends its change, the master averages the changes over the workers and every replica applies the mean
(``ef21.methods.buffers``). So evaluation, checkpoints and ``ef21 export`` use one set of buffers, which is the
running average of the workers' batch statistics, exactly the same in every process.

**Data.** ``X, y`` in memory (tensors or arrays), or a map-style ``torch.utils.data.Dataset`` whose items are
(input, target) pairs, batched by ``collate_fn`` (default ``torch.utils.data.default_collate``). ef21 draws a
minibatch's rows from (seed, rank, round) and fetches only those; a full-shard gradient (the ``full`` estimator,
evaluation rounds) runs over the shard in chunks of ``chunk_size`` rows (a dataset: 256; tensors: all at once),
accumulating the gradient as gradient accumulation does, so a lazy dataset is never loaded whole.

Either way a gradient is a deterministic function of its inputs for a fixed number of intra-op threads, which is
what makes ``ef21 run`` equal ``ef21 simulate`` bit for bit: ``threads`` (default 1) pins torch's intra-op pool,
because a reduction split over a different number of threads adds in a different order. One thread is also what
you want with several worker processes on one machine (they would otherwise oversubscribe the cores).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from ef21.problems.layout import ModelLayout, TensorSpec

from .ops import TorchOps

if TYPE_CHECKING:
    import torch

__all__ = ["TorchObjective", "seeded", "require_torch"]


NATIVE_ENV = "EF21_TORCH_NATIVE"


def native_default() -> bool:
    """Torch-native method vectors unless the environment says ``EF21_TORCH_NATIVE=0`` (it gives the same bits;
    the switch is for measuring and for ruling it out)."""
    value = os.environ.get(NATIVE_ENV, "1").strip().lower()
    if value not in ("0", "1", "false", "true", "no", "yes", "off", "on", ""):
        raise ValueError(f"{NATIVE_ENV}={value!r}: expected 1 or 0")
    return value not in ("0", "false", "no", "off")


def require_torch() -> Any:
    """Import torch, or fail with the line that says how to get it."""
    try:
        import torch
    except ImportError:
        from ef21.errors import UserError

        raise UserError("this objective needs PyTorch: pip install torch==2.13.0 (CPU wheel), "
                        "or pip install -e '.[torch]'") from None
    return torch


def seeded(seed: int, build: Callable[[], Any]) -> Any:
    """``build()`` (a module constructor) under ``torch.manual_seed(seed)``, leaving torch's global generator as it
    was: every worker given the same seed builds the same initial weights, and the factory has no side effect."""
    torch = require_torch()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


_DTYPES = ("float32", "float64")
# The tag of the draws a gradient call makes (dropout, augmentation), beside ef21.methods.streams' tags (1-4).
_TORCH_STREAM = 5
_KINDS = {"full": 0, "batch": 1, "test": 2}
DATASET_CHUNK = 256


def _is_dataset(a: Any) -> bool:
    """A map-style dataset (``__getitem__`` and ``__len__``), as opposed to an array or a tensor of rows."""
    torch = require_torch()
    return (not torch.is_tensor(a) and not isinstance(a, (np.ndarray, list, tuple))
            and hasattr(a, "__getitem__") and hasattr(a, "__len__"))


class _Rows:
    """Rows of (input, target) the objective reads: ``batch(idx)`` returns them as tensors of the model's dtype
    (floating inputs and targets; integer ones stay int64, e.g. class labels or token ids)."""

    def __init__(self, obj: TorchObjective, X: Any, y: Any, collate_fn: Callable[[list], Any] | None,
                 what: str) -> None:
        torch = obj._torch
        self.obj, self.what = obj, what
        self.dataset = X if _is_dataset(X) else None
        if self.dataset is not None:
            if y is not None:
                raise ValueError(f"{what}: give a Dataset alone (its items are (input, target) pairs), not with y")
            self.collate = collate_fn or torch.utils.data.default_collate
            self.n = len(self.dataset)
        else:
            if y is None:
                raise ValueError(f"{what}: give X and y, or a map-style Dataset")
            self.X, self.y = obj._tensor(X), obj._tensor(y, integer_to_long=True)
            if self.X.shape[0] != self.y.shape[0]:
                raise ValueError(f"{what}: X has {self.X.shape[0]} rows and y {self.y.shape[0]}: need the same")
            self.n = int(self.X.shape[0])
        if self.n == 0:
            raise ValueError(f"{what}: no rows")

    def batch(self, idx: np.ndarray | None) -> tuple[Any, Any]:
        if self.dataset is None:
            if idx is None:
                return self.X, self.y
            t = self.obj._torch.from_numpy(np.asarray(idx, dtype=np.int64)).to(self.X.device)
            return self.X[t], self.y[t]
        rows = range(self.n) if idx is None else (int(i) for i in idx)
        items = []
        for i in rows:
            try:
                item = self.dataset[i]
            except Exception as exc:
                raise ValueError(f"{self.what}: the dataset raised {type(exc).__name__} on item {i}: {exc}") from None
            if self.collate is self.obj._torch.utils.data.default_collate and not (
                    isinstance(item, (tuple, list)) and len(item) == 2):
                raise ValueError(f"{self.what}: dataset item {i} is a {type(item).__name__}, expected an "
                                 f"(input, target) pair")
            items.append(item)
        try:
            out = self.collate(items)
        except Exception as exc:
            raise ValueError(f"{self.what}: collate_fn raised {type(exc).__name__}: {exc}") from None
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise ValueError(f"{self.what}: collate_fn returned a {type(out).__name__}, expected (inputs, targets)")
        inputs, targets = out
        if not self.obj._torch.is_tensor(targets):
            raise ValueError(f"{self.what}: the targets are a {type(targets).__name__}, expected a tensor")
        return self.obj._cast(inputs), self.obj._tensor(targets, integer_to_long=True)

    def chunks(self, size: int | None) -> Iterator[np.ndarray | None]:
        """Row indices of the whole set, ``size`` at a time (None: all in one)."""
        if size is None or size >= self.n:
            yield None
            return
        for start in range(0, self.n, size):
            yield np.arange(start, min(start + size, self.n))


class TorchObjective:
    """An ``nn.Module`` + loss + data as an ef21 objective: ``d``, ``value_and_grad``, ``n_samples`` with
    ``grad_batch`` (minibatch estimators), ``x0`` (the model's initial weights), ``metrics`` (held-out loss and, for
    classification, accuracy), and ``layout`` with the buffer hooks (``initial_buffers``, ``begin_round``,
    ``round_buffers``). No ``smoothness()``: a network has no known L, so ``--stepsize`` is required.

    ``loss(output, target)`` must return the mean over the rows (``nn.CrossEntropyLoss()``, ``nn.MSELoss()``).
    ``test``: a held-out (X, y) or Dataset evaluated by ``metrics`` in ``eval()`` under ``torch.no_grad()``; every
    worker reports its own and ef21 logs the mean over the workers, so give each worker the whole held-out set
    (exact) or equal slices.
    ``native``: the worker keeps its method vectors as float64 tensors on the model's device (``array_ops``; the
    same bits as numpy); None reads ``EF21_TORCH_NATIVE`` (default on), False keeps them in numpy.
    """

    def __init__(self, model: torch.nn.Module, loss: Callable[[Any, Any], Any], X: Any, y: Any = None, *,
                 test: Any = None, collate_fn: Callable[[list], Any] | None = None, dtype: str = "float32",
                 threads: int | None = 1, train: bool = True, chunk_size: int | None = None,
                 native: bool | None = None) -> None:
        torch = require_torch()
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        if threads is not None:
            torch.set_num_threads(int(threads))
        self._torch = torch
        self._dtype = torch.float32 if dtype == "float32" else torch.float64
        self.train = bool(train)
        self.model = model.to(self._dtype)
        self.model.train(self.train)
        # The model's device (CPU, or CUDA when the user moved it there): the data, the draws and the method's
        # vectors (``array_ops``) follow it; numpy sees only what crosses to the host (x⁰, b, the codec's k entries).
        first = next(iter(self.model.parameters()), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self.loss = loss
        self.data = _Rows(self, X, y, collate_fn, "training data")
        self.chunk_size = chunk_size if chunk_size is not None else (DATASET_CHUNK if self.data.dataset is not None
                                                                     else None)
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.test_rows = None
        if test is not None:
            self.test_rows = (_Rows(self, test, None, collate_fn, "test data") if _is_dataset(test)
                              else _Rows(self, test[0], test[1], None, "test data"))
        if self.data.dataset is None:  # the rows in memory, as before (and for code that reads them)
            self.X, self.y = self.data.X, self.data.y
        if self.test_rows is not None and self.test_rows.dataset is None:
            self.test = (self.test_rows.X, self.test_rows.y)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.d = sum(p.numel() for p in self.params)
        self.n_samples = self.data.n
        self._layout, self._buffers = self._describe()
        # The parameters become views of one flat buffer, so loading x is a single copy (and cast) into it.
        self._flat = torch.cat([p.detach().reshape(-1) for p in self.params])
        offset = 0
        for p in self.params:
            p.data = self._flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        self._x0 = self._flat.to(torch.float64).cpu().numpy().copy()
        self._b0 = self._read_buffers()
        self._b = self._b0.copy()
        self._key = (0, 0, 0)
        self._round_x: Any = None
        self._updated: np.ndarray | None = None
        self.native = native_default() if native is None else bool(native)

    def array_ops(self) -> TorchOps | None:
        """The backend a worker keeps its method vectors on (``ef21.compression.ops``): torch float64 tensors on the
        model's device, fed by autograd with no numpy round trip; None with ``native=False`` (numpy)."""
        return TorchOps(self._torch, self._flat.device) if self.native else None

    # -- layout and buffers -----------------------------------------------------------------------------------------

    def _describe(self) -> tuple[ModelLayout, list[Any]]:
        """The model's layout (parameters in x's order, the rest of its state dict in b's) and b's tensors."""
        torch = self._torch
        name_of = {id(p): n for n, p in self.model.named_parameters() if p.requires_grad}
        params = tuple(TensorSpec(name_of[id(p)], tuple(p.shape), _dtype_name(p.dtype)) for p in self.params)
        buffers, tensors, keys, seen = [], [], [], {}
        for key, t in self.model.state_dict(keep_vars=True).items():
            if id(t) in name_of:
                keys.append((key, name_of[id(t)]))
                continue
            if id(t) not in seen:
                if _dtype_name(t.dtype) is None:
                    raise ValueError(f"state dict entry {key!r} has dtype {t.dtype}, which ef21 cannot carry")
                seen[id(t)] = key
                buffers.append(TensorSpec(key, tuple(t.shape), _dtype_name(t.dtype)))
                tensors.append(t.detach() if isinstance(t, torch.nn.Parameter) else t)
            keys.append((key, seen[id(t)]))
        return ModelLayout(params, tuple(buffers), tuple(keys)), tensors

    def layout(self) -> ModelLayout:
        """The names, shapes and dtypes of x's and b's tensors (sent at set-up; what ``ef21 export`` writes)."""
        return self._layout

    def initial_buffers(self) -> np.ndarray:
        """b⁰: the model's buffers as built (float64; empty when it has none)."""
        return self._b0.copy()

    def begin_round(self, key: tuple[int, int, int], buffers: np.ndarray | None) -> None:
        """Round ``key`` = (seed, rank, round) begins with the replicated buffers b^t: seeds the round's draws."""
        self._key = (int(key[0]), int(key[1]), int(key[2]))
        if buffers is not None:
            self._b = np.array(buffers, dtype=np.float64, copy=True)
        self._round_x = None
        self._updated = None

    def round_buffers(self) -> np.ndarray | None:
        """b after this round's training forward (the last gradient call at the round's x), or None."""
        return None if self._updated is None else self._updated.copy()

    def _read_buffers(self) -> np.ndarray:
        if not self._buffers:
            return np.zeros(0)
        return np.concatenate([t.detach().reshape(-1).to(self._torch.float64).cpu().numpy() for t in self._buffers])

    def _load_buffers(self) -> None:
        offset = 0
        with self._torch.no_grad():
            for t in self._buffers:
                n = t.numel()
                part = self._b[offset:offset + n]
                if not t.is_floating_point():
                    part = np.rint(part)
                t.copy_(self._torch.from_numpy(part).view(t.shape))
                offset += n

    # -- data -------------------------------------------------------------------------------------------------------

    def _tensor(self, a: Any, *, integer_to_long: bool = False) -> torch.Tensor:
        t = self._torch.as_tensor(a if self._torch.is_tensor(a) else np.asarray(a)).to(self.device)
        # Floating data follows the model's dtype; integers stay integers (class labels, token ids).
        if t.is_floating_point():
            return t.to(self._dtype)
        return t.to(self._torch.int64) if integer_to_long or t.dtype != self._torch.bool else t

    def _cast(self, inputs: Any) -> Any:
        if self._torch.is_tensor(inputs):
            return self._tensor(inputs)
        if isinstance(inputs, (tuple, list)):
            return type(inputs)(self._cast(v) for v in inputs)
        if isinstance(inputs, dict):
            return {k: self._cast(v) for k, v in inputs.items()}
        return inputs

    @contextlib.contextmanager
    def _draws(self, kind: str) -> Iterator[None]:
        """The call's random draws (dropout, augmentation) from (seed, rank, round, kind); the global generators
        of torch, numpy and Python as they were afterwards."""
        seed = int(np.random.SeedSequence([*self._key, _TORCH_STREAM, _KINDS[kind]]).generate_state(1, np.uint64)[0])
        np_state, py_state = np.random.get_state(), random.getstate()
        # manual_seed seeds every device's generator; fork_rng puts back the model's device's too (CUDA's dropout
        # draws come from it), so the draws of a call never leak into the next.
        devices = [self.device] if self.device.type == "cuda" else []
        with self._torch.random.fork_rng(devices=devices):
            self._torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
            random.seed(seed)
            try:
                yield
            finally:
                np.random.set_state(np_state)
                random.setstate(py_state)

    # -- f_i and its gradients --------------------------------------------------------------------------------------

    def _load(self, x: Any) -> None:
        """Load x (numpy, or a float64 tensor from ``array_ops``) into the model: one copy, rounded to its dtype."""
        with self._torch.no_grad():
            if self._torch.is_tensor(x):
                self._flat.copy_(x)
            else:  # x's own dtype (float64, or a float32 run's float32), cast by the copy
                self._flat.copy_(self._torch.from_numpy(np.ascontiguousarray(x)))

    def _loss_and_grad(self, x: Any, idx: np.ndarray | None, kind: str) -> tuple[float, Any]:
        """Mean loss and gradient over ``idx`` (None: the whole shard), in chunks of ``chunk_size`` rows whose
        gradients add up weighted by their rows, as gradient accumulation does. The gradient is a float64 tensor
        on the model's device when x is one (``array_ops``), else numpy (a view of that tensor on CPU)."""
        torch = self._torch
        self._load(x)
        self._load_buffers()
        self.model.train(self.train)
        rows = self.data.n if idx is None else len(idx)
        if idx is None:
            parts = list(self.data.chunks(self.chunk_size))
        elif self.chunk_size is None or len(idx) <= self.chunk_size:
            parts = [idx]
        else:
            parts = [idx[i:i + self.chunk_size] for i in range(0, len(idx), self.chunk_size)]
        value, flat = 0.0, None
        # The gradient comes back in x's dtype: float64 for a float64 run (a float32 model's gradient widens
        # exactly), float32 for --dtype float32, where a float32 model's gradient is used as it is (no round trip).
        out = torch.float32 if x.dtype == np.float32 else torch.float64
        with self._draws(kind), torch.enable_grad():
            for part in parts:
                inputs, targets = self.data.batch(part)
                loss = self.loss(self.model(inputs), targets)
                if loss.dim() != 0:
                    raise ValueError(f"the loss must be a scalar (a mean over the rows), got shape "
                                     f"{tuple(loss.shape)}")
                v = float(loss.detach())
                if not math.isfinite(v):
                    raise FloatingPointError(f"the loss is {v} on {rows} rows")
                grads = torch.autograd.grad(loss, self.params, allow_unused=True)
                g = torch.cat([(torch.zeros_like(p) if gr is None else gr).reshape(-1)
                               for p, gr in zip(self.params, grads)]).to(out)
                if len(parts) == 1:  # the one chunk: its bits, unscaled
                    value, flat = v, g
                else:
                    w = (self.data.n if part is None else len(part)) / rows
                    value += w * v
                    flat = w * g if flat is None else flat.add_(g, alpha=w)
        self._note_buffers(x)
        assert flat is not None
        return value, (flat if torch.is_tensor(x) else flat.cpu().numpy())

    def _note_buffers(self, x: Any) -> None:
        """Keep b after a training forward at the round's x (the first point a round evaluates; PAGE's second,
        at the previous x, does not count)."""
        if not self.train or not self._buffers:
            return
        torch = self._torch
        if torch.is_tensor(x):
            if self._round_x is None:
                self._round_x = x.clone()
            same = torch.equal(x, self._round_x)
        else:
            if self._round_x is None:
                self._round_x = np.array(x, dtype=np.float64, copy=True)
            same = np.array_equal(x, self._round_x)
        if same:
            self._updated = self._read_buffers()

    accepts_float32 = True
    """A ``--dtype float32`` run hands x over as float32 and gets the gradient back in float32 (no float64 copy)."""

    def value_and_grad(self, x: Any) -> tuple[float, Any]:
        """f_i(x) and ∇f_i(x) over the whole shard."""
        return self._loss_and_grad(x, None, "full")

    def grad_batch(self, x: Any, rows: np.ndarray) -> Any:
        """The gradient of the mean loss over ``rows`` of the shard (drawn by ef21 from (seed, rank, round))."""
        return self._loss_and_grad(x, np.asarray(rows, dtype=np.int64), "batch")[1]

    def x0(self) -> np.ndarray:
        """The model's initial weights (build it with ``seeded`` so that every worker has the same)."""
        return self._x0.copy()

    def metrics(self, x: Any) -> dict[str, float]:
        """Held-out loss and accuracy (the share of rows whose largest output is the label) at x, in ``eval()``
        with the replicated buffers b^t."""
        if self.test_rows is None:
            return {}
        torch = self._torch
        self._load(x)
        self._load_buffers()
        self.model.eval()
        losses, correct, classified = [], 0, True
        try:
            with self._draws("test"), torch.no_grad():
                for part in self.test_rows.chunks(self.chunk_size):
                    inputs, y = self.test_rows.batch(part)
                    out = self.model(inputs)
                    losses.append((float(self.loss(out, y)), self.test_rows.n if part is None else len(part)))
                    classified = classified and not y.is_floating_point() and out.dim() == 2 and y.dim() == 1
                    if classified:
                        correct += int((out.argmax(dim=1) == y).sum())
        finally:
            self.model.train(self.train)
        # One chunk: its loss as it comes (a mean over every row); several: their means weighted by their rows.
        loss = losses[0][0] if len(losses) == 1 else sum(v * n for v, n in losses) / self.test_rows.n
        out_metrics = {"test_loss": loss}
        if classified:
            out_metrics["test_acc"] = correct / self.test_rows.n
        return out_metrics


def _dtype_name(dtype: Any) -> str | None:
    name = str(dtype).removeprefix("torch.")
    return name if name in ("float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8", "bool") \
        else None
