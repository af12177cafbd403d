"""What the fake Docker Hub saw: deltas of its JSON-lines access logs (CDN,
edge, token server), and the counts a benchmark reports from them."""

from __future__ import annotations

import re
import time
from typing import Any, Callable

MANIFEST_RE = re.compile(r"^/v2/.+/manifests/[^/]+$")
BLOB_RE = re.compile(r"^/v2/.+/blobs/[^/]+$")


class LogCursor:
    """Deltas of one of the fake Hub's JSON-lines access logs."""

    def __init__(self, read: Callable[..., list[dict[str, Any]]]) -> None:
        self.read = read
        self.pos = len(read())

    def take(self, settle: float = 0.4, timeout: float = 10.0) -> list[dict[str, Any]]:
        """New records since the last take, once the log stopped growing for ``settle`` s
        (the CDN writes its record only after the body was sent)."""
        deadline = time.monotonic() + timeout
        n = len(self.read())
        while time.monotonic() < deadline:
            time.sleep(settle)
            m = len(self.read())
            if m == n:
                break
            n = m
        recs = self.read()
        new, self.pos = recs[self.pos:], len(recs)
        return new


def count_upstream(cdn: list[dict[str, Any]], edge: list[dict[str, Any]], tokens: list[dict[str, Any]]) -> dict[str, Any]:
    blob_gets = [r for r in cdn if r.get("method") == "GET"]
    per_path: dict[str, int] = {}
    for r in blob_gets:
        per_path[r["path"]] = per_path.get(r["path"], 0) + 1

    def edge_count(method: str, regex: re.Pattern) -> int:
        return sum(1 for r in edge if r.get("method") == method and regex.match(r.get("path", "")))

    manifest_get, manifest_head = edge_count("GET", MANIFEST_RE), edge_count("HEAD", MANIFEST_RE)
    blob_get, blob_head = edge_count("GET", BLOB_RE), edge_count("HEAD", BLOB_RE)
    return {
        "cdn_requests": len(cdn),
        "cdn_gets": len(blob_gets),
        "cdn_bytes": sum(int(r.get("bytes") or 0) for r in cdn),
        "cdn_statuses": sorted({r.get("status") for r in cdn}, key=str),
        "cdn_max_gets_per_blob": max(per_path.values(), default=0),
        "cdn_distinct_blobs": len(per_path),
        "edge_requests": len(edge),
        "edge_manifest_get": manifest_get,
        "edge_manifest_head": manifest_head,
        "edge_blob_get": blob_get,
        "edge_blob_head": blob_head,
        "edge_other": len(edge) - manifest_get - manifest_head - blob_get - blob_head,
        "token_requests": len(tokens),
    }
