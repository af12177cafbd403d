"""The operator's own upstream accounts, used for clients that bring none."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .accounts import basic_header
from .rules import PolicyError

CREDENTIALS_ENV_PREFIX = "HUB_UPSTREAM_CREDENTIALS_"


@dataclass
class UpstreamCredentials:
    """The operator's own upstream accounts, used when a client brings none.

    From a file (``<registry> <username> <password>`` per line) and from the
    environment (``HUB_UPSTREAM_CREDENTIALS_DOCKER_IO=user:password``: the
    registry name upper-cased, every other character ``_``); the environment wins.
    A registry with several URLs may have an account per URL: its API host
    (``host`` or ``host:port`` as the table writes it) in place of the registry name.
    ``repr`` never shows them.
    """

    _by_registry: dict[str, tuple[str, str]] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, path: str, registries: set[str], environ: dict[str, str] | None = None) -> UpstreamCredentials:
        found: dict[str, tuple[str, str]] = {}
        if path:
            try:
                text = Path(path).expanduser().read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise PolicyError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from e
            for number, line in enumerate(text.splitlines(), 1):
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                fields = line.split(None, 2)
                if len(fields) != 3:
                    # the line is not quoted: it holds a secret
                    raise PolicyError(f"{path}:{number}: expected <registry> <username> <password>")
                registry, user, password = fields[0].lower(), fields[1], fields[2].strip()
                if registry not in registries:
                    raise PolicyError(f"{path}:{number}: registry or API host {registry} is not in hub_upstreams")
                found[registry] = (user, password)
        env = os.environ if environ is None else environ
        for registry in registries:
            value = env.get(CREDENTIALS_ENV_PREFIX + env_suffix(registry))
            if value:
                user, sep, password = value.partition(":")
                if not sep or not user:
                    raise PolicyError(f"{CREDENTIALS_ENV_PREFIX}{env_suffix(registry)}: expected user:password")
                found[registry] = (user, password)
        return cls(found)

    def basic_for(self, registry: str) -> str | None:
        pair = self._by_registry.get(registry)
        return basic_header(*pair) if pair else None

    def basic_for_source(self, source) -> str | None:
        """For one URL of a registry (an Upstream): its own account, else the registry's."""
        return self.basic_for(source_key(source)) or self.basic_for(source.name)

    def registries(self) -> list[str]:
        return sorted(self._by_registry)

    def secrets(self) -> list[str]:
        """Every secret held, so callers can make sure none is ever printed."""
        return [password for _, password in self._by_registry.values()]


def env_suffix(registry: str) -> str:
    return re.sub(r"[^A-Z0-9]", "_", registry.upper())


def source_key(source) -> str:
    """How a URL of a registry is named in the credentials: its host, with a port other than the scheme's."""
    default = 443 if source.scheme == "https" else 80
    return source.host if source.port == default else f"{source.host}:{source.port}"
