"""Parse and re-emit ``WWW-Authenticate`` challenges (RFC 9110, section 11).

The seed string-replaced the realm URL. That breaks as soon as the upstream
spells its realm differently (Docker Hub has an IPv6 realm host too), so the
mirror parses every challenge and rebuilds it with only the realm changed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from .scopes import parse_scope, split_scopes

_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_SCHEME_RE = re.compile(_TOKEN)
_PARAM_RE = re.compile(
    rf"\s*({_TOKEN})\s*=\s*(?:\"((?:[^\"\\]|\\.)*)\"|({_TOKEN}))\s*"
)
_TOKEN68_RE = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


class ChallengeError(ValueError):
    """A ``WWW-Authenticate`` value that does not follow the grammar."""


@dataclass
class Challenge:
    scheme: str
    params: dict[str, str] = field(default_factory=dict)
    token68: str | None = None

    @property
    def is_bearer(self) -> bool:
        return self.scheme.lower() == "bearer"

    def get(self, name: str) -> str | None:
        """Parameter names are case-insensitive."""
        for key, value in self.params.items():
            if key.lower() == name.lower():
                return value
        return None

    def with_param(self, name: str, value: str) -> Challenge:
        """A copy with one parameter set, keeping its position if it existed."""
        rebuilt: dict[str, str] = {}
        replaced = False
        for key, old in self.params.items():
            if key.lower() == name.lower():
                rebuilt[key] = value
                replaced = True
            else:
                rebuilt[key] = old
        if not replaced:
            rebuilt[name] = value
        return Challenge(self.scheme, rebuilt, self.token68)

    def format(self) -> str:
        if self.token68 is not None:
            return f"{self.scheme} {self.token68}"
        if not self.params:
            return self.scheme
        parts = ",".join(f"{k}={_quote(v)}" for k, v in self.params.items())
        return f"{self.scheme} {parts}"


def _quote(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _unquote(value: str) -> str:
    return re.sub(r"\\(.)", r"\1", value)


def parse_challenges(header: str) -> list[Challenge]:
    """Parse one header value, which may carry several comma-separated challenges."""
    challenges: list[Challenge] = []
    pos = 0
    text = header.strip()
    while pos < len(text):
        # skip empty list elements
        while pos < len(text) and text[pos] in ", \t":
            pos += 1
        if pos >= len(text):
            break
        m = _SCHEME_RE.match(text, pos)
        if not m:
            raise ChallengeError(f"expected an auth scheme at offset {pos}")
        challenge = Challenge(m.group(0))
        pos = m.end()
        # the scheme is followed by spaces, then token68 or auth-params
        while pos < len(text) and text[pos] in " \t":
            pos += 1
        first_param = True
        while pos < len(text):
            pm = _PARAM_RE.match(text, pos)
            if pm:
                name = pm.group(1)
                value = _unquote(pm.group(2)) if pm.group(2) is not None else pm.group(3)
                challenge.params[name] = value
                pos = pm.end()
                first_param = False
                if pos < len(text) and text[pos] == ",":
                    # a comma either separates params or ends this challenge;
                    # look ahead: "token =" continues params, "token SP" starts a new one.
                    nxt = _PARAM_RE.match(text, pos + 1)
                    if nxt:
                        pos += 1
                        continue
                    pos += 1
                    break
                continue
            if first_param:
                t68 = _TOKEN68_RE.match(text, pos)
                if t68 and (t68.end() == len(text) or text[t68.end()] in ", \t"):
                    challenge.token68 = t68.group(0)
                    pos = t68.end()
                    break
            if text[pos] == ",":
                break
            raise ChallengeError(f"malformed auth-param at offset {pos}")
        challenges.append(challenge)
    return challenges


def format_challenges(challenges: list[Challenge]) -> str:
    return ", ".join(c.format() for c in challenges)


def point_at_mirror(header: str, token_url: str, client_prefix: str = "") -> str:
    """An upstream's challenge as the mirror's client must see it: every Bearer
    realm is the mirror's token endpoint, scopes name repositories as the
    client does (with its registry prefix); service and error stay."""
    try:
        parsed = parse_challenges(header)
    except ChallengeError:
        return header
    rewritten = []
    for c in parsed:
        if c.is_bearer and c.get("realm"):
            c = c.with_param("realm", token_url)
            scope = c.get("scope")
            if scope and client_prefix:
                c = c.with_param("scope", " ".join(_prefixed(text, client_prefix) for text in split_scopes(scope)))
        rewritten.append(c)
    return format_challenges(rewritten)


def bearer_realm(header: str) -> tuple[str, str | None] | None:
    """(realm, service) of the first Bearer challenge with an http(s) realm in a header value."""
    try:
        parsed = parse_challenges(header)
    except ChallengeError:
        return None
    for c in parsed:
        realm = c.get("realm")
        if c.is_bearer and realm and urlsplit(realm).scheme in ("http", "https"):
            return realm, c.get("service")
    return None


def _prefixed(text: str, client_prefix: str) -> str:
    scope = parse_scope(text)
    if scope is None or not scope.is_repository:
        return text  # the upstream's own words: relayed as they are
    return str(scope.renamed(client_prefix + scope.name))
