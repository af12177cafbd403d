"""Looks for usable credentials in text a person could read (mitmweb's API, a saved flow).

    scan = CredentialScan(upstream, passwords={"alice": ..., "bob (mirror)": ...},
                          basic=[("alice", password)])
    scan.found(text)   # what was found, by kind: never the secret itself (a test report prints it)

What counts, and how each is recognised:

- a secret the upstream's token service issued (a JWT's signature, which is what makes it
  usable, or a refresh token): its sha256 is in the service's log (``issued_sha256``), and
  every run of base64url characters in the text is hashed and compared;
- a password, or a Basic credential carrying one, as given;
- a token the mirror sealed (``hub1.`` and its Fernet text);
- a signed URL: the blob listener's and the test CDN's ``signature=`` (64 hex digits), an S3
  presigned URL's ``X-Amz-Signature``;
- the mirror's loopback key (``X-Hub-Loopback-Key`` and 32 hex digits).
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable, Mapping
from io import BytesIO

from mitmproxy import http, io

_BASE64URL_RUN = re.compile(r"[A-Za-z0-9_-]{20,}")
_SEALED = re.compile(r"hub1\.[A-Za-z0-9_=-]{20,}")
_SIGNED_URL = re.compile(r"(?i)(?<![a-z])(signature|x-amz-signature)(=|%3D)[0-9a-f]{16,}")
_LOOPBACK_KEY = re.compile(r"(?i)x-hub-loopback-key\W{1,8}[0-9a-f]{32}")


class CredentialScan:
    def __init__(self, upstream, passwords: Mapping[str, str] = (), basic: Iterable[tuple[str, str]] = ()) -> None:
        self.upstream = upstream
        self.passwords = dict(passwords)
        self.basic = {f"Basic credentials of {user}": base64.b64encode(f"{user}:{password}".encode()).decode()
                      for user, password in basic}

    def issued(self) -> set[str]:
        """sha256 of every secret the upstream's token service handed out so far."""
        return {h for record in self.upstream.token_requests() for h in record.get("issued_sha256", ())}

    def found(self, text: str, issued: set[str] | None = None) -> list[str]:
        """The kinds of credential in ``text``, each once."""
        issued = self.issued() if issued is None else issued
        kinds = []
        runs = {m.group(0) for m in _BASE64URL_RUN.finditer(text)}
        if any(hashlib.sha256(run.encode()).hexdigest() in issued for run in runs):
            kinds.append("a JWT signature or refresh token the upstream issued")
        kinds += [f"password of {who}" for who, password in self.passwords.items() if password in text]
        kinds += [what for what, value in self.basic.items() if value in text]
        for kind, pattern in (("a sealed hub1. token", _SEALED), ("a signed URL's signature", _SIGNED_URL),
                              ("the loopback key", _LOOPBACK_KEY)):
            if pattern.search(text):
                kinds.append(kind)
        return kinds


def flow_texts(data: bytes) -> list[tuple[str, str]]:
    """(what, text) for each message of each flow in a saved-flows file (``-w``, ``/flows/dump``):
    its URL, headers and content, decoded (a compressed body is scanned as what it says)."""
    out = []
    reader = io.FlowReader(BytesIO(data))
    for flow in reader.stream():
        if not isinstance(flow, http.HTTPFlow):
            continue
        label = flow_label(flow.comment, flow.request.method, flow.request.path)
        out.append((f"{label}: request", _message_text(flow.request, flow.request.url)))
        if flow.response is not None:
            out.append((f"{label}: response", _message_text(flow.response, str(flow.response.status_code))))
        out.append((f"{label}: metadata", repr(flow.metadata) + flow.comment))
    return out


def flow_label(comment: str, method: str, path: str) -> str:
    """``client flow GET /token`` or ``side flow GET /token (token request to the token service)``:
    where a finding is, without the query (it may be what was found)."""
    path = path.split("?", 1)[0]
    if comment.startswith("hub side flow: "):
        return f"side flow {method} {path} ({comment[len('hub side flow: '):].split(',', 1)[0]})"
    return f"client flow {method} {path}"


def _message_text(message: http.Message, first_line: str) -> str:
    headers = "\n".join(f"{k}: {v}" for k, v in message.headers.items(multi=True))
    raw = message.raw_content or b""
    content = message.get_content(strict=False) or b""
    return f"{first_line}\n{headers}\n\n" + content.decode("latin-1") + "\n" + raw.decode("latin-1")

