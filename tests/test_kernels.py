"""The compiled loops (numba, ``ef21[fast]``) where numba can keep no on-disk cache: an installed package in a container
whose user has no writable home. numba then refuses ``cache=True`` at decoration ("no locator available"), which
once turned the master's first large message in `docker compose up` into an internal error; the loops must compile
in memory instead and give the same answers."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from ef21.compression import kernels

ROOT = Path(__file__).resolve().parents[1]


def test_a_loop_numba_cannot_cache_compiles_in_memory():
    numba = kernels.numba_or_none()
    if numba is None:
        pytest.skip("numba is not installed (ef21[fast]): nothing is compiled")
    ns: dict = {}
    exec("def total(a):\n    s = 0.0\n    for v in a:\n        s += v\n    return s\n", ns)  # no source file
    with pytest.raises(RuntimeError, match="no locator available"):  # what numba does with cache=True
        numba.njit(cache=True)(ns["total"])
    assert kernels.njit(numba)(ns["total"])(np.arange(4.0)) == 6.0


def test_the_masters_compiled_paths_work_without_a_cache_locator(tmp_path):
    """A fresh process in which numba finds no place for any cache (its locator list emptied, as in the container):
    the Update reader, the decoder's checks and the fold still run compiled and agree with the Python paths."""
    if kernels.numba_or_none() is None:
        pytest.skip("numba is not installed (ef21[fast]): nothing is compiled")
    script = textwrap.dedent("""
        import numpy as np
        from numba.core import caching
        caching.CacheImpl._locator_classes = []  # no locator: numba raises at cache=True
        from ef21.compression import kernels
        from ef21.compression.codec import decode
        from ef21.compression.compressors import TopK
        from ef21.compression.sparse import SparseVector
        from ef21_wire import compiled
        from ef21_wire.fastwire import read_update
        from ef21_worker.client import update_message
        from ef21.engine.nodes import WorkerReport
        from ef21.methods import Message

        d, k = 10**6, 10**4
        vec = TopK(k)(np.random.default_rng(0).standard_normal(d))
        raw = update_message(WorkerReport(7, Message(vec), 0.5, np.zeros(0), 1e-3))
        fast, slow = compiled.read_update(raw), read_update(raw)
        assert fast is not None and bytes(fast.vector.values) == bytes(slow.vector.values)
        got = decode(fast.vector, expected_dim=d)
        assert kernels.vector_checks(got.indices, got.values, d) == kernels.CHECK_OK
        assert got.values.tobytes() == vec.values.tobytes()
        pair = kernels.radix_fold(np.concatenate([vec.indices, vec.indices]), np.concatenate([vec.values] * 2), d)
        assert pair is not None and pair[1].tobytes() == (vec.values + vec.values).tobytes()
        print("compiled without a cache")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "compiled without a cache" in r.stdout


def test_a_large_message_that_is_not_an_update_never_imports_numba():
    """A d×d Gram reply at set-up (100 kB at mushrooms' d = 112) is past the compiled reader's size but is no Update:
    the reader leaves it to Python without importing numba, whose import and first compile would hold the master's
    event loop for seconds in the middle of the set-up. An Update of the same size does import it."""
    if kernels.numba_or_none() is None:
        pytest.skip("numba is not installed (ef21[fast]): nothing is compiled")
    script = textwrap.dedent("""
        import sys
        import numpy as np
        from ef21_wire.serde import read_update_fast
        from ef21_wire.v1 import ef21_pb2 as pb
        from ef21.compression.compressors import TopK
        from ef21.engine.nodes import WorkerReport
        from ef21.methods import Message
        from ef21_worker.client import update_message

        gram = pb.WorkerMessage(gram_reply=pb.GramReply(gram=np.eye(112).tobytes(), attempt=1)).SerializeToString()
        assert len(gram) > 1 << 16 and read_update_fast(gram) is None
        assert "numba" not in sys.modules, "a Gram reply imported numba"
        vec = TopK(10**4)(np.random.default_rng(0).standard_normal(10**6))
        raw = update_message(WorkerReport(7, Message(vec), 0.5, np.zeros(0), 1e-3))
        assert read_update_fast(raw) is not None and "numba" in sys.modules
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]
