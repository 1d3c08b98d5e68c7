"""The master's heap trimmer gives the free memory in the middle of glibc's heap back to the system: what the
Gram set-up leaves behind (server/heap.py). Measured in a fresh process, from /proc."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from ef21_server.heap import HeapTrimmer

PROBE = textwrap.dedent("""
    from pathlib import Path
    from ef21_server.heap import HeapTrimmer

    def rss_mib():
        line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024

    # 2 000 blocks of 100 kB (below glibc's mmap threshold: they come from the heap), each followed by a 1 kB
    # object that stays (above 512 bytes: from malloc, not from Python's small-object pools), so that the freed
    # blocks cannot fall back into the heap's top and be returned by free().
    blocks, keep = [], []
    for i in range(2000):
        blocks.append(bytes([i % 256]) * 100_000)
        keep.append(bytes([i % 256]) * 1_000)
    del blocks
    before = rss_mib()
    trimmer = HeapTrimmer(every=2)
    trimmer.tick()
    untouched = rss_mib()
    trimmer.tick()
    print(before, untouched, rss_mib())
""")


@pytest.mark.skipif(not HeapTrimmer(1).available, reason="malloc_trim is glibc's")
def test_the_free_middle_of_the_heap_goes_back_to_the_system():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=True)
    before, untouched, after = (float(v) for v in out.stdout.split())
    assert before > 150  # the freed 200 MB are still resident: free() alone did not return them
    assert untouched > before - 10  # the first tick of two does nothing
    assert after < before - 150, (before, after)  # the second returned them
