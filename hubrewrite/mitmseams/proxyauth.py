"""The proxy password mitmproxy's proxyauth addon keeps in ``flow.metadata``.

Relies on: proxyauth's ``flow.metadata["proxyauth"]``, the ``(user, password)`` it
accepted from a client's ``Proxy-Authorization`` (and copies to every later flow of
that connection).
Why: the addon keeps it there for other addons, undocumented; saved flows (``-w``,
mitmweb's /flows/dump) keep it too, so the mirror's records replace the password
with its fingerprint (debug/redact.py).
"""

from __future__ import annotations

from mitmproxy import http

METADATA_KEY = "proxyauth"


def accepted_login(flow: http.HTTPFlow) -> tuple[str, str] | None:
    """The (user, password) proxyauth accepted for this flow's connection, if it did."""
    accepted = flow.metadata.get(METADATA_KEY)
    if isinstance(accepted, (tuple, list)) and len(accepted) == 2 and isinstance(accepted[1], str):
        return accepted[0], accepted[1]
    return None


def replace_accepted_password(flow: http.HTTPFlow, password: str) -> None:
    """Keep ``password`` in place of the one proxyauth accepted (its user unchanged)."""
    accepted = accepted_login(flow)
    if accepted is not None:
        flow.metadata[METADATA_KEY] = (accepted[0], password)
