"""What every benchmark script shares around its measurements: progress logging,
the machine facts and exact command a report names, the smoke-scale switch,
and ``run_benchmark`` (clean-up on failure, Ctrl-C and SIGTERM; ``--json``).

The benchmarks are scripts run from the repository root
(``PYTHONPATH=. .venv/bin/python bench/<script>.py``); Python puts ``bench/`` on
``sys.path`` for them, so they import this module as ``harness``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
SCALE_ENV = "HUB_BENCH_SCALE"
SCALES = ("full", "smoke")


class BenchError(RuntimeError):
    """A measurement that cannot be trusted (a failed pull, a wrong byte count...)."""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


# ---------------------------------------------------------------- scale


def apply_scale(ap: argparse.ArgumentParser, args: argparse.Namespace, smoke: dict[str, Any]) -> str:
    """Apply ``HUB_BENCH_SCALE``: unset or ``full`` keeps ``args``; ``smoke`` overwrites
    them with ``smoke`` (attribute -> value), whatever the command line said, so a
    README command runs in seconds in a test. Returns the scale's name."""
    scale = os.environ.get(SCALE_ENV, "").strip().lower() or "full"
    if scale not in SCALES:
        ap.error(f"{SCALE_ENV}={os.environ[SCALE_ENV]!r}: expected one of {', '.join(SCALES)}")
    if scale == "smoke":
        changes = ", ".join(f"--{k.replace('_', '-')} {getattr(args, k)} -> {v}" for k, v in smoke.items())
        for key, value in smoke.items():
            setattr(args, key, value)
        log(f"{SCALE_ENV}=smoke: {changes}")
    return scale


def smoke_banner(result: dict[str, Any]) -> list[str]:
    """The report's first line on a smoke run: its figures measure nothing."""
    if result.get("scale") != "smoke":
        return []
    return [f"**SMOKE RUN** ({SCALE_ENV}=smoke: sizes, repetitions and durations shrunk to check that the "
            f"benchmark runs; the figures below are not measurements)\n"]


# ---------------------------------------------------------------- options and report lines they share


def upstream_argument(ap: argparse.ArgumentParser) -> None:
    """``--plain-upstream``: the fake Hub in plain HTTP instead of HTTPS (Docker Hub's shape, the default)."""
    ap.add_argument("--plain-upstream", action="store_true",
                    help="run the fake Docker Hub on plain HTTP (default: HTTPS on the edge, the token "
                         "service and the CDN, like Docker Hub)")


def upstream_options(args: argparse.Namespace, result: dict[str, Any]) -> dict[str, Any]:
    """The Upstream(...) keyword arguments ``--plain-upstream`` asks for; notes the transport in ``result``."""
    plain = bool(getattr(args, "plain_upstream", False))
    result["upstream_transport"] = "http" if plain else "https"
    return {"tls": not plain}


def transport_note(result: dict[str, Any]) -> str:
    """A report's words for the fake Hub's transport."""
    if result.get("upstream_transport") == "http":
        return "fake Docker Hub on plain HTTP (--plain-upstream)"
    return ("fake Docker Hub on HTTPS like Docker Hub (edge and token service HTTP/1.1, CDN behind nginx "
            "with h2/http1.1; the mirror trusts the test CA by ssl_verify_upstream_trusted_ca)")


def blob_arguments(ap: argparse.ArgumentParser, reps: int, reps_help: str) -> None:
    """The options of the benchmarks that pull one big layer."""
    ap.add_argument("--size-mib", type=int, default=1024, help="layer size in MiB (default 1024)")
    ap.add_argument("--reps", type=int, default=reps, help=f"{reps_help} (default {reps})")
    ap.add_argument("--json", type=Path, help="write raw numbers to this file")
    ap.add_argument("--strict", action="store_true", help="also exit 2 when a target is missed")
    ap.add_argument("--keep-workdir", action="store_true", help="keep the temp dir (logs; blob data deleted)")
    upstream_argument(ap)


def curl_blob_command_line(doc: str, reps: int, reps_help: str, argv: list[str] | None,
                           units: dict[str, str]) -> tuple[argparse.Namespace, dict[str, Any]]:
    """A benchmark pulling one big layer with curl: its checked (and smoke-scaled) command line, and
    the head of its result (the command, the machine, the scale, the sizes, ``units``)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    blob_arguments(ap, reps, reps_help)
    args = ap.parse_args(argv)
    if args.size_mib < 1 or args.reps < 1:
        ap.error("--size-mib and --reps must be at least 1")
    if shutil.which("curl") is None:
        ap.error("curl is required")
    scale = apply_scale(ap, args, {"size_mib": 16, "reps": 1})
    return args, {"command": exact_command(), "machine": machine_facts(), "scale": scale,
                  "size_mib": args.size_mib, "reps": args.reps, "units": units}


def report_footer(result: dict[str, Any], tools: list[str], load_note: str = "") -> list[str]:
    """A report's last lines: the machine and the ``tools`` measured with, the load around
    the run, the exact command, the wall time."""
    facts = result["machine"]
    return ([f"Upstream: {transport_note(result)}."] if "upstream_transport" in result else []) + [
            f"Machine: nproc {facts['nproc']}, {facts['cpu']}, {facts['mem_total']} RAM, Linux {facts['kernel']}; "
            f"Python {facts['python']}, mitmproxy {facts['mitmproxy']}, {', '.join(tools)}; repo {facts['git']}",
            f"Load average (1/5/15 min): {result['loadavg_start']} at start, {result['loadavg_end']} at end"
            f"{' ' + load_note if load_note else ''}.",
            f"Command: `{result['command']}`",
            f"Wall time: {result['wall_seconds']:.0f}s"]


# ---------------------------------------------------------------- facts for the report


def machine_facts() -> dict[str, Any]:
    import mitmproxy.version

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) // 1024} MiB"
    except OSError:
        pass
    curl = subprocess.run(["curl", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "mem_total": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "mitmproxy": mitmproxy.version.VERSION,
        "curl": " ".join(curl.split()[:2]),
        "git": git_state(),
    }


def tool_version(*argv: str) -> str:
    """First line of a tool's version output, or "?"."""
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "?"
    return ((p.stdout or p.stderr).strip().splitlines() or ["?"])[0]


def git_state() -> str:
    """HEAD commit, plus "+dirty" when hubrewrite/ or addons/ differ from it (what was measured)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "hubrewrite", "addons", "mitm.conf"],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return (head or "?") + ("+dirty" if dirty else "")


def exact_command() -> str:
    argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in ("PYTHONPATH", SCALE_ENV) if os.environ.get(k)]
    return " ".join([*env, shlex.join(argv)])


# ---------------------------------------------------------------- the frame around a run


def _sigterm(signum, frame):  # turn SIGTERM into the same clean unwind as Ctrl-C
    raise KeyboardInterrupt


def run_benchmark(args, result: dict[str, Any], started: float, workdir: Path,
                  measure: Callable[[Any, Path, dict[str, Any]], None], finish: Callable[[dict[str, Any]], int],
                  log_paths: Callable[[Path], list[Path]], kept_data_patterns: tuple[str, ...] = ()) -> int:
    """The part of every benchmark's main() around its measurements.

    measure(args, workdir, result) runs the benchmark; finish(result) reports
    and returns the exit code. A failed pull (BenchError) prints the tails of
    log_paths(workdir); Ctrl-C or SIGTERM exits 130; either way the temporary
    directory goes (or only its blob data, with --keep-workdir) and --json is
    written.
    """
    signal.signal(signal.SIGTERM, _sigterm)
    rc = 1
    try:
        result["loadavg_start"] = loadavg()
        measure(args, workdir, result)
        result["loadavg_end"] = loadavg()
        result["wall_seconds"] = time.monotonic() - started
        rc = finish(result)
    except BenchError as e:
        result["error"] = str(e)
        log(f"FAILED: {e}")
        for lp in log_paths(workdir):
            if lp.exists():
                log(f"--- {lp.relative_to(workdir)} (tail) ---\n" + lp.read_text(errors="replace")[-3000:])
    except KeyboardInterrupt:
        result["error"] = "interrupted"
        log("interrupted; cleaning up")
        rc = 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # do not interrupt the cleanup itself
        if args.keep_workdir:
            for pattern in kept_data_patterns:
                for f in workdir.glob(pattern):
                    if f.is_file():
                        f.unlink(missing_ok=True)
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        result.setdefault("wall_seconds", time.monotonic() - started)
        result["exit_code"] = rc
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return rc


def curl_blob_main(doc: str, argv: list[str] | None, reps: tuple[int, str], units: dict[str, str], prefix: str,
                   measure: Callable[[Any, Path, dict[str, Any]], None], report: Callable[[Any, dict[str, Any]], bool],
                   log_paths: Callable[[Path], list[Path]], kept_data_patterns: tuple[str, ...]) -> int:
    """main() of a benchmark pulling one big layer with curl: its command line (``reps``: the default
    and what one is), its measurements in a fresh work directory, its report (exit 2 with
    --strict when a target is missed)."""
    args, result = curl_blob_command_line(doc, reps[0], reps[1], argv, units)
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix=prefix))

    def finish(result: dict[str, Any]) -> int:
        return 0 if report(args, result) or not args.strict else 2

    return run_benchmark(args, result, started, workdir, measure, finish, log_paths, kept_data_patterns)
