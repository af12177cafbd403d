"""Every benchmark command in bench/README.md runs, shrunk by HUB_BENCH_SCALE=smoke.

The commands are read from the README itself, so what it tells people to run
is what is tested; only the interpreter (this one, not ``.venv/bin/python``)
and the ``--json`` file (a temp file, not bench/results/) differ. The figures'
page, docs/benchmarks.md, shows the same commands, each next to what it measured.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
README = REPO_ROOT / "bench" / "README.md"
FIGURES = REPO_ROOT / "docs" / "benchmarks.md"
COMMAND_RE = re.compile(r"^PYTHONPATH=\. \.venv/bin/python (bench/\S+\.py\b.*)$", re.M)


def readme_commands(readme: Path = README) -> dict[str, list[str]]:
    """script name -> its argv (after the interpreter), from the README's command lines."""
    return {Path(m.group(1).split()[0]).name: shlex.split(m.group(1)) for m in COMMAND_RE.finditer(readme.read_text())}


def test_readme_documents_every_benchmark():
    scripts = {p.name for p in (REPO_ROOT / "bench").glob("bench_*.py")}
    assert scripts and set(readme_commands()) == scripts


def test_the_figures_page_shows_the_same_commands():
    """docs/benchmarks.md reproduces each figure with the command run here, and none other."""
    assert readme_commands(FIGURES) == readme_commands()


@pytest.mark.parametrize("script", sorted(readme_commands()))
def test_readme_command_runs_as_smoke(script, tmp_path):
    if script == "bench_blobpath.py" and os.geteuid() != 0:
        pytest.skip("bench_blobpath.py throttles the CDN with tc on lo: root only")
    argv = readme_commands()[script]
    out = tmp_path / "out.json"
    argv[argv.index("--json") + 1] = str(out)
    p = subprocess.run([sys.executable, *argv], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "HUB_BENCH_SCALE": "smoke"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.startswith("**SMOKE RUN**")
    assert "Traceback" not in p.stderr
    assert "signature=" not in p.stdout + p.stderr  # no signed CDN URL is ever printed
    result = json.loads(out.read_text())
    assert result["scale"] == "smoke" and result["exit_code"] == 0 and "error" not in result
