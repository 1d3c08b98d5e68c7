from __future__ import annotations

import gzip

import numpy as np
import pytest

from ef21.errors import UserError
from ef21.problems.data import (
    load_dataset,
    make_shard,
    map_labels,
    save_npz,
    shard_bounds,
    split,
    synthetic_dataset,
)

SAMPLE = """\
2 1:0.5 3:1
1 2:-1.5
# a comment line
2 1:1 2:2 3:3 # trailing comment
"""


def test_libsvm_parse_and_label_mapping(tmp_path):
    p = tmp_path / "tiny.svm"
    p.write_text(SAMPLE)
    ds = load_dataset(str(p))
    np.testing.assert_array_equal(ds.A, [[0.5, 0, 1], [0, -1.5, 0], [1, 2, 3]])
    np.testing.assert_array_equal(ds.y, [1, -1, 1])


def test_gzip_libsvm(tmp_path):
    p = tmp_path / "tiny.svm.gz"
    p.write_bytes(gzip.compress(SAMPLE.encode()))
    assert load_dataset(str(p)).A.shape == (3, 3)


def test_label_mapping_rules():
    np.testing.assert_array_equal(map_labels(np.array([0.0, 1.0, 0.0])), [-1, 1, -1])
    np.testing.assert_array_equal(map_labels(np.array([-1.0, 1.0])), [-1, 1])
    with pytest.raises(UserError, match="binary"):
        map_labels(np.array([0.0, 1.0, 2.0]))


def test_shipped_mushrooms():
    ds = load_dataset("mushrooms")
    assert ds.A.shape == (8124, 112)  # method doc §5 (and LIBSVM's page for mushrooms)
    assert int((ds.y == 1).sum()) == 4208 and int((ds.y == -1).sum()) == 3916  # the UCI data set's two classes


def test_official_split():
    assert shard_bounds(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert shard_bounds(8124, 20)[-1] == (19 * 406, 8124)  # method doc §5: N_i = 406, the last worker 410
    ds = synthetic_dataset(10, 2, seed=0)
    shards = split(ds, 3)
    np.testing.assert_array_equal(np.concatenate([s.A for s in shards]), ds.A)


def test_shuffle_is_seeded():
    ds = synthetic_dataset(50, 3, seed=0)
    a, b = make_shard(ds, 1, 5, shuffle=7), make_shard(ds, 1, 5, shuffle=7)
    c = make_shard(ds, 1, 5)
    np.testing.assert_array_equal(a.A, b.A)
    assert not np.array_equal(a.A, c.A)


def test_npz_roundtrip(tmp_path):
    ds = synthetic_dataset(20, 4, seed=2, problem="logreg")
    p = tmp_path / "d.npz"
    save_npz(p, ds)
    back = load_dataset(str(p))
    np.testing.assert_array_equal(back.A, ds.A)
    np.testing.assert_array_equal(back.y, ds.y)


def test_synthetic_is_deterministic():
    a = load_dataset("synthetic:30:5:9", problem="lsq")
    b = load_dataset("synthetic:30:5:9", problem="lsq")
    np.testing.assert_array_equal(a.A, b.A)


@pytest.mark.parametrize(
    "content,match",
    [("", "no data rows"), ("1 x:1\n", "line 1"), ("1 1:abc\n", "line 1"), ("\x00\xff\xfe", "cannot read")],
)
def test_bad_files_name_the_file(tmp_path, content, match):
    p = tmp_path / "bad.txt"
    p.write_bytes(content.encode("latin-1"))
    with pytest.raises(UserError, match=match) as err:
        load_dataset(str(p))
    assert "bad.txt" in str(err.value)


def test_missing_file_and_bad_npz(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_dataset(str(tmp_path / "nope"))
    p = tmp_path / "x.npz"
    np.savez(p, B=np.zeros(3))
    with pytest.raises(UserError, match="needs arrays 'A' and 'y'"):
        load_dataset(str(p))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="junk.npz"):
        load_dataset(str(tmp_path / "junk.npz"))


def test_fewer_rows_than_workers():
    with pytest.raises(UserError, match="cannot be split over 4 workers"):
        shard_bounds(3, 4)
