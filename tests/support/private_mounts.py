"""A dockerd that sees its own copies of system files: a private mount namespace.

    with NamespacedDockerd(workdir, ctd.address, config, binds={"/etc/hosts": my_hosts}) as dockerd: ...

A README's set-up steps touch machine-wide files: DNS names pointing at the
mirror (``/etc/hosts``), the system CA store (``update-ca-certificates``).  The
test gives the daemon they are for a private mount namespace in which files of
the test are bind-mounted over those paths, runs the set-up command (``before``)
in there, then execs dockerd (same pid: unshare and sh exec).  The machine's
files and every other process are untouched, and the mounts go away with the
daemon.  Needs root (``unshare --mount``).

``hosts_file`` writes a copy of the machine's /etc/hosts with names for
127.0.0.1 added; ``no_proxy`` names hosts the daemon reaches directly
(tests/support/daemons.py points everything else at a dead proxy); ``env``
sets more variables (a proxy, as a systemd drop-in would).
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from pathlib import Path

from tests.support.daemons import Dockerd

SYSTEM_HOSTS = Path("/etc/hosts")


def hosts_file(path: Path, names: list[str]) -> Path:
    """The machine's /etc/hosts plus ``127.0.0.1 <names>``."""
    path.write_text(SYSTEM_HOSTS.read_text() + f"\n127.0.0.1 {' '.join(names)}\n")
    return path


def can_use_private_mounts() -> bool:
    return os.geteuid() == 0


def with_private_mounts(argv: list[str], binds: dict[str, Path], before: str = "") -> list[str]:
    """``argv`` run (same pid) where each key path shows its value instead, after ``before`` ran there."""
    steps = [f"mount --bind {shlex.quote(str(source))} {shlex.quote(target)}" for target, source in binds.items()]
    if before:
        steps.append(before)
    return ["unshare", "--mount", "--propagation", "private", "--",
            "sh", "-c", " && ".join([*steps, 'exec "$@"']), "sh", *argv]


class NamespacedDockerd(Dockerd):
    """A Dockerd (tests/support/daemons.py) in a private mount namespace; see the module docstring."""

    def __init__(self, workdir: Path, containerd_address: str, config: dict, *, binds: dict[str, Path],
                 before: str = "", no_proxy: Sequence[str] = (), env: dict[str, str] | None = None,
                 cli: str = "docker") -> None:
        super().__init__(workdir, containerd_address, config=config, cli=cli)
        self.binds, self.before = dict(binds), before
        self.no_proxy, self.extra_env = list(no_proxy), dict(env or {})

    def argv(self) -> list[str]:
        return with_private_mounts(super().argv(), self.binds, self.before)

    def env(self) -> dict[str, str]:
        env = super().env()
        for key in ("NO_PROXY", "no_proxy"):
            env[key] = ",".join([env[key], *self.no_proxy])
        return {**env, **self.extra_env}
