"""Throttle what one local TCP port sends, with ``tc`` on ``lo`` (root only).

    with throttled_port(up_cdn_port, 50):   # the CDN's answers now leave at 50 MB/s
        ...

An htb class with the rate, and a u32 filter that sends the packets whose
*source* port is ``port`` into it: only that server's answers slow down
(requests to it and all other loopback traffic pass unclassified, at full
speed). MB = 10^6 bytes.

Other people run tests on this machine at the same time, so:

* only our own class and filter are ever removed, and they are ALWAYS removed
  on the way out (exceptions, Ctrl-C, SIGTERM: the two signals are held
  while tc is being changed, so an interruption cannot leave half a setup);
* if ``lo``'s root qdisc is the kernel's default (``noqueue``), we add an htb
  root with handle ``7a11:`` and delete it again when the last class under it
  is gone; if the root already is an htb qdisc (another throttle, ours or
  anybody's), our class goes under it and the root stays; any other root
  qdisc is someone else's setup and we refuse with ThrottleError;
* every throttle records itself in ``/run/hub-rewrite-throttle/`` (owner pid,
  class, filter priority); a throttle whose owner died without cleaning up
  (SIGKILL) is removed by the next one, so a stale filter never keeps slowing
  a port that somebody else's server gets later;
* changes are serialised between processes with ``flock`` on
  ``/run/lock/hub-rewrite-throttle.lock``.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

OUR_ROOT = "7a11"  # handle (hex major) of the root htb qdisc this module creates
STATE_DIR = Path("/run/hub-rewrite-throttle")
LOCK_PATH = Path("/run/lock/hub-rewrite-throttle.lock")
BURST_BYTES = 128 << 10  # two 64 KiB loopback segments: the rate holds from the first bytes on
MINORS = range(0x100, 0x1000)  # class minor numbers we pick from (hex in tc's syntax)


class ThrottleError(RuntimeError):
    pass


def _tc(*args: str, check: bool = True) -> str:
    try:
        p = subprocess.run(["tc", *args], capture_output=True, text=True, timeout=10)
    except FileNotFoundError:
        raise ThrottleError("tc not found (apt-get install iproute2)") from None
    if check and p.returncode != 0:
        raise ThrottleError(f"tc {' '.join(args)} failed: {p.stderr.strip() or p.stdout.strip()}")
    return p.stdout


@contextmanager
def _signals_held() -> Iterator[None]:
    """Ctrl-C / SIGTERM wait until tc is in a consistent state again."""
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextmanager
def _tc_lock() -> Iterator[None]:
    LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK_PATH, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _root_qdisc(dev: str) -> tuple[str, str]:
    """(kind, major handle in hex) of ``dev``'s root qdisc; ("noqueue", "0") by default."""
    m = re.match(r"qdisc (\S+) ([0-9a-f]+): root", _tc("qdisc", "show", "dev", dev, "root"))
    if not m:
        raise ThrottleError(f"cannot read the root qdisc of {dev}")
    return m.group(1), m.group(2)


def _classes(dev: str, major: str) -> set[int]:
    return {int(minor, 16) for minor in re.findall(rf"class htb {major}:([0-9a-f]+) ", _tc("class", "show", "dev", dev))}


def _filter_prios(dev: str, major: str) -> set[int]:
    return {int(p) for p in re.findall(r"\bpref (\d+) ", _tc("filter", "show", "dev", dev, "parent", f"{major}:"))}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(state: dict) -> None:
    """Take one throttle's filter and class away (whatever of them still exists), then its
    record, then our root qdisc if nothing is left under it."""
    dev, major = state["dev"], state["major"]
    _tc("filter", "del", "dev", dev, "parent", f"{major}:", "protocol", "ip", "prio", str(state["prio"]), check=False)
    _tc("class", "del", "dev", dev, "classid", f"{major}:{state['minor']:x}", check=False)
    (STATE_DIR / state["file"]).unlink(missing_ok=True)
    kind, root = _root_qdisc(dev)
    if kind == "htb" and root == OUR_ROOT and not _classes(dev, OUR_ROOT):
        _tc("qdisc", "del", "dev", dev, "root", "handle", f"{OUR_ROOT}:", "htb", check=False)


def _sweep_stale() -> None:
    """Remove the throttles whose owner process is gone."""
    if not STATE_DIR.is_dir():
        return
    for path in STATE_DIR.glob("*.json"):
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            path.unlink(missing_ok=True)
            continue
        if not _pid_alive(state["pid"]):
            _remove(state)


def _add(port: int, mbytes_per_s: float, dev: str) -> dict:
    kind, major = _root_qdisc(dev)
    if kind != "htb":
        if major != "0":
            raise ThrottleError(f"{dev} has a root qdisc {kind} {major}: set up by someone else; "
                                f"not touching it (remove it, or throttle with an htb root)")
        _tc("qdisc", "add", "dev", dev, "root", "handle", f"{OUR_ROOT}:", "htb")
        major = OUR_ROOT
    used_minors, used_prios = _classes(dev, major), _filter_prios(dev, major)
    minor = next((m for m in MINORS if m not in used_minors), None)
    prio = next((p for p in range(minor, 0xFFFF) if p not in used_prios), None) if minor else None
    if minor is None or prio is None:
        raise ThrottleError(f"no free htb class or filter priority under {major}: on {dev}")
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    state = {"pid": os.getpid(), "dev": dev, "major": major, "minor": minor, "prio": prio, "port": port,
             "file": f"{major}-{minor:x}.json"}
    (STATE_DIR / state["file"]).write_text(json.dumps(state))  # first: a crash below still gets swept
    try:
        rate = f"{int(mbytes_per_s * 8e6)}bit"
        _tc("class", "add", "dev", dev, "parent", f"{major}:", "classid", f"{major}:{minor:x}", "htb",
            "rate", rate, "ceil", rate, "burst", str(BURST_BYTES), "cburst", str(BURST_BYTES),
            "quantum", "65536", "mtu", "65536")
        _tc("filter", "add", "dev", dev, "parent", f"{major}:", "protocol", "ip", "prio", str(prio), "u32",
            "match", "ip", "sport", str(port), "0xffff", "flowid", f"{major}:{minor:x}")
    except ThrottleError:
        _remove(state)
        raise
    return state


@contextmanager
def throttled_port(port: int, mbytes_per_s: float, dev: str = "lo") -> Iterator[None]:
    """Inside the block, TCP segments sent from ``port`` on ``dev`` leave at ``mbytes_per_s``
    (10^6 bytes per second)."""
    if not 0 < port < 65536 or not mbytes_per_s > 0:
        raise ValueError(f"need a TCP port and a positive rate, not port={port!r}, rate={mbytes_per_s!r}")
    if shutil.which("tc") is None:
        raise ThrottleError("tc not found (apt-get install iproute2)")
    state = None
    try:
        with _signals_held(), _tc_lock():
            _sweep_stale()
            state = _add(port, mbytes_per_s, dev)
        # a Ctrl-C held during the setup arrives here, with state set: it is cleaned up below
        yield
    finally:
        if state is not None:
            with _signals_held(), _tc_lock():
                _remove(state)


def throttles_active(port: int, dev: str = "lo") -> bool:
    """Whether any tc filter on ``dev`` still matches source port ``port`` (for tests)."""
    out = _tc("filter", "show", "dev", dev)
    return f"match {port:04x}0000/ffff0000 at 20" in out
