"""hubrewrite/cache/bucket.py against a real S3 server (the ``ceph`` fixture: Ceph 16 RGW),
and its option parsing (bucket_config.py) without one."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import threading
import time
import tracemalloc

import httpx
import pytest

from hubrewrite.cache.bucket import Bucket, BucketError
from hubrewrite.cache.bucket_config import BucketConfig, BucketConfigError
from hubrewrite.cache.shared import SharedStore
from hubrewrite.observe.metrics import Metrics

MiB = 1 << 20
SECRET_LOOKING = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzzSECRET"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- options, no server


@pytest.fixture
def no_aws_files(tmp_path, monkeypatch):
    """boto3 must not find this machine's own ~/.aws files or keys."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))


def parse(url="s3://cache-bucket", environ=None, **kw) -> BucketConfig:
    return BucketConfig.parse(url, environ={} if environ is None else environ, **kw)


def test_config_url_endpoint_region_addressing():
    c = parse("s3://cache-bucket//hub/a.b_c-d/", endpoint="https://s3.example.com:8443/", addressing="PATH")
    assert (c.bucket, c.prefix, c.endpoint_url, c.addressing_style) == (
        "cache-bucket", "hub/a.b_c-d", "https://s3.example.com:8443", "path")
    assert c.region == "us-east-1" and c.credentials_source == "boto3 default chain"
    c = parse("s3://cache.bucket", environ={"AWS_DEFAULT_REGION": "eu-west-1"})
    assert (c.prefix, c.endpoint_url, c.region, c.addressing_style) == ("", None, "eu-west-1", "auto")
    assert parse(environ={"AWS_REGION": "eu-central-1", "AWS_DEFAULT_REGION": "x"}).region == "eu-central-1"
    assert parse(region="ap-south-1", environ={"AWS_REGION": "eu-central-1"}).region == "ap-south-1"


@pytest.mark.parametrize("url, message", [
    ("", "s3://bucket"),
    ("https://cache-bucket/x", "s3://bucket"),
    ("s3://", "not a valid bucket name"),
    ("s3://ab", "not a valid bucket name"),
    ("s3://Cache", "not a valid bucket name"),
    ("s3://cache_bucket", "not a valid bucket name"),
    ("s3://cache..bucket", "not a valid bucket name"),
    ("s3://192.168.1.10", "not a valid bucket name"),
    ("s3://cache-bucket/a/../b", "'..'"),
    ("s3://cache-bucket/a b", "not allowed"),
    ("s3://cache-bucket?versionId=1", "no query"),
    (f"s3://AKIAEXAMPLE:{SECRET_LOOKING}@cache-bucket/x", "must not carry credentials"),
    (f"s3://AKIAEXAMPLE:{SECRET_LOOKING}", "the bucket name is not a valid bucket name"),
])
def test_config_bad_urls(url, message):
    with pytest.raises(BucketConfigError, match=re.escape(message)) as e:
        parse(url)
    assert SECRET_LOOKING not in str(e.value) and "AKIAEXAMPLE" not in str(e.value)


@pytest.mark.parametrize("options, message", [
    ({"endpoint": "127.0.0.1:7480"}, "https://host[:port]"),
    ({"endpoint": "ftp://host"}, "https://host[:port]"),
    ({"endpoint": "http://host:99999"}, "not a valid URL"),
    ({"endpoint": "http://host/bucket"}, "no path"),
    ({"endpoint": f"http://key:{SECRET_LOOKING}@host"}, "must not carry credentials"),
    ({"addressing": "dns"}, "addressing style must be one of auto, path, virtual"),
    ({"region": "US East"}, "not a region name"),
])
def test_config_bad_options(options, message):
    with pytest.raises(BucketConfigError, match=re.escape(message)) as e:
        parse(**options)
    assert SECRET_LOOKING not in str(e.value)


def test_config_credentials_from_environment():
    c = parse(environ={"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": SECRET_LOOKING,
                       "AWS_SESSION_TOKEN": "tok-" + SECRET_LOOKING})
    assert (c.access_key, c.secret_key, c.session_token) == ("AKIAEXAMPLE", SECRET_LOOKING, "tok-" + SECRET_LOOKING)
    assert c.credentials_source == "environment"
    for text in (repr(c), str(c)):
        assert SECRET_LOOKING not in text and "AKIAEXAMPLE" not in text
    with pytest.raises(BucketConfigError, match="must be set together"):
        parse(environ={"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE"})
    c = parse(environ={"AWS_PROFILE": "team"})
    assert (c.profile, c.access_key, c.credentials_source) == ("team", None, "profile team")


def test_config_credentials_file(tmp_path):
    path = tmp_path / "credentials"
    path.write_text("[default]\naws_access_key_id = AKIADEFAULT\naws_secret_access_key = " + SECRET_LOOKING + "\n"
                    "[mirror]\naws_access_key_id = AKIAMIRROR\naws_secret_access_key = s2\naws_session_token = t2\n")
    c = parse(credentials_file=str(path))
    assert (c.access_key, c.secret_key, c.session_token) == ("AKIADEFAULT", SECRET_LOOKING, None)
    assert c.credentials_source == f"credentials file {path} [default]"
    c = parse(credentials_file=str(path), environ={"AWS_PROFILE": "mirror", "AWS_ACCESS_KEY_ID": "ignored",
                                                   "AWS_SECRET_ACCESS_KEY": "ignored"})
    assert (c.access_key, c.secret_key, c.session_token) == ("AKIAMIRROR", "s2", "t2")
    # AWS_SHARED_CREDENTIALS_FILE is read the same way, after explicit environment keys
    c = parse(environ={"AWS_SHARED_CREDENTIALS_FILE": str(path)})
    assert c.access_key == "AKIADEFAULT"
    assert parse(environ={"AWS_SHARED_CREDENTIALS_FILE": str(path), "AWS_ACCESS_KEY_ID": "AKIAENV",
                          "AWS_SECRET_ACCESS_KEY": "x"}).access_key == "AKIAENV"


@pytest.mark.parametrize("content, message", [
    (None, "cannot read the credentials file"),
    (f"aws_secret_access_key = {SECRET_LOOKING}\n", "is not an INI file"),
    ("[other]\naws_access_key_id = a\naws_secret_access_key = b\n", "has no [default] section"),
    (f"[default]\naws_secret_access_key = {SECRET_LOOKING}\n", "needs both aws_access_key_id"),
])
def test_config_bad_credentials_file(tmp_path, content, message):
    path = tmp_path / "credentials"
    if content is not None:
        path.write_text(content)
    with pytest.raises(BucketConfigError, match=re.escape(message)) as e:
        parse(credentials_file=str(path))
    assert SECRET_LOOKING not in str(e.value)


def test_unknown_profile_is_a_config_error(no_aws_files):
    with pytest.raises(BucketConfigError, match="AWS profile 'nobody' is not configured"):
        Bucket(parse(environ={"AWS_PROFILE": "nobody"}))


def test_no_credentials_anywhere_is_a_bucket_error(no_aws_files, monkeypatch):
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role lookup
    with Bucket(parse(endpoint="http://127.0.0.1:9")) as b:
        with pytest.raises(BucketError, match="no S3 credentials found"):
            b.blob_size("sha256:" + "0" * 64)
        assert b.check_reachable() == (False, "check bucket cache-bucket: no S3 credentials found")


@pytest.mark.parametrize("digest", [
    "sha256:" + "A" * 64, "sha256:" + "a" * 63, "sha512:" + "a" * 128, "a" * 64, "sha256:../../etc", None])
def test_malformed_digests_are_refused(digest, tmp_path):
    b = Bucket(parse(endpoint="http://127.0.0.1:9", environ={"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}))
    with b:
        for call in (lambda: b.blob_size(digest), lambda: b.open_blob(digest),
                     lambda: b.presigned_blob_url(digest, 60), lambda: b.get_manifest(digest)):
            with pytest.raises(ValueError, match="expected a digest like sha256"):
                call()


# ---------------------------------------------------------------- against Ceph RGW


@pytest.fixture(scope="module")
def bucket_name(ceph):
    return ceph.make_bucket("hub-bucket-tests")


def make_bucket(ceph, bucket_name, prefix, **kw) -> Bucket:
    config = BucketConfig.parse(f"s3://{bucket_name}/{prefix}", endpoint=ceph.endpoint_url, addressing="path",
                                environ={"AWS_ACCESS_KEY_ID": ceph.access_key,
                                         "AWS_SECRET_ACCESS_KEY": ceph.secret_key})
    return Bucket(config, **kw)


@pytest.fixture
def prefix(request):
    """Each test's objects under their own prefix."""
    return "t/" + request.node.name.replace("[", "-").replace("]", "").replace("/", "-")[:80]


@pytest.fixture
def bucket(ceph, bucket_name, prefix):
    with make_bucket(ceph, bucket_name, prefix) as b:
        yield b


@pytest.fixture
def raw(ceph):
    """A plain boto3 client: to look at or tamper with objects behind the module's back."""
    return ceph.client()


def key_of(prefix, *parts):
    return "/".join([prefix, *parts])


def test_big_blob_multipart_with_bounded_memory(ceph, bucket_name, prefix, raw, tmp_path):
    size = 64 * MiB
    src = tmp_path / "blob"
    h = hashlib.sha256()
    with open(src, "wb") as f:
        for _ in range(size // MiB):
            chunk = os.urandom(MiB)
            h.update(chunk)
            f.write(chunk)
    digest = "sha256:" + h.hexdigest()
    with make_bucket(ceph, bucket_name, prefix, part_size=5 * MiB, upload_concurrency=2) as b:
        assert b.blob_size(digest) is None
        tracemalloc.start()
        try:
            b.upload_blob(digest, src)
            _, upload_peak = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            (tmp_path / "copy").write_bytes(b"")
            with b.open_blob(digest) as stream, open(tmp_path / "copy", "wb") as out:
                for chunk in stream:
                    out.write(chunk)
            _, download_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert b.blob_size(digest) == size
    # (upload_concurrency + 1) parts of 5 MiB at most: far below the file's 64 MiB
    assert upload_peak < 16 * MiB, upload_peak
    assert download_peak < 8 * MiB, download_peak
    head = raw.head_object(Bucket=bucket_name, Key=key_of(prefix, "blobs", "sha256", digest[7:]))
    assert head["ETag"].strip('"').endswith("-13")  # a multipart object of 13 parts
    assert head["ContentType"] == "application/octet-stream"
    assert hashlib.sha256((tmp_path / "copy").read_bytes()).hexdigest() == digest[7:]


def test_small_blob_single_put_and_head(bucket, bucket_name, prefix, raw, tmp_path):
    data = os.urandom(100_000)
    (tmp_path / "b").write_bytes(data)
    bucket.upload_blob(digest_of(data), tmp_path / "b")
    assert bucket.blob_size(digest_of(data)) == 100_000
    head = raw.head_object(Bucket=bucket_name, Key=key_of(prefix, "blobs", "sha256", digest_of(data)[7:]))
    assert "-" not in head["ETag"]
    assert bucket.blob_size(digest_of(b"other")) is None
    assert bucket.open_blob(digest_of(b"other")) is None
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    bucket.upload_blob(digest_of(b""), empty)
    assert bucket.stat_blob(digest_of(b"")).size == 0 and bucket.stat_blob(digest_of(b"")).marked


@pytest.mark.parametrize("size", [1000, 12 * MiB], ids=["single-put", "multipart"])
def test_upload_refuses_a_file_that_does_not_match(bucket, bucket_name, raw, tmp_path, size):
    data = os.urandom(size)
    (tmp_path / "b").write_bytes(data)
    wrong = digest_of(data + b"x")
    with pytest.raises(ValueError, match="does not hash to"):
        bucket.upload_blob(wrong, tmp_path / "b")
    assert bucket.blob_size(wrong) is None
    assert raw.list_multipart_uploads(Bucket=bucket_name).get("Uploads", []) == []


def test_open_blob_whole_and_ranges(bucket, tmp_path):
    data = os.urandom(3 * MiB + 17)
    (tmp_path / "b").write_bytes(data)
    d = digest_of(data)
    bucket.upload_blob(d, tmp_path / "b")
    with bucket.open_blob(d) as s:
        assert (s.size, s.length) == (len(data), len(data))
        chunks = list(s)
    assert b"".join(chunks) == data and max(len(c) for c in chunks) <= MiB
    with bucket.open_blob(d, 1000, 5000) as s:
        assert (s.size, s.length) == (len(data), 5000)
        assert b"".join(s) == data[1000:6000]
    with bucket.open_blob(d, len(data) - 10) as s:
        assert b"".join(s) == data[-10:] and s.length == 10
    with bucket.open_blob(d, len(data) - 10, 1000) as s:  # clipped at the end, as HTTP ranges are
        assert b"".join(s) == data[-10:]
    with pytest.raises(ValueError, match="past the end"):
        bucket.open_blob(d, len(data))
    with pytest.raises(ValueError):
        bucket.open_blob(d, -1)
    assert bucket.open_blob(digest_of(b"absent")) is None


def test_presigned_url_full_range_and_expiry(ceph, bucket, tmp_path):
    data = os.urandom(2 * MiB)
    (tmp_path / "b").write_bytes(data)
    d = digest_of(data)
    bucket.upload_blob(d, tmp_path / "b")
    url = bucket.presigned_blob_url(d, 60)
    assert ceph.secret_key not in url and url.startswith(ceph.endpoint_url + "/")
    with httpx.Client() as client:  # no credentials of any kind: the URL alone
        full = client.get(url)
        assert full.status_code == 200 and full.content == data
        part = client.get(url, headers={"Range": "bytes=10-19"})
        assert part.status_code == 206 and part.content == data[10:20]
        short = bucket.presigned_blob_url(d, 1)
        assert client.get(short).status_code == 200
        time.sleep(2.2)
        assert client.get(short).status_code == 403
    with pytest.raises(ValueError):
        bucket.presigned_blob_url(d, 0)
    with pytest.raises(ValueError):
        bucket.presigned_blob_url(d, 8 * 24 * 3600)


def test_an_overwritten_blob_loses_its_verified_mark_and_can_be_deleted(bucket, bucket_name, prefix, raw, tmp_path):
    data = os.urandom(300_000)
    (tmp_path / "b").write_bytes(data)
    d = digest_of(data)
    bucket.upload_blob(d, tmp_path / "b")
    key = key_of(prefix, "blobs", "sha256", d[7:])
    assert bucket.stat_blob(d).marked  # stored by upload_blob
    raw.put_object(Bucket=bucket_name, Key=key, Body=b"X" + data[1:])  # same size, other bytes
    assert not bucket.stat_blob(d).marked  # not ours any more: never handed out presigned
    bucket.delete_blob(d)  # what the mirror does when its download of it does not match
    assert bucket.blob_size(d) is None
    assert raw.list_objects_v2(Bucket=bucket_name, Prefix=key).get("KeyCount") == 0


@pytest.mark.parametrize("size", [1000, 12 * MiB], ids=["single-put", "multipart"])
def test_upload_and_read_report_the_objects_etag(ceph, bucket_name, prefix, raw, tmp_path, size):
    data = os.urandom(size)
    (tmp_path / "b").write_bytes(data)
    d = digest_of(data)
    with make_bucket(ceph, bucket_name, prefix, part_size=5 * MiB) as b:
        stored = b.upload_blob(d, tmp_path / "b")
        stat = b.stat_blob(d)
        assert stored.etag and stored.etag == stat.etag and stat.size == stored.size == size and stat.marked
        with b.open_blob(d) as stream:
            assert stream.etag == stat.etag
        key = key_of(prefix, "blobs", "sha256", d[7:])
        head = raw.head_object(Bucket=bucket_name, Key=key)
        # other bytes with the metadata copied: the mark is there, the ETag is not the same
        raw.put_object(Bucket=bucket_name, Key=key, Body=os.urandom(size), Metadata=head["Metadata"])
        copied = b.stat_blob(d)
        assert copied.marked and copied.size == size and copied.etag != stored.etag


def test_a_marked_object_is_presigned_only_for_the_etag_this_process_verified(ceph, bucket_name, prefix, raw,
                                                                             tmp_path):
    data = os.urandom(300_000)
    (tmp_path / "b").write_bytes(data)
    d = digest_of(data)
    key = key_of(prefix, "blobs", "sha256", d[7:])

    async def check() -> None:
        uploader, other = (SharedStore(make_bucket(ceph, bucket_name, prefix), 60, Metrics()) for _ in range(2))
        keyed = SharedStore(make_bucket(ceph, bucket_name, prefix), 60, Metrics())
        uploader.use_mark_key(b"k" * 32)
        keyed.use_mark_key(b"k" * 32)
        other.use_mark_key(None)  # the key is the bucket's: marks prove nothing
        await uploader.upload(d, tmp_path / "b")
        stat = await other.blob(d)
        assert await uploader.presignable(d, stat) and await keyed.presignable(d, stat)
        assert not await other.presignable(d, stat)
        other.verified_read(d, stat.etag)  # it read the object whole, and it matched
        assert await other.presignable(d, stat)
        head = raw.head_object(Bucket=bucket_name, Key=key)
        raw.put_object(Bucket=bucket_name, Key=key, Body=os.urandom(len(data)), Metadata=head["Metadata"])
        replaced = keyed.bucket.stat_blob(d)
        for shared in (uploader, keyed, other):
            assert not await shared.presignable(d, replaced)
        for shared in (uploader, keyed, other):
            await shared.close()

    asyncio.run(check())


def test_a_presigned_url_of_a_version_serves_that_version(ceph, tmp_path):
    name = ceph.make_bucket("hub-versioned")
    ceph.client().put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    data = os.urandom(100_000)
    (tmp_path / "b").write_bytes(data)
    d = digest_of(data)
    with make_bucket(ceph, name, "v") as b:
        stored = b.upload_blob(d, tmp_path / "b")
        assert stored.version and b.stat_blob(d).version == stored.version
        url = b.presigned_blob_url(d, 60, stored.version)
        ceph.client().put_object(Bucket=name, Key=f"v/blobs/sha256/{d[7:]}", Body=b"replaced")
        assert b.stat_blob(d).version != stored.version
        assert httpx.get(url).content == data  # the version checked, not what replaced it
        assert httpx.get(b.presigned_blob_url(d, 60)).content == b"replaced"


def test_a_wrong_object_forgotten_then_uploaded_again_ends_verified(ceph, bucket_name, prefix, raw, tmp_path):
    """What the mirror does when a client's read of a tampered object fails and the client
    retries at once: the delete of the wrong object and the good upload must not cross
    (the upload seeing the wrong object and skipping, or the delete landing after it)."""
    data = os.urandom(3 * MiB)
    (tmp_path / "b").write_bytes(data)
    d = digest_of(data)
    key = key_of(prefix, "blobs", "sha256", d[7:])

    async def tamper_forget_upload() -> None:
        raw.delete_object(Bucket=bucket_name, Key=key)
        shared = SharedStore(make_bucket(ceph, bucket_name, prefix), 0, Metrics())
        await shared.upload(d, tmp_path / "b")
        raw.put_object(Bucket=bucket_name, Key=key, Body=os.urandom(3 * MiB))  # someone else's bytes
        assert not (await shared.blob(d)).marked
        shared.forget(d)  # the read did not match: the delete runs in the background
        await shared.upload(d, tmp_path / "b")  # the retry's download, verified
        await shared.close()

    for _ in range(3):
        asyncio.run(tamper_forget_upload())
        head = raw.head_object(Bucket=bucket_name, Key=key)
        assert raw.get_object(Bucket=bucket_name, Key=key)["Body"].read() == data
        assert head["Metadata"], "not the mirror's verified upload"


def test_an_unverified_object_is_replaced_by_the_verified_upload(ceph, bucket_name, prefix, raw, tmp_path):
    data = os.urandom(200_000)
    (tmp_path / "b").write_bytes(data)
    d = digest_of(data)
    key = key_of(prefix, "blobs", "sha256", d[7:])
    raw.put_object(Bucket=bucket_name, Key=key, Body=data)  # right bytes, but no one checked them

    async def upload() -> None:
        shared = SharedStore(make_bucket(ceph, bucket_name, prefix), 0, Metrics())
        await shared.upload(d, tmp_path / "b")
        assert (await shared.blob(d)).marked
        await shared.close()

    asyncio.run(upload())


def test_manifests_typed_and_verified(bucket, bucket_name, prefix, raw):
    body = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}'
    d = digest_of(body)
    media = "application/vnd.oci.image.index.v1+json"
    assert bucket.get_manifest(d) is None
    bucket.put_manifest(d, media, body)
    assert bucket.get_manifest(d) == (media, body)
    with pytest.raises(ValueError, match="does not hash to"):
        bucket.put_manifest(digest_of(b"other"), media, body)
    assert bucket.get_manifest(digest_of(b"other")) is None
    for bad_type in ("", "json", "text/plain\r\nX-Evil: 1", "a/b c"):
        with pytest.raises(ValueError, match="not a media type"):
            bucket.put_manifest(d, bad_type, body)
    key = key_of(prefix, "manifests", "sha256", d[7:])
    raw.put_object(Bucket=bucket_name, Key=key, Body=body.replace(b"2", b"3"), ContentType=media)
    assert bucket.get_manifest(d) is None
    assert raw.list_objects_v2(Bucket=bucket_name, Prefix=key).get("KeyCount") == 0


def test_small_records(bucket, bucket_name, prefix, raw):
    key = "tags/" + "ab" * 32 + ".json"
    assert bucket.get_object(key) is None
    bucket.put_object(key, b'{"digest":"sha256:..."}')
    assert bucket.get_object(key) == b'{"digest":"sha256:..."}'
    assert raw.get_object(Bucket=bucket_name, Key=f"{prefix}/{key}")["Body"].read() == b'{"digest":"sha256:..."}'
    member = "repos/" + "cd" * 32 + "/" + "ef" * 32
    bucket.put_object(member, b"")
    assert bucket.get_object(member) == b""
    bucket.delete_object(key)
    bucket.delete_object(key)  # again: not an error
    assert bucket.get_object(key) is None
    for bad in ("", "/abs", "a//b", "a/../b", "a/./b", "sp ace", "blobs/sha256/" + "0" * 64, "manifests/x", "locks/x"):
        with pytest.raises(ValueError, match="record key"):
            bucket.put_object(bad, b"x")
    with pytest.raises(ValueError, match="larger than"):
        bucket.put_object("big", b"x" * (4 * MiB + 1))


def test_lock_between_two_processes_sharing_the_bucket(ceph, bucket_name, prefix):
    with make_bucket(ceph, bucket_name, prefix) as a, make_bucket(ceph, bucket_name, prefix) as b:
        # Ceph 16.2's RGW honours If-None-Match: * on PUT (and If-Match with an unquoted ETag)
        assert a.locks.supports_conditional_writes and b.locks.supports_conditional_writes
        name = "sha256-" + "1" * 64
        assert a.locks.try_lock(name, 30)
        assert not b.locks.try_lock(name, 30)
        assert not a.locks.try_lock(name, 30)  # not re-entrant
        assert not b.locks.refresh_lock(name, 30)  # b never held it
        assert a.locks.refresh_lock(name, 30)
        a.locks.release_lock(name)
        assert b.locks.try_lock(name, 30)
        assert not a.locks.try_lock(name, 30)
        b.locks.release_lock(name)
        a.locks.release_lock(name)  # not held: nothing happens


def test_expired_lock_is_taken_over_once(ceph, bucket_name, prefix, raw):
    with (make_bucket(ceph, bucket_name, prefix) as a, make_bucket(ceph, bucket_name, prefix) as b,
          make_bucket(ceph, bucket_name, prefix) as c):
        assert a.locks.try_lock("L", 1)
        assert not b.locks.try_lock("L", 30)
        time.sleep(2.2)  # Last-Modified and Date have whole seconds
        assert b.locks.try_lock("L", 30)
        assert not c.locks.try_lock("L", 30)
        assert not a.locks.refresh_lock("L", 30)  # a lost it
        a.locks.release_lock("L")  # must not delete b's lock
        assert raw.head_object(Bucket=bucket_name, Key=f"{prefix}/locks/L")
        assert not c.locks.try_lock("L", 30)


def test_one_winner_among_racing_lockers(ceph, bucket_name, prefix):
    buckets = [make_bucket(ceph, bucket_name, prefix) for _ in range(6)]
    try:
        for b in buckets:
            assert b.locks.supports_conditional_writes
        for round_ in range(5):
            barrier = threading.Barrier(len(buckets))
            wins = []

            def contend(b):
                barrier.wait()
                if b.locks.try_lock(f"race-{round_}", 30):
                    wins.append(b)

            threads = [threading.Thread(target=contend, args=(b,)) for b in buckets]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert len(wins) == 1
    finally:
        for b in buckets:
            b.close()


def test_lock_without_conditional_writes_holds_within_the_process(bucket):
    # what a store without If-None-Match gets (Ceph has it, so the detection is overridden here)
    bucket.locks._conditional = False
    assert bucket.locks.try_lock("L", 0.5) and not bucket.locks.try_lock("L", 30)
    time.sleep(0.6)
    assert bucket.locks.try_lock("L", 30)
    bucket.locks.release_lock("L")
    assert bucket.locks.try_lock("L", 30)


def test_bad_lock_arguments(bucket):
    for name in ("", ".probe", "a/b", "x" * 201):
        with pytest.raises(ValueError, match="lock name"):
            bucket.locks.try_lock(name, 10)
    with pytest.raises(ValueError, match="ttl_seconds"):
        bucket.locks.try_lock("ok", 0)


def test_health_and_errors_when_rgw_is_down(ceph, bucket, tmp_path):
    assert bucket.check_reachable() == (True, "bucket hub-bucket-tests reachable")
    d = digest_of(b"abc")
    ceph.stop_rgw()
    try:
        t = time.monotonic()
        ok, why = bucket.check_reachable()
        assert not ok and "cannot connect" in why
        assert time.monotonic() - t < 3
        for call in (lambda: bucket.blob_size(d), lambda: bucket.get_manifest(d),
                     lambda: bucket.open_blob(d), lambda: bucket.put_object("k", b"v")):
            t = time.monotonic()
            with pytest.raises(BucketError, match="cannot connect to the S3 endpoint") as e:
                call()
            assert time.monotonic() - t < 5
            assert "http" not in str(e.value) and ceph.secret_key not in str(e.value)
        assert not (tmp_path / "x").exists()
    finally:
        ceph.start_rgw()
    assert bucket.check_reachable()[0]


def test_refusals_name_no_secret(ceph, bucket_name, caplog):
    caplog.set_level(logging.DEBUG)
    config = BucketConfig.parse(f"s3://{bucket_name}", endpoint=ceph.endpoint_url,
                                environ={"AWS_ACCESS_KEY_ID": ceph.access_key,
                                         "AWS_SECRET_ACCESS_KEY": SECRET_LOOKING})
    with Bucket(config) as wrong:
        ok, why = wrong.check_reachable()
        assert not ok and why == f"check bucket {bucket_name}: HTTP 403"  # HEAD answers carry no error code
        with pytest.raises(BucketError) as e:
            wrong.get_object("k")
        assert e.value.status == 403 and e.value.code == "SignatureDoesNotMatch"
        assert str(e.value) == "get record k: HTTP 403 SignatureDoesNotMatch"
    missing = BucketConfig.parse("s3://no-such-bucket-here", endpoint=ceph.endpoint_url,
                                 environ={"AWS_ACCESS_KEY_ID": ceph.access_key,
                                          "AWS_SECRET_ACCESS_KEY": ceph.secret_key})
    with Bucket(missing) as b:
        assert b.check_reachable() == (False, "bucket no-such-bucket-here does not exist")
        with pytest.raises(BucketError, match="NoSuchBucket"):
            b.get_object("k")
    # botocore's DEBUG records carry signed headers: they must not reach the logs
    for secret in (SECRET_LOOKING, ceph.secret_key, ceph.access_key, "Signature="):
        assert secret not in caplog.text
