"""A service unit's command line as systemd would run it, for machines without a running systemd.

    unit = ServiceUnit.load(path, drop_ins=[...])
    unit.value("LimitNOFILE")                  # "4096" (the last assignment wins, drop-ins after the unit)
    unit.exec_start({"STATE_DIRECTORY": ...})  # ExecStart= as an argv, ${VAR} expanded

Only what the unit files of this repository use: one-line settings in
``[Service]``, ``Environment=NAME=value`` (unquoted), and in ``ExecStart=``
systemd's expansion of ``${NAME}`` (replaced by the variable's value as one
argument, or as part of one) from ``Environment=`` and the variables systemd
sets itself (``$STATE_DIRECTORY``: the caller gives them). Anything else in a
command line (quotes, ``$NAME`` splitting, specifiers, prefixes such as ``-``
or ``+``) raises ValueError rather than being read some other way than systemd
reads it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass
class ServiceUnit:
    settings: list[tuple[str, str]]  # (key, value) of [Service], in file order, drop-ins last

    @classmethod
    def load(cls, path: Path, drop_ins: list[Path] = ()) -> ServiceUnit:
        settings: list[tuple[str, str]] = []
        for file in [path, *drop_ins]:
            section = ""
            for line in file.read_text().splitlines():
                line = line.strip()
                if not line or line.startswith(("#", ";")):
                    continue
                if line.startswith("["):
                    section = line
                elif section == "[Service]":
                    if line.endswith("\\"):
                        raise ValueError(f"{file}: continued lines are not read here: {line}")
                    key, _, value = line.partition("=")
                    settings.append((key.strip(), value.strip()))
        return cls(settings)

    def value(self, key: str) -> str | None:
        values = [v for k, v in self.settings if k == key]
        return values[-1] if values else None

    def environment(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for key, value in self.settings:
            if key == "Environment":
                for assignment in value.split():
                    if '"' in assignment or "'" in assignment or "=" not in assignment:
                        raise ValueError(f"Environment= form not read here: {value}")
                    name, _, val = assignment.partition("=")
                    env[name] = val
        return env

    def exec_start(self, manager_env: dict[str, str]) -> list[str]:
        line = self.value("ExecStart")
        if not line:
            raise ValueError("no ExecStart=")
        if any(c in line for c in "\"'%\\") or re.search(r"\$(?!\{)", line) or line[0] in "-+@:!":
            raise ValueError(f"ExecStart= uses syntax not read here: {line}")
        env = {**self.environment(), **manager_env}
        argv = [VARIABLE.sub(lambda m: env.get(m.group(1), ""), word) for word in line.split()]
        if not argv[0].startswith("/"):
            raise ValueError("systemd needs an absolute path for the command")
        return argv
