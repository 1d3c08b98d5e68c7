"""A worker hands freed vectors of d back to the system (worker/memory.py), measured on a real process."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Allocate a 16 MiB block, free it (glibc then raises its mmap threshold to 16 MiB), allocate another with a small
# block after it (which pins the heap's top) and free it: the second block is resident afterwards unless it had
# its own mapping. Prints the resident growth in KiB.
PROBE = """
import sys
import numpy as np
from ef21_worker.memory import unmap_large_blocks
if sys.argv[1] == "fixed":
    assert unmap_large_blocks()
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0])
a = np.ones(2 << 20); del a
before = rss()
b = np.ones(2 << 20)
pin = [bytearray(64) for _ in range(1000)]
del b
print(rss() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator and /proc")
def test_a_freed_vector_leaves_the_resident_set():
    out = subprocess.run([sys.executable, "-c", PROBE, "fixed"], capture_output=True, text=True, check=True)
    assert int(out.stdout) < 4 * 1024  # KiB: the 16 MiB block went back to the system
