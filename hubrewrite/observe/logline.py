"""One log line per client request: who, what, outcome. Never a header, query or body.

The same facts go to the text line and, for ``hub_log_format: json``, to the
fields of its JSON object (``observe/logformat.py``).
"""

from __future__ import annotations


def pull_log_line(
    client: str, upstream: str, method: str, kind: str, repository: str, reference: str,
    status: int | str, size: int, seconds: float, cache: str,
) -> str:
    """One line per client request: who, what, outcome. Never a header, query or body."""
    if not repository:
        what = kind  # /v2/, token, ...
    elif reference.startswith("sha256:"):
        what = f"{kind} {repository}@{reference}"
    else:
        what = f"{kind} {repository}:{reference}" if reference else f"{kind} {repository}"
    return f"pull client={client} upstream={upstream} {method} {what} status={status} bytes={size} time={seconds:.3f}s cache={cache or '-'}"


def pull_fields(
    client: str, upstream: str, method: str, kind: str, repository: str, reference: str,
    status: int | str, size: int, seconds: float, cache: str,
) -> dict[str, object]:
    """The line's facts as JSON fields (the same ones: nothing the line leaves out)."""
    return {"event": "pull", "client": client, "upstream": upstream, "method": method, "kind": kind,
            "repository": repository or None, "reference": reference or None, "status": status, "bytes": size,
            "seconds": round(seconds, 3), "cache": cache or None}
