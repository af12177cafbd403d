"""The registry API's URL space: which route a path is, and whether it is valid.

Grammar from the distribution spec (reference/regexp.go in distribution 2.8):
repository names are lower-case path components, tags are at most 128
characters, digests are ``algorithm:hex``. Anything else is refused before a
byte goes upstream, so traversal tricks such as ``/v2/../../etc/passwd`` or
``%2e%2e`` never reach a registry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from .errors import RegistryError

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
DIGEST_RE = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[A-Za-z0-9=_-]+")
MAX_NAME_LENGTH = 255
# a registry host as containerd names it in ?ns=: host name or IP, optional port
REGISTRY_HOST_RE = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*(?::[0-9]{1,5})?", re.I)
# The only algorithms the mirror can verify; others are refused as invalid.
DIGEST_HEX_LENGTHS = {"sha256": 64, "sha512": 128}
_HEX_RE = re.compile(r"[0-9a-f]+")
# /v2/<name>/blobs/uploads/ and /v2/<name>/blobs/uploads/<session id>
_UPLOAD_RE = re.compile(r"(.+)/blobs/uploads/([A-Za-z0-9_=-]*)")


class RouteKind(Enum):
    """Which registry API route a /v2/ path is (distribution's routes)."""

    BASE = "base"  # /v2/
    MANIFEST = "manifest"  # /v2/<name>/manifests/<tag|digest>
    BLOB = "blob"  # /v2/<name>/blobs/<digest>
    UPLOAD = "upload"  # /v2/<name>/blobs/uploads/...
    TAGS = "tags"  # /v2/<name>/tags/list
    REFERRERS = "referrers"  # /v2/<name>/referrers/<digest> (OCI 1.1)
    CATALOG = "catalog"  # /v2/_catalog


@dataclass(frozen=True)
class Route:
    kind: RouteKind
    name: str = ""
    reference: str = ""  # tag or digest; for uploads, the rest of the path

    @property
    def is_digest(self) -> bool:
        return ":" in self.reference

    def path(self) -> str:
        """The /v2/ path this route stands for (query not included)."""
        match self.kind:
            case RouteKind.BASE:
                return "/v2/"
            case RouteKind.CATALOG:
                return "/v2/_catalog"
            case RouteKind.MANIFEST:
                return f"/v2/{self.name}/manifests/{self.reference}"
            case RouteKind.BLOB:
                return f"/v2/{self.name}/blobs/{self.reference}"
            case RouteKind.UPLOAD:
                return f"/v2/{self.name}/blobs/uploads/{self.reference}"
            case RouteKind.TAGS:
                return f"/v2/{self.name}/tags/list"
            case RouteKind.REFERRERS:
                return f"/v2/{self.name}/referrers/{self.reference}"
        raise AssertionError(self.kind)


def validate_name(name: str) -> None:
    if len(name) > MAX_NAME_LENGTH:
        raise RegistryError(400, "NAME_INVALID", f"repository name longer than {MAX_NAME_LENGTH} characters")
    if not NAME_RE.fullmatch(name):
        raise RegistryError(400, "NAME_INVALID", "invalid repository name")


def validate_digest(digest: str) -> None:
    if not DIGEST_RE.fullmatch(digest):
        raise RegistryError(400, "DIGEST_INVALID", "invalid digest")
    algorithm, hex_part = digest.split(":", 1)
    expected = DIGEST_HEX_LENGTHS.get(algorithm)
    if expected is None:
        raise RegistryError(400, "DIGEST_INVALID", f"unsupported digest algorithm {algorithm!r}")
    if len(hex_part) != expected or not _HEX_RE.fullmatch(hex_part):
        raise RegistryError(400, "DIGEST_INVALID", f"invalid {algorithm} digest")


def validate_reference(reference: str) -> None:
    """A manifest reference is a tag or a digest; anything else (or nothing) names no manifest.

    The spec's only failure for a manifest GET, HEAD or PUT is 404 (end-3, end-7), and
    distribution's router answers 404 to a reference outside its grammar: so the
    mirror says MANIFEST_UNKNOWN itself, and nothing goes upstream. (A blob or
    referrers digest stays DIGEST_INVALID: distribution and, for referrers, the
    spec answer those with 400.)
    """
    if ":" not in reference:
        if not TAG_RE.fullmatch(reference):
            raise _no_such_manifest("not a valid tag")
        return
    try:
        validate_digest(reference)
    except RegistryError as e:
        raise _no_such_manifest(e.message) from None


def _no_such_manifest(why: str) -> RegistryError:
    return RegistryError(404, "MANIFEST_UNKNOWN", f"manifest unknown: {why}")


def parse_route(path: str) -> Route:
    """Parse the raw (still percent-encoded) path of a request, without query.

    Raises RegistryError for anything outside the API's grammar.
    """
    if not path.startswith("/v2/") and path != "/v2":
        raise RegistryError(404, "UNSUPPORTED", "not a registry API path")
    if "%" in path or "\\" in path:
        # Nothing in the API grammar is ever percent-encoded; an encoded
        # character is an attempt to smuggle '/', '.' or a control byte.
        raise RegistryError(400, "NAME_INVALID", "percent-encoded characters are not allowed in registry paths")
    if path in ("/v2", "/v2/"):
        return Route(RouteKind.BASE)
    rest = path[len("/v2/"):]
    if rest == "_catalog":
        return Route(RouteKind.CATALOG)
    upload = _UPLOAD_RE.fullmatch(rest)
    if upload:
        # the one route that may end in '/': starting an upload
        validate_name(upload.group(1))
        return Route(RouteKind.UPLOAD, upload.group(1), upload.group(2))
    segments = rest.split("/")
    # a manifest route's last segment is its reference, which validate_reference judges
    in_name = segments[:-1] if len(segments) >= 3 and segments[-2] == "manifests" else segments
    if any(s in ("", ".", "..") for s in in_name):
        raise RegistryError(400, "NAME_INVALID", "empty or relative path segments are not allowed")

    if len(segments) >= 3 and segments[-2] == "tags" and segments[-1] == "list":
        name = "/".join(segments[:-2])
        validate_name(name)
        return Route(RouteKind.TAGS, name)
    if len(segments) >= 3 and segments[-2] in ("manifests", "blobs", "referrers"):
        name = "/".join(segments[:-2])
        validate_name(name)
        reference = segments[-1]
        if segments[-2] == "manifests":
            validate_reference(reference)
            return Route(RouteKind.MANIFEST, name, reference)
        validate_digest(reference)
        kind = RouteKind.BLOB if segments[-2] == "blobs" else RouteKind.REFERRERS
        return Route(kind, name, reference)
    raise RegistryError(404, "UNSUPPORTED", "unknown registry API path")


def official_name(name: str, prefix: str) -> str:
    """Docker Hub keeps official images under ``library/``: ``nginx`` is ``library/nginx``."""
    if not prefix or not name or "/" in name:
        return name
    return f"{prefix}/{name}"

