"""Every Python file the README, bench/README.md and docs/ name (`observe/summaries.py`,
`hubrewrite/addon.py`, ...) exists: a renamed module shows here, not to a reader."""

from __future__ import annotations

import os
import re

import pytest

from hubrewrite.config_file import REPO_ROOT
from tests.support.readme_commands import inline_spans

PY_FILE_RE = re.compile(r"[\w./-]+\.py")
DOCS = ["README.md", "bench/README.md", *sorted(p.relative_to(REPO_ROOT).as_posix() for p in REPO_ROOT.glob("docs/*.md"))]


def python_files() -> list[str]:
    found = []
    for folder, subfolders, names in os.walk(REPO_ROOT):
        subfolders[:] = [d for d in subfolders if not d.startswith(".") and d != "__pycache__"]
        found += [os.path.relpath(os.path.join(folder, n), REPO_ROOT) for n in names if n.endswith(".py")]
    return found


@pytest.mark.parametrize("doc", DOCS)
def test_named_python_files_exist(doc):
    files = python_files()
    named = [s for s in inline_spans((REPO_ROOT / doc).read_text()) if PY_FILE_RE.fullmatch(s)]
    missing = [s for s in named if not any(f == s or f.endswith("/" + s) for f in files)]
    assert missing == []
