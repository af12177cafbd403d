"""The two images the blob benchmarks push to the fake Docker Hub.

* ``bench/big:1.0``: OCI image, one uncompressed layer of ``size_mib`` MiB of
  pseudo-random data (written to disk, pushed, deleted: the registry keeps its copy);
* ``bench/multi:1.0``: Docker manifest list, amd64 + arm64, each image with two
  uncompressed random layers (4 MiB and 1 MiB) and its config.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from harness import log
from tests.support.images import make_big_layer, push_image, push_index
from tests.support.upstream import Upstream

BIG = ("bench/big", "1.0")
MULTI = ("bench/multi", "1.0")
MULTI_LAYERS = (4 << 20, 1 << 20)  # per arch


def image_blobs(images: list[dict[str, Any]]) -> dict[str, int]:
    """digest -> size of every config and layer of some pushed images."""
    out: dict[str, int] = {}
    for img in images:
        out[img["config_digest"]] = len(img["config_bytes"])
        out.update(zip(img["layer_digests"], img["layer_sizes"]))
    return out


def push_images(up: Upstream, workdir: Path, size_mib: int) -> dict[str, Any]:
    """Push both images; returns ``{"big": info, "multi": info}`` (repo, tag, blobs, sizes)."""
    t0 = time.monotonic()
    layer = workdir / "layer.tar"
    log(f"writing a {size_mib} MiB layer")
    digest, size = make_big_layer(layer, size_mib << 20, seed=b"bench-cache")
    log(f"layer {digest} ({size} bytes) written ({time.monotonic() - t0:.1f}s); pushing {BIG[0]}:{BIG[1]}")
    try:
        big = push_image(up, BIG[0], BIG[1], [layer], media="oci")
    finally:
        layer.unlink(missing_ok=True)  # the registry has its own copy
    arch_images = []
    for arch in ("amd64", "arm64"):
        layers = [{f"data/{arch}-{i}.bin": os.urandom(n)} for i, n in enumerate(MULTI_LAYERS)]
        arch_images.append(push_image(up, MULTI[0], None, layers, media="docker", arch=arch, compress=False))
    index = push_index(up, MULTI[0], MULTI[1], arch_images, media="docker")
    log(f"pushed both images ({time.monotonic() - t0:.1f}s)")
    out = {
        "big": {"repo": BIG[0], "tag": BIG[1], "multi": False, "manifest_digest": big["digest"],
                "blobs": image_blobs([big]), "layer_digest": digest, "layer_size": size, "manifests": 1},
        "multi": {"repo": MULTI[0], "tag": MULTI[1], "multi": True, "manifest_digest": index["digest"],
                  "blobs": image_blobs(arch_images), "manifests": 1 + len(arch_images)},
    }
    for info in out.values():
        info["blob_bytes"] = sum(info["blobs"].values())
    return out
