"""Plain-text summaries of registry manifests and indexes, for people reading traffic.

``describe(doc, media_type)`` returns None when ``doc`` does not have the shape
of its media type; the content view then steps aside and mitmproxy shows the
body as JSON or raw text.
"""

from __future__ import annotations

from typing import Any

from hubrewrite.debug.text import plain, size

DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_IMAGE = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_IMAGE = "application/vnd.oci.image.manifest.v1+json"

TITLES = {
    DOCKER_LIST: "Docker manifest list",
    DOCKER_IMAGE: "Docker image manifest",
    DOCKER_SCHEMA1: "Docker schema 1 manifest",
    DOCKER_SCHEMA1_SIGNED: "Docker schema 1 manifest, signed",
    OCI_INDEX: "OCI image index",
    OCI_IMAGE: "OCI image manifest",
}
MANIFEST_TYPES = frozenset(TITLES)

# short names for the media types of index entries
_ENTRY_KINDS = {DOCKER_IMAGE: "docker image", OCI_IMAGE: "oci image", OCI_INDEX: "oci index",
                DOCKER_LIST: "docker list"}

# buildkit marks its provenance/SBOM manifests in an index this way
_REFERENCE_TYPE = "vnd.docker.reference.type"
_REFERENCE_DIGEST = "vnd.docker.reference.digest"


def media_type_of(doc: Any, content_type: str | None) -> str | None:
    """The manifest type: the Content-Type if it names one, else the body's
    ``mediaType``, else guessed from the body's shape (OCI makes ``mediaType`` optional)."""
    if content_type in MANIFEST_TYPES:
        return content_type
    if not isinstance(doc, dict):
        return None
    declared = doc.get("mediaType")
    if isinstance(declared, str) and declared in MANIFEST_TYPES:
        return declared
    if doc.get("schemaVersion") == 1:
        return DOCKER_SCHEMA1_SIGNED if "signatures" in doc else DOCKER_SCHEMA1
    if isinstance(doc.get("manifests"), list):
        return OCI_INDEX
    if isinstance(doc.get("config"), dict) and isinstance(doc.get("layers"), list):
        return OCI_IMAGE
    return None


def describe(doc: Any, media_type: str) -> str | None:
    if not isinstance(doc, dict) or media_type not in MANIFEST_TYPES:
        return None
    if media_type in (DOCKER_LIST, OCI_INDEX):
        body = _index(doc)
    elif media_type in (DOCKER_IMAGE, OCI_IMAGE):
        body = _image(doc)
    else:
        body = _schema1(doc)
    if body is None:
        return None
    head = [f"{TITLES[media_type]} ({media_type})"]
    declared = doc.get("mediaType")
    if declared is not None and declared != media_type:
        head.append(f"! the body says mediaType {plain(declared)}")
    return "\n".join(head + [""] + body + _annotations(doc.get("annotations")) + _subject(doc))


def _index(doc: dict[str, Any]) -> list[str] | None:
    entries = doc.get("manifests")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        return None
    platforms = {e["digest"]: _platform(e.get("platform")) for e in entries if isinstance(e.get("digest"), str)}
    # per group: (label, entry, lines under the entry)
    groups: dict[str, list[tuple[str, dict[str, Any], list[str]]]] = {
        "platforms": [], "attestations": [], "other manifests": []}
    for e in entries:
        target = _attested_digest(e)
        if target is not None:
            groups["attestations"].append((f"of {platforms.get(target) or '?'}", e, [f"attests {target}"]))
        elif platform := _platform(e.get("platform")):
            groups["platforms"].append((platform, e, []))
        else:
            groups["other manifests"].append(("(no platform)", e, []))
    lines = _artifact_type(doc)
    for title, rows in groups.items():
        if rows:
            lines.append(f"{title} ({len(rows)}):")
            width = max(len(label) for label, _, _ in rows)
            for label, e, notes in rows:
                lines.append(f"  {label:<{width}}  {_entry(e)}")
                lines += [f"  {'':<{width}}  {note}" for note in notes]
    if not entries:
        lines.append("no manifests")
    return lines


def _attested_digest(entry: dict[str, Any]) -> str | None:
    """The digest a buildkit attestation manifest is about; None for other entries."""
    annotations = entry.get("annotations")
    if not isinstance(annotations, dict) or annotations.get(_REFERENCE_TYPE) != "attestation-manifest":
        return None
    return plain(annotations.get(_REFERENCE_DIGEST))


def _platform(platform: Any) -> str:
    """``os/arch[/variant]`` (plus ``os.version`` when given, as on Windows)."""
    if not isinstance(platform, dict):
        return ""
    parts = [platform.get("os"), platform.get("architecture"), platform.get("variant")]
    text = "/".join(plain(p) for p in parts if p)
    if platform.get("os.version"):
        text += f" {plain(platform['os.version'])}"
    return text


def _entry(descriptor: dict[str, Any]) -> str:
    kind = descriptor.get("mediaType")
    short = _ENTRY_KINDS.get(kind) if isinstance(kind, str) else None
    return f"{_size(descriptor.get('size'))}  {plain(descriptor.get('digest'))}  {short or plain(kind)}"


def _image(doc: dict[str, Any]) -> list[str] | None:
    config, layers = doc.get("config"), doc.get("layers")
    if not isinstance(config, dict) or not isinstance(layers, list) or not all(isinstance(l, dict) for l in layers):
        return None
    lines = _artifact_type(doc) + [f"config: {_descriptor(config)}", f"layers ({len(layers)}):"]
    for layer in layers:
        lines.append(f"  {_descriptor(layer)}")
        lines += ["    " + line for line in _annotations(layer.get("annotations"))]
    sizes = [d.get("size") for d in (config, *layers)]
    if all(_is_size(s) for s in sizes):
        layer_count = "1 layer" if len(layers) == 1 else f"{len(layers)} layers"
        lines.append(f"total (config and {layer_count}): {size(sum(sizes))}")
    return lines


def _schema1(doc: dict[str, Any]) -> list[str] | None:
    fs_layers = doc.get("fsLayers")
    if not isinstance(fs_layers, list) or not all(isinstance(l, dict) for l in fs_layers):
        return None
    lines = [f"{field}: {plain(doc.get(field))}" for field in ("name", "tag", "architecture")]
    lines.append(f"fsLayers ({len(fs_layers)}, newest first):")
    lines += [f"  {plain(l.get('blobSum'))}" for l in fs_layers]
    history = doc.get("history")
    if isinstance(history, list):
        lines.append(f"history: {len(history)} entries")
    signatures = doc.get("signatures")
    if isinstance(signatures, list):
        algs = sorted({plain(s.get("header", {}).get("alg")) for s in signatures
                       if isinstance(s, dict) and isinstance(s.get("header"), dict)})
        lines.append(f"signatures: {len(signatures)} ({', '.join(algs)}), not verified here")
    return lines


def _descriptor(d: dict[str, Any]) -> str:
    return f"{_size(d.get('size'))}  {plain(d.get('digest'))}  {plain(d.get('mediaType'))}"


def _artifact_type(doc: dict[str, Any]) -> list[str]:
    return [f"artifact type: {plain(doc['artifactType'])}"] if "artifactType" in doc else []


def _subject(doc: dict[str, Any]) -> list[str]:
    """OCI 1.1 referrers: the manifest this one is about (a signature, an SBOM ...)."""
    subject = doc.get("subject")
    if not isinstance(subject, dict):
        return []
    return [f"subject (this manifest refers to): {_descriptor(subject)}"]


def _annotations(annotations: Any) -> list[str]:
    if not isinstance(annotations, dict) or not annotations:
        return []
    return ["annotations:"] + [f"  {plain(k)}: {plain(v)}" for k, v in annotations.items()]


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _size(value: Any) -> str:
    return size(value) if _is_size(value) else f"size {plain(value)}"
