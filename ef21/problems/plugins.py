"""User objectives: ``--objective FILE.py:FUNC`` or ``--objective package.module:FUNC``.

FUNC is called once per worker with an ``ObjectiveContext`` (rank, n, seed, the worker's data shard when
``--data`` is given, the ``--objective-arg`` options) and returns an object with at least

- ``d``: the dimension, and ``value_and_grad(x) -> (f_i(x), ∇f_i(x))`` for x a float64 vector of length d;

and optionally ``smoothness() -> L_i`` (the theory stepsizes need it; without it ``--stepsize`` is required),
``x0() -> vector`` (the start, e.g. a network's initial weights), ``n_samples`` with
``grad_batch(x, rows) -> gradient over those rows`` (minibatch estimators), ``metrics(x) -> {name: value}``
(logged every evaluation round, averaged over the workers: give each worker a slice of a held-out set), and
``gram()`` / ``diagonal()`` (curvature for the exact L of the whole problem; else L is taken as mean L_i, an
upper bound), and a model's ``layout()`` with its buffer hooks (``initial_buffers()``, ``begin_round(key, b)``,
``round_buffers()``: see ``ef21.problems.torch``). docs/objectives.md has the whole contract, examples/ridge.py a complete example.

Every worker must present the same objective: its identity (the function's name, the file's content hash or the
module's version, the options and d) is checked by the master at join.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ef21.errors import UserError

from .layout import ModelLayout


@dataclass(frozen=True)
class ObjectiveContext:
    """What a worker knows when its objective is built."""

    rank: int
    n: int
    seed: int
    options: dict[str, str] = field(default_factory=dict)
    shard: Any = None
    """The worker's rows of ``--data`` (``shard.A``, ``shard.y``), or None without ``--data``."""


@dataclass(frozen=True)
class PluginRef:
    spec: str
    func: str
    label: str
    """``file.py:func`` or ``package.module:func``: how errors and the identity name it."""
    digest: str
    factory: Callable[[ObjectiveContext], Any]


_LOADED: dict[tuple[str, str], PluginRef] = {}


def _split(spec: str) -> tuple[str, str]:
    target, sep, func = spec.rpartition(":")
    if not sep or not target or not func.isidentifier():
        raise UserError(f"--objective {spec!r}: use FILE.py:FUNC or package.module:FUNC")
    return target, func


def load_plugin(spec: str) -> PluginRef:
    """Import the factory named by ``spec`` (once per process and file content)."""
    target, func = _split(spec)
    if target.endswith(".py") or "/" in target or Path(target).is_file():
        path = Path(target)
        try:
            source = path.read_bytes()
        except FileNotFoundError:
            raise UserError(f"--objective {spec}: no such file {target}") from None
        except OSError as exc:
            raise UserError(f"--objective {spec}: cannot read {target} ({exc.strerror})") from None
        digest = hashlib.sha256(source).hexdigest()[:16]
        key = (str(path.resolve()), digest)
        if key in _LOADED:
            return _LOADED[key]
        name = f"ef21_objective_{digest}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        # Helpers next to the user's file import as they would when it is run as a script.
        folder = str(path.resolve().parent)
        added = folder not in sys.path
        if added:
            sys.path.insert(0, folder)
        try:
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise UserError(f"--objective {spec}: import failed: {type(exc).__name__}: {exc}") from None
        label = f"{path.name}:{func}"
    else:
        key = (target, "")
        try:
            module = importlib.import_module(target)
        except Exception as exc:
            raise UserError(f"--objective {spec}: cannot import {target}: {type(exc).__name__}: {exc}") from None
        version = getattr(module, "__version__", None)
        origin = getattr(module, "__file__", None)
        if version is not None:
            digest = f"v{version}"
        elif origin is not None:
            digest = hashlib.sha256(Path(origin).read_bytes()).hexdigest()[:16]
        else:
            digest = "builtin"
        label = f"{target}:{func}"
    factory = getattr(module, func, None)
    if not callable(factory):
        raise UserError(f"--objective {spec}: {label.split(':')[0]} has no function {func!r}")
    ref = PluginRef(spec, func, label, digest, factory)
    _LOADED[key] = ref
    return ref


def identity(ref: PluginRef, options: tuple[tuple[str, str], ...]) -> str:
    """What two workers must agree on before they build the objective: its name, content and options (its d is
    compared once built, at set-up)."""
    opts = ",".join(f"{k}={v}" for k, v in options)
    return f"{ref.label}@{ref.digest}" + (f" [{opts}]" if opts else "")


def build_objective(spec: str, options: tuple[tuple[str, str], ...], rank: int, n: int, seed: int,
                    shard: Any = None) -> PluginObjective:
    ref = load_plugin(spec)
    ctx = ObjectiveContext(rank, n, seed, dict(options), shard)
    try:
        obj = ref.factory(ctx)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"objective {ref.label} (rank {rank}) raised {type(exc).__name__}: {exc}") from None
    return PluginObjective(obj, ref, rank, options)


class PluginObjective:
    """A user's objective behind checks: every value and gradient it returns is of the right shape and finite,
    or a one-line error names the objective, the rank and what was wrong."""

    def __init__(self, inner: Any, ref: PluginRef, rank: int, options: tuple[tuple[str, str], ...]) -> None:
        self.inner, self.ref, self.rank = inner, ref, rank
        d = getattr(inner, "d", None)
        if not isinstance(d, (int, np.integer)) or isinstance(d, bool) or d <= 0:
            self._fail(f"returned an object without a positive integer d (got {d!r})")
        if not callable(getattr(inner, "value_and_grad", None)):
            self._fail("returned an object without value_and_grad(x)")
        self.d = int(d)
        self.identity = identity(ref, options)
        n = getattr(inner, "n_samples", None)
        self.n_samples: int | None = int(n) if n is not None and callable(getattr(inner, "grad_batch", None)) else None
        self._layout = self._read_layout()
        # A model that computes in float32 (``ef21.problems.torch``) takes a --dtype float32 run's x as it is and
        # hands back a float32 gradient, which stays float32 here (no float64 round trip).
        self.accepts_float32 = bool(getattr(inner, "accepts_float32", False))
        self._ops: Any = None

    def _fail(self, what: str) -> None:
        raise UserError(f"objective {self.ref.label} (rank {self.rank}) {what}")

    def array_ops(self) -> Any:
        """The objective's own backend for a worker's vectors (``ef21.compression.ops``; a ``TorchObjective``'s
        tensors), or None: then every vector is numpy."""
        make = getattr(self.inner, "array_ops", None)
        self._ops = self._call("array_ops") if callable(make) else None
        return self._ops

    def _vector(self, g: Any, what: str) -> Any:
        ops = self._ops
        if ops is not None and ops.owns(g):  # a gradient on the objective's backend stays there: checked there
            if tuple(g.shape) != (self.d,):
                self._fail(f"returned a {what} of shape {tuple(g.shape)}, expected ({self.d},)")
            if not ops.all_finite(g):
                self._fail(f"returned a {what} with NaN or Inf")
            return g
        try:
            keep32 = self.accepts_float32 and getattr(g, "dtype", None) == np.float32
            g = np.asarray(g, dtype=np.float32 if keep32 else np.float64)
        except (TypeError, ValueError):
            self._fail(f"returned a {what} that is not a numeric vector")
        if g.shape != (self.d,):
            self._fail(f"returned a {what} of shape {g.shape}, expected ({self.d},)")
        with np.errstate(over="ignore", invalid="ignore"):
            if not math.isfinite(float(g @ g)) and not np.all(np.isfinite(g)):
                self._fail(f"returned a {what} with NaN or Inf")
        return g

    def _call(self, name: str, *args: Any) -> Any:
        try:
            return getattr(self.inner, name)(*args)
        except UserError:
            raise
        except Exception as exc:
            self._fail(f"{name} raised {type(exc).__name__}: {exc}")

    def value_and_grad(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        out = self._call("value_and_grad", x)
        try:
            f, g = out
            f = float(f)
        except (TypeError, ValueError):
            self._fail("value_and_grad must return (value, gradient)")
        if not math.isfinite(f):
            self._fail(f"returned a non-finite value f = {f}")
        return f, self._vector(g, "gradient")

    def grad_batch(self, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return self._vector(self._call("grad_batch", x, rows), "minibatch gradient")

    def smoothness(self) -> float | None:
        if not callable(getattr(self.inner, "smoothness", None)):
            return None
        L = self._call("smoothness")
        try:
            L = float(L)
        except (TypeError, ValueError):
            self._fail(f"smoothness() returned {L!r}, not a number")
        if not (math.isfinite(L) and L > 0):
            self._fail(f"smoothness() returned {L}, not a positive number")
        return L

    def x0(self) -> np.ndarray | None:
        if not callable(getattr(self.inner, "x0", None)):
            return None
        return self._vector(self._call("x0"), "x0")

    def metrics(self, x: np.ndarray) -> dict[str, float] | None:
        if not callable(getattr(self.inner, "metrics", None)):
            return None
        out = self._call("metrics", x)
        try:
            return {str(k): float(v) for k, v in dict(out).items()}
        except (TypeError, ValueError):
            self._fail("metrics(x) must return a mapping of names to numbers")
        return None

    # -- a model's layout and buffers (ef21.problems.torch) -----------------------------------------------------------

    def _read_layout(self) -> ModelLayout | None:
        if not callable(getattr(self.inner, "layout", None)):
            return None
        lay = self._call("layout")
        if not isinstance(lay, ModelLayout) or lay.d != self.d:
            self._fail(f"layout() returned {type(lay).__name__} whose parameters do not hold d = {self.d} entries")
        return lay

    def layout(self) -> ModelLayout | None:
        """The model's tensors (None for an objective that is not a model)."""
        return self._layout

    def _buffers(self, b: Any, what: str) -> np.ndarray:
        size = 0 if self._layout is None else self._layout.buffer_size
        try:
            b = np.asarray(b, dtype=np.float64)
        except (TypeError, ValueError):
            self._fail(f"returned {what} that are not numbers")
        if b.shape != (size,) or not np.all(np.isfinite(b)):
            self._fail(f"returned {what} of shape {b.shape} or with NaN/Inf, expected ({size},) finite")
        return b

    def initial_buffers(self) -> np.ndarray | None:
        """b⁰, the model's buffers as built (None: it carries none)."""
        if self._layout is None or not self._layout.buffers or not callable(getattr(self.inner, "initial_buffers",
                                                                                     None)):
            return None
        return self._buffers(self._call("initial_buffers"), "initial buffers")

    def begin_round(self, key: tuple[int, int, int], buffers: np.ndarray | None) -> None:
        if callable(getattr(self.inner, "begin_round", None)):
            self._call("begin_round", key, buffers)

    def round_buffers(self) -> np.ndarray | None:
        if not callable(getattr(self.inner, "round_buffers", None)):
            return None
        b = self._call("round_buffers")
        return None if b is None else self._buffers(b, "buffers")

    def gram(self) -> np.ndarray | None:
        return self._optional_array("gram", (self.d, self.d))

    def diagonal(self) -> np.ndarray | None:
        return self._optional_array("diagonal", (self.d,))

    def _optional_array(self, name: str, shape: tuple[int, ...]) -> np.ndarray | None:
        if not callable(getattr(self.inner, name, None)):
            return None
        out = self._call(name)
        if out is None:
            return None
        a = np.asarray(out, dtype=np.float64)
        if a.shape != shape or not np.all(np.isfinite(a)):
            self._fail(f"{name}() returned shape {a.shape} or non-finite values, expected {shape}")
        return a
