"""Token scopes (``repository:library/nginx:pull``), parsed as token services parse them.

A ``scope`` parameter may hold several scopes separated by spaces (docker
sends one per parameter, containerd and dockerd after login join them in a
POST form, and Docker Hub's token service splits any value on spaces), and a
request may repeat the parameter. Every scope is parsed on its own, so that a
rule applied to one is applied to each; what does not parse is dropped, never
passed on unchecked.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

# resource type, optionally with a class: "repository", "repository(plugin)", "registry"
_TYPE = r"[a-z0-9]+(?:\([a-z0-9]+\))?"
# the name sits between the first and the last ':' (it may carry a registry
# host with a port: "localhost:5000/app"); actions are comma-separated
_SCOPE_RE = re.compile(rf"({_TYPE}):(\S+):([a-z*]+(?:,[a-z*]+)*)")


@dataclass(frozen=True)
class Scope:
    type: str
    name: str
    actions: str

    @property
    def is_repository(self) -> bool:
        return self.type == "repository" or self.type.startswith("repository(")

    def renamed(self, name: str) -> Scope:
        return replace(self, name=name)

    def read_only(self) -> Scope | None:
        """The pull part of this scope (None: it asks for none): what a read-only mirror passes on."""
        actions = self.actions.split(",")
        return replace(self, actions="pull") if "pull" in actions or "*" in actions else None

    def __str__(self) -> str:
        return f"{self.type}:{self.name}:{self.actions}"


def parse_scope(text: str) -> Scope | None:
    match = _SCOPE_RE.fullmatch(text)
    return Scope(*match.groups()) if match else None


def split_scopes(value: str) -> list[str]:
    """One ``scope`` value as the token service reads it: split on whitespace."""
    return value.split()


def map_scopes(value: str, mapper: Callable[[Scope], Scope | None]) -> str:
    """Each scope of a value through ``mapper`` (None drops it); unparsable ones are dropped."""
    kept = []
    for text in split_scopes(value):
        scope = parse_scope(text)
        mapped = mapper(scope) if scope is not None else None
        if mapped is not None:
            kept.append(str(mapped))
    return " ".join(kept)


def map_scope_fields(fields: Iterable[tuple[str, str]], mapper: Callable[[Scope], Scope | None]) -> list[tuple[str, str]]:
    """A query's or form's fields with every ``scope`` value mapped; emptied ones disappear."""
    out = []
    for key, value in fields:
        if key == "scope":
            value = map_scopes(value, mapper)
            if not value:
                continue
        out.append((key, value))
    return out


def repository_names(fields: Iterable[tuple[str, str]]) -> list[str]:
    """The repository names every ``scope`` field of a query or form asks for."""
    names = []
    for key, value in fields:
        if key != "scope":
            continue
        for text in split_scopes(value):
            scope = parse_scope(text)
            if scope is not None and scope.is_repository:
                names.append(scope.name)
    return names
