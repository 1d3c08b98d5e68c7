"""The documentation: the MkDocs site builds under --strict, --strict catches what it must, and the README stays a
front page with the quick start's commands exactly as CI and users run them.

The site needs mkdocs and mkdocs-material; where they are missing the build tests skip and say why, except in CI
(``CI`` set), where they fail.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_MAX_LINES = 250

# The quick start's two set-up commands, verbatim: the README must keep them character for character.
QUICK_START = (
    "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/ef21 run --workers 4 --k 2 "
    "--stepsize-mult 256 --x0 normal:0 --rounds 3000 --tol 1e-7 --log runs/ef21.jsonl --out runs/x.npy "
    "--plot runs/ef21.png",
    ".venv/bin/python -m pytest",
)

MISSING = [name for name in ("mkdocs", "material") if importlib.util.find_spec(name) is None]
needs_mkdocs = pytest.mark.skipif(
    bool(MISSING) and not os.environ.get("CI"),
    reason=f"{' and '.join(MISSING)} not installed (pip install mkdocs mkdocs-material) - the docs site is not built",
)

# Anything a page would fetch from elsewhere when opened: web fonts, scripts or styles from a CDN.
EXTERNAL_ASSET = re.compile(
    r"""<(?:script|link|img)\b[^>]*\b(?:src|href)=["']https?://|fonts\.(?:googleapis|gstatic)\.com""")


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")  # Material's end-of-life banner: noise, not a build warning
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config), "--site-dir", str(site)],
        cwd=config.parent, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    if MISSING:
        pytest.fail(f"{' and '.join(MISSING)} missing in CI: the docs site cannot be built")
    out = tmp_path_factory.mktemp("site")
    r = mkdocs_build(ROOT / "mkdocs.yml", out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "WARNING" not in r.stdout + r.stderr, r.stdout + r.stderr
    return out


@needs_mkdocs
def test_the_site_builds_strict_with_its_pages_figures_and_search(site):
    for page in ("index.html", "getting-started/index.html", "configuration/index.html", "paper/index.html",
                 "benchmarks/index.html", "benchmarks/constrained-link/index.html", "design/index.html"):
        assert (site / page).is_file(), page
    # The hook serves the benchmark figures from benchmarks/results/ without a copy in docs/.
    assert (site / "results" / "compact.png").read_bytes() == (ROOT / "benchmarks/results/compact.png").read_bytes()
    assert (site / "results/experiments/finetuned/finetuned.png").is_file()
    assert 'src="../results/experiments/finetuned/finetuned.png"' in (site / "paper/index.html").read_text()
    assert not (site / "hooks").exists()
    index = (site / "search" / "search_index.json").read_text()
    assert "--status-token" in index and "Elias" in index


@needs_mkdocs
def test_the_site_fetches_nothing_from_elsewhere(site):
    offenders = [str(p.relative_to(site)) for p in site.rglob("*.html") if EXTERNAL_ASSET.search(p.read_text())]
    assert offenders == []


@pytest.fixture
def docs_copy(tmp_path) -> Path:
    """The site's sources in tmp_path: mkdocs.yml, docs/ and (linked) the benchmark figures the hook serves."""
    if MISSING:
        pytest.fail(f"{' and '.join(MISSING)} missing in CI: the docs site cannot be built")
    shutil.copy2(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "results").symlink_to(ROOT / "benchmarks" / "results", target_is_directory=True)
    return tmp_path


def add_page(root: Path, text: str, *, in_nav: bool) -> None:
    (root / "docs" / "extra-page.md").write_text(f"# An extra page\n\n{text}\n")
    if in_nav:
        config = root / "mkdocs.yml"
        text = config.read_text()
        assert text.rstrip().splitlines()[-1].startswith("  - "), "nav is no longer the last key of mkdocs.yml"
        config.write_text(text.rstrip() + "\n  - Extra: extra-page.md\n")


@needs_mkdocs
@pytest.mark.parametrize("case, page, in_nav, expect", [
    ("a good page", "[Configuration](configuration.md#config-files)", True, None),
    ("a link to no page", "[gone](no-such-page.md)", True, "no-such-page.md"),
    ("a link to no anchor", "[gone](configuration.md#no-such-anchor)", True, "no-such-anchor"),
    ("a link out of docs/", "[code](../examples/ridge.py)", True, "../examples/ridge.py"),
    ("a missing figure", "![figure](results/no-such-figure.png)", True, "results/no-such-figure.png"),
    ("a page left out of the nav", "[Configuration](configuration.md)", False, "extra-page.md"),
])
def test_strict_fails_on_what_it_must_and_only_on_that(docs_copy, tmp_path, case, page, in_nav, expect):
    add_page(docs_copy, page, in_nav=in_nav)
    r = mkdocs_build(docs_copy / "mkdocs.yml", tmp_path / "site")
    out = r.stdout + r.stderr
    if expect is None:
        assert r.returncode == 0, out
    else:
        assert r.returncode != 0, f"{case}: the strict build passed\n{out}"
        assert expect in out, out


def test_the_readme_is_a_front_page_with_the_quick_start_verbatim():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; the rest belongs in docs/"
    for command in QUICK_START:
        assert command in lines, f"the quick start's command is no longer verbatim in README.md: {command}"


def toml_block(text: str) -> str:
    start = text.index("```toml") + len("```toml")
    return text[start:text.index("```", start)]


def test_the_config_file_example_is_the_same_in_the_readme_and_the_docs():
    # tests/test_config_files.py runs the README's copy; the docs must show the same file.
    readme = README.read_text()
    docs = (ROOT / "docs" / "configuration.md").read_text()
    assert toml_block(readme[readme.index("### Config files"):]) == toml_block(docs[docs.index("## Config files"):])
