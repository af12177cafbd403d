"""A full cache disk (issue 9, item 5): the mirror serves without caching.

The cache directory is a small tmpfs of its own, filled to the last byte by a
filler file.  Then manifests still answer 200 with the right digest (writing
the tag record and the manifest fails), a blob larger than the free space is
served whole and correct but not cached, nothing partial is left, the log has
no traceback, and health and metrics say the cache is full.  Once the filler
is removed, caching resumes.  Needs root (mount).
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.support.images import sha256_digest

from .helpers import INDEX_ACCEPT, anonymous_token, cache_blob_path, fresh_image, part_files

# big enough that, once freed, a blob download fits the mirror's free-space margin (64 MiB)
TMPFS_SIZE = "96m"
BIG_BLOB = 6 * 1024 * 1024


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """The module's cache directory (the conftest's mirror uses it) on a tmpfs of its own."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount_point = tmp_path_factory.mktemp("full-disk-cache")
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        # the mirror (which depends on this fixture) has stopped by now
        if subprocess.run(["umount", str(mount_point)]).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)])


def fill(directory: Path) -> Path:
    """Write a file until the file system refuses one more byte; its path."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (1 << 20, 1 << 12, 1):
            block = b"\0" * size
            try:
                while True:
                    f.write(block)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
    assert os.statvfs(directory).f_bavail == 0
    return filler


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def manifest_get(mirror, repo: str, ref: str, token: str, method: str = "GET") -> httpx.Response:
    return httpx.request(method, f"{mirror.url}/v2/{repo}/manifests/{ref}", timeout=30,
                         headers=[*auth(token).items()] + [("Accept", a) for a in INDEX_ACCEPT])


def metric(mirror, name: str) -> float:
    text = httpx.get(f"{mirror.url}/_hub/metrics", timeout=10).text
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m, f"no {name} in the metrics"
    return float(m.group(1))


def tmp_leftovers(cache_dir: Path) -> list[Path]:
    """Files in the cache's tmp/ (download locks exist only while their download runs)."""
    return list((cache_dir / "tmp").iterdir())


def test_full_disk_serves_without_caching_then_caching_resumes(mirror, upstream, cache_dir, tmp_path):
    big = fresh_image(upstream, tmp_path, "team/fulldisk-big", size=BIG_BLOB)
    later = fresh_image(upstream, tmp_path, "team/fulldisk-later")
    big_layer, big_size = big["layer_digests"][0], big["layer_sizes"][0]
    token = anonymous_token(mirror.url, "team/fulldisk-big")
    log_start = len(mirror.log_text())
    filler = fill(cache_dir)
    try:
        # manifests: by tag (the tag record cannot be written) and by digest, GET and HEAD
        for ref in ("1", big["digest"]):
            for method in ("GET", "HEAD"):
                r = manifest_get(mirror, "team/fulldisk-big", ref, token, method)
                assert r.status_code == 200, f"{method} manifest {ref} on a full disk: {r.status_code} {r.text[:300]}"
                assert r.headers.get("docker-content-digest") == big["digest"]
                if method == "GET":
                    assert sha256_digest(r.content) == big["digest"]
        assert not list((cache_dir / "manifests").rglob(big["digest"][7:])), "manifest cached on a full disk"

        # a blob larger than the free space: whole and correct, not cached, nothing partial left
        r = httpx.get(f"{mirror.url}/v2/team/fulldisk-big/blobs/{big_layer}", headers=auth(token),
                      timeout=30, follow_redirects=True)
        assert r.status_code == 200, r.text[:300]
        assert len(r.content) == big_size and sha256_digest(r.content) == big_layer, \
            f"blob on a full disk: {len(r.content)} of {big_size} bytes, digest {sha256_digest(r.content)}"
        assert not cache_blob_path(cache_dir, big_layer).exists(), "blob committed to a full disk"
        assert part_files(cache_dir) == [] and tmp_leftovers(cache_dir) == [], os.listdir(cache_dir / "tmp")

        health = httpx.get(f"{mirror.url}/_hub/health", timeout=10)
        assert health.status_code == 200, health.text  # degraded, still serving
        assert health.json().get("cache") == "full" and "without caching" in health.text, health.text
        assert metric(mirror, "hub_cache_writable") == 0
    finally:
        filler.unlink()
    assert "Traceback" not in mirror.log_text()[log_start:]

    # space again: the next pull is cached (manifest by tag, then its blob)
    token = anonymous_token(mirror.url, "team/fulldisk-later")
    r = manifest_get(mirror, "team/fulldisk-later", "1", token)
    assert r.status_code == 200 and r.headers.get("docker-content-digest") == later["digest"]
    layer = later["layer_digests"][0]
    r = httpx.get(f"{mirror.url}/v2/team/fulldisk-later/blobs/{layer}", headers=auth(token), timeout=30,
                  follow_redirects=True)
    assert r.status_code == 200 and sha256_digest(r.content) == layer
    assert list((cache_dir / "manifests").rglob(later["digest"][7:])), "manifest not cached after space was freed"
    assert cache_blob_path(cache_dir, layer).exists(), "blob not cached after space was freed"
    health = httpx.get(f"{mirror.url}/_hub/health", timeout=10).json()
    assert health.get("cache") == "writable", health
    assert metric(mirror, "hub_cache_writable") == 1
