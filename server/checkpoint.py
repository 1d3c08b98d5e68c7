"""Master checkpoints: everything needed to continue a run exactly, written atomically, with a checksum.

One ``.npz`` (no pickles) holds the arrays and a JSON ``meta`` block; ``checksum`` is a SHA-256 over all of
them. A new checkpoint goes to a temporary file, is fsynced and renamed over the old one, which is first kept as
``PATH.prev``: a crash at any moment leaves at least one good checkpoint, and a corrupt file is refused (the
loader then falls back to the previous one, saying so).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ef21.errors import UserError

FORMAT = "ef21-checkpoint/1"
EXTRA = ("v", "g_tilde", "w")
STATE_PREFIX = "state."
"""Arrays named ``state.NAME``: the replicated state beside x, g and v (a model's buffers, the optimizer's)."""


@dataclass
class Checkpoint:
    meta: dict[str, Any]
    """Configuration, run id, round, constants, counters, log offset, data reference (JSON-able)."""
    x: np.ndarray
    g: np.ndarray
    rows: np.ndarray | None
    """The master's per-worker state (EF21's g_i), when the method keeps one."""
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    """Optional state of extensions: ``v`` (EF21-HB's direction), ``g_tilde`` (EF21-BC's uplink aggregate), ``w``
    (EF21-P's shared point), and ``state.NAME`` (a model's buffers, the optimizer's state)."""


def _digest(meta_bytes: bytes, arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256(meta_bytes)
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode())
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def previous_path(path: Path) -> Path:
    return path.with_name(path.name + ".prev")


def _keep_as_previous(path: Path) -> None:
    """The current checkpoint becomes ``PATH.prev`` while ``PATH`` itself stays in place until the new one is
    renamed over it, so that whoever reads ``PATH`` (a test, a backup job, a person) never finds it missing: a hard
    link renamed onto ``.prev``. Where the file system has no hard links, the old file is moved, and for a moment
    only ``.prev`` exists (``load`` falls back to it)."""
    prev = previous_path(path)
    link = path.with_name(f".{prev.name}.tmp{os.getpid()}")
    try:
        os.link(path, link)
    except OSError:
        os.replace(path, prev)
        return
    os.replace(link, prev)


def save(path: Path, ckpt: Checkpoint) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta_bytes = json.dumps({"format": FORMAT, **ckpt.meta}, sort_keys=True).encode()
    arrays = {"x": ckpt.x, "g": ckpt.g, **ckpt.extra}
    if ckpt.rows is not None:
        arrays["rows"] = ckpt.rows
    buf = io.BytesIO()
    np.savez(buf, meta=np.frombuffer(meta_bytes, dtype=np.uint8),
             checksum=np.frombuffer(_digest(meta_bytes, arrays).encode(), dtype=np.uint8), **arrays)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(buf.getvalue())
        fh.flush()
        os.fsync(fh.fileno())
    if path.exists():
        _keep_as_previous(path)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_one(path: Path) -> Checkpoint:
    """Read and verify one checkpoint file, or raise UserError saying what is wrong with it."""
    try:
        with np.load(path, allow_pickle=False) as z:
            files = set(z.files)
            if not {"meta", "checksum", "x", "g"} <= files:
                raise UserError(f"checkpoint {path}: missing arrays (has {sorted(files)})")
            meta_bytes = z["meta"].tobytes()
            stored = z["checksum"].tobytes().decode("ascii", "replace")
            arrays = {name: z[name] for name in files
                      if name in ("x", "g", "rows", *EXTRA) or name.startswith(STATE_PREFIX)}
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"checkpoint {path}: no such file") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as exc:
        raise UserError(f"checkpoint {path}: unreadable ({exc})") from None
    if _digest(meta_bytes, arrays) != stored:
        raise UserError(f"checkpoint {path}: checksum mismatch (the file is corrupt)")
    try:
        meta = json.loads(meta_bytes)
    except json.JSONDecodeError:
        raise UserError(f"checkpoint {path}: corrupt metadata") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"checkpoint {path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return Checkpoint(meta, arrays["x"].copy(), arrays["g"].copy(),
                      arrays["rows"].copy() if "rows" in arrays else None,
                      {k: a.copy() for k, a in arrays.items() if k in EXTRA or k.startswith(STATE_PREFIX)})


def load_latest(path: Path) -> tuple[Checkpoint, Path, str | None]:
    """The newest good checkpoint: ``path``, else ``path.prev``. Returns (checkpoint, file used, warning)."""
    path = Path(path)
    try:
        return load_one(path), path, None
    except UserError as first:
        prev = previous_path(path)
        if not prev.exists():
            raise UserError(f"{first}; no previous checkpoint ({prev.name}) to fall back to") from None
        try:
            return load_one(prev), prev, f"{first}; resuming from the previous checkpoint {prev}"
        except UserError as second:
            raise UserError(f"{first}; the previous one is bad too: {second}") from None
