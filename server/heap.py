"""Giving the allocator's free memory back to the system during the Gram set-up.

Summing n Grams of d = 10³ passes n messages of 8 MB through gRPC's receive path, and glibc keeps what they leave
free in the middle of its heaps as resident memory: the master's RSS grew by about 1 MB a Gram although it holds
the sum and two Grams (benchmarks/capacity.py, logistic, n = 1 024: 1 160 MiB; not Python objects, not gRPC per
connection: benchmarks/grpc_residue.py). ``malloc_trim(0)`` returns the free pages of every arena; called after
every 4th Gram the peak was 843 MiB (every Gram: 615 MiB, but the join took 2× as long; every 16th: 1 036 MiB).
Where the C library is not glibc (musl, macOS) this does nothing."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys


class HeapTrimmer:
    """``tick()`` after each large message is let go; every ``every``-th tick returns the free heap to the system."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.ticks = 0
        self._trim = None
        if sys.platform.startswith("linux"):
            try:
                self._trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
            except (OSError, AttributeError):  # not glibc: no malloc_trim, nothing to do
                pass

    @property
    def available(self) -> bool:
        return self._trim is not None

    def tick(self) -> None:
        self.ticks += 1
        if self._trim is not None and self.ticks % self.every == 0:
            self._trim(0)
