"""What the Ceph RGW under test did (tests/support/ceph.py): the S3 bytes it
took in and sent out, and what a bucket holds.

The byte counts come from radosgw's own performance counters, read over its
admin socket (``ceph --admin-daemon <asok> perf dump``, section ``rgw``):
``put_b`` counts the body bytes of every PUT, multipart parts included, and
``get_b`` those of every GET (Ceph 16 counts one byte less per GET: the end
of the range is inclusive). They count every client of that radosgw, which in
a benchmark is the mirrors, the benchmark's own HEADs and any presigned
download. RGW's usage log would give the same per bucket, but the test
cluster runs with ``rgw_enable_usage_log = false``.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

from harness import BenchError
from tests.support.ceph import CephRGW

RGW_NAME = "client.rgw.a"  # the one radosgw tests/support/ceph.py starts
COUNTERS = ("req", "get", "get_b", "put", "put_b")


def _admin(*argv: str) -> str:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise BenchError(f"{argv[0]} {argv[1]}: exit {p.returncode}: {p.stderr.strip()[-500:]}")
    return p.stdout


def rgw_counters(rgw: CephRGW) -> dict[str, int]:
    """radosgw's request and byte counters so far (see the module docstring)."""
    asok = rgw.workdir / "run" / f"{RGW_NAME}.asok"
    try:
        perf = json.loads(_admin("ceph", "--admin-daemon", str(asok), "perf", "dump"))["rgw"]
    except (json.JSONDecodeError, KeyError) as e:
        raise BenchError(f"radosgw's perf dump has no rgw counters: {e}") from None
    return {k: int(perf[k]) for k in COUNTERS}


def counter_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in COUNTERS}


def bucket_usage(rgw: CephRGW, bucket: str) -> dict[str, Any]:
    """Bytes and objects a bucket holds (``radosgw-admin bucket stats``)."""
    out = _admin("radosgw-admin", "-c", str(rgw.conf_path), "bucket", "stats", "--bucket", bucket)
    try:
        main = json.loads(out).get("usage", {}).get("rgw.main", {})
    except json.JSONDecodeError as e:
        raise BenchError(f"radosgw-admin bucket stats: {e}") from None
    return {"bytes": int(main.get("size", 0)), "objects": int(main.get("num_objects", 0))}
