"""Datasets: LIBSVM/svmlight and .npz files, the shipped default, seeded synthetic problems, and sharding.

A worker reads only its own shard: a file is scanned once for its facts (rows, features, labels, a digest of
its bytes) and once more keeping just the shard's rows, so no process ever holds an N × d dense array of a large
problem. Matrices with more than ``GRAM_MAX_D`` columns are CSR (scipy.sparse); smaller ones are dense (numpy's
dense products are faster there, and the published figures were computed that way). The choice depends on d
alone, so the simulator and every worker hold the same representation and compute the same bits.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import scipy.sparse as sp

from ef21.errors import UserError

from .objectives import GRAM_MAX_D

BUILTIN = {"mushrooms": ("mushrooms.gz", "f39a4eb628dc61a7d43760815b061c9e497aa728ce1ad8bde57a09ef6043b538")}
SPARSE_PREFIX = "synthetic-sparse:"


@dataclass(frozen=True, eq=False)
class Dataset:
    """A design matrix ``A`` (N × d, float64; dense, or CSR when d > GRAM_MAX_D) with targets ``y``."""

    name: str
    A: Any
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
    A: Any
    y: np.ndarray

    @property
    def nbytes(self) -> int:
        """Memory held by the shard's arrays (the CSR parts, or the dense matrix) and its targets."""
        A = self.A
        parts = [A.data, A.indices, A.indptr] if sp.issparse(A) else [A]
        return sum(int(a.nbytes) for a in parts) + int(self.y.nbytes)


@dataclass(frozen=True)
class DataInfo:
    """What every party can know of a dataset without holding its rows: the master's reference, the worker's
    Hello."""

    name: str
    n_rows: int
    d: int
    fingerprint: str
    """A digest of the data as stored (the file's bytes, or the generator's parameters)."""
    classes: tuple[float, ...] = ()
    """The distinct labels (at most 3 kept: more than 2 is an error for classification)."""
    nnz: int = 0
    zero_based: bool = False
    """A LIBSVM file's feature indices start at 0 (else at 1)."""


def fingerprint(A: Any, y: np.ndarray) -> str:
    """A short digest of exact float64 arrays (dense or CSR), e.g. to compare two in-memory datasets."""
    h = hashlib.sha256()
    h.update(np.asarray(A.shape, dtype="<i8").tobytes())
    if sp.issparse(A):
        A = A.tocsr()
        for part, dtype in ((A.indptr, "<i8"), (A.indices, "<i8"), (A.data, "<f8")):
            h.update(np.ascontiguousarray(part, dtype=dtype).tobytes())
    else:
        h.update(np.ascontiguousarray(A, dtype="<f8").tobytes())
    h.update(np.ascontiguousarray(y, dtype="<f8").tobytes())
    return h.hexdigest()[:16]


def map_labels(y: np.ndarray, classes: tuple[float, ...] | None = None) -> np.ndarray:
    """Binary labels to ±1 (min → −1, max → +1) unless they already are ±1; more than two classes is an error.
    ``classes``: the labels of the whole dataset, when ``y`` is only a shard's."""
    found = np.unique(y) if classes is None else np.asarray(sorted(classes), dtype=np.float64)
    if found.shape[0] > 2:
        raise UserError(f"expected binary labels, found {found.shape[0]} classes")
    if np.all(np.isin(found, (-1.0, 1.0))):
        return y.astype(np.float64)
    if found.shape[0] == 1:
        raise UserError(f"all labels are {found[0]!r}: a binary problem needs two classes")
    return np.where(y == found.max(), 1.0, -1.0)


# -- LIBSVM / svmlight -------------------------------------------------------------------------------------------

def _parse_line(raw: str, origin: str, lineno: int) -> tuple[float, np.ndarray, np.ndarray] | None:
    """(label, feature indices as written, values) of one line, or None for a blank/comment line."""
    parts = raw.split("#", 1)[0].split()
    if not parts:
        return None
    try:
        label = float(parts[0])
        feats = [t for t in parts[1:] if not t.startswith("qid:")]
        flat = " ".join(feats).replace(":", " ").split()
        if len(flat) != 2 * len(feats) or any(t.count(":") != 1 for t in feats):
            bad = next(t for t in feats if t.count(":") != 1)
            raise ValueError(f"expected index:value, got {bad!r}")
        pairs = np.array(flat, dtype=np.float64).reshape(-1, 2)
    except (ValueError, StopIteration) as exc:
        raise UserError(f"{origin}: line {lineno} is not svmlight/LIBSVM ({exc})") from None
    idx = pairs[:, 0]
    if idx.size and not np.all(idx == np.floor(idx)):
        raise UserError(f"{origin}: line {lineno} is not svmlight/LIBSVM (non-integer feature index)")
    return label, idx.astype(np.int64), pairs[:, 1].copy()


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a plain or gzipped text file, read as a stream."""
    try:
        with open(path, "rb") as probe:
            gz = probe.read(2) == b"\x1f\x8b"
        opener = gzip.open if gz else open
        with opener(path, "rb") as fh:  # type: ignore[operator]
            for lineno, raw in enumerate(fh, start=1):
                yield lineno, raw.decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile) as exc:
        raise UserError(f"{path}: cannot read ({exc})") from None


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    return h.hexdigest()[:16]


def libsvm_info(path: Path, n_features: int | None = None) -> DataInfo:
    """One pass over a LIBSVM file: its facts."""
    origin = str(path)
    rows = nnz = 0
    lo, hi = None, -1
    classes: set[float] = set()
    for lineno, raw in _lines(path):
        parsed = _parse_line(raw, origin, lineno)
        if parsed is None:
            continue
        label, idx, vals = parsed
        if not (math.isfinite(label) and np.all(np.isfinite(vals))):
            raise UserError(f"{origin}: non-finite values (line {lineno})")
        rows += 1
        nnz += idx.shape[0]
        if len(classes) < 3:
            classes.add(label)
        if idx.size:
            lo = int(idx.min()) if lo is None else min(lo, int(idx.min()))
            hi = max(hi, int(idx.max()))
    if rows == 0:
        raise UserError(f"{origin}: no data rows")
    zero_based, d = _dimension(lo, hi, n_features, origin)
    return DataInfo(path.name, rows, d, _file_digest(path), tuple(sorted(classes)), nnz, zero_based)


def _dimension(lo: int | None, hi: int, n_features: int | None, origin: str) -> tuple[bool, int]:
    """(whether indices are 0-based, d) from the smallest and largest feature index a file holds."""
    if lo is not None and lo < 0:
        raise UserError(f"{origin}: negative feature index")
    zero_based = lo == 0
    d = hi + 1 if zero_based else hi
    if n_features is not None:
        if d > n_features:
            raise UserError(f"{origin}: feature index {d} exceeds --features {n_features}")
        d = n_features
    if d <= 0:
        raise UserError(f"{origin}: no features")
    return zero_based, d


def _index_dtype(d: int) -> type:
    return np.int32 if d < 2**31 else np.int64


def _assemble(rows: list[tuple[np.ndarray, np.ndarray]], d: int) -> Any:
    """Rows (column indices, values) to a CSR matrix, or dense when d is small."""
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([r[0].shape[0] for r in rows], out=indptr[1:])
    cols = np.concatenate([r[0] for r in rows]) if rows else np.zeros(0, dtype=np.int64)
    vals = np.concatenate([r[1] for r in rows]) if rows else np.zeros(0)
    if d <= GRAM_MAX_D:
        A = np.zeros((len(rows), d))
        # Repeated indices in a line: the last one wins, as with a dense assignment.
        A[np.repeat(np.arange(len(rows)), np.diff(indptr)), cols] = vals
        return A
    A = sp.csr_matrix((vals, cols.astype(_index_dtype(d), copy=False), indptr), shape=(len(rows), d))
    A.sum_duplicates()
    return A


def read_libsvm_rows(path: Path, wanted: np.ndarray | None, info: DataInfo) -> tuple[Any, np.ndarray]:
    """The rows at positions ``wanted`` (in that order; None: all) of a LIBSVM file, as (A, raw labels)."""
    origin = str(path)
    where: dict[int, int] | None = None if wanted is None else {int(r): i for i, r in enumerate(wanted)}
    count = info.n_rows if wanted is None else wanted.shape[0]
    rows: list[tuple[np.ndarray, np.ndarray] | None] = [None] * count
    labels = np.zeros(count)
    r = -1
    for lineno, raw in _lines(path):
        if where is not None and len(where) == 0:
            break
        parsed = _parse_line(raw, origin, lineno)
        if parsed is None:
            continue
        r += 1
        slot = r if where is None else where.pop(r, None)
        if slot is None:
            continue
        label, idx, vals = parsed
        if not info.zero_based:
            idx = idx - 1
        labels[slot] = label
        rows[slot] = (idx, vals)
    if any(x is None for x in rows):
        raise UserError(f"{origin}: changed while it was being read")
    return _assemble(rows, info.d), labels  # type: ignore[arg-type]


def parse_libsvm(text: str, origin: str, n_features: int | None = None) -> tuple[Any, np.ndarray]:
    """Parse svmlight text held in memory into (A, y). Indices are 1-based unless a 0 index appears."""
    parsed = [p for p in (_parse_line(raw, origin, i) for i, raw in enumerate(text.splitlines(), start=1)) if p]
    if not parsed:
        raise UserError(f"{origin}: no data rows")
    mins = [int(p[1].min()) for p in parsed if p[1].size]
    hi = max((int(p[1].max()) for p in parsed if p[1].size), default=-1)
    zero_based, d = _dimension(min(mins) if mins else None, hi, n_features, origin)
    y = np.array([p[0] for p in parsed])
    A = _assemble([(p[1] if zero_based else p[1] - 1, p[2]) for p in parsed], d)
    values = A.data if sp.issparse(A) else A
    if not (np.all(np.isfinite(values)) and np.all(np.isfinite(y))):
        raise UserError(f"{origin}: non-finite values")
    return A, y


def load_builtin(name: str) -> Dataset:
    fname, digest = BUILTIN[name]
    raw = gzip.decompress(resources.files("ef21.problems.datasets").joinpath(fname).read_bytes())
    if hashlib.sha256(raw).hexdigest() != digest:
        raise UserError(f"shipped dataset {name!r} is corrupt (sha256 mismatch); reinstall ef21")
    A, y = parse_libsvm(raw.decode("ascii"), name)
    return Dataset(name, A, map_labels(y))


# -- .npz ----------------------------------------------------------------------------------------------------------

CSR_KEYS = ("data", "indices", "indptr", "shape")


def load_npz(path: Path) -> Dataset:
    """``A`` (dense N × d) and ``y``; or a CSR matrix as ``data``, ``indices``, ``indptr``, ``shape`` (the layout
    of scipy.sparse.save_npz) with ``y``."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if "y" in z and all(k in z for k in CSR_KEYS):
                shape = tuple(int(v) for v in z["shape"])
                A: Any = sp.csr_matrix((np.asarray(z["data"], dtype=np.float64), z["indices"], z["indptr"]),
                                       shape=shape)
                A.check_format(full_check=True)
            elif "A" in z and "y" in z:
                A = np.asarray(z["A"], dtype=np.float64)
            else:
                raise UserError(f"{path}: an .npz dataset needs arrays 'A' and 'y' (or a CSR matrix as 'data', "
                                f"'indices', 'indptr', 'shape' with 'y'), found {sorted(z.files)}")
            y = np.asarray(z["y"], dtype=np.float64).reshape(-1)
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except Exception as exc:  # numpy and scipy raise several types for a damaged archive
        raise UserError(f"{path}: cannot read .npz ({exc})") from None
    if A.ndim != 2 or A.shape[0] != y.shape[0] or A.shape[0] == 0 or A.shape[1] == 0:
        raise UserError(f"{path}: expected A of shape (N, d) and y of shape (N,), got {A.shape} and {y.shape}")
    values = A.data if sp.issparse(A) else A
    if not (np.all(np.isfinite(values)) and np.all(np.isfinite(y))):
        raise UserError(f"{path}: non-finite values")
    # The representation follows d alone (see the module docstring).
    if sp.issparse(A) and A.shape[1] <= GRAM_MAX_D:
        A = A.toarray()
    elif not sp.issparse(A) and A.shape[1] > GRAM_MAX_D:
        A = sp.csr_matrix(A)
    return Dataset(path.name, A, y)


# -- synthetic -----------------------------------------------------------------------------------------------------

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
        raise UserError(f"synthetic:{n_rows}:{d} is too large for a dense design; use synthetic-sparse:N:D:DENSITY "
                        f"or --problem quadratic")
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
    return Dataset(f"synthetic:{n_rows}:{d}:{seed}", A if d <= GRAM_MAX_D else sp.csr_matrix(A), y)


@dataclass(frozen=True)
class SparseSpec:
    """``synthetic-sparse:N:D:DENSITY[:SEED]``: N rows, D features, about DENSITY·D non-zeros a row.

    Shaped like news20 (20,000 × 1.35M at density 3e-4): feature popularity follows a power law (a few features in
    most documents, most in very few), values are positive and each row has unit ℓ2 norm (tf-idf-like), and the
    labels come from a planted linear model with label noise. Rows are generated in blocks of ``BLOCK`` from
    (seed, block), so a worker generates only the blocks its shard touches.
    """

    n_rows: int
    d: int
    density: float
    seed: int = 0
    BLOCK: int = field(default=256, repr=False)

    @staticmethod
    def parse(spec: str) -> SparseSpec:
        parts = spec.split(":")
        try:
            n_rows, d, density = int(parts[1]), int(parts[2]), float(parts[3])
            seed = int(parts[4]) if len(parts) > 4 else 0
            if len(parts) > 5:
                raise ValueError
        except (IndexError, ValueError):
            raise UserError(f"bad spec {spec!r}; use synthetic-sparse:N:D:DENSITY[:SEED]") from None
        if n_rows <= 0 or d <= 1 or not 0.0 < density <= 1.0:
            raise UserError(f"bad spec {spec!r}: N > 0, D > 1 and DENSITY in (0, 1] required")
        return SparseSpec(n_rows, d, density, seed)

    @property
    def name(self) -> str:
        return f"{SPARSE_PREFIX}{self.n_rows}:{self.d}:{self.density:g}:{self.seed}"

    def _cdf(self) -> np.ndarray:
        # Popularity ∝ (rank + 10)^−1.1 over a seeded permutation of the columns.
        weights = (np.arange(self.d, dtype=np.float64) + 10.0) ** -1.1
        cdf = np.cumsum(weights)
        cdf /= cdf[-1]
        return cdf

    def _columns(self) -> np.ndarray:
        return np.random.default_rng([self.seed, 1]).permutation(self.d)

    def _planted(self) -> np.ndarray:
        return np.random.default_rng([self.seed, 2]).standard_normal(self.d)

    def rows(self, positions: np.ndarray) -> tuple[Any, np.ndarray]:
        """(A, y) of the rows at ``positions`` (in that order)."""
        cdf, perm, w = self._cdf(), self._columns(), self._planted()
        per_row = max(1, round(self.density * self.d))
        out: list[tuple[np.ndarray, np.ndarray]] = [None] * positions.shape[0]  # type: ignore[list-item]
        labels = np.zeros(positions.shape[0])
        slots: dict[int, list[tuple[int, int]]] = {}
        for i, r in enumerate(positions):
            b, j = divmod(int(r), self.BLOCK)
            slots.setdefault(b, []).append((i, j))
        for b in sorted(slots):  # each block generated once, whatever the order of the positions
            block = self._block(b, cdf, perm, w, per_row)
            for i, j in slots[b]:
                cols, vals, labels[i] = block[j]
                out[i] = (cols, vals)
        del cdf, perm, w  # three vectors of d: gone before the rows are joined (a worker's peak memory)
        return _assemble(out, self.d), labels

    def _block(self, b: int, cdf: np.ndarray, perm: np.ndarray, w: np.ndarray, per_row: int
               ) -> list[tuple[np.ndarray, np.ndarray, float]]:
        rng = np.random.default_rng([self.seed, 3, b])
        count = min(self.BLOCK, self.n_rows - b * self.BLOCK)
        rows = []
        for _ in range(count):
            cols = np.unique(perm[np.minimum(np.searchsorted(cdf, rng.random(per_row)), self.d - 1)])
            vals = rng.exponential(1.0, cols.shape[0]) + 0.1
            vals /= np.sqrt(vals @ vals)
            margin = float(vals @ w[cols]) * 4.0
            label = 1.0 if margin + 0.3 * rng.standard_normal() >= 0.0 else -1.0
            rows.append((cols.astype(_index_dtype(self.d)), vals, label))
        return rows

    def info(self) -> DataInfo:
        return DataInfo(self.name, self.n_rows, self.d, hashlib.sha256(self.name.encode()).hexdigest()[:16],
                        (-1.0, 1.0), self.n_rows * max(1, round(self.density * self.d)))


# -- by name or path ---------------------------------------------------------------------------------------------

def data_info(spec: str, *, problem: str = "logreg", loaded: Dataset | None = None) -> DataInfo:
    """The facts of a dataset by name or path, without holding its rows in memory (files are scanned once).
    ``loaded``: the dataset already in memory (a shipped or synthetic one), to take its facts from."""
    if spec in BUILTIN:
        ds = loaded or load_builtin(spec)
        return DataInfo(spec, ds.n_rows, ds.d, BUILTIN[spec][1][:16], tuple(np.unique(ds.y)), _nnz(ds.A))
    if spec.startswith(SPARSE_PREFIX):
        return SparseSpec.parse(spec).info()
    if spec.startswith("synthetic:"):
        ds = loaded or synthetic_from_spec(spec, problem)
        return DataInfo(ds.name, ds.n_rows, ds.d, hashlib.sha256(f"{ds.name}:{problem}".encode()).hexdigest()[:16])
    path = Path(spec)
    if path.suffix == ".npz":
        ds = load_npz(path)
        return DataInfo(path.name, ds.n_rows, ds.d, _file_digest(path), tuple(np.unique(ds.y)[:3]), _nnz(ds.A))
    return libsvm_info(path)


def _nnz(A: Any) -> int:
    return int(A.nnz) if sp.issparse(A) else int(np.count_nonzero(A))


def load_dataset(spec: str, *, problem: str = "logreg") -> Dataset:
    """Load by name or path: a shipped name (``mushrooms``), ``synthetic:N:D[:SEED]``,
    ``synthetic-sparse:N:D:DENSITY[:SEED]``, an .npz or LIBSVM file — all rows.

    Labels of classification data are mapped to ±1 for logistic regression; least squares keeps them as targets
    after the same mapping (the official least-squares experiments fit the ±1 labels), except .npz targets.
    """
    if spec in BUILTIN:
        return load_builtin(spec)
    if spec.startswith(SPARSE_PREFIX):
        s = SparseSpec.parse(spec)
        A, y = s.rows(np.arange(s.n_rows))
        return Dataset(s.name, A, y)
    if spec.startswith("synthetic:"):
        return synthetic_from_spec(spec, problem)
    path = Path(spec)
    if path.suffix == ".npz":
        ds = load_npz(path)
        return Dataset(ds.name, ds.A, map_labels(ds.y) if problem == "logreg" else ds.y)
    info = libsvm_info(path)
    A, y = read_libsvm_rows(path, None, info)
    return Dataset(path.name, A, map_labels(y, info.classes))


def load_shard(spec: str, rank: int, n_workers: int, shuffle: int | None = None, *, problem: str = "logreg",
               info: DataInfo | None = None) -> Shard:
    """Worker ``rank``'s rows only (the same rows, in the same order, as ``make_shard`` of the whole dataset)."""
    if spec.startswith(SPARSE_PREFIX) or (not spec.startswith("synthetic:") and spec not in BUILTIN
                                          and Path(spec).suffix != ".npz"):
        if info is None:
            info = data_info(spec, problem=problem)
        start, stop = shard_bounds(info.n_rows, n_workers)[rank]
        order = row_order(info.n_rows, shuffle)
        wanted = np.arange(start, stop) if order is None else order[start:stop]
        if spec.startswith(SPARSE_PREFIX):
            A, y = SparseSpec.parse(spec).rows(wanted)
            return Shard(rank, (start, stop), A, y)
        A, raw = read_libsvm_rows(Path(spec), wanted, info)
        return Shard(rank, (start, stop), A, map_labels(raw, info.classes))
    return make_shard(load_dataset(spec, problem=problem), rank, n_workers, shuffle)


# -- sharding ------------------------------------------------------------------------------------------------------

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
    if sp.issparse(ds.A):
        A = ds.A.tocsr()
        np.savez(buf, data=A.data, indices=A.indices, indptr=A.indptr, shape=np.asarray(A.shape), y=ds.y)
    else:
        np.savez(buf, A=ds.A, y=ds.y)
    path.write_bytes(buf.getvalue())
