"""What requests leave in the cache directory (issue 17, item 3).

The cache directory is a small tmpfs of its own with few inodes (``nr_inodes``),
as in the issue. Blob requests for digests the upstream does not have (404,
an anonymous token is enough), whole, ``Range`` and ``HEAD``, leave no file
at all; a download's lock file goes when the download ends; lock and
``.download`` files no live process holds are removed when a mirror starts,
while one a live process holds stays (and keeps excluding); and with no inode
left an uncached blob is served whole and correct without caching (health
says the cache is full) until inodes are free again. Needs root (mount).

What requests for content the upstream has leave (tag records, membership
records, manifests, blobs) is bounded by ``hub_cache_max_files``: an anonymous
client resolving a hundred tags of one image leaves the cache within it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.support.images import Pusher, sha256_digest
from tests.support.mirror import Mirror

from .helpers import UPSTREAM_TIMEOUT, anonymous_token, assert_registry_error, cache_blob_path, fresh_image

INODES = 600  # the tmpfs: 650 requests of unknown digests used them all
REQUESTS = 100


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """The module's cache directory (the conftest's mirror uses it) on a tmpfs with few inodes."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount_point = tmp_path_factory.mktemp("few-inodes-cache")
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size=96m,nr_inodes={INODES}", "tmpfs", str(mount_point)],
                   check=True)
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)]).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)])


def all_files(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*")}


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_blob_requests_for_unknown_digests_leave_no_file(mirror, upstream, cache_dir):
    token = anonymous_token(mirror.url, "team/unknown-digests")
    before = all_files(cache_dir)
    with httpx.Client(base_url=mirror.url, headers=auth(token), timeout=30) as client:
        for i in range(REQUESTS):
            digest = "sha256:" + secrets.token_hex(32)
            method, headers = [("GET", {}), ("GET", {"Range": "bytes=0-9"}), ("HEAD", {})][i % 3]
            r = client.request(method, f"/v2/team/unknown-digests/blobs/{digest}", headers=headers)
            if method == "HEAD":
                assert r.status_code == 404, f"HEAD {digest}: {r.status_code}"
            else:
                assert_registry_error(r, (404,), f"{method} {headers} {digest}")
    left = sorted(all_files(cache_dir) - before)
    assert left == [], f"{len(left)} files left by {REQUESTS} requests of unknown digests, e.g. {left[:5]}"


def test_a_download_leaves_no_lock_file(mirror, upstream, cache_dir, tmp_path):
    image = fresh_image(upstream, tmp_path, "team/lock-left", size=1024 * 1024)
    token = anonymous_token(mirror.url, "team/lock-left")
    layer = image["layer_digests"][0]
    r = httpx.get(f"{mirror.url}/v2/team/lock-left/blobs/{layer}", headers=auth(token), timeout=30)
    assert r.status_code == 200 and sha256_digest(r.content) == layer, r.text[:300]
    assert cache_blob_path(cache_dir, layer).exists(), "not cached"
    assert sorted(os.listdir(cache_dir / "tmp")) == [], "left in tmp/ after the download ended"


def hold_lock(path: Path) -> subprocess.Popen:
    """Another process holding an flock on ``path`` (as a mirror downloading does) until killed."""
    code = ("import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR, 0o600)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('held', flush=True)\n"
            "time.sleep(600)\n")
    holder = subprocess.Popen(["python3", "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_stale_lock_and_download_files_are_removed_at_start_but_not_a_held_one(upstream, cache_dir, tmp_path):
    tmp = cache_dir / "tmp"
    stale_lock, orphan, held = (secrets.token_hex(32) for _ in range(3))
    (tmp / f"{stale_lock}.lock").write_bytes(b"1234")  # a crashed download's lock...
    (tmp / f"{stale_lock}.download").write_bytes(b"x" * 1000)  # ...and its file
    (tmp / f"{orphan}.download").write_bytes(b"y" * 1000)  # a file without its lock
    (tmp / f"{held}.download").write_bytes(b"z" * 1000)
    holder = hold_lock(tmp / f"{held}.lock")
    try:
        options = {"hub_cache_dir": str(cache_dir), "hub_upstream_timeout": str(UPSTREAM_TIMEOUT)}
        with Mirror(tmp_path / "second", upstream, options=options, name="second") as second:
            left = sorted(os.listdir(tmp))
            assert left == [f"{held}.download", f"{held}.lock"], f"after a mirror started on the cache: {left}"
            assert "Traceback" not in second.log_text()
        # the held lock still excludes: nobody else can take it
        fd = os.open(tmp / f"{held}.lock", os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    finally:
        holder.kill()
        holder.wait()
    for name in os.listdir(tmp):
        (tmp / name).unlink()


def fill_inodes(directory: Path) -> Path:
    """Create empty files until the file system has no inode left; the folder holding them."""
    filler = directory / "filler"
    filler.mkdir()
    for i in range(INODES * 2):
        try:
            (filler / str(i)).touch()
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
            break
    else:
        pytest.fail("the tmpfs never ran out of inodes")
    assert os.statvfs(directory).f_favail == 0
    return filler


def empty(filler: Path) -> None:
    for p in filler.iterdir():
        p.unlink()
    filler.rmdir()


def test_with_no_inode_left_an_uncached_blob_is_served_without_caching(mirror, upstream, cache_dir, tmp_path):
    image = fresh_image(upstream, tmp_path, "team/no-inodes", size=2 * 1024 * 1024)
    later = fresh_image(upstream, tmp_path, "team/no-inodes-later", size=1024 * 1024)
    layer, later_layer = image["layer_digests"][0], later["layer_digests"][0]
    token = anonymous_token(mirror.url, "team/no-inodes")
    log_start = len(mirror.log_text())
    filler = fill_inodes(cache_dir)
    try:
        for _ in range(2):  # the second time too: nothing the first left behind stands in the way
            r = httpx.get(f"{mirror.url}/v2/team/no-inodes/blobs/{layer}", headers=auth(token), timeout=30,
                          follow_redirects=True)
            assert r.status_code == 200, f"no inode left: {r.status_code} {r.text[:300]}"
            assert sha256_digest(r.content) == layer, "wrong bytes with no inode left"
        assert not cache_blob_path(cache_dir, layer).exists()
        health = httpx.get(f"{mirror.url}/_hub/health", timeout=10)
        assert health.status_code == 200 and health.json().get("cache") == "full", health.text
    finally:
        empty(filler)
    assert "Traceback" not in mirror.log_text()[log_start:]

    later_token = anonymous_token(mirror.url, "team/no-inodes-later")
    r = httpx.get(f"{mirror.url}/v2/team/no-inodes-later/blobs/{later_layer}", headers=auth(later_token), timeout=30)
    assert r.status_code == 200 and sha256_digest(r.content) == later_layer
    assert cache_blob_path(cache_dir, later_layer).exists(), "not cached once inodes were free again"
    assert httpx.get(f"{mirror.url}/_hub/health", timeout=10).json().get("cache") == "writable"


MAX_FILES = 40
TAGS = 100


def counted_files(cache: Path) -> int:
    """What hub_cache_max_files counts: the files of blobs, manifests and records, and the
    repository folders."""
    files = [p for sub in ("blobs", "manifests", "tags", "repos") for p in (cache / sub).rglob("*")
             if (p.is_file() and p.name != ".lock") or p.parent.name == "repos"]
    return len(files)


def test_records_of_many_tags_stay_within_the_file_limit(upstream, tmp_path):
    image = fresh_image(upstream, tmp_path, "team/many-tags")
    with Pusher(upstream) as p:
        for i in range(TAGS):
            p.push_manifest("team/many-tags", f"t{i}", image["manifest_bytes"], image["media_type"])
    cache = tmp_path / "cache"
    options = {"hub_cache_dir": str(cache), "hub_upstream_timeout": str(UPSTREAM_TIMEOUT),
               "hub_cache_max_files": str(MAX_FILES)}
    with Mirror(tmp_path / "limited", upstream, options=options, name="limited") as limited:
        token = anonymous_token(limited.url, "team/many-tags")
        with httpx.Client(base_url=limited.url, headers=auth(token), timeout=30) as client:
            for i in range(TAGS):
                r = client.head(f"/v2/team/many-tags/manifests/t{i}", headers={"Accept": image["media_type"]})
                assert r.status_code == 200 and r.headers.get("docker-content-digest") == image["digest"]
            for digest in (image["config_digest"], *image["layer_digests"]):
                assert sha256_digest(client.get(f"/v2/team/many-tags/blobs/{digest}").content) == digest
        deadline = time.monotonic() + 10
        while counted_files(cache) > MAX_FILES and time.monotonic() < deadline:
            time.sleep(0.2)  # the limit is kept by a scan in a thread of its own
        assert counted_files(cache) <= MAX_FILES, f"{counted_files(cache)} files for a limit of {MAX_FILES}"
        r = httpx.head(f"{limited.url}/v2/team/many-tags/manifests/t{TAGS - 1}", headers={
            **auth(token), "Accept": image["media_type"]}, timeout=30)
        assert r.status_code == 200, "the mirror still serves"
        assert "Traceback" not in limited.log_text()
