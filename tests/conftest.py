from __future__ import annotations

import os

# The ef21 processes the tests start run one BLAS thread each (ef21/__main__.py); the simulations run in this process
# must add in the same order, so they get the same setting, before numpy loads its BLAS.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)
