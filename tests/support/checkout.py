"""A scratch copy of the repository with a set-up ``.venv``, for running
``scripts/run`` the way a user does without touching the real checkout's
``.venv`` or the virtualenv running the tests.

    root = scratch_checkout(tmp_path / "checkout")   # root/scripts/run, root/.venv

The ``.venv`` is a copy of the virtualenv running the tests (``sys.prefix``):
its files are hard links (instant, no space; real copies across file
systems), except the ``bin/`` scripts, which are rewritten to name the copy's
own Python.  Writing into a hard-linked file would change the original too;
nothing does: Python writes bytecode by replacing files, pip removes and
creates files (and the tests keep it off the network, so it fails before it
changes anything), and the install stamp is left out of the copy.  Raises
``CheckoutError`` when the tests do not run in a virtualenv.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from tests.support.mirror import REPO_ROOT

# what scripts/run needs: the scripts, the addon and its package, the dependencies and the config
PARTS = ("scripts", "addons", "hubrewrite", "pyproject.toml", "mitm.conf")
STAMP = ".hub-rewrite-installed"  # VENV_STAMP in scripts/lib.sh


class CheckoutError(RuntimeError):
    pass


def link_or_copy(source: str, dest: str) -> None:
    try:
        os.link(source, dest)
    except OSError:  # another file system (e.g. /tmp on tmpfs): a real copy, slower
        shutil.copy2(source, dest)


def copy_venv(source: Path, dest: Path) -> Path:
    # without the install stamp, which scripts/lib.sh (re)writes: the caller writes its own
    shutil.copytree(source, dest, symlinks=True, copy_function=link_or_copy, ignore=shutil.ignore_patterns(STAMP))
    old_prefix = f"#!{source}/bin/".encode()
    for script in (dest / "bin").iterdir():
        if script.is_symlink() or not script.is_file():
            continue
        with open(script, "rb") as f:
            head = f.read(len(old_prefix))
        if head != old_prefix:
            continue
        data = script.read_bytes()
        mode = script.stat().st_mode
        script.unlink()  # a hard link to the original: replace it, never write through it
        script.write_bytes(f"#!{dest}/bin/".encode() + data[len(old_prefix):])
        script.chmod(mode)
    return dest


def scratch_checkout(dest: Path) -> Path:
    if sys.prefix == sys.base_prefix:
        raise CheckoutError("the tests do not run in a virtualenv: nothing to copy as .venv")
    dest.mkdir(parents=True)
    for part in PARTS:
        source = REPO_ROOT / part
        if source.is_dir():
            shutil.copytree(source, dest / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, dest / part)
    copy_venv(Path(sys.prefix), dest / ".venv")
    return dest
