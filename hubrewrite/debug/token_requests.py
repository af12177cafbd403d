"""Plain-text summary of a request to a token service (GET query or POST form).

Only parameters known to be public are shown as they are; passwords, refresh
tokens and anything unknown appear as fingerprints.
"""

from __future__ import annotations

from hubrewrite.debug.fingerprint import fingerprint
from hubrewrite.debug.text import plain

# the Docker token protocol's public parameters, in the order people read them
PUBLIC_PARAMS = ("service", "scope", "account", "username", "client_id", "offline_token",
                 "access_type", "grant_type")
# their presence is what makes a request a token request
SIGNATURE_PARAMS = frozenset({"service", "scope", "grant_type"})


def is_token_request(params: list[tuple[str, str]]) -> bool:
    return any(name in SIGNATURE_PARAMS for name, _ in params)


def describe_request(params: list[tuple[str, str]], authorization: str | None) -> str:
    lines = ["Token request", ""]
    for name in PUBLIC_PARAMS:
        values = [value for key, value in params if key == name]
        if name == "scope":
            # a scope parameter may be repeated and each may hold space-separated scopes
            scopes = [scope for value in values for scope in value.split()]
            if values:
                lines.append(f"scope ({len(scopes)}):")
                lines += [f"  {plain(scope)}" for scope in scopes]
        else:
            lines += [f"{name}: {plain(value)}" for value in values]
    lines += [f"{plain(key)}: {fingerprint(value)}" for key, value in params if key not in PUBLIC_PARAMS]
    if authorization:
        lines.append(f"credentials: {fingerprint(authorization)}")
    return "\n".join(lines)
