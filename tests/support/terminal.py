"""A command run in a pseudo-terminal, answering its prompts as a person at the keyboard would.

    result = in_terminal(["bash", "-c", "docker login host"], [("Username: ", "ann"), ("Password: ", pw)],
                         secrets=[pw], env=env, cwd=cwd)
    result.returncode, result.output    # output with every secret replaced by ***

Commands that ask for a password (``docker login``, ``htpasswd``, Python's
``getpass``) refuse to read it from a pipe or read it from the terminal itself,
so the command gets a terminal of its own as its controlling terminal.  A
secret answer is typed only once the terminal no longer echoes (the command
turned echo off for it), so it never shows in the output; the output is
scrubbed of every secret anyway before anyone sees it.
"""

from __future__ import annotations

import fcntl
import os
import select
import subprocess
import termios
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support.common import set_pdeathsig


class TerminalError(RuntimeError):
    pass


@dataclass(frozen=True)
class TerminalResult:
    returncode: int
    output: str


def _controlling_terminal() -> None:
    # runs in the child after start_new_session's setsid(): stdin is the terminal's slave side
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    set_pdeathsig()


def _echo_on(fd: int) -> bool:
    return bool(termios.tcgetattr(fd)[3] & termios.ECHO)


def in_terminal(argv: list[str], answers: list[tuple[str, str]], *, secrets: Sequence[str] = (),
                env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 60) -> TerminalResult:
    """Run ``argv`` on a new terminal; for each (prompt, answer) in order, wait for the prompt, type the answer."""
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env,
                                start_new_session=True, preexec_fn=_controlling_terminal)
        try:
            output = _converse(proc, master, slave, list(answers), set(secrets), time.monotonic() + timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        output += _drain(master)
    finally:
        os.close(slave)
        os.close(master)
    return TerminalResult(proc.returncode, _scrub(output, secrets))


def _converse(proc: subprocess.Popen, master: int, slave: int, answers: list[tuple[str, str]],
              secrets: set[str], deadline: float) -> str:
    output = ""
    seen = 0  # output before this offset has been answered already
    while time.monotonic() < deadline:
        if answers and answers[0][0] in output[seen:]:
            prompt, answer = answers[0]
            if answer in secrets and _echo_on(slave):
                time.sleep(0.02)  # the command has printed its prompt but not yet turned echo off
            else:
                os.write(master, answer.encode() + b"\n")
                seen = output.index(prompt, seen) + len(prompt)
                answers.pop(0)
                continue
        readable, _, _ = select.select([master], [], [], 0.05)
        if readable:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every process holding the terminal is gone
                chunk = b""
            output += chunk.decode(errors="replace")
        elif proc.poll() is not None:
            return output
    raise TerminalError(f"{proc.args[0]} still running after the timeout; output so far:\n"
                        f"{_scrub(output, secrets)[-2000:]}")


def _drain(master: int) -> str:
    data = b""
    while select.select([master], [], [], 0)[0]:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace")


def _scrub(text: str, secrets: Sequence[str] | set[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text
