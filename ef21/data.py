"""Datasets: LIBSVM/svmlight and .npz files, the shipped default, seeded synthetic problems, and sharding."""

from __future__ import annotations

import gzip
import hashlib
import io
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from .errors import UserError

BUILTIN = {"mushrooms": ("mushrooms.gz", "f39a4eb628dc61a7d43760815b061c9e497aa728ce1ad8bde57a09ef6043b538")}


@dataclass(frozen=True, eq=False)
class Dataset:
    """A dense design matrix ``A`` (N × d, float64) with targets ``y`` (±1 labels, or real values)."""

    name: str
    A: np.ndarray
    y: np.ndarray

    @property
    def n_rows(self) -> int:
        return self.A.shape[0]

    @property
    def d(self) -> int:
        return self.A.shape[1]


@dataclass(frozen=True, eq=False)
class Shard:
    rank: int
    rows: tuple[int, int] | None  # [start, stop) in the (possibly shuffled) row order
    A: np.ndarray
    y: np.ndarray


def fingerprint(A: np.ndarray, y: np.ndarray) -> str:
    """A short digest of the exact float64 bytes, to check that two machines hold the same data."""
    h = hashlib.sha256()
    h.update(np.asarray(A.shape, dtype="<i8").tobytes())
    h.update(np.ascontiguousarray(A, dtype="<f8").tobytes())
    h.update(np.ascontiguousarray(y, dtype="<f8").tobytes())
    return h.hexdigest()[:16]


def map_labels(y: np.ndarray) -> np.ndarray:
    """Binary labels to ±1 (min → −1, max → +1) unless they already are ±1; more than two classes is an error."""
    classes = np.unique(y)
    if classes.shape[0] > 2:
        raise UserError(f"expected binary labels, found {classes.shape[0]} classes")
    if np.all(np.isin(classes, (-1.0, 1.0))):
        return y.astype(np.float64)
    if classes.shape[0] == 1:
        raise UserError(f"all labels are {classes[0]!r}: a binary problem needs two classes")
    return np.where(y == classes.max(), 1.0, -1.0)


def parse_libsvm(text: str, origin: str, n_features: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Parse svmlight text into a dense (A, y). Indices are 1-based unless a 0 index appears (then 0-based)."""
    labels: list[float] = []
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        try:
            labels.append(float(parts[0]))
            r = len(labels) - 1
            for tok in parts[1:]:
                key, _, val = tok.partition(":")
                if key == "qid":
                    continue
                if not _:
                    raise ValueError(f"expected index:value, got {tok!r}")
                cols.append(int(key))
                vals.append(float(val))
                rows.append(r)
        except ValueError as exc:
            raise UserError(f"{origin}: line {lineno} is not svmlight/LIBSVM ({exc})") from None
    if not labels:
        raise UserError(f"{origin}: no data rows")
    col = np.asarray(cols, dtype=np.int64)
    if col.size and col.min() < 0:
        raise UserError(f"{origin}: negative feature index")
    zero_based = bool(col.size and col.min() == 0)
    if not zero_based:
        col -= 1
    d = int(col.max()) + 1 if col.size else 0
    if n_features is not None:
        if d > n_features:
            raise UserError(f"{origin}: feature index {d} exceeds --features {n_features}")
        d = n_features
    if d == 0:
        raise UserError(f"{origin}: no features")
    A = np.zeros((len(labels), d), dtype=np.float64)
    A[np.asarray(rows, dtype=np.int64), col] = np.asarray(vals, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if not (np.all(np.isfinite(A)) and np.all(np.isfinite(y))):
        raise UserError(f"{origin}: non-finite values")
    return A, y


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        return raw.decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile) as exc:
        raise UserError(f"{path}: cannot read ({exc})") from None


def load_builtin(name: str) -> Dataset:
    fname, digest = BUILTIN[name]
    raw = gzip.decompress(resources.files("ef21.datasets").joinpath(fname).read_bytes())
    if hashlib.sha256(raw).hexdigest() != digest:
        raise UserError(f"shipped dataset {name!r} is corrupt (sha256 mismatch); reinstall ef21")
    A, y = parse_libsvm(raw.decode("ascii"), name)
    return Dataset(name, A, map_labels(y))


def load_npz(path: Path) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as z:
            if "A" not in z or "y" not in z:
                raise UserError(f"{path}: an .npz dataset needs arrays 'A' and 'y', found {sorted(z.files)}")
            A = np.asarray(z["A"], dtype=np.float64)
            y = np.asarray(z["y"], dtype=np.float64).reshape(-1)
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except Exception as exc:  # numpy raises several types for a damaged archive
        raise UserError(f"{path}: cannot read .npz ({exc})") from None
    if A.ndim != 2 or A.shape[0] != y.shape[0] or A.shape[0] == 0 or A.shape[1] == 0:
        raise UserError(f"{path}: expected A of shape (N, d) and y of shape (N,), got {A.shape} and {y.shape}")
    if not (np.all(np.isfinite(A)) and np.all(np.isfinite(y))):
        raise UserError(f"{path}: non-finite values")
    return Dataset(path.name, A, y)


def load_dataset(spec: str, *, problem: str = "logreg") -> Dataset:
    """Load by name or path: a shipped name (``mushrooms``), ``synthetic:N:D[:SEED]``, an .npz or LIBSVM file.

    Labels of classification data are mapped to ±1 for logistic regression; least squares keeps them as targets
    after the same mapping (the official least-squares experiments fit the ±1 labels).
    """
    if spec in BUILTIN:
        return load_builtin(spec)
    if spec.startswith("synthetic:"):
        return synthetic_from_spec(spec, problem)
    path = Path(spec)
    if path.suffix == ".npz":
        ds = load_npz(path)
        return Dataset(ds.name, ds.A, map_labels(ds.y) if problem == "logreg" else ds.y)
    A, y = parse_libsvm(_read_text(path), str(path))
    return Dataset(path.name, A, map_labels(y))


def synthetic_from_spec(spec: str, problem: str) -> Dataset:
    parts = spec.split(":")
    try:
        n_rows, d = int(parts[1]), int(parts[2])
        seed = int(parts[3]) if len(parts) > 3 else 0
    except (IndexError, ValueError):
        raise UserError(f"bad synthetic spec {spec!r}; use synthetic:N:D[:SEED]") from None
    if n_rows <= 0 or d <= 0:
        raise UserError(f"bad synthetic spec {spec!r}: N and D must be positive")
    if n_rows * d > 200_000_000:
        raise UserError(f"synthetic:{n_rows}:{d} is too large for a dense design; use --problem quadratic")
    return synthetic_dataset(n_rows, d, seed, problem)


def synthetic_dataset(n_rows: int, d: int, seed: int, problem: str = "lsq") -> Dataset:
    """A seeded dense problem: Gaussian design; ±1 labels from a planted model (logreg) or noisy targets (lsq)."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n_rows, d))
    w = rng.standard_normal(d)
    z = A @ w
    if problem == "logreg":
        y = np.where(z + 0.5 * rng.standard_normal(n_rows) >= 0, 1.0, -1.0)
    else:
        y = z + 0.1 * rng.standard_normal(n_rows)
    return Dataset(f"synthetic:{n_rows}:{d}:{seed}", A, y)


def shard_bounds(n_rows: int, n_workers: int) -> list[tuple[int, int]]:
    """Rows [i·⌊N/n⌋, (i+1)·⌊N/n⌋) for worker i; the last worker also takes the remainder (the official split)."""
    if n_workers <= 0:
        raise UserError(f"--workers must be positive, got {n_workers}")
    if n_rows < n_workers:
        raise UserError(f"{n_rows} rows cannot be split over {n_workers} workers")
    size = n_rows // n_workers
    bounds = [(i * size, (i + 1) * size) for i in range(n_workers)]
    bounds[-1] = (bounds[-1][0], n_rows)
    return bounds


def row_order(n_rows: int, shuffle: int | None) -> np.ndarray | None:
    return None if shuffle is None else np.random.default_rng(shuffle).permutation(n_rows)


def make_shard(ds: Dataset, rank: int, n_workers: int, shuffle: int | None = None) -> Shard:
    start, stop = shard_bounds(ds.n_rows, n_workers)[rank]
    order = row_order(ds.n_rows, shuffle)
    if order is None:
        return Shard(rank, (start, stop), ds.A[start:stop], ds.y[start:stop])
    sel = order[start:stop]
    return Shard(rank, (start, stop), ds.A[sel], ds.y[sel])


def split(ds: Dataset, n_workers: int, shuffle: int | None = None) -> list[Shard]:
    return [make_shard(ds, i, n_workers, shuffle) for i in range(n_workers)]


def save_npz(path: Path, ds: Dataset) -> None:
    buf = io.BytesIO()
    np.savez(buf, A=ds.A, y=ds.y)
    path.write_bytes(buf.getvalue())
