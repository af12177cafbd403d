"""S3 client library benchmark: boto3 (sync, from threads) vs aiobotocore (async),
uploading and downloading one big blob to a real S3 server (Ceph RGW on loopback).

    python bench/bench_bucket_client.py [--size-mib 512] [--reps 3] [--objectstore bluestore]

Needs boto3 and aiobotocore in the same interpreter.  aiobotocore pins its
own botocore, so do not install it into the project's .venv; use a scratch one:

    python3.13 -m venv /tmp/bench-venv && /tmp/bench-venv/bin/pip install boto3 aiobotocore
    /tmp/bench-venv/bin/python bench/bench_bucket_client.py

Starts tests/support/ceph.py's CephRGW (memstore by default: the server in
RAM, so that the disk, shared with everything else on the machine, does not
decide the result; ``--objectstore bluestore`` for a sparse file on disk),
writes ``--size-mib`` MiB of random data, then ``--reps`` times runs each
variant (the order rotating): a fresh worker process uploads the file, then
another one downloads the object.  The download only hashes the bytes: writing
them to a file costs the same whatever the library, and its page-cache
write-back noise drowned the differences between libraries.

* ``bucket``: hubrewrite/cache/bucket.py (boto3), called through
  ``asyncio.to_thread`` as the mirror does: upload_blob (8 MiB parts, 4 in
  flight, sha256 while reading the file), then open_blob (one streaming GET,
  1 MiB chunks) hashed;
* ``aiobotocore``: the same algorithm written for aiobotocore: 8 MiB parts, 4
  in flight (file reads and hashing in threads, so the event loop never
  blocks), then one streaming GET, 1 MiB chunks, hashed;
* ``s3transfer``: boto3's own managed transfer (``upload_file`` /
  ``download_fileobj``: 8 MiB parts, 4 threads, ranged parallel GETs written
  out of order into a file in /dev/shm, hashed after the clock stops), no
  hashing during either phase: the library's raw speed, for reference.
  (``download_fileobj`` into a non-seekable hashing object stalled for good
  after 10 parts of 8 MiB here.)

Each worker reports wall time, its CPU time (user + system, all threads) and
its peak RSS (VmHWM) for its phase; a worker's RSS after importing its library
and making its client is the "base".  Every download must hash to the
digest.  MiB = 2^20 bytes.  The Markdown table goes to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(REPO_ROOT))

MiB = 1 << 20
PART = 8 * MiB
IN_FLIGHT = 4
CHUNK = 1 * MiB
VARIANTS = ("bucket", "aiobotocore", "s3transfer")
BUCKET = "bench-client"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- worker side


def rss_peak() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(phase, results: dict) -> None:
    reset_peak()
    wall, cpu = time.monotonic(), cpu_seconds()
    phase()
    results.update(seconds=time.monotonic() - wall, cpu=cpu_seconds() - cpu, rss_peak=rss_peak())


def client_options() -> dict:
    return dict(connect_timeout=3, read_timeout=60, retries={"mode": "standard", "total_max_attempts": 2},
                max_pool_connections=16, s3={"addressing_style": "path"}, signature_version="s3v4",
                request_checksum_calculation="when_required", response_checksum_validation="when_required")


def worker(args: argparse.Namespace) -> dict:
    """One phase (upload or download) with one variant; this process does nothing else."""
    key = f"blobs/sha256/{args.digest[7:]}"
    results: dict = {}
    if args.worker == "bucket":
        from hubrewrite.cache.bucket import Bucket, BucketConfig

        b = Bucket(BucketConfig.parse(f"s3://{BUCKET}", endpoint=args.endpoint, addressing="path"),
                   part_size=PART, upload_concurrency=IN_FLIGHT)
        results["rss_base"] = rss_peak()
        if args.phase == "upload":
            measure(lambda: asyncio.run(asyncio.to_thread(b.upload_blob, args.digest, args.file)), results)
        else:
            def download() -> str:
                h = hashlib.sha256()
                with b.open_blob(args.digest) as stream:
                    for chunk in stream:
                        h.update(chunk)
                return "sha256:" + h.hexdigest()

            got = []
            measure(lambda: got.append(asyncio.run(asyncio.to_thread(download))), results)
            assert got == [args.digest], "download does not match"
        b.close()
    elif args.worker == "s3transfer":
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        s3 = boto3.client("s3", endpoint_url=args.endpoint, region_name="us-east-1", config=Config(**client_options()))
        tc = TransferConfig(multipart_threshold=PART, multipart_chunksize=PART, max_concurrency=IN_FLIGHT)
        results["rss_base"] = rss_peak()
        if args.phase == "upload":
            measure(lambda: s3.upload_file(args.file, BUCKET, key, Config=tc), results)
        else:
            # ranges arrive out of order: into a file in RAM (tmpfs), hashed afterwards, untimed
            with tempfile.NamedTemporaryFile(dir="/dev/shm", prefix="bench-bucket-") as sink:
                measure(lambda: s3.download_fileobj(BUCKET, key, sink, Config=tc), results)
                sink.seek(0)
                assert "sha256:" + hashlib.file_digest(sink, "sha256").hexdigest() == args.digest
    else:
        asyncio.run(aio_worker(args, key, results))
    return results


async def aio_worker(args: argparse.Namespace, key: str, results: dict) -> None:
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    session = get_session()
    async with session.create_client("s3", endpoint_url=args.endpoint, region_name="us-east-1",
                                     config=AioConfig(**client_options())) as s3:
        results["rss_base"] = rss_peak()
        phase = aio_upload if args.phase == "upload" else aio_download
        reset_peak()
        wall, cpu = time.monotonic(), cpu_seconds()
        await phase(s3, args, key)
        results.update(seconds=time.monotonic() - wall, cpu=cpu_seconds() - cpu, rss_peak=rss_peak())


async def aio_upload(s3, args: argparse.Namespace, key: str) -> None:
    upload_id = (await s3.create_multipart_upload(Bucket=BUCKET, Key=key,
                                                  ContentType="application/octet-stream"))["UploadId"]
    slots = asyncio.Semaphore(IN_FLIGHT)
    h = hashlib.sha256()

    def read_and_hash(f) -> bytes:
        data = f.read(PART)
        h.update(data)
        return data

    async def send(number: int, data: bytes) -> dict:
        try:
            answer = await s3.upload_part(Bucket=BUCKET, Key=key, UploadId=upload_id, PartNumber=number, Body=data)
            return {"ETag": answer["ETag"], "PartNumber": number}
        finally:
            slots.release()

    tasks = []
    with open(args.file, "rb") as f:
        number = 0
        while True:
            await slots.acquire()
            data = await asyncio.to_thread(read_and_hash, f)
            if not data:
                slots.release()
                break
            number += 1
            tasks.append(asyncio.create_task(send(number, data)))
            del data
    parts = await asyncio.gather(*tasks)
    assert "sha256:" + h.hexdigest() == args.digest
    await s3.complete_multipart_upload(Bucket=BUCKET, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts})


async def aio_download(s3, args: argparse.Namespace, key: str) -> None:
    got = await s3.get_object(Bucket=BUCKET, Key=key)
    h = hashlib.sha256()
    async with got["Body"] as body:
        async for chunk in body.iter_chunks(CHUNK):
            h.update(chunk)
    assert "sha256:" + h.hexdigest() == args.digest, "download does not match"


# ---------------------------------------------------------------- driver side


def run_worker(variant: str, phase: str, rgw, src: Path, digest: str) -> dict:
    # the keys go in the environment: a command line is visible to every user of the machine
    env = {**os.environ, "AWS_ACCESS_KEY_ID": rgw.access_key, "AWS_SECRET_ACCESS_KEY": rgw.secret_key,
           "PYTHONPATH": str(REPO_ROOT)}
    argv = [sys.executable, __file__, "--worker", variant, "--phase", phase, "--endpoint", rgw.endpoint_url,
            "--file", str(src), "--digest", digest]
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise SystemExit(f"worker {variant} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mib", type=int, default=512)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--objectstore", choices=("memstore", "bluestore"), default="memstore")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--json", help="write the raw numbers here")
    # worker mode (internal)
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--phase", choices=("upload", "download"), help=argparse.SUPPRESS)
    p.add_argument("--endpoint", help=argparse.SUPPRESS)
    p.add_argument("--file", help=argparse.SUPPRESS)
    p.add_argument("--digest", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    from bench.harness import apply_scale, smoke_banner
    from tests.support.ceph import CephRGW

    scale = apply_scale(p, args, {"size_mib": 16, "reps": 1})
    variants = [v for v in args.variants.split(",") if v]
    if "aiobotocore" in variants and importlib.util.find_spec("aiobotocore") is None:
        # it pins its own botocore: it is not in the project's .venv (see the docstring for a scratch venv)
        log("aiobotocore is not installed here: its variant is left out")
        variants.remove("aiobotocore")
    with tempfile.TemporaryDirectory(prefix="bench-bucket-") as tmp:
        workdir = Path(tmp)
        src = workdir / "blob"
        h = hashlib.sha256()
        with open(src, "wb") as f:
            for _ in range(args.size_mib):
                chunk = os.urandom(MiB)
                h.update(chunk)
                f.write(chunk)
        digest = "sha256:" + h.hexdigest()
        memstore = (args.size_mib * 2 + 512) * MiB  # an object, its overwrite, and rgw's own pools
        with CephRGW(workdir / "ceph", args.objectstore, memstore_bytes=memstore) as rgw:
            log(f"ceph rgw ({args.objectstore}) started in {rgw.start_seconds:.1f} s")
            rgw.make_bucket(BUCKET)
            runs: dict[str, list[dict]] = {v: [] for v in variants}
            for rep in range(args.reps):
                order = variants[rep % len(variants):] + variants[:rep % len(variants)]
                for v in order:
                    res = {phase: run_worker(v, phase, rgw, src, digest) for phase in ("upload", "download")}
                    # every variant writes the same key: free the last copy's space before the next
                    rgw.client().delete_object(Bucket=BUCKET, Key=f"blobs/sha256/{digest[7:]}")
                    rgw.collect_garbage()
                    runs[v].append(res)
                    log(f"rep {rep + 1} {v}: up {args.size_mib / res['upload']['seconds']:.0f} MiB/s, "
                        f"down {args.size_mib / res['download']['seconds']:.0f} MiB/s")
    print("".join(smoke_banner({"scale": scale})), end="")
    print_table(runs, args.size_mib)
    if args.json:
        Path(args.json).write_text(json.dumps({"scale": scale, "exit_code": 0, "size_mib": args.size_mib,
                                               "runs": runs}, indent=2))


def print_table(runs: dict[str, list[dict]], size_mib: int) -> None:
    gib = size_mib / 1024
    print(f"\n{size_mib} MiB blob, median of {len(next(iter(runs.values())))} runs "
          "(throughput in MiB/s; CPU: worker process, s per GiB; RSS: peak of the worker process, MiB)\n")
    print("| variant | upload MiB/s | download MiB/s | CPU up | CPU down | RSS base | RSS peak up | RSS peak down |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for v, rs in runs.items():
        def med(phase: str, field: str) -> float:
            return statistics.median(r[phase][field] for r in rs)

        print(f"| {v} | {size_mib / med('upload', 'seconds'):.0f} | {size_mib / med('download', 'seconds'):.0f} "
              f"| {med('upload', 'cpu') / gib:.2f} | {med('download', 'cpu') / gib:.2f} "
              f"| {max(r['upload']['rss_base'] for r in rs) / MiB:.0f} "
              f"| {max(r['upload']['rss_peak'] for r in rs) / MiB:.0f} "
              f"| {max(r['download']['rss_peak'] for r in rs) / MiB:.0f} |")


if __name__ == "__main__":
    main()
