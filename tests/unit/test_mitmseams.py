"""hubrewrite/mitmseams as the one place where the mirror relies on mitmproxy's insides.

Outside the package only mitmproxy's public modules are imported (its
``__init__``'s rule), no other addon is looked up, and nothing of h2 or httpcore
is imported; inside, each module says what it relies on and why. The seams
were checked against the mitmproxy that pyproject.toml pins: an upgrade starts
with this file failing, and the seams' tests (test_mitmseams_*.py) say what moved.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re

import pytest
from mitmproxy import version

from hubrewrite import mitmseams
from hubrewrite.config_file import REPO_ROOT

PACKAGE = REPO_ROOT / "hubrewrite"
SEAMS = PACKAGE / "mitmseams"
# what mitmproxy promises addons: its API reference's modules, and helpers used like a library
PUBLIC = frozenset({
    "mitmproxy.http", "mitmproxy.connection", "mitmproxy.flow", "mitmproxy.tls", "mitmproxy.tcp",
    "mitmproxy.exceptions", "mitmproxy.ctx", "mitmproxy.optmanager", "mitmproxy.contentviews",
    "mitmproxy.certs", "mitmproxy.proxy.mode_specs", "mitmproxy.proxy.server_hooks", "mitmproxy.proxy.context",
    "mitmproxy.utils.human",
})
PUBLIC_NAMES = frozenset({("mitmproxy.proxy.layer", "NextLayer")})  # the next_layer hook's data
INSIDES = ("h2", "httpcore", "hpack", "hyperframe")  # the libraries mitmproxy (and httpx) are built on
# to move into mitmseams once the blob download work (upstream_bodies.py) has landed
NOT_YET_MOVED: set[tuple[str, str]] = set()  # (file, library) of a seam still outside the package


def imports_of(path) -> list[tuple[str, str | None]]:
    """(module, name) of every import in a file; name None for ``import module``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.module, alias.name) for alias in node.names]
    return found


def imported_module(module: str, name: str | None) -> str:
    """``from a.b import c``: a.b.c when c is a module, else a.b."""
    if name is not None and module.startswith("mitmproxy") and importlib.util.find_spec(module) is not None:
        try:
            if importlib.util.find_spec(f"{module}.{name}") is not None:
                return f"{module}.{name}"
        except ModuleNotFoundError:
            pass
    return module


def outside_files():
    return sorted(p for p in PACKAGE.rglob("*.py") if SEAMS not in p.parents)


def test_written_for_the_pinned_mitmproxy():
    pinned = re.search(r'"mitmproxy==([^"]+)"', (REPO_ROOT / "pyproject.toml").read_text()).group(1)
    assert pinned == version.VERSION == mitmseams.MITMPROXY, (
        f"mitmproxy {version.VERSION} installed, {pinned} pinned, the seams checked against {mitmseams.MITMPROXY}: "
        "run tests/unit/test_mitmseams_*.py against the new version, then set mitmseams.MITMPROXY")


def reaches_inside(path) -> list[str]:
    """What of mitmproxy's insides a file outside the seams imports, or that it looks up an addon."""
    where = str(path.relative_to(REPO_ROOT))
    inside = []
    for module, name in imports_of(path):
        root = module.split(".")[0]
        if root in INSIDES and (where, root) not in NOT_YET_MOVED:
            inside.append(module)
        elif root == "mitmproxy" and (module, name) not in PUBLIC_NAMES:
            target = imported_module(module, name)
            if target != "mitmproxy" and target not in PUBLIC:
                inside.append(target)
    if ".addons.get(" in path.read_text():
        inside.append("another addon (addons.get)")
    return inside


def test_only_mitmproxys_public_modules_outside_the_seams():
    found = {str(p.relative_to(REPO_ROOT)): inside for p in outside_files() if (inside := reaches_inside(p))}
    assert found == {}, "these reach into mitmproxy's insides: move what they do into hubrewrite/mitmseams"


@pytest.mark.parametrize("name", sorted(p.stem for p in SEAMS.glob("*.py") if p.stem != "__init__"))
def test_every_seam_says_what_it_relies_on_and_why(name):
    doc = importlib.import_module(f"hubrewrite.mitmseams.{name}").__doc__ or ""
    assert "Relies on:" in doc and "Why:" in doc, f"mitmseams/{name}.py: its docstring must say both"
    assert f"``{name}``" in mitmseams.__doc__, f"mitmseams/__init__.py does not list {name}"
