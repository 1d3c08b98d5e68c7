"""The master's reader of a large Update, compiled by numba when it is installed (``pip install 'ef21[fast]'``).

Why: at k = 10⁴ entries the codec's work on an Update is a few microseconds, and ``fastwire.read_update`` —
a loop in Python over a dozen bytes of keys and lengths — took as long again (≈ 7 µs against 2.6 µs for a numpy copy
of the message's 12·k bytes). Here one compiled call walks the same fields and returns where the arrays are.

It answers only where it knows ``fastwire.read_update``'s answer: the fields of a WorkerMessage(Update) — each known
field at most once, in any order, with its wire type, as there — holding a vector and no model buffers, every varint
at most 9 bytes long (so that every number fits an int64). Anything else, an Update it would read otherwise or a
message that is not one, returns None and ``read_update`` decides, so the two never disagree
(``tests/test_fastwire.py`` fuzzes both on mangled messages). Below ``MIN_BYTES`` it does not run: numba's import
(about 2 s on a loaded 2-core machine, once a process) would cost more than it saves, and the tests' small runs never
import numba.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import numpy as np

from ef21.compression.codec import EncodedVector
from ef21.compression.kernels import njit, numba_or_none

from .fastwire import UpdateIn

MIN_BYTES = 1 << 16
"""A Top-k Update of about 5,000 entries."""

UPDATE_KEY = 3 << 3 | 2
"""The first byte of every message answered here: WorkerMessage field 3 (update), length-delimited. Other large
messages — a d×d Gram reply at set-up — are left to the Python reader without importing numba: its import and first
compile hold the master's event loop for seconds, which the set-up's own time-outs must not pay for nothing."""
_UPDATE_PREFIX = bytes([UPDATE_KEY])

# Wire type of each field by number (−1: none such), as fastwire's _UPDATE and _VECTOR (7, 8: pads).
_UPDATE_LAYOUT = np.array([-1, 0, 2, 0, -1, -1, 2, -1, -1], dtype=np.int64)
_VECTOR_LAYOUT = np.array([-1, 0, 2, 2, 0, 0, 0, 2, 2], dtype=np.int64)
_UNSEEN = -2


@functools.cache  # imported and compiled on the first large Update, not at every ef21 start
def _compile() -> Callable[..., Any] | None:
    numba = numba_or_none()
    if numba is None:
        return None

    @njit(numba)
    def varint(b: Any, pos: int, end: int) -> tuple[int, int]:  # pragma: no cover - compiled
        """(value, position after it); value −1 past ``end`` or beyond 9 bytes (read_update then decides)."""
        result = 0
        shift = 0
        while pos < end and shift <= 56:
            c = np.int64(b[pos])
            pos += 1
            result |= (c & 0x7F) << shift
            if c < 0x80:
                return result, pos
            shift += 7
        return -1, pos

    @njit(numba)
    def fields(b: Any, pos: int, end: int, layout: Any, val: Any, stop: Any) -> bool:  # pragma: no cover
        """The fields between pos and end: val[f] the varint or where field f's bytes start, stop[f] where they
        end; False at anything ``fastwire._fields`` would not take (an unknown or repeated field, another wire
        type, a length past ``end``) or at a varint this reader leaves to it."""
        while pos < end:
            key, pos = varint(b, pos, end)
            if key < 0:
                return False
            f, wt = key >> 3, key & 7
            if f >= layout.shape[0] or layout[f] != wt or val[f] != _UNSEEN:
                return False
            n, pos = varint(b, pos, end)
            if n < 0:
                return False
            if wt == 0:
                val[f] = n
            else:
                if n > end - pos:
                    return False
                val[f], stop[f] = pos, pos + n
                pos += n
        return True

    @njit(numba)
    def read(b: Any) -> tuple[int, ...]:  # pragma: no cover - compiled
        """(True, round, replace, dim, dense, float32, index_bits, indices start, stop, values start, stop), or a
        tuple starting with False: not answered here."""
        no = (False, 0, False, 0, False, False, 0, 0, 0, 0, 0)
        end = len(b)
        key, pos = varint(b, 0, end)
        if key != UPDATE_KEY:  # WorkerMessage.update, length-delimited
            return no
        n, pos = varint(b, pos, end)
        if n < 0 or pos + n != end:
            return no
        seen = np.full((4, 9), _UNSEEN, np.int64)  # the Update's fields: value or start, stop; the vector's
        u, us, v, vs = seen[0], seen[1], seen[2], seen[3]
        if not fields(b, pos, end, _UPDATE_LAYOUT, u, us) or u[2] == _UNSEEN or u[6] != _UNSEEN:
            return no  # no vector, or a model's buffers: read_update's
        replace = 0 if u[3] == _UNSEEN else u[3]
        if replace > 1 or not fields(b, u[2], us[2], _VECTOR_LAYOUT, v, vs):
            return no
        dense = 0 if v[4] == _UNSEEN else v[4]
        float32 = 0 if v[5] == _UNSEEN else v[5]
        if dense > 1 or float32 > 1 or (v[6] >> 32) > 0:  # index_bits: a uint32, as in fastwire
            return no
        ia, ib = (0, 0) if v[2] == _UNSEEN else (v[2], vs[2])
        va, vb = (0, 0) if v[3] == _UNSEEN else (v[3], vs[3])
        return (True, 0 if u[1] == _UNSEEN else u[1], replace == 1, 0 if v[1] == _UNSEEN else v[1], dense == 1,
                float32 == 1, 0 if v[6] == _UNSEEN else v[6], ia, ib, va, vb)

    return read


def read_update(raw: bytes) -> UpdateIn | None:
    """The Update in a serialized WorkerMessage, exactly as ``fastwire.read_update`` reads it (the arrays views of
    ``raw``), or None: too small, no numba, or not a message answered here (the caller asks ``fastwire``)."""
    kernel = _compile() if len(raw) >= MIN_BYTES and raw[:1] == _UPDATE_PREFIX else None
    if kernel is None:
        return None
    # numba reads the bytes as they are (no uint8 array in between)
    ok, round_, replace, dim, dense, float32, index_bits, ia, ib, va, vb = kernel(raw)
    if not ok:
        return None
    view = memoryview(raw)
    return UpdateIn(round_, EncodedVector(dim, view[ia:ib], view[va:vb], dense, float32, index_bits), replace)
