"""MkDocs hook: the benchmark figures in ``benchmarks/results/`` become site files under ``results/``.

The benchmark scripts write their figures there, outside ``docs/``; a copy in ``docs/`` would be a second set of
binaries to keep in step. Added to the Files collection, they are copied into the site at build time, a page
links them as ``results/compact.png`` (relative to its own location, e.g. ``../results/compact.png`` from
``benchmarks/``), and MkDocs' link validation checks those links like any other.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
SUFFIXES = {".png", ".svg"}
PREFIX = "results"


def on_files(files, config):
    for path in sorted(RESULTS.rglob("*")):
        if path.is_file() and path.suffix.lower() in SUFFIXES:
            uri = f"{PREFIX}/{path.relative_to(RESULTS).as_posix()}"
            if files.get_file_from_path(uri) is None:
                files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files
