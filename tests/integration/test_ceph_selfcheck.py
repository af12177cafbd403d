"""Self-check of the test S3 server (tests/support/ceph.py): Ceph RGW on loopback.

No hub-rewrite code here: these prove the ``ceph`` fixture is a working S3
endpoint, so that the bucket tests mean something.
"""

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import botocore.exceptions
import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_started_quickly(ceph, record_property):
    record_property("ceph_start_seconds", round(ceph.start_seconds, 2))
    assert ceph.start_seconds < 30
    assert set(ceph.pids()) == {"mon", "osd", "rgw"}
    assert ceph.secret_key not in repr(ceph)


def test_put_get_list(ceph):
    s3 = ceph.client()
    bucket = ceph.make_bucket("selfcheck-putget")
    body = os.urandom(3 << 20)
    s3.put_object(Bucket=bucket, Key="a/b", Body=body, ContentType="application/x-test")
    got = s3.get_object(Bucket=bucket, Key="a/b")
    assert got["Body"].read() == body
    assert got["ContentType"] == "application/x-test"
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]] == ["a/b"]
    with pytest.raises(botocore.exceptions.ClientError) as e:
        s3.get_object(Bucket=bucket, Key="missing")
    assert e.value.response["Error"]["Code"] == "NoSuchKey"


def test_presigned_get_with_httpx(ceph):
    s3 = ceph.client()
    bucket = ceph.make_bucket("selfcheck-presign")
    body = os.urandom(1 << 20)
    s3.put_object(Bucket=bucket, Key="blob", Body=body)
    url = s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "blob"}, ExpiresIn=60)
    full = httpx.get(url)
    assert full.status_code == 200 and hashlib.sha256(full.content).digest() == hashlib.sha256(body).digest()
    part = httpx.get(url, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == body[100:200]
    # the signature is checked: an unsigned request is refused
    assert httpx.get(url.split("?")[0]).status_code == 403


def test_stop_and_start_rgw_same_port(ceph):
    s3 = ceph.client(retries={"total_max_attempts": 1}, connect_timeout=1)
    bucket = ceph.make_bucket("selfcheck-restart")
    s3.put_object(Bucket=bucket, Key="k", Body=b"kept")
    endpoint = ceph.endpoint_url
    ceph.stop_rgw()
    try:
        assert "rgw" not in ceph.pids()
        with pytest.raises(botocore.exceptions.EndpointConnectionError):
            s3.get_object(Bucket=bucket, Key="k")
    finally:
        ceph.start_rgw()
    assert ceph.endpoint_url == endpoint
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"kept"


def test_daemons_die_with_a_killed_test_process(tmp_path):
    """SIGKILL the process that started a cluster: its daemons must not survive it."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO_ROOT)!r})
        from tests.support.ceph import CephRGW
        rgw = CephRGW({str(tmp_path / "cluster")!r}).start()
        print(" ".join(str(p) for p in rgw.pids().values()), flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 3
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    assert not [p for p in pids if _alive(p)]


def _alive(pid: int) -> bool:
    """Running, and not a zombie waiting for init to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
