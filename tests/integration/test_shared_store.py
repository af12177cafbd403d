"""Several mirror processes on one bucket of a real S3 server (Ceph RGW on loopback).

Two mirrors with separate local cache directories share a bucket: a blob one
of them pulled is served by the other without a CDN request; a presigned
redirect to the object is followed by skopeo; a token one issued is accepted by
the other; a client the upstream refuses is refused by both though the blob is
in the bucket; an object corrupted in the bucket is never served as the blob and
is replaced; with the bucket down the mirrors keep serving and say so; two
concurrent pulls of one uncached blob through both make one CDN request.

Issue 17, item 12: an object replaced by someone with write access to the
bucket, with the mirror's metadata copied onto the other bytes, is never
handed out as a presigned URL, whole or in ranges, by the process that
uploaded it or by another, whether the key is the bucket's or hub_blob_secret.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.support.images import fresh_blob, make_big_layer, push_image, sha256_digest
from tests.support.mirror import Mirror
from tests.support.skopeo import skopeo

SERVICE = "registry.docker.io"
PREFIX = "hub"


@pytest.fixture(scope="module")
def bucket(ceph) -> str:
    name = "mirror-" + secrets.token_hex(4)
    ceph.make_bucket(name)
    return name


def store_options(ceph, bucket: str, cache: Path, **extra: str) -> dict[str, str]:
    return {"hub_cache_dir": str(cache), "hub_store_url": f"s3://{bucket}/{PREFIX}",
            "hub_store_endpoint": ceph.endpoint_url, "hub_store_addressing": "path", **extra}


def store_env(ceph) -> dict[str, str]:
    """The bucket's keys, as the standard AWS variables (never on the command line, never logged)."""
    return {"AWS_ACCESS_KEY_ID": ceph.access_key, "AWS_SECRET_ACCESS_KEY": ceph.secret_key}


@pytest.fixture(scope="module")
def blob_secret(tmp_path_factory) -> str:
    """The processes' own key (hub_blob_secret), not the bucket's: with it, a process presigns
    objects another one uploaded (their marks are made with a key the bucket does not hold)."""
    path = tmp_path_factory.mktemp("secret") / "blob-secret"
    path.write_text(secrets.token_hex(32))
    return str(path)


@pytest.fixture(scope="module")
def pair(upstream, ceph, bucket, blob_secret, tmp_path_factory):
    """Two mirror processes, separate local tiers, one bucket, one key."""
    work = tmp_path_factory.mktemp("shared")
    a = Mirror(work / "a", upstream, env=store_env(ceph), name="a",
               options=store_options(ceph, bucket, work / "cache-a", hub_blob_secret=blob_secret))
    b = Mirror(work / "b", upstream, env=store_env(ceph), name="b",
               options=store_options(ceph, bucket, work / "cache-b", hub_blob_secret=blob_secret))
    with a, b:
        yield a, b


def token(mirror: Mirror, repo: str, auth=None) -> str:
    r = httpx.get(f"{mirror.url}/token", params={"service": SERVICE, "scope": f"repository:{repo}:pull"}, auth=auth,
                  timeout=15)
    assert r.status_code == 200, r.text
    return r.json()["token"]


def get_blob(mirror: Mirror, repo: str, digest: str, bearer: str | None, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
    return httpx.get(f"{mirror.url}/v2/{repo}/blobs/{digest}", headers=headers, timeout=60, follow_redirects=True, **kw)


def test_a_blob_pulled_through_one_is_served_by_the_other_without_the_cdn(pair, upstream, ceph, bucket, tmp_path):
    a, b = pair
    digest, _ = fresh_blob(upstream, tmp_path, "team/s-shared", 6 * 1024 * 1024)
    first = get_blob(a, "team/s-shared", digest, token(a, "team/s-shared"))
    assert first.status_code == 200 and sha256_digest(first.content) == digest
    assert ceph.wait_for_blob(bucket, PREFIX, digest), "not uploaded to the bucket"
    before = upstream.cdn_gets(digest)
    second = get_blob(b, "team/s-shared", digest, token(b, "team/s-shared"))
    assert second.status_code == 200 and sha256_digest(second.content) == digest
    assert upstream.cdn_gets(digest) == before == 1
    metrics = httpx.get(f"{b.url}/_hub/metrics").text
    assert 'hub_cache_tier_hits_total{tier="shared"}' in metrics
    # and b's own local tier has it now
    again = get_blob(b, "team/s-shared", digest, token(b, "team/s-shared"))
    assert again.headers["x-hub-cache"] == "hit" and sha256_digest(again.content) == digest


def test_a_presigned_redirect_is_followed_by_skopeo(upstream, ceph, bucket, pair, blob_secret, tmp_path):
    a, _ = pair
    image = upstream.images["team/ociapp"]
    ref = f"docker://{a.host}/team/ociapp:1.0"
    warm = skopeo("copy", "--src-tls-verify=false", ref, f"dir:{tmp_path / 'warm'}")
    assert warm.returncode == 0, warm.stderr
    for layer in image["layer_digests"]:
        assert ceph.wait_for_blob(bucket, PREFIX, layer)
    options = store_options(ceph, bucket, tmp_path / "cache-c", hub_store_presign="true", hub_blob_secret=blob_secret)
    with Mirror(tmp_path / "c", upstream, options=options, env=store_env(ceph), name="c") as c:
        before = {d: upstream.cdn_gets(d) for d in image["layer_digests"]}
        # never read by c: presigned on the mark a made (the mark lands just after the object)
        assert eventually_presigned(ceph, c, "team/ociapp", image["layer_digests"][0], token(c, "team/ociapp"))
        result = skopeo("copy", "--src-tls-verify=false", f"docker://{c.host}/team/ociapp:1.0",
                        f"dir:{tmp_path / 'presigned'}")
        assert result.returncode == 0, result.stderr
        for layer in image["layer_digests"]:
            data = (tmp_path / "presigned" / layer[7:]).read_bytes()
            assert sha256_digest(data) == layer
        assert {d: upstream.cdn_gets(d) for d in image["layer_digests"]} == before  # the bucket sent them
        assert "X-Amz-Signature" not in c.log_text()


def test_a_token_issued_by_one_is_accepted_by_the_other(upstream, ceph, tmp_path):
    from hubrewrite.access.accounts import hash_password

    users = tmp_path / "users"
    users.write_text(f"ann:{hash_password('mirror-pw')}\n")
    name = "tokens-" + secrets.token_hex(4)
    ceph.make_bucket(name)
    mirrors = [Mirror(tmp_path / n, upstream, name=n, env=store_env(ceph),
                      options=store_options(ceph, name, tmp_path / f"cache-{n}", hub_users_file=str(users)))
               for n in ("one", "two")]
    with mirrors[0] as one, mirrors[1] as two:
        issued = token(one, "library/alpine", auth=("ann", "mirror-pw"))
        assert issued.startswith("hub1.")
        accept = [("Accept", upstream.images["library/alpine"]["media_type"])]
        r = httpx.get(f"{two.url}/v2/library/alpine/manifests/3.19",
                      headers=[("Authorization", f"Bearer {issued}"), *accept], timeout=15)
        assert r.status_code == 200 and r.headers["docker-content-digest"] == upstream.images["library/alpine"]["digest"]
        forged = issued[:-4] + ("AAAA" if not issued.endswith("AAAA") else "BBBB")
        r = httpx.get(f"{two.url}/v2/library/alpine/manifests/3.19",
                      headers=[("Authorization", f"Bearer {forged}"), *accept], timeout=15)
        assert r.status_code == 401


def test_a_refused_client_is_refused_by_both_though_the_blob_is_in_the_bucket(pair, upstream, ceph, bucket, tmp_path):
    a, b = pair
    secret = upstream.images["private/secret"]
    digest = secret["layer_digests"][0]
    alice = token(a, "private/secret", auth=("alice", upstream.users["alice"]))
    assert sha256_digest(get_blob(a, "private/secret", digest, alice).content) == digest
    assert ceph.wait_for_blob(bucket, PREFIX, digest)
    options = store_options(ceph, bucket, tmp_path / "cache-p", hub_store_presign="true")
    with Mirror(tmp_path / "p", upstream, options=options, env=store_env(ceph), name="p") as presigning:
        for mirror in (a, b, presigning):
            anonymous = token(mirror, "private/secret")
            for bearer in (anonymous, None):
                r = httpx.get(f"{mirror.url}/v2/private/secret/blobs/{digest}", timeout=30,
                              headers={"Authorization": f"Bearer {bearer}"} if bearer else {})
                assert r.status_code == 401, (mirror.url, r.status_code)
                assert digest[7:19] not in r.text and "location" not in r.headers


def test_a_corrupted_object_is_never_served_and_is_replaced(upstream, ceph, bucket, pair, tmp_path):
    a, _ = pair
    digest, _ = fresh_blob(upstream, tmp_path, "team/s-corrupt", 3 * 1024 * 1024)
    assert sha256_digest(get_blob(a, "team/s-corrupt", digest, token(a, "team/s-corrupt")).content) == digest
    assert ceph.wait_for_blob(bucket, PREFIX, digest)
    key = f"{PREFIX}/blobs/sha256/{digest[7:]}"
    ceph.client().put_object(Bucket=bucket, Key=key, Body=os.urandom(3 * 1024 * 1024))  # someone else's bytes
    for presign in ("false", "true"):
        options = store_options(ceph, bucket, tmp_path / f"cache-d-{presign}", hub_store_presign=presign)
        with Mirror(tmp_path / f"d-{presign}", upstream, options=options, env=store_env(ceph), name="d") as d:
            bearer = token(d, "team/s-corrupt")
            for attempt in range(3):  # a client retries a failed transfer, as docker and skopeo do
                try:
                    r = get_blob(d, "team/s-corrupt", digest, bearer)
                except httpx.HTTPError:
                    continue  # a transfer cut short: never the wrong bytes as a whole
                if r.status_code == 200:
                    assert sha256_digest(r.content) == digest, "the corrupted object was served"
                    break
            else:
                pytest.fail("no correct transfer after 3 tries")
    assert ceph.wait_for_blob(bucket, PREFIX, digest)
    body = ceph.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    assert sha256_digest(body) == digest, "the corrupted object was not replaced"


def test_the_bucket_down_the_mirror_serves_on_and_says_so(pair, upstream, ceph, tmp_path):
    a, _ = pair
    digest, _ = fresh_blob(upstream, tmp_path, "team/s-down", 1024 * 1024)
    ceph.stop_rgw()
    try:
        health = httpx.get(f"{a.url}/_hub/health", timeout=30).json()
        time.sleep(5.5)  # the health answer is remembered for a few seconds
        health = httpx.get(f"{a.url}/_hub/health", timeout=30).json()
        assert health["status"] == "degraded" and health["store"].startswith("unreachable"), health
        r = get_blob(a, "team/s-down", digest, token(a, "team/s-down"))
        assert r.status_code == 200 and sha256_digest(r.content) == digest  # from the upstream
        again = get_blob(a, "team/s-down", digest, token(a, "team/s-down"))
        assert again.status_code == 200 and again.headers["x-hub-cache"] == "hit"  # from the local tier
        assert "Traceback" not in a.log_text()
    finally:
        ceph.start_rgw()


def test_concurrent_pulls_of_one_uncached_blob_through_both_make_one_cdn_request(pair, upstream, tmp_path):
    a, b = pair
    digest, _ = fresh_blob(upstream, tmp_path, "team/s-race", 16 * 1024 * 1024)
    results = {}

    def pull(name: str, mirror: Mirror) -> None:
        r = get_blob(mirror, "team/s-race", digest, token(mirror, "team/s-race"))
        results[name] = (r.status_code, sha256_digest(r.content))

    threads = [threading.Thread(target=pull, args=(n, m)) for n, m in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == {"a": (200, digest), "b": (200, digest)}
    assert upstream.cdn_gets(digest) == 1


# ---------------------------------------------------------------- issue 17, item 12: the verified mark


def replace_keeping_metadata(ceph, bucket: str, digest: str) -> None:
    """What anyone with write access to the bucket can do: other bytes of the same size under
    the blob's key, with the metadata and type copied from the mirror's object."""
    s3, key = ceph.client(), f"{PREFIX}/blobs/sha256/{digest[7:]}"
    head = s3.head_object(Bucket=bucket, Key=key)
    assert head["Metadata"], "not the mirror's upload"
    s3.put_object(Bucket=bucket, Key=key, Body=os.urandom(head["ContentLength"]), ContentType=head["ContentType"],
                  Metadata=head["Metadata"])
    assert s3.head_object(Bucket=bucket, Key=key)["Metadata"] == head["Metadata"]


def redirect(mirror: Mirror, repo: str, digest: str, bearer: str, **headers: str) -> str:
    """Where the mirror's answer to a blob GET points (its Location), without following it."""
    request = httpx.Request("GET", f"{mirror.url}/v2/{repo}/blobs/{digest}",
                            headers={"Authorization": f"Bearer {bearer}", **headers})
    with httpx.Client(timeout=30) as client:
        r = client.send(request, stream=True)  # a transfer of a replaced object is cut short: unread
        r.close()
    # 502: the read of a replaced object failed its digest before the range was sent
    assert r.status_code in (200, 206, 307, 502), f"{digest} {headers}: {r.status_code}"
    return r.headers.get("location", "")


def eventually_presigned(ceph, mirror: Mirror, repo: str, digest: str, bearer: str) -> bool:
    """Presigned within a few seconds (the upload's mark lands just after the object does)."""
    deadline = time.monotonic() + 10
    while not redirect(mirror, repo, digest, bearer).startswith(ceph.endpoint_url):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.3)
    return True


@pytest.mark.parametrize("key", ["kept-in-bucket", "hub_blob_secret"])
def test_an_object_replaced_with_its_mark_copied_is_never_presigned(upstream, ceph, tmp_path, key):
    name = ceph.make_bucket("marks-" + secrets.token_hex(4))
    extra = {"hub_store_presign": "true"}
    if key == "hub_blob_secret":
        (tmp_path / "blob-secret").write_text(secrets.token_hex(32))
        extra["hub_blob_secret"] = str(tmp_path / "blob-secret")
    repo = f"team/s-marks-{key.replace('_', '-')}"
    layers = []
    for part in ("control", "whole", "ranged"):
        layers.append(tmp_path / f"{part}.tar")
        make_big_layer(layers[-1], 1024 * 1024, seed=os.urandom(8))
    control, whole, ranged = push_image(upstream, repo, "1", layers, media="oci")["layer_digests"]
    writer = Mirror(tmp_path / "w", upstream, options=store_options(ceph, name, tmp_path / "cache-w", **extra),
                    env=store_env(ceph), name="w")
    reader = Mirror(tmp_path / "r", upstream, options=store_options(ceph, name, tmp_path / "cache-r", **extra),
                    env=store_env(ceph), name="r")
    with writer, reader:
        tw, tr = token(writer, repo), token(reader, repo)
        for digest in (control, whole, ranged):
            assert sha256_digest(get_blob(writer, repo, digest, tw).content) == digest
            assert ceph.wait_for_blob(name, PREFIX, digest), "not uploaded"
        # what was verified is still presigned: by the process that uploaded it, and by another
        # one once it read the object whole, or at once with a mark it can trust
        assert eventually_presigned(ceph, writer, repo, control, tw), "the uploader does not presign"
        first = redirect(reader, repo, control, tr)
        assert first.startswith(ceph.endpoint_url) == (key == "hub_blob_secret"), first
        assert eventually_presigned(ceph, reader, repo, control, tr), "not presigned after a verified read"

        replace_keeping_metadata(ceph, name, whole)
        replace_keeping_metadata(ceph, name, ranged)
        for who, mirror, bearer in (("the uploader", writer, tw), ("the other process", reader, tr)):
            location = redirect(mirror, repo, whole, bearer)
            assert not location.startswith(ceph.endpoint_url), f"{who}: replaced object presigned"
            location = redirect(mirror, repo, ranged, bearer, Range="bytes=0-99")
            assert not location.startswith(ceph.endpoint_url), f"{who}: replaced object presigned (Range)"
        for mirror in (writer, reader):
            assert "Traceback" not in mirror.log_text()
