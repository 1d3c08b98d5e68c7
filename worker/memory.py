"""Keep a worker's resident memory close to what it holds.

A worker at d = 10⁶ allocates and frees several vectors of d every round (the gradient, the residual, Top-k's
magnitudes, the messages' buffers). glibc serves the first such block with its own mapping, but on freeing it
raises its mmap threshold to that size (adaptively, up to 32 MiB), and from then on the vectors come from the
heap, whose freed space stays resident and fragments between the event loop's small objects and gRPC's buffers:
measured, a worker's peak RSS grew to 2–3× what it held at any moment (``benchmarks/sparse_scale.py``). Fixing
the threshold gives every large block its own mapping, returned to the system when it is freed. The cost is a fresh
mapping per large temporary; numpy asks for huge pages for those, so it is a few faults each, and allocating and
filling a vector of 1.35M measured the same both ways here (3.6–4.3 ms against 4.2–4.9 ms best-of, a loaded
2-core machine). Other C libraries have no ``mallopt``: nothing to do there.
"""

from __future__ import annotations

import ctypes

# <malloc.h>: M_MMAP_THRESHOLD. Setting it also turns glibc's adaptive threshold off.
_M_MMAP_THRESHOLD = -3
LARGE_BLOCK = 1 << 20


def _libc_function(name: str) -> object | None:
    try:
        return getattr(ctypes.CDLL(None), name, None)
    except OSError:
        return None


def unmap_large_blocks(threshold: int = LARGE_BLOCK) -> bool:
    """Serve every allocation of ``threshold`` bytes or more with its own mapping; False where unsupported."""
    mallopt = _libc_function("mallopt")
    return bool(mallopt is not None and mallopt(_M_MMAP_THRESHOLD, threshold) == 1)  # type: ignore[operator]


def release_free_heap() -> None:
    """Return the heap's free pages to the system (after loading a shard: the parser's many small rows)."""
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim(0)  # type: ignore[operator]
