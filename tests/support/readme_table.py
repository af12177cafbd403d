"""The table that says how each command (or configuration block) that README.md or a page of
docs/ shows is run by the tests.

``documented()`` collects them: every command of the documents' ``sh`` blocks and
every other fenced block whole (``shell_commands``, ``fenced_blocks``), each with
the documents that show it.

Each entry is one of:

* ``Here``: a test (or fixture) of the module holding the table runs it, as
  typed except for the placeholders listed in ``replaced`` (each must occur in
  the text) and what ``appended``/``environment`` say;
* ``Elsewhere``: another file runs it; ``shows`` is the text that file's
  source (or the named test function's) contains where it runs the command;
* ``BenchSmoke``: a benchmark command, run by tests/integration/test_bench_smoke.py,
  which runs every command of bench/README.md: the document's command must be one of them.

``Handout`` hands the documents' text to the tests the table names, applying
only the allowed replacements, and remembers what was handed out, so that a
last test can check every ``Here`` command was run.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

from tests.support.readme_commands import fenced_blocks, shell_commands

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCH_COMMAND_RE = re.compile(r"^PYTHONPATH=\. \.venv/bin/python bench/\S+\.py\b.*$", re.M)


@dataclass(frozen=True)
class Here:
    runners: tuple[str, ...]  # test functions or fixtures of the table's module that run it
    replaced: tuple[str, ...] = ()  # placeholders a runner may replace by its real value
    appended: str = ""  # arguments added at the end, and why
    environment: str = ""  # what the command's environment adds, and why


@dataclass(frozen=True)
class Elsewhere:
    where: str  # "path" or "path::test_function", relative to the repository root
    shows: str  # what that source contains where it runs the command
    note: str = ""

    def problem(self, command: str) -> str | None:
        """Why this reference does not hold (None when it does)."""
        path, _, function = self.where.partition("::")
        try:
            source = (REPO_ROOT / path).read_text()
        except OSError as e:
            return f"{self.where}: {e.strerror}"
        if function:
            source = function_source(source, function)
            if source is None:
                return f"{path} has no function {function}"
        if self.shows not in source:
            return f"{self.where} does not contain {self.shows!r}"
        return None


@dataclass(frozen=True)
class BenchSmoke:
    where: str = "tests/integration/test_bench_smoke.py::test_readme_command_runs_as_smoke"

    def problem(self, command: str) -> str | None:
        bench_readme = (REPO_ROOT / "bench" / "README.md").read_text()
        if command not in BENCH_COMMAND_RE.findall(bench_readme):
            return f"{command!r} is not one of bench/README.md's commands, which {self.where} runs"
        return Elsewhere(self.where, "readme_commands()").problem(command)


Entry = Here | Elsewhere | BenchSmoke


def documents() -> list[Path]:
    """README.md and every page of docs/: what the tests run the commands of."""
    return [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]


def documented() -> dict[str, list[str]]:
    """Every command of the documents' sh blocks and every other fenced block, whole ->
    the documents (paths relative to the repository) that show it."""
    shown: dict[str, list[str]] = {}
    for document in documents():
        name = document.relative_to(REPO_ROOT).as_posix()
        for block in fenced_blocks(document.read_text()):
            for text in shell_commands(block.text) if block.lang == "sh" else [block.text]:
                shown.setdefault(text, []).append(name)
    return shown


def function_source(module_source: str, name: str) -> str | None:
    for node in ast.walk(ast.parse(module_source)):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return ast.get_source_segment(module_source, node)
    return None


class TableError(AssertionError):
    pass


class Handout:
    """The documents' commands and blocks, handed to the runners the table names."""

    def __init__(self, table: dict[str, Entry], shown: Iterable[str]) -> None:
        self.table = table
        self.shown = set(shown)  # every command and block text README.md and docs/ show
        self.handed: dict[str, set[str]] = {}  # text -> runners that got it
        self.skipped: set[str] = set()  # runners that skipped (a client not installed, a port taken)

    def text(self, runner: str, key: str, replace: dict[str, str] | None = None, append: str = "") -> str:
        """``key`` as the documents show it, with ``replace`` applied and ``append`` added."""
        if key not in self.shown:
            raise TableError(f"neither README.md nor docs/ shows {key!r} any longer")
        entry = self.table.get(key)
        if not isinstance(entry, Here) or runner not in entry.runners:
            raise TableError(f"the table does not say that {runner} runs {key!r}")
        replace = replace or {}
        for placeholder in replace:
            if placeholder not in entry.replaced:
                raise TableError(f"the table does not allow replacing {placeholder!r} in {key!r}")
            if placeholder not in key:
                raise TableError(f"{placeholder!r} is not in {key!r}")
        text = key
        if replace:
            # all at once: a value put in is never searched for another placeholder (port 45001 holds "5001")
            pattern = "|".join(re.escape(p) for p in sorted(replace, key=len, reverse=True))
            text = re.sub(pattern, lambda m: replace[m.group(0)], key)
        if append and not entry.appended:
            raise TableError(f"the table does not allow appending to {key!r}")
        self.handed.setdefault(key, set()).add(runner)
        return f"{text} {append}" if append else text

    def skip(self, runner: str, reason: str) -> NoReturn:
        __tracebackhide__ = True  # the skip is reported at the test's line
        self.skipped.add(runner)
        pytest.skip(reason)

    def skip_all(self, reason: str) -> NoReturn:
        """Nothing can run (the scratch checkout is missing): every runner skips."""
        __tracebackhide__ = True
        for entry in self.table.values():
            if isinstance(entry, Here):
                self.skipped.update(entry.runners)
        pytest.skip(reason)

    def not_run(self) -> list[str]:
        """``Here`` commands no runner got, though none of their runners skipped."""
        return [key for key, entry in self.table.items()
                if isinstance(entry, Here) and key not in self.handed and not self.skipped & set(entry.runners)]
