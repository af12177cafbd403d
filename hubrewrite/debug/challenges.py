"""Plain-text summary of a 401 answer: its ``WWW-Authenticate`` challenges and registry errors."""

from __future__ import annotations

import json

from hubrewrite.registry import challenge
from hubrewrite.debug.text import plain

# shown first and in this order; other parameters follow as they come
_KNOWN_PARAMS = ("realm", "service", "scope", "error")


def describe(header_values: list[str], body: bytes) -> str | None:
    """None when no header value is a valid challenge."""
    lines, valid = ["Authentication challenge", ""], 0
    for value in header_values:
        try:
            parsed = challenge.parse_challenges(value)
        except challenge.ChallengeError as exc:
            lines.append(f"! not a valid challenge ({exc}): {plain(value)}")
            continue
        valid += len(parsed)
        for c in parsed:
            lines += _challenge(c)
    return "\n".join(lines + _errors(body)) if valid else None


def _challenge(c: challenge.Challenge) -> list[str]:
    lines = [f"challenge: {plain(c.scheme)}"]
    if c.token68 is not None:
        lines.append(f"  token68: {plain(c.token68)}")
    for name in _KNOWN_PARAMS:
        value = c.get(name)
        if value is None:
            continue
        if name == "scope":
            scopes = value.split()
            lines.append(f"  scope ({len(scopes)}):")
            lines += [f"    {plain(s)}" for s in scopes]
        else:
            lines.append(f"  {name}: {plain(value)}")
    lines += [f"  {plain(k)}: {plain(v)}" for k, v in c.params.items() if k.lower() not in _KNOWN_PARAMS]
    return lines


def _errors(body: bytes) -> list[str]:
    """The registry's ``{"errors": [{"code", "message", "detail"}]}`` body, if that is what it is."""
    if not body.strip():
        return []
    try:
        errors = json.loads(body).get("errors")
    except (ValueError, RecursionError, AttributeError):
        errors = None
    if not isinstance(errors, list):
        return ["", f"body: {len(body)} B, not registry errors (see the JSON or Raw view)"]
    lines = ["", f"errors ({len(errors)}):"]
    for e in errors:
        e = e if isinstance(e, dict) else {"message": e}
        lines.append(f"  {plain(e.get('code'))}: {plain(e.get('message'))}")
        if "detail" in e:
            lines.append(f"    detail: {plain(e['detail'])}")
    return lines
