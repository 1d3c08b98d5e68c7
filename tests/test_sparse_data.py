"""Large sparse data: LIBSVM files and the sparse generator read shard by shard into CSR, L by a power
iteration spread over the workers, and the service equal to the simulator on such a problem."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.sparse.linalg import svds

from ef21.engine.config import RunConfig
from ef21.engine.simulate import simulate
from ef21.problems.data import SparseSpec, data_info, load_dataset, load_shard, make_shard
from ef21.problems.objectives import GRAM_MAX_D
from ef21.problems.problem import build_problem

PY = sys.executable


def write_libsvm(path, n_rows: int, d: int, density: float, seed: int, *, zero_based: bool = False,
                 gz: bool = False) -> sp.csr_matrix:
    """A random LIBSVM file, and the matrix it holds (as written: the file is the independent reference)."""
    rng = np.random.default_rng(seed)
    A = sp.random(n_rows, d, density=density, format="lil", random_state=seed, dtype=np.float64)
    A[0, d - 1] = 1.5  # the first and last columns appear, so the file's d and index base are unambiguous
    A[1, 0] = 2.5
    A = A.tocsr()
    A.data = np.round(A.data * 10, 3)  # values that print and parse exactly
    lines = []
    for i in range(n_rows):
        row = A.getrow(i)
        label = rng.choice([0, 1]) if i else 0  # 0/1 labels: mapped to ±1
        idx = row.indices + (0 if zero_based else 1)
        lines.append(f"{label} " + " ".join(f"{j}:{v:g}" for j, v in zip(idx, row.data)))
    text = "\n".join(lines) + "\n"
    path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    return A


@pytest.mark.parametrize("d", [300, GRAM_MAX_D + 500])
@pytest.mark.parametrize("shuffle", [None, 7])
@pytest.mark.parametrize("zero_based,gz", [(False, False), (True, True)])
def test_a_shard_read_alone_is_the_shard_of_the_whole_file(tmp_path, d, shuffle, zero_based, gz):
    path = tmp_path / ("data.svm.gz" if gz else "data.svm")
    A = write_libsvm(path, 103, d, 0.02, seed=d, zero_based=zero_based)
    if gz:
        write_libsvm(path, 103, d, 0.02, seed=d, zero_based=zero_based, gz=True)
    whole = load_dataset(str(path))
    assert whole.A.shape == (103, d) and sp.issparse(whole.A) == (d > GRAM_MAX_D)
    dense = whole.A.toarray() if sp.issparse(whole.A) else whole.A
    np.testing.assert_array_equal(dense[:, :A.shape[1]], A.toarray())
    info = data_info(str(path))
    assert (info.n_rows, info.d, info.zero_based) == (103, d, zero_based)
    for rank in range(4):
        alone = load_shard(str(path), rank, 4, shuffle)
        ref = make_shard(whole, rank, 4, shuffle)
        assert alone.rows == ref.rows and type(alone.A) is type(ref.A)
        a = alone.A.toarray() if sp.issparse(alone.A) else alone.A
        b = ref.A.toarray() if sp.issparse(ref.A) else ref.A
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(alone.y, ref.y)


def test_the_fingerprint_is_the_files_content(tmp_path):
    write_libsvm(tmp_path / "a.svm", 20, 10, 0.3, seed=1)
    (tmp_path / "b.svm").write_bytes((tmp_path / "a.svm").read_bytes())
    write_libsvm(tmp_path / "c.svm", 20, 10, 0.3, seed=2)
    fa, fb, fc = (data_info(str(tmp_path / n)).fingerprint for n in ("a.svm", "b.svm", "c.svm"))
    assert fa == fb != fc


def test_sparse_generator_is_shaped_like_news20_and_generates_shards_alone():
    spec = "synthetic-sparse:600:50000:0.002:5"
    s = SparseSpec.parse(spec)
    whole = load_dataset(spec)
    A = whole.A
    assert sp.isspmatrix_csr(A) and A.shape == (600, 50000)
    assert 0.8 * 100 <= A.nnz / 600 <= 100  # ≈ density·d non-zeros a row (duplicates merged)
    np.testing.assert_allclose(np.sqrt(A.multiply(A).sum(axis=1)).A1, 1.0)  # unit rows, tf-idf-like
    col_counts = np.bincount(A.indices, minlength=50000)
    assert col_counts.max() > 50 * max(1.0, np.median(col_counts))  # a few popular features, a long tail
    assert set(np.unique(whole.y)) == {-1.0, 1.0}
    for rank, shuffle in ((0, None), (2, None), (1, 3)):
        alone = load_shard(spec, rank, 3, shuffle)
        ref = make_shard(whole, rank, 3, shuffle)
        assert (alone.A != ref.A).nnz == 0 and np.array_equal(alone.y, ref.y)
    assert s.name == "synthetic-sparse:600:50000:0.002:5"


def test_power_iteration_L_matches_an_independent_svd():
    cfg = RunConfig(data="synthetic-sparse:900:6000:0.004:2", workers=3, problem="logreg", rounds=0)
    p = build_problem(cfg)
    A = load_dataset(cfg.data).A
    sigma = svds(A, k=1, return_singular_vectors=False, tol=1e-12)[0]
    assert p.L == pytest.approx(sigma**2 / (4 * 900) + 2 * cfg.lam, rel=1e-9)
    for obj, (lo, hi) in zip(p.objectives, [(0, 300), (300, 600), (600, 900)]):
        s_i = svds(A[lo:hi], k=1, return_singular_vectors=False, tol=1e-12)[0]
        assert obj.smoothness() == pytest.approx(s_i**2 / (4 * 300) + 2 * cfg.lam, rel=1e-9)


def test_sparse_problem_through_the_service_equals_the_simulator(tmp_path):
    """d > 2048: workers hold CSR shards and the master computes L by a power iteration over them (PowerStep);
    same L, same iterates, bit for bit."""
    args = ["--data", "synthetic-sparse:900:6000:0.004:2", "--workers", "3", "--k", "30", "--stepsize-mult", "32",
            "--rounds", "60", "--x0", "zeros"]
    its, log = tmp_path / "xs.npy", tmp_path / "l.jsonl"
    r = subprocess.run([PY, "-m", "ef21", "run", *args, "--save-iterates", str(its), "--log", str(log), "-q",
                        "--status-port", "-1", "--eval-every", "10"], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    cfg = RunConfig(data="synthetic-sparse:900:6000:0.004:2", workers=3, k=30, stepsize_mult=32, rounds=60,
                    x0="zeros")
    sim = simulate(cfg, keep_iterates=True, eval_every=10)
    assert f"L={sim.constants.L:.6g}" in r.stdout
    np.testing.assert_array_equal(np.load(its), np.array(sim.xs))
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [row["grad_norm_sq"] for row in rows] == [rec.grad_norm_sq for rec in sim.records]
    assert rows[-1]["grad_norm_sq"] < 0.5 * rows[0]["grad_norm_sq"]


def test_a_libsvm_file_through_the_service(tmp_path):
    path = tmp_path / "big.svm"
    write_libsvm(path, 240, GRAM_MAX_D + 100, 0.01, seed=4)
    args = ["--data", str(path), "--workers", "2", "--k", "20", "--stepsize-mult", "16", "--rounds", "30"]
    its = tmp_path / "xs.npy"
    r = subprocess.run([PY, "-m", "ef21", "run", *args, "--save-iterates", str(its), "-q", "--status-port", "-1"],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    sim = simulate(RunConfig(data=str(path), workers=2, k=20, stepsize_mult=16, rounds=30), keep_iterates=True)
    np.testing.assert_array_equal(np.load(its), np.array(sim.xs))


@pytest.mark.parametrize("spec,match", [
    ("synthetic-sparse:10:100", "use synthetic-sparse:N:D:DENSITY"),
    ("synthetic-sparse:10:100:2", "DENSITY in (0, 1]"),
    ("synthetic-sparse:0:100:0.1", "N > 0"),
])
def test_bad_sparse_specs(spec, match):
    r = subprocess.run([PY, "-m", "ef21", "simulate", "--data", spec, "--rounds", "1", "--workers", "1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and match in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_bad_csr_npz_is_refused(tmp_path):
    np.savez(tmp_path / "bad.npz", data=np.ones(3), indices=np.array([0, 5, 1]), indptr=np.array([0, 2, 3]),
             shape=np.array([2, 4]), y=np.ones(2))
    r = subprocess.run([PY, "-m", "ef21", "simulate", "--data", str(tmp_path / "bad.npz"), "--rounds", "1",
                        "--workers", "1"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "bad.npz: cannot read .npz" in r.stderr
