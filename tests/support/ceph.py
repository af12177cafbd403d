"""A real S3 server for the tests: Ceph's RADOS Gateway on loopback.

    with CephRGW(workdir) as rgw:           # objectstore="bluestore" for GiB-sized data
        rgw.endpoint_url, rgw.access_key, rgw.secret_key, rgw.region
        rgw.make_bucket("cache")
        rgw.stop_rgw(); rgw.start_rgw()     # the S3 endpoint goes away and comes back, same port

One monitor, one OSD and one radosgw (Debian 12's Ceph 16.2), no cephx, pool
size 1, no manager.  Everything lives under ``workdir``: the cluster's own
conf file (every command gets ``-c``), data, logs, admin sockets, pid files.
Nothing reads or writes /etc/ceph or /var/lib/ceph.  Ports are random free
ones on 127.0.0.1.  Start-up takes 2-3 s with memstore, about 6 s with
bluestore (measured on 2 cores); the settings it depends on say why below.

The daemons run in the foreground (``-f``) as our children and are stopped by
their recorded pids.  They get SIGKILL when the thread that started them dies
(PR_SET_PDEATHSIG), so a killed pytest leaves nothing running: start the
cluster from the main thread (session fixtures do).
"""

from __future__ import annotations

import secrets
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from tests.support.common import set_pdeathsig
from tests.support.ports import free_port, port_free

REGION = "us-east-1"
_MON_NAME = "a"
_RGW_NAME = "client.rgw.a"
# messenger ports for the mon's v2+v1 pair and the OSD's public/cluster/heartbeat sockets
_MSGR_PORTS = 24


class CephError(RuntimeError):
    pass


def _free_port_range(count: int, tries: int = 200) -> int:
    """First port of ``count`` consecutive free ports (racy like any free-port pick; good enough)."""
    for _ in range(tries):
        base = 20000 + secrets.randbelow(30000)
        if all(port_free(p) for p in range(base, base + count)):
            return base
    raise CephError(f"no {count} consecutive free ports found")


def _die_with_parent() -> None:
    # SIGKILL, not SIGTERM: the data is throw-away, and memstore would otherwise
    # spend the shutdown writing its whole content to disk
    set_pdeathsig(signal.SIGKILL)


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_bytes()[-chars:].decode("utf-8", "replace")
    except FileNotFoundError:
        return "(no log file)"


class CephRGW:
    """A single-node Ceph cluster with an S3 endpoint; see the module docstring.

    ``objectstore``: ``"memstore"`` (RAM, at most ``memstore_bytes``; fast, for
    small data) or ``"bluestore"`` (a sparse file of ``bluestore_bytes``
    under workdir, for GiB-sized data).
    """

    def __init__(self, workdir: Path | str, objectstore: str = "memstore", *,
                 memstore_bytes: int = 512 << 20, bluestore_bytes: int = 16 << 30) -> None:
        if objectstore not in ("memstore", "bluestore"):
            raise ValueError(f"objectstore must be 'memstore' or 'bluestore', not {objectstore!r}")
        self.workdir = Path(workdir).resolve()
        self.objectstore = objectstore
        self.memstore_bytes = memstore_bytes
        self.bluestore_bytes = bluestore_bytes
        # fixed for the life of this object: the same user survives stop_rgw()/start_rgw()
        self.access_key = "HUBTEST" + secrets.token_hex(7).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.region = REGION
        self.rgw_port = 0
        self.conf_path = self.workdir / "ceph.conf"
        self.start_seconds: float | None = None  # wall time of the last start(), for reports
        self._procs: dict[str, subprocess.Popen] = {}

    def __repr__(self) -> str:  # never the secret key
        return f"CephRGW({str(self.workdir)!r}, {self.objectstore!r}, endpoint={self.endpoint_url!r})"

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.rgw_port}"

    # ------------------------------------------------------------ lifetime

    def __enter__(self) -> CephRGW:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> CephRGW:
        began = time.monotonic()
        try:
            self._write_conf()
            self._start_mon(timeout)
            self._start_osd(timeout)
            self._run("radosgw-admin", "user", "create", "--uid", "hubtest", "--display-name", "hub tests",
                      "--access-key", self.access_key, "--secret-key", self.secret_key, timeout=timeout)
            self.start_rgw(timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began
        return self

    def stop(self) -> None:
        """Kill every daemon by its recorded pid (rgw, osd, mon): the cluster is throw-away."""
        for name in ("rgw", "osd", "mon"):
            self._kill(name)

    def stop_rgw(self) -> None:
        """Stop only the S3 endpoint; the port then refuses connections until ``start_rgw()``.

        SIGKILL: radosgw takes ~9 s to shut down on SIGTERM, and a crash is what
        a mirror must survive anyway."""
        self._kill("rgw")

    def start_rgw(self, timeout: float = 60.0) -> None:
        """Start radosgw on the same port as before (a fresh free one the first time)."""
        if "rgw" in self._procs and self._procs["rgw"].poll() is None:
            raise CephError("radosgw is already running")
        self._spawn("rgw", ["radosgw", "-f", "-c", str(self.conf_path), "-n", _RGW_NAME])
        self._wait(lambda: self._rgw_answers(), "radosgw", timeout)

    # ------------------------------------------------------------ S3 helpers

    def client(self, **config):
        """A boto3 S3 client for this endpoint (path-style, SigV4)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.region,
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=Config(s3={"addressing_style": "path"}, signature_version="s3v4",
                          request_checksum_calculation="when_required",
                          response_checksum_validation="when_required", **config))

    def wait_for_blob(self, bucket: str, prefix: str, digest: str, timeout: float = 30) -> bool:
        """Whether a blob's object appears in the bucket within ``timeout`` (a mirror
        uploads it in the background once verified): the mirror's key layout."""
        from botocore.exceptions import ClientError

        s3, key = self.client(), f"{prefix}/blobs/sha256/{digest.split(':', 1)[1]}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                s3.head_object(Bucket=bucket, Key=key)
                return True
            except ClientError:
                time.sleep(0.1)
        return False

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def collect_garbage(self) -> None:
        """Free deleted objects' space now rather than at rgw's next garbage collection.

        memstore frees nothing before that, and a full OSD makes radosgw hold
        writes (no error: the client times out)."""
        self._run("radosgw-admin", "gc", "process", "--include-all", timeout=120)

    def pids(self) -> dict[str, int]:
        """Running daemons by name ("mon", "osd", "rgw")."""
        return {name: p.pid for name, p in self._procs.items() if p.poll() is None}

    # ------------------------------------------------------------ steps

    def _write_conf(self) -> None:
        w = self.workdir
        for d in ("run", "log", "crash", "mon", "osd", "rgw"):
            (w / d).mkdir(parents=True, exist_ok=True)
        self.fsid = str(uuid.uuid4())
        self.mon_port = _free_port_range(_MSGR_PORTS)
        self.rgw_port = self.rgw_port or free_port()
        if self.objectstore == "memstore":
            store = f"osd_objectstore = memstore\nmemstore_device_bytes = {self.memstore_bytes}\n"
        else:
            # a sparse file: only what is written takes disk space; small caches keep RSS modest
            store = ("osd_objectstore = bluestore\n"
                     f"bluestore_block_path = {w}/osd/block\nbluestore_block_create = true\n"
                     f"bluestore_block_size = {self.bluestore_bytes}\n"
                     "bluestore_cache_autotune = false\nbluestore_cache_size = 134217728\n"
                     "bluestore_block_db_create = false\nbluestore_block_wal_create = false\n")
        self.conf_path.write_text(f"""\
[global]
fsid = {self.fsid}
mon_host = [v2:127.0.0.1:{self.mon_port},v1:127.0.0.1:{self.mon_port + 1}]
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
ms_bind_ipv4 = true
ms_bind_ipv6 = false
ms_bind_port_min = {self.mon_port + 2}
ms_bind_port_max = {self.mon_port + _MSGR_PORTS - 1}
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
run_dir = {w}/run
admin_socket = {w}/run/$name.asok
pid_file = {w}/run/$name.pid
log_file = {w}/log/$name.log
crash_dir = {w}/crash
keyring = {w}/keyring
mon_data = {w}/mon/$id
osd_data = {w}/osd/$id
rgw_data = {w}/rgw/$id
# one OSD: every pool has one replica, few placement groups, no host-level spreading
osd_pool_default_size = 1
osd_pool_default_min_size = 1
mon_allow_pool_size_one = true
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
# rgw creates its pools one by one at first start: ~1 s each with the default interval
paxos_propose_interval = 0.1
# the disk may be mostly full: no health warnings about it
mon_data_avail_warn = 1
mon_data_avail_crit = 0
# a killed radosgw leaves watches on its control objects; until the OSD drops
# them (30 s by default) every bucket creation of the next radosgw waits for
# the dead one's answer.  Watchers ping every objecter tick.
osd_client_watch_timeout = 5
objecter_tick_interval = 1
{store}
[{_RGW_NAME}]
rgw_frontends = beast endpoint=127.0.0.1:{self.rgw_port}
# without it radosgw hangs at start logging "get_initial_auth_request returned -13"
ms_mon_client_mode = crc
rgw_thread_pool_size = 32
rgw_dynamic_resharding = false
rgw_enable_usage_log = false
# memstore frees deleted objects only after garbage collection: collect soon
rgw_gc_obj_min_wait = 5
rgw_gc_processor_period = 10
""")

    def _start_mon(self, timeout: float) -> None:
        keyring, monmap = self.workdir / "keyring", self.workdir / "monmap"
        self._run("ceph-authtool", "--create-keyring", str(keyring), "--gen-key", "-n", "mon.",
                  "--cap", "mon", "allow *", conf=False)
        self._run("monmaptool", "--create", "--clobber", "--fsid", self.fsid, "--addv", _MON_NAME,
                  f"[v2:127.0.0.1:{self.mon_port},v1:127.0.0.1:{self.mon_port + 1}]", str(monmap), conf=False)
        self._run("ceph-mon", "--mkfs", "-i", _MON_NAME, "--monmap", str(monmap), "--keyring", str(keyring))
        self._spawn("mon", ["ceph-mon", "-f", "-c", str(self.conf_path), "-i", _MON_NAME])
        self._wait(lambda: self._ceph_ok("mon", "stat"), "ceph-mon", timeout)

    def _start_osd(self, timeout: float) -> None:
        osd_uuid = str(uuid.uuid4())
        osd_id = self._run("ceph", "osd", "new", osd_uuid, timeout=timeout).stdout.strip()
        (self.workdir / "osd" / osd_id).mkdir(exist_ok=True)
        self._run("ceph-osd", "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid, timeout=timeout)
        self._spawn("osd", ["ceph-osd", "-f", "-c", str(self.conf_path), "-i", osd_id])
        self._wait(lambda: self._osd_up(), "ceph-osd", timeout)

    # ------------------------------------------------------------ plumbing

    def _run(self, *argv: str, conf: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess:
        full = [argv[0], *(["-c", str(self.conf_path)] if conf else []), *argv[1:]]
        try:
            r = subprocess.run(full, capture_output=True, text=True, timeout=timeout,
                               stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        except subprocess.TimeoutExpired:
            raise CephError(f"{argv[0]} {argv[1]}: no answer in {timeout}s") from None
        if r.returncode != 0:
            # argv may hold the S3 secret key (radosgw-admin user create): name the command only
            raise CephError(f"{argv[0]} {argv[1]} failed ({r.returncode}): {r.stderr[-2000:]}")
        return r

    def _spawn(self, name: str, argv: list[str]) -> None:
        log_path = self.workdir / "log" / f"{name}.out"
        with open(log_path, "ab") as log:
            self._procs[name] = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=str(self.workdir),
                preexec_fn=_die_with_parent, close_fds=True)

    def _kill(self, name: str) -> None:
        proc = self._procs.pop(name, None)
        if proc and proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def _wait(self, ready, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        name = {"ceph-mon": "mon", "ceph-osd": "osd", "radosgw": "rgw"}[what]
        while time.monotonic() < deadline:
            proc = self._procs.get(name)
            if proc is None or proc.poll() is not None:
                rc = proc.returncode if proc else None
                raise CephError(f"{what} exited with {rc}:\n{self._log_tail(name)}")
            if ready():
                return
            time.sleep(0.1)
        raise CephError(f"{what} not ready after {timeout}s:\n{self._log_tail(name)}")

    def _log_tail(self, name: str) -> str:
        daemon_log = {"mon": f"mon.{_MON_NAME}", "osd": "osd.0", "rgw": _RGW_NAME}[name]
        return _tail(self.workdir / "log" / f"{name}.out") + "\n" + _tail(self.workdir / "log" / f"{daemon_log}.log")

    def _ceph_ok(self, *args: str) -> bool:
        r = subprocess.run(["ceph", "-c", str(self.conf_path), "--connect-timeout", "5", *args],
                           capture_output=True, timeout=15, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        return r.returncode == 0

    def _osd_up(self) -> bool:
        r = subprocess.run(["ceph", "-c", str(self.conf_path), "--connect-timeout", "5", "osd", "stat",
                            "--format", "json"], capture_output=True, text=True, timeout=15,
                           stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        return r.returncode == 0 and '"num_up_osds":1' in r.stdout.replace(" ", "")

    def _rgw_answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint_url + "/", timeout=2) as resp:
                return resp.status == 200
        except urllib.error.HTTPError:
            return True  # any S3 error document: it is up
        except OSError:
            return False
