"""Manifest media types, and the Accept header as a registry reads it.

A registry picks what a tag answers with (an index, one image's manifest, a
legacy schema) from the manifest types the client's ``Accept`` names, as they
were sent. distribution 2.8 compares them case-sensitively (measured: an index
type in upper case is no index type to it, so a tag's index comes back
converted to its amd64 manifest, and with no type it knows, as schema1),
ignores their order and parameters (``q=0`` included) and reads repeated
headers as one list. Docker Hub documents nothing of the kind. So the cache
keeps a tag's answer under exactly what decided it: the manifest-type entries
of the Accept (named in any case, and wildcards) as sent, case and parameters
kept; only the spaces around them and their order are normalized. Other types
decide nothing and are left out, which also keeps the number of variants of a
tag small whatever a client sends.

An answer is remembered for an Accept only when its media type is one that
Accept asked for, and served in stale mode only to an Accept asking for it
(``asks_for``, ``same_answer``): "asked for" means named exactly (in the case
every registry knows), not refused with ``q=0``, with well-formed parameters.
"""

from __future__ import annotations

import re
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

INDEX_TYPES = frozenset({
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
})

# keys of an earlier format (lower-cased, parameters dropped) carry no prefix: never matched
KEY_PREFIX = "accept:"
# longer Accept keys (huge parameters) are not kept: a tag's record stays small
MAX_KEY_LENGTH = 1024

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_PARAMETER = re.compile(rf'^{_TOKEN}=(?:{_TOKEN}|"[^"\\]*")$')
_Q_VALUE = re.compile(r"^[qQ]=(.*)$")
_QVALUE = re.compile(r"^(?:0(?:\.\d{0,3})?|1(?:\.0{0,3})?)$")


def accept_key(values: Iterable[str]) -> str | None:
    """What in these Accept header values decides a tag's answer, as one string; None when
    too long to keep."""
    entries = {entry for value in values for part in value.split(",") if (entry := _entry(part))}
    key = KEY_PREFIX + ",".join(sorted(entries))
    return key if len(key) <= MAX_KEY_LENGTH else None


def _entry(part: str) -> str | None:
    """A manifest type (in any case) or a wildcard with its parameters, as sent but for spaces;
    None for anything else."""
    media_type, *parameters = (p.strip() for p in part.split(";"))
    if media_type.lower() not in MANIFEST_TYPES and "*" not in media_type:
        return None
    return ";".join([media_type, *(re.sub(r"\s*=\s*", "=", p) for p in parameters)])


def _asked(key: str) -> frozenset[str]:
    """The media types an Accept key asks for: named exactly, not refused, parameters well-formed."""
    if not key.startswith(KEY_PREFIX):
        return frozenset()
    asked = set()
    for entry in filter(None, key[len(KEY_PREFIX):].split(",")):
        media_type, *parameters = entry.split(";")
        if all(_PARAMETER.match(p) for p in parameters) and all(_acceptable(p) for p in parameters):
            asked.add(media_type)
    return frozenset(asked)


def _acceptable(parameter: str) -> bool:
    """Not a q-value of 0 (refused, where a registry reads q) nor a malformed one."""
    q = _Q_VALUE.match(parameter)
    return q is None or (bool(_QVALUE.match(q.group(1))) and float(q.group(1)) > 0)


def asks_for(key: str, media_type: str) -> bool:
    """Did the Accept of this key ask for an answer of this media type?"""
    return media_type in _asked(key)


def same_answer(seen_key: str, seen_type: str, key: str) -> bool:
    """Would a client whose Accept has ``key`` get the manifest of type ``seen_type`` that a
    client whose Accept had ``seen_key`` got for the same tag?

    Never unless ``key`` asks for ``seen_type``. Then yes for the same key.
    Otherwise only when the tag's kind is known: an index answer means the tag
    is that index (no registry turns a manifest into one), which every client
    asking for its type gets; a single image given to a client that asked for
    both index types means the tag is that image. A single image given to a
    client that did not ask for both may be one platform picked from an index
    (distribution converts a Docker list, refuses an OCI index), so only the
    same key may have it.
    """
    asked = _asked(key)
    if seen_type not in asked or not seen_key.startswith(KEY_PREFIX):
        return False
    if key == seen_key or seen_type in INDEX_TYPES:
        return True
    return INDEX_TYPES <= _asked(seen_key)
