"""The operator's allow/deny patterns on ``registry/repository``."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase


class PolicyError(ValueError):
    pass


@dataclass(frozen=True)
class RepositoryRules:
    """Allow/deny patterns on ``registry/repository`` (shell-style: ``docker.io/library/*``).

    A deny match refuses; with allow patterns, a name must match one of them.
    ``*`` also matches ``/``, so ``ghcr.io/*`` covers every repository there.
    """

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()

    @classmethod
    def parse(cls, allow: list[str] | tuple[str, ...], deny: list[str] | tuple[str, ...]) -> RepositoryRules:
        for pattern in [*allow, *deny]:
            if not pattern or "/" not in pattern or pattern != pattern.strip():
                raise PolicyError(f"{pattern!r}: expected registry/repository, e.g. docker.io/library/*")
        return cls(tuple(p.lower() for p in allow), tuple(p.lower() for p in deny))

    def permits(self, registry: str, repository: str) -> bool:
        full = f"{registry}/{repository}".lower()
        if any(fnmatchcase(full, p) for p in self.deny):
            return False
        return not self.allow or any(fnmatchcase(full, p) for p in self.allow)
