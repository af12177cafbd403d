import asyncio
import fcntl
import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from hubrewrite.cache import lockfiles
from hubrewrite.cache.blobwriter import BlobWriter, Copy
from hubrewrite.cache.store import Store

from .fed_upstream import FedUpstream


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def put_blob(store: Store, data: bytes) -> str:
    digest = digest_of(data)
    writer = store.new_writer(digest)
    for i in range(0, len(data), 7):
        writer.write(data[i : i + 7])
    assert writer.finish()
    return digest


def test_blob_committed_only_when_verified(tmp_path):
    store = Store(tmp_path, 0)
    good = put_blob(store, b"hello world")
    assert store.has_blob(good) and store.check_blob(good)
    assert store.blob_path(good).read_bytes() == b"hello world"

    wrong = store.new_writer(digest_of(b"something else"))
    wrong.write(b"hello world")
    assert not wrong.finish()
    assert not store.has_blob(digest_of(b"something else"))
    assert list(store.tmp.glob("*.download")) == []


def test_aborted_download_leaves_nothing(tmp_path):
    store = Store(tmp_path, 0)
    writer = store.new_writer(digest_of(b"abc"))
    writer.write(b"ab")
    writer.abort()
    assert not store.has_blob(digest_of(b"abc"))
    assert list(store.tmp.iterdir()) == []


def test_modified_blob_is_detected_and_removed(tmp_path):
    store = Store(tmp_path, 0)
    digest = put_blob(store, b"x" * 1000)
    path = store.blob_path(digest)
    time.sleep(0.01)
    with open(path, "r+b") as f:
        f.seek(500)
        f.write(b"y")
    assert not store.check_blob(digest)
    assert not path.exists()


def test_unstamped_blob_is_hashed_before_trusted(tmp_path):
    store = Store(tmp_path, 0)
    digest = put_blob(store, b"data")
    store._stamp(store.blob_path(digest)).unlink()
    assert store.check_blob(digest)  # re-verified, stamped again
    assert store._stamp(store.blob_path(digest)).exists()


def test_lru_eviction_spares_recent_and_in_use(tmp_path):
    store = Store(tmp_path, 250)
    a = put_blob(store, b"a" * 100)
    b = put_blob(store, b"b" * 100)
    old = time.time() - 100
    os.utime(store._stamp(store.blob_path(a)), (old, old))
    os.utime(store._stamp(store.blob_path(b)), (old + 10, old + 10))
    store.in_use[a] = 1  # being served: never evicted
    c = put_blob(store, b"c" * 100)  # over the limit: evicts the oldest not in use
    assert store.has_blob(a) and not store.has_blob(b) and store.has_blob(c)
    assert store.total_bytes() == 200


def test_manifests_verified_on_read(tmp_path):
    store = Store(tmp_path, 0)
    body = b'{"schemaVersion":2}'
    digest = digest_of(body)
    assert not store.put_manifest(digest, "t", b"other")
    assert store.put_manifest(digest, "application/vnd.oci.image.manifest.v1+json", body)
    assert store.get_manifest(digest) == ("application/vnd.oci.image.manifest.v1+json", body)
    store.manifest_path(digest).write_bytes(b"tampered")
    assert store.get_manifest(digest) is None


def test_tags_keyed_by_accept_and_membership(tmp_path):
    store = Store(tmp_path, 0)
    store.put_tag("https://r", "library/a", "1", "index", digest_of(b"1"), "index-type")
    store.put_tag("https://r", "library/a", "1", "single", digest_of(b"2"), "single-type")
    assert store.tag_entries("https://r", "library/a", "1").get("index").digest == digest_of(b"1")
    assert store.tag_entries("https://r", "library/a", "1").get("single").digest == digest_of(b"2")
    assert store.tag_entries("https://r", "library/b", "1").get("index") is None
    # another Accept may be answered with another manifest: no entry stands in for it
    assert store.tag_entries("https://r", "library/a", "1").get("x, single-type;q=0.9") is None
    assert store.tag_entries("https://r", "library/a", "1").get("unrelated") is None
    store.add_member("https://r", "library/a", digest_of(b"1"))
    assert store.is_member("https://r", "library/a", digest_of(b"1"))
    assert not store.is_member("https://r", "private/x", digest_of(b"1"))


def test_download_lock_is_exclusive_and_exists_only_while_held(tmp_path):
    store, other = Store(tmp_path, 0), Store(tmp_path, 0)  # two processes sharing the directory
    digest = digest_of(b"z")
    assert not store.download_locked(digest) and list(store.tmp.iterdir()) == []  # looking creates nothing
    fd = store.download_lock(digest)
    assert fd is not None and store.download_lock_path(digest).exists()
    assert other.download_lock(digest) is None and other.download_locked(digest)
    store.release_download_lock(digest, fd)
    assert list(store.tmp.iterdir()) == [] and not other.download_locked(digest)
    fd2 = other.download_lock(digest)
    assert fd2 is not None
    other.release_download_lock(digest, fd2)
    assert list(store.tmp.iterdir()) == []


def test_a_lock_taken_on_a_file_just_unlinked_is_not_held(tmp_path):
    """The flock-and-unlink race: B opened the lock file just before its holder A removed it and
    let go; B's flock then succeeds on a file no longer in the directory, while C creates and
    locks a new one. B must see that the path no longer names what it locked."""
    path = tmp_path / "x.lock"
    a = lockfiles.acquire(path)
    b = os.open(path, os.O_RDWR)  # B, between its open and its flock
    lockfiles.release(path, a)
    c = lockfiles.acquire(path)
    assert c is not None
    fcntl.flock(b, fcntl.LOCK_EX | fcntl.LOCK_NB)  # B's lock succeeds: on the unlinked file
    assert not lockfiles.names(path, b) and lockfiles.names(path, c)
    os.close(b)
    assert lockfiles.acquire(path) is None  # what acquire does: C holds the current file
    lockfiles.release(path, c)


def test_lock_files_exclude_under_contention(tmp_path):
    """Threads taking and removing one lock file as fast as they can (each its own open file,
    as separate processes): never two holders at once."""
    path, holders, worst, errors = tmp_path / "x.lock", [0], [0], []
    count = threading.Lock()

    def work() -> None:
        try:
            for _ in range(3000):
                fd = lockfiles.acquire(path)
                if fd is None:
                    continue
                with count:
                    holders[0] += 1
                    worst[0] = max(worst[0], holders[0])
                time.sleep(0)
                with count:
                    holders[0] -= 1
                lockfiles.release(path, fd)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and worst[0] == 1 and not path.exists()


def test_stale_download_files_are_removed_at_start_but_not_a_held_one(tmp_path):
    store = Store(tmp_path, 0)
    stale, orphan, held = digest_of(b"stale"), digest_of(b"orphan"), digest_of(b"held")
    for digest in (stale, orphan, held):
        store.download_path(digest).write_bytes(b"partial")
    store.download_lock_path(stale).write_bytes(b"100")  # its holder crashed
    fd = store.download_lock(held)
    (tmp_path / "tags" / "ab.json.lock").touch()  # an earlier version's sidecar
    Store(tmp_path, 0)  # another process starts on the directory
    assert sorted(p.name for p in store.tmp.iterdir()) == sorted(
        [store.download_path(held).name, store.download_lock_path(held).name])
    assert list((tmp_path / "tags").glob("*.json.lock")) == []
    store.release_download_lock(held, fd)


def test_only_sha256(tmp_path):
    store = Store(tmp_path, 0)
    with pytest.raises(ValueError):
        store.blob_path("sha512:" + "a" * 128)


def _write_tags(root: str, writer: int, count: int) -> None:
    store = Store(Path(root), 0)
    for i in range(count):
        store.put_tag("https://up", "library/nginx", "latest", f"accept-{writer}-{i}", "sha256:" + "a" * 64, "t")


def test_concurrent_tag_writers_keep_every_entry(tmp_path):
    """Processes sharing a cache write one tag's Accept entries at once: none is lost."""
    import multiprocessing

    Store(tmp_path, 0)
    context = multiprocessing.get_context("spawn")  # fork from a threaded pytest may deadlock
    writers = [context.Process(target=_write_tags, args=(str(tmp_path), w, 4)) for w in range(4)]
    for p in writers:
        p.start()
    for p in writers:
        p.join(60)
        assert p.exitcode == 0
    store = Store(tmp_path, 0)
    for w in range(4):
        for i in range(4):
            assert store.tag_entries("https://up", "library/nginx", "latest").get(f"accept-{w}-{i}") is not None, (w, i)


def test_tag_records_stay_bounded(tmp_path):
    from hubrewrite.cache.store import MAX_TAG_ENTRIES

    store = Store(tmp_path, 0)
    for i in range(5 * MAX_TAG_ENTRIES):
        store.put_tag("https://up", "library/nginx", "latest", f"accept-{i}", "sha256:" + "a" * 64, "t")
    path = store._tag_path("https://up", "library/nginx", "latest")
    assert path.stat().st_size < 300 * MAX_TAG_ENTRIES
    newest = f"accept-{5 * MAX_TAG_ENTRIES - 1}"
    assert store.tag_entries("https://up", "library/nginx", "latest").get(newest) is not None
    assert store.tag_entries("https://up", "library/nginx", "latest").get("accept-0") is None


def test_a_disk_that_refuses_writes_never_fails_a_caller(tmp_path):
    """Full disk: writes are given up and the problem remembered; the next good write clears it."""
    import errno

    store = Store(tmp_path, 0)
    real_replace = os.replace

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    os.replace = full
    try:
        store.put_tag("https://up", "a", "1", "k", "sha256:" + "a" * 64, "t")
        assert not store.put_manifest(digest_of(b"m"), "t", b"m")
    finally:
        os.replace = real_replace
    assert store.problem == "disk full"
    assert list(store.tmp.iterdir()) == []  # nothing half-written left behind
    store.put_tag("https://up", "a", "1", "k", "sha256:" + "a" * 64, "t")
    assert store.problem is None


def copied(source, writer, on_written=lambda n: None, until_started=None):
    """Run a Copy to its end on a fresh loop: (committed, error, the sizes told)."""
    told: list[int] = []

    async def run():
        loop = asyncio.get_running_loop()
        ended = loop.create_future()

        def written(n: int) -> None:
            told.append(n)
            on_written(n)

        copy = Copy(source, writer, loop, written, lambda ok, error: ended.set_result((ok, error)))
        copy.start()
        if until_started is not None:
            await until_started(copy)
        return await asyncio.wait_for(ended, 20)

    committed, error = asyncio.run(run())
    return committed, error, told


def test_copy_writes_in_order_and_tells_only_bytes_on_disk(tmp_path):
    """Bytes read ahead of a slow disk wait in at most DEPTH buffers; the loop is told of bytes
    once they are written (at most TELL_BYTES at once), so followers never see bytes not on disk."""
    store = Store(tmp_path, 0)
    data = os.urandom(3 * Copy.BUFFER + 12345)
    digest = digest_of(data)
    disk_open = threading.Event()

    class SlowDisk(BlobWriter):
        def write(self, chunk) -> None:
            disk_open.wait(10)
            super().write(chunk)

    writer = SlowDisk(store, digest)
    source = FedUpstream(len(data))
    for i in range(0, len(data), 100_000):
        source.queue.chunks.put(data[i:i + 100_000])

    told_so_far: list[int] = []

    def on_written(n: int) -> None:
        told_so_far.append(told_so_far[-1] + n if told_so_far else n)
        try:
            on_disk = writer.path.stat().st_size
        except FileNotFoundError:  # committed meanwhile (renamed into place)
            on_disk = store.blob_path(digest).stat().st_size
        assert on_disk >= told_so_far[-1]

    async def slow_disk_then_open(copy) -> None:
        await asyncio.sleep(0.3)
        assert copy._free.empty()  # DEPTH buffers filled, none written: the reader waits
        disk_open.set()

    committed, error, told = copied(source, writer, on_written, slow_disk_then_open)
    assert committed and error is None
    assert sum(told) == len(data) and max(told) <= Copy.TELL_BYTES
    assert store.blob_path(digest).read_bytes() == data


def test_copy_tells_the_loop_of_a_slow_sources_bytes_within_its_wake_time(tmp_path):
    """A buffer goes to the disk when full or WAKE_SECONDS after its first byte: a source
    trickling bytes still reaches followers."""
    store = Store(tmp_path, 0)
    data = b"x" * 5000
    writer = store.new_writer(digest_of(data))
    source = FedUpstream(len(data))
    times: list[float] = []

    async def trickle(copy) -> None:
        for i in range(5):
            await source.queue.put(data[i * 1000:(i + 1) * 1000])
            await asyncio.sleep(0.2)

    committed, error, told = copied(source, writer, lambda n: times.append(time.monotonic()), trickle)
    assert committed and sum(told) == len(data)
    assert len(told) >= 4  # each piece told on its own (waiting for a full MiB would tell one)


def test_copy_of_a_refused_write_fails_and_keeps_nothing(tmp_path):
    """A write the kernel refuses fails the download; nothing is kept, and the source is let go."""
    store = Store(tmp_path, 0)
    data = b"abcdef" * 1000
    writer = store.new_writer(digest_of(data))
    source = FedUpstream(len(data))

    async def refuse_writes(copy) -> None:
        read_only = os.open(os.devnull, os.O_RDONLY)
        os.dup2(read_only, writer.file.fileno())  # the kernel refuses every write (EBADF)
        os.close(read_only)
        await source.queue.put(data)

    committed, error, told = copied(source, writer, until_started=refuse_writes)
    assert not committed and isinstance(error, OSError) and told == []
    assert not store.has_blob(digest_of(data))
    assert list(store.tmp.glob("*.download")) == []


def test_a_cancelled_copy_unblocks_its_source_and_throws_the_file_away(tmp_path):
    store = Store(tmp_path, 0)
    data = b"z" * 100_000
    writer = store.new_writer(digest_of(data))
    source = FedUpstream(len(data))

    async def cancel_midway(copy) -> None:
        await source.queue.put(data[:1000])
        await asyncio.sleep(0.2)
        copy.cancel()  # the source never sends the rest: its read is interrupted

    committed, error, told = copied(source, writer, until_started=cancel_midway)
    assert not committed and error is not None
    assert list(store.tmp.glob("*.download")) == []


def test_a_source_ending_early_fails_the_copy(tmp_path):
    store = Store(tmp_path, 0)
    data = b"q" * 10_000
    writer = store.new_writer(digest_of(data))
    source = FedUpstream(len(data))
    source.queue.chunks.put(data[:4000])
    source.queue.chunks.put(None)
    committed, error, told = copied(source, writer)
    assert not committed and isinstance(error, EOFError)
    assert list(store.tmp.glob("*.download")) == []


def wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def cached_files(root: Path) -> int:
    """Files and repository folders the file limit counts."""
    counted = [p for sub in ("blobs", "manifests", "tags", "repos") for p in (root / sub).rglob("*")
               if p.is_file() or p.parent.name == "repos"]
    return len([p for p in counted if p.name != ".lock"])


def test_the_file_limit_removes_the_least_recently_used_entries_of_any_kind(tmp_path):
    store = Store(tmp_path, 0, max_files=40)
    in_use = put_blob(store, b"served")
    store.in_use[in_use] = 1
    old = put_blob(store, b"old")
    os.utime(store.blob_path(old).with_name(store.blob_path(old).name + ".ok"), (1, 1))  # used long ago
    recent = put_blob(store, b"recent")
    for i in range(100):  # what anonymous clients can add: a record per tag, per repository and digest
        store.put_tag("https://r", "library/a", f"tag-{i}", "accept:", digest_of(b"%d" % i), "t")
        store.add_member("https://r", f"library/r{i}", digest_of(b"%d" % i))
        assert store.put_manifest(digest_of(b"m%d" % i), "t", b"m%d" % i)
        time.sleep(0.001)
    assert wait_for(lambda: not store.limits._scanning and cached_files(tmp_path) <= 40), cached_files(tmp_path)
    assert not store.has_blob(recent), "older than the records: evicted first"
    recent = put_blob(store, b"recent")
    store.add_member("https://r", "library/last", digest_of(b"last"))
    assert wait_for(lambda: not store.limits._scanning and cached_files(tmp_path) <= 40), cached_files(tmp_path)
    store.limits.evict_files()
    assert store.has_blob(in_use) and store.has_blob(recent), "a blob in use or recently used went"
    assert not store.has_blob(old), "the least recently used blob stayed"
    assert store.tag_entries("https://r", "library/a", "tag-99").get("accept:") is not None  # the newest stay
    assert store.tag_entries("https://r", "library/a", "tag-0").get("accept:") is None
    assert len(list((tmp_path / "repos").iterdir())) == len(list((tmp_path / "repos").glob("*/*")))  # no empty folder


def test_no_file_limit_with_zero(tmp_path):
    store = Store(tmp_path, 0, max_files=0)
    for i in range(30):
        store.add_member("https://r", f"library/r{i}", digest_of(b"%d" % i))
    assert cached_files(tmp_path) == 60
