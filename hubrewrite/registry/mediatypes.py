"""Manifest media types, and the Accept header as a registry reads it.

A registry picks what a tag answers with (an index, one image's manifest, a
legacy schema) from the manifest types the client's ``Accept`` names, not from
their order or parameters: two Accept headers naming the same types get the
same answer. So the cache keys a tag's lookups by that set, which also keeps
the number of variants small whatever a client sends.
"""

from __future__ import annotations

from collections.abc import Iterable

MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.oci.artifact.manifest.v1+json",
)


def accept_key(values: Iterable[str]) -> str:
    """The manifest types a set of Accept header values names, in a fixed order."""
    named = {part.split(";")[0].strip().lower() for value in values for part in value.split(",")}
    return ",".join(t for t in MANIFEST_TYPES if t in named)

INDEX_TYPES = frozenset({
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
})


def same_answer(seen_key: str, seen_type: str, key: str) -> bool:
    """Would a client accepting ``key`` get the manifest of type ``seen_type`` that a
    client accepting ``seen_key`` got for the same tag?

    Yes for the same types. Otherwise only when the tag's kind is known: an index
    answer means the tag is an index, which every client accepting that type
    gets; a single image given to a client that also accepted indexes means the
    tag is that image. A single image given to a client that did not accept
    indexes may be one platform picked from an index (distribution converts), so
    only the same types may have it.
    """
    if key == seen_key:
        return True
    accepted = set(key.split(",")) if key else set()
    if seen_type not in accepted:
        return False
    return seen_type in INDEX_TYPES or bool(INDEX_TYPES & set(seen_key.split(",")))
