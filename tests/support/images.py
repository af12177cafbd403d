"""Build and push test images straight through the registry HTTP API.

No docker, no internet: an admin token from the token server, blob uploads
(monolithic PUT, or chunked PATCHes, both streamed from disk for big blobs),
then manifest PUTs.  Everything goes to ``Upstream.registry_url`` (distribution
directly, not through the edge).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import time
from pathlib import Path
from typing import Any, Iterator, Union
from urllib.parse import urljoin

import httpx
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from tests.support.upstream import Upstream

# media types
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"

ALL_MANIFEST_TYPES = [OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST]

IO_CHUNK = 1 << 20
MONOLITHIC_LIMIT = 64 << 20  # bigger blobs from files go up in PATCH chunks of this size
TIMEOUT = httpx.Timeout(120.0, connect=10.0)

BlobSource = Union[bytes, str, os.PathLike]


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_digest(path: str | os.PathLike) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(IO_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return "sha256:" + h.hexdigest(), size


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, indent=3, sort_keys=False).encode()


# ---------------------------------------------------------------- layers


def make_tar(files: dict[str, bytes | str], mtime: int = 1700000000) -> bytes:
    """A small deterministic tar archive (in memory) holding ``files``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        dirs = set()
        for name in sorted(files):
            parts = name.strip("/").split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    ti = tarfile.TarInfo(d)
                    ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, mtime
                    tf.addfile(ti)
            data = files[name].encode() if isinstance(files[name], str) else files[name]
            ti = tarfile.TarInfo(name.strip("/"))
            ti.size, ti.mode, ti.mtime = len(data), 0o644, mtime
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


class _PseudoRandom(io.RawIOBase):
    """``size`` deterministic pseudo-random bytes (AES-CTR keystream of ``seed``)."""

    def __init__(self, size: int, seed: bytes):
        key = hashlib.sha256(b"hub-rewrite big layer" + seed).digest()
        self._enc = Cipher(algorithms.AES(key), modes.CTR(b"\0" * 16)).encryptor()
        self._left = size
        self._zeros = bytes(IO_CHUNK)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        n = min(len(b), self._left, IO_CHUNK)
        if n <= 0:
            return 0
        b[:n] = self._enc.update(self._zeros[:n])
        self._left -= n
        return n


def make_big_layer(path: str | os.PathLike, size_bytes: int, seed: bytes | str = b"big") -> tuple[str, int]:
    """Write an (uncompressed) tar holding one file ``big.bin`` of ``size_bytes``
    pseudo-random bytes, streaming (constant memory).  Returns (digest, size)
    of the tar file; its digest is also its diff_id."""
    seed = seed.encode() if isinstance(seed, str) else seed
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT, bufsize=IO_CHUNK) as tf:
        ti = tarfile.TarInfo("big.bin")
        ti.size, ti.mode, ti.mtime = size_bytes, 0o644, 1700000000
        tf.addfile(ti, io.BufferedReader(_PseudoRandom(size_bytes, seed), buffer_size=IO_CHUNK))
    os.replace(tmp, path)
    return file_digest(path)


def fresh_blob(up: Upstream, directory: Path, repo: str, size: int) -> tuple[str, int]:
    """Push ``repo:1``, an OCI image whose one layer (``size`` pseudo-random bytes, in a tar) was
    never seen before; the layer's (digest, size)."""
    layer = Path(directory) / f"{repo.replace('/', '_')}-{time.monotonic_ns()}.tar"
    digest, size = make_big_layer(layer, size, seed=os.urandom(8))
    push_image(up, repo, "1", [layer], media="oci")
    return digest, size


# ---------------------------------------------------------------- HTTP


class Pusher:
    """Registry client with a per-repository admin token (pull,push)."""

    def __init__(self, up: Upstream, user: str = "admin"):
        self.up = up
        self.user = user
        self.client = httpx.Client(base_url=up.registry_url, timeout=TIMEOUT)
        self._tokens: dict[str, str] = {}

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "Pusher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _auth(self, repo: str) -> dict[str, str]:
        if repo not in self._tokens:
            self._tokens[repo] = self.up.get_token(f"repository:{repo}:pull,push", user=self.user)
        return {"Authorization": f"Bearer {self._tokens[repo]}"}

    def _request(self, method: str, url: str, repo: str, **kw: Any) -> httpx.Response:
        headers = {**kw.pop("headers", {}), **self._auth(repo)}
        r = self.client.request(method, url, headers=headers, **kw)
        if r.status_code == 401 and "content" not in kw:  # token expired: once more
            self._tokens.pop(repo, None)
            headers.update(self._auth(repo))
            r = self.client.request(method, url, headers=headers, **kw)
        return r

    @staticmethod
    def _check(r: httpx.Response, what: str, *ok: int) -> None:
        if r.status_code not in ok:
            raise RuntimeError(f"{what}: HTTP {r.status_code} {r.text[:500]}")

    def blob_exists(self, repo: str, digest: str) -> bool:
        r = self._request("HEAD", f"/v2/{repo}/blobs/{digest}", repo, follow_redirects=False)
        return r.status_code in (200, 307)

    def push_blob(self, repo: str, src: BlobSource, *, chunked: bool | None = None,
                  digest: str | None = None) -> str:
        """Upload a blob (bytes or a file path).  Returns its digest.

        Files are streamed (never loaded whole); files above 64 MiB go up in
        PATCH chunks unless ``chunked=False``.
        """
        if isinstance(src, bytes):
            digest = digest or sha256_digest(src)
            size = len(src)
        else:
            if digest is None:
                digest, size = file_digest(src)
            else:
                size = os.path.getsize(src)
        if self.blob_exists(repo, digest):
            return digest
        if chunked is None:
            chunked = not isinstance(src, bytes) and size > MONOLITHIC_LIMIT
        r = self._request("POST", f"/v2/{repo}/blobs/uploads/", repo, headers={"Content-Length": "0"})
        self._check(r, f"start upload {repo}", 202)
        location = urljoin(self.up.registry_url + "/", r.headers["Location"])

        def put(loc: str, content: Any, length: int) -> httpx.Response:
            sep = "&" if "?" in loc else "?"
            return self._request("PUT", f"{loc}{sep}digest={digest}", repo, content=content,
                                 headers={"Content-Type": "application/octet-stream",
                                          "Content-Length": str(length)})

        if isinstance(src, bytes):
            r = put(location, src, size)
        elif not chunked:
            r = put(location, _file_chunks(src, 0, size), size)
        else:
            offset = 0
            while offset < size:
                n = min(MONOLITHIC_LIMIT, size - offset)
                r = self._request("PATCH", location, repo, content=_file_chunks(src, offset, n), headers={
                    "Content-Type": "application/octet-stream", "Content-Length": str(n),
                    "Content-Range": f"{offset}-{offset + n - 1}"})
                self._check(r, f"PATCH chunk of {digest} to {repo}", 202)
                location = urljoin(self.up.registry_url + "/", r.headers["Location"])
                offset += n
            r = put(location, b"", 0)
        self._check(r, f"PUT blob {digest} to {repo}", 201)
        got = r.headers.get("Docker-Content-Digest")
        if got and got != digest:
            raise RuntimeError(f"registry stored {got}, expected {digest}")
        return digest

    def push_manifest(self, repo: str, ref: str, body: bytes, media_type: str) -> str:
        r = self._request("PUT", f"/v2/{repo}/manifests/{ref}", repo, content=body,
                          headers={"Content-Type": media_type})
        self._check(r, f"PUT manifest {repo}:{ref}", 201)
        digest = sha256_digest(body)
        if r.headers.get("Docker-Content-Digest") not in (None, digest):
            raise RuntimeError(f"manifest digest mismatch: {r.headers.get('Docker-Content-Digest')} != {digest}")
        return digest


def _file_chunks(path: BlobSource, offset: int, length: int) -> Iterator[bytes]:
    with open(path, "rb") as f:  # type: ignore[arg-type]
        f.seek(offset)
        left = length
        while left:
            chunk = f.read(min(IO_CHUNK, left))
            if not chunk:
                raise RuntimeError(f"{path} shrank while uploading")
            left -= len(chunk)
            yield chunk


# ---------------------------------------------------------------- helpers


def push_blob(up: Upstream, repo: str, path_or_bytes: BlobSource, **kw: Any) -> str:
    with Pusher(up) as p:
        return p.push_blob(repo, path_or_bytes, **kw)


LayerSpec = Union[bytes, dict, str, os.PathLike]


def _prepare_layer(spec: LayerSpec, media: str, compress: bool) -> dict[str, Any]:
    """-> {"source", "digest", "size", "diff_id", "media_type"}.

    ``spec``: dict name->content (a tar is built; gzip when ``compress``),
    bytes (an uncompressed tar; gzipped when ``compress``), or a path to an
    existing uncompressed tar (uploaded as is).
    """
    oci = media == "oci"
    if isinstance(spec, (str, os.PathLike)):
        digest, size = file_digest(spec)
        return {"source": Path(spec), "digest": digest, "size": size, "diff_id": digest,
                "media_type": OCI_LAYER if oci else DOCKER_LAYER}
    tar = make_tar(spec) if isinstance(spec, dict) else spec
    diff_id = sha256_digest(tar)
    if compress:
        blob = gzip.compress(tar, compresslevel=6, mtime=0)
        mt = OCI_LAYER_GZIP if oci else DOCKER_LAYER_GZIP
    else:
        blob, mt = tar, (OCI_LAYER if oci else DOCKER_LAYER)
    return {"source": blob, "digest": sha256_digest(blob), "size": len(blob), "diff_id": diff_id, "media_type": mt}


def _variant(arch: str) -> str | None:
    return {"arm64": "v8", "arm": "v7"}.get(arch)


def push_image(up: Upstream, repo: str, tag: str | None, layers: list[LayerSpec], media: str = "docker",
               arch: str = "amd64", *, compress: bool = True, labels: dict[str, str] | None = None,
               pusher: Pusher | None = None) -> dict[str, Any]:
    """Push one image (config + layers + manifest).  ``tag=None`` pushes by
    digest only (for index members).  Returns digest, manifest_bytes,
    media_type, size, config_digest, config_bytes, layer_digests,
    layer_sizes, diff_ids, arch, repo, tag."""
    if media not in ("docker", "oci"):
        raise ValueError("media must be 'docker' or 'oci'")
    own = pusher is None
    p = pusher or Pusher(up)
    try:
        prepared = [_prepare_layer(s, media, compress) for s in layers]
        variant = _variant(arch)
        config = {
            "architecture": arch,
            "os": "linux",
            **({"variant": variant} if variant else {}),
            "created": "2024-01-01T00:00:00Z",
            "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                       "Cmd": ["/bin/sh"], "Labels": dict(labels or {}, **{"hub-rewrite.test/repo": repo})},
            "rootfs": {"type": "layers", "diff_ids": [l["diff_id"] for l in prepared]},
            "history": [{"created": "2024-01-01T00:00:00Z", "created_by": f"hub-rewrite test layer {i}"}
                        for i in range(len(prepared))],
        }
        config_bytes = canonical_json(config)
        config_digest = p.push_blob(repo, config_bytes)
        for l in prepared:
            p.push_blob(repo, l["source"], digest=l["digest"])
        mt = OCI_MANIFEST if media == "oci" else DOCKER_MANIFEST
        manifest = {
            "schemaVersion": 2,
            "mediaType": mt,
            "config": {"mediaType": OCI_CONFIG if media == "oci" else DOCKER_CONFIG,
                       "size": len(config_bytes), "digest": config_digest},
            "layers": [{"mediaType": l["media_type"], "size": l["size"], "digest": l["digest"]} for l in prepared],
        }
        body = canonical_json(manifest)
        digest = p.push_manifest(repo, tag or sha256_digest(body), body, mt)
        return {"repo": repo, "tag": tag, "arch": arch, "digest": digest, "manifest_bytes": body,
                "media_type": mt, "size": len(body), "config_digest": config_digest,
                "config_bytes": config_bytes, "layer_digests": [l["digest"] for l in prepared],
                "layer_sizes": [l["size"] for l in prepared], "diff_ids": [l["diff_id"] for l in prepared]}
    finally:
        if own:
            p.close()


def push_index(up: Upstream, repo: str, tag: str, per_arch_images: list[dict[str, Any]], media: str = "docker",
               *, pusher: Pusher | None = None) -> dict[str, Any]:
    """Push a Docker manifest list / OCI index over already pushed images
    (results of ``push_image`` in the same repo).  Returns digest,
    manifest_bytes, media_type, size, manifests (the per-arch dicts)."""
    mt = OCI_INDEX if media == "oci" else DOCKER_LIST
    entries = []
    for img in per_arch_images:
        platform = {"architecture": img["arch"], "os": "linux"}
        if _variant(img["arch"]):
            platform["variant"] = _variant(img["arch"])
        entries.append({"mediaType": img["media_type"], "size": img["size"], "digest": img["digest"],
                        "platform": platform})
    body = canonical_json({"schemaVersion": 2, "mediaType": mt, "manifests": entries})
    own = pusher is None
    p = pusher or Pusher(up)
    try:
        digest = p.push_manifest(repo, tag, body, mt)
    finally:
        if own:
            p.close()
    return {"repo": repo, "tag": tag, "digest": digest, "manifest_bytes": body, "media_type": mt,
            "size": len(body), "manifests": {img["arch"]: img for img in per_arch_images}}


def _multiarch(up: Upstream, p: Pusher, repo: str, tag: str, media: str, name: str) -> dict[str, Any]:
    images = []
    for arch in ("amd64", "arm64"):
        files = {"etc/os-release": f"NAME={name}\nARCH={arch}\n",
                 f"bin/{name}": f"#!/bin/sh\necho {name} {arch}\n"}
        images.append(push_image(up, repo, None, [files, {f"usr/share/{name}/{arch}.txt": arch * 100}],
                                 media=media, arch=arch, pusher=p))
    return push_index(up, repo, tag, images, media=media, pusher=p)


def standard_images(up: Upstream, big_size: int = 256 * 1024 * 1024) -> dict[str, Any]:
    """Push the standard test set; returns ``{repo: info}`` where info has
    ``repo``, ``tag``, ``ref`` ("repo:tag"), ``digest``, ``media_type``,
    ``manifest_bytes``, ``size``, and either ``manifests`` (arch -> image
    info, for indexes) or ``config_digest``/``layer_digests``/... (images).

    * ``library/alpine:3.19``  Docker manifest list, amd64 + arm64 (docker schema2 images)
    * ``library/busybox:latest``  OCI index, amd64 + arm64 (OCI images)
    * ``team/ociapp:1.0``  single OCI image manifest, no index
    * ``private/secret:1.0``  Docker image; only alice (and admin) may pull
    * ``library/big:1.0``  Docker image with one uncompressed layer of ``big_size`` bytes
      (plus ``big_layer_digest``/``big_layer_size`` keys)
    """
    out: dict[str, Any] = {}
    with Pusher(up) as p:
        out["library/alpine"] = _multiarch(up, p, "library/alpine", "3.19", "docker", "alpine")
        out["library/busybox"] = _multiarch(up, p, "library/busybox", "latest", "oci", "busybox")
        out["team/ociapp"] = push_image(up, "team/ociapp", "1.0", [
            {"app/main.txt": "oci app\n"}, {"app/data/blob.bin": b"\x00\x01" * 4096}],
            media="oci", pusher=p)
        out["private/secret"] = push_image(up, "private/secret", "1.0", [{"secret.txt": "top secret\n"}],
                                           media="docker", pusher=p)
        big_path = up.workdir / f"big-{big_size}.tar"
        if big_path.exists():
            big_digest, big_len = file_digest(big_path)
        else:
            big_digest, big_len = make_big_layer(big_path, big_size)
        try:
            out["library/big"] = push_image(up, "library/big", "1.0", [big_path], media="docker", pusher=p)
        finally:
            big_path.unlink(missing_ok=True)  # the registry has its own copy
        out["library/big"].update(big_layer_digest=big_digest, big_layer_size=big_len)
    for info in out.values():
        info["ref"] = f"{info['repo']}:{info['tag']}"
    return out


def all_blob_digests(image_set: dict[str, Any]) -> set[str]:
    """Every config and layer digest in a ``standard_images`` result."""
    out: set[str] = set()
    for info in image_set.values():
        for img in (info.get("manifests") or {info["repo"]: info}).values():
            out.add(img["config_digest"])
            out.update(img["layer_digests"])
    return out
