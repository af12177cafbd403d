"""What a manifest names: an image's config and layers, an index's platform manifests."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

IMAGE_TYPES = frozenset({
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
})
INDEX_TYPES = frozenset({
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
})
MAX_ENTRIES = 1000  # a manifest naming more is read no further
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class Descriptor:
    digest: str
    size: int
    media_type: str


@dataclass(frozen=True)
class Contents:
    blobs: list[Descriptor]  # an image's config and layers (foreign layers, with their own URLs, left out)
    manifests: list[Descriptor]  # an index's platform manifests (attestations left out)


def contents(body: bytes, content_type: str) -> Contents | None:
    """None: not an image manifest or index, or not well formed."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict):
        return None
    media_type = content_type.split(";")[0].strip().lower() or str(doc.get("mediaType", ""))
    if media_type in IMAGE_TYPES or (not media_type and "layers" in doc):
        entries = [doc.get("config")] + _list(doc.get("layers"))
        return Contents([d for e in entries if not _foreign(e) and (d := _descriptor(e))], [])
    if media_type in INDEX_TYPES or (not media_type and "manifests" in doc):
        entries = [e for e in _list(doc.get("manifests")) if not _attestation(e)]
        return Contents([], [d for e in entries if (d := _descriptor(e))])
    return None


def _list(value: object) -> list:
    return value[:MAX_ENTRIES] if isinstance(value, list) else []


def _descriptor(entry: object) -> Descriptor | None:
    if not isinstance(entry, dict):
        return None
    digest, size, media_type = entry.get("digest"), entry.get("size"), entry.get("mediaType", "")
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest) or type(size) is not int or size < 0:
        return None
    return Descriptor(digest, size, media_type if isinstance(media_type, str) else "")


def _foreign(entry: object) -> bool:
    """A layer the registry does not hold (Windows base layers): fetched from its own URLs."""
    return isinstance(entry, dict) and bool(entry.get("urls"))


def _attestation(entry: object) -> bool:
    """buildkit's provenance and SBOM manifests: no client pulls them as a platform."""
    if not isinstance(entry, dict):
        return True
    annotations = entry.get("annotations")
    if isinstance(annotations, dict) and annotations.get("vnd.docker.reference.type") == "attestation-manifest":
        return True
    platform = entry.get("platform")
    return isinstance(platform, dict) and platform.get("os") == "unknown"
