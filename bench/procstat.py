"""CPU time and memory of the processes under test, from /proc.

A server may be one process (mitmdump) or several (nginx: a master, its
workers, the cache manager), so everything here takes a list of pids;
``process_tree`` lists a process and its descendants.
"""

from __future__ import annotations

import os
from pathlib import Path


class ProcError(RuntimeError):
    pass


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its living descendants (Linux: /proc/<pid>/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:  # the task or the process went away meanwhile
                pass
    return out


def status_bytes(pid: int, field: str) -> int:
    """A kB field of /proc/<pid>/status (VmRSS, VmHWM...) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise ProcError(f"no {field} for pid {pid}")


def rss_bytes(pid: int) -> int:
    return status_bytes(pid, "VmRSS")


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes so far (those that have exited count 0)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def reset_peak_rss(pids: list[int]) -> None:
    """Start a new peak measurement (writing 5 to clear_refs resets VmHWM)."""
    for pid in pids:
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")
        except FileNotFoundError:  # exited meanwhile (nginx's cache loader does)
            pass


def peak_rss(pids: list[int]) -> int:
    """Sum of the processes' VmHWM since the last reset, in bytes; exited ones count 0.

    For several processes this is an upper bound of their peak together (the
    peaks need not coincide, and shared memory counts in each)."""
    total = 0
    for pid in pids:
        try:
            total += status_bytes(pid, "VmHWM")
        except FileNotFoundError:
            pass
    return total
